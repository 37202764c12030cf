//! The `ferry` command line: the VMM process and the client commands.

pub mod client;
pub mod plan;
pub mod signals;
pub mod steer;
pub mod vmm;
