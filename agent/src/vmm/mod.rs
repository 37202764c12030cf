//! `ferry vmm`: one KVM virtual machine in its own process.

pub mod blob;
pub mod block;
pub mod boot;
pub mod capabilities;
pub mod config;
pub mod dirty;
pub mod disk_check;
pub mod launch;
pub mod machine;
pub mod prealloc;
pub mod prefault;
pub mod snapshot;
pub mod state;
pub mod uffd;
