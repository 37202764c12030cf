//! Ferry: live migration of KVM virtual machines.

pub mod bitmap;
pub mod cli;
pub mod client;
pub mod clock;
pub mod control;
pub mod daemon;
pub mod driver;
pub mod failpoint;
pub mod guest;
pub mod migration;
pub mod pki;
pub mod policy;
pub mod probes;
pub mod sync;
pub mod telemetry;
pub mod vmm;
