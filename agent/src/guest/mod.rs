//! The lab guest: a small program Ferry generates and runs in its VMs, whose memory
//! and disk writes are self-checking, so a migration's correctness is proven from inside.

pub mod abi;
pub mod corpus;
pub mod layout;
pub mod program;
