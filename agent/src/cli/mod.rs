//! The `ferry` command line: the VMM process and the client commands.

pub mod agent;
pub mod client;
pub mod migrate;
pub mod plan;
pub mod signals;
pub mod vmm;
