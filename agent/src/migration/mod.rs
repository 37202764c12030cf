//! Live migration: the wire protocol and the page codecs it carries.

pub mod codec;
pub mod destination;
pub mod postcopy_dst;
pub mod postcopy_src;
pub mod protocol;
pub mod source;
