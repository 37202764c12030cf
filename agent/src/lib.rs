//! Ferry: live migration of KVM virtual machines.

pub mod guest;
pub mod vmm;
