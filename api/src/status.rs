//! What a VMM says of itself and its guest: `status`, and the answers of the requests
//! that measure or save the guest.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::progress::{CodecSample, MigrationProgress, PostcopyStatus, StorageProgress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    Running,
    Paused,
    Crashed,
    /// Handed over to a migration destination: paused for good.
    Migrated,
}
named!(
    RunState,
    "run state",
    [
        Running = "running",
        Paused = "paused",
        Crashed = "crashed",
        Migrated = "migrated"
    ]
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuStatus {
    pub heartbeats: u64,
    pub pages_written: u64,
    pub pages_written_per_sec: f64,
    pub max_heartbeat_gap_ms: f64,
    pub last_heartbeat_ms_ago: Option<f64>,
}

/// Where the time went when the VMM was restored from a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreTimings {
    pub disks_ms: f64,
    /// VM, memory mapping, vCPUs and CPUID.
    pub vm_create_ms: f64,
    /// vCPU, irqchip and clock state.
    pub state_restore_ms: f64,
    pub memory_load_ms: f64,
}

/// The VM and its guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineStatus {
    pub name: String,
    pub state: RunState,
    pub pid: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// How dirty pages are tracked: `bitmap` or `ring`.
    pub dirty_tracking: String,
    pub uptime_ms: u64,
    pub heartbeats: u64,
    pub guest_pages_written: u64,
    pub pages_written_per_sec: f64,
    pub guest_integrity_errors: u64,
    pub disk_integrity_errors: u64,
    pub disk_writes: u64,
    pub disk_reads: u64,
    pub max_heartbeat_gap_ms: f64,
    /// Host CLOCK_MONOTONIC (ns) of the first heartbeat this process received, so a
    /// caller can measure start-up from its own clock.
    pub first_heartbeat_monotonic_ns: Option<u64>,
    /// Present when this process was restored from a snapshot.
    pub restore: Option<RestoreTimings>,
    /// A `dirty-sample` holds the dirty log now.
    pub dirty_sample_running: bool,
    pub crash: Option<String>,
    /// Why the vCPUs stopped on their own with a guest write held (a disk's file
    /// system full): `resume` retries it once there is room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    pub per_vcpu: Vec<VcpuStatus>,
}

/// `status` of a VMM serving a VM: the machine's, and what moves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    #[serde(flatten)]
    pub machine: MachineStatus,
    /// The current or last outgoing migration.
    pub migration: Option<MigrationProgress>,
    /// An incoming post-copy (this process is its destination).
    pub incoming_postcopy: Option<PostcopyStatus>,
    /// The current or last storage migration (`report` set once it ended).
    pub storage_migration: Option<StorageProgress>,
}

/// A destination's incoming port, while no VM has arrived.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PortCounters {
    /// Connections closed without a migration: not the protocol, too slow to say
    /// hello, the wrong session, too many waiting.
    pub rejected_connections: u64,
    /// Migrations that began and failed before the guest ran here.
    pub failed_migrations: u64,
    /// Why the last of either was refused.
    pub last_rejection: Option<String>,
    /// A migration is arriving now.
    #[serde(default)]
    pub receiving: bool,
}

/// `status` of a destination before its VM has arrived. (Strict, so that a VM's status
/// that does not read as [`VmStatus`] is an error, not a destination.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingStatus {
    /// Always `incoming`.
    pub state: String,
    pub pid: u32,
    pub incoming: Option<PortCounters>,
    /// The address the port listens on (its port chosen by the system when it was
    /// asked for port 0).
    #[serde(default)]
    pub listening: Option<String>,
}

/// `status`'s answer: a VM, or a destination still waiting for one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Status {
    Vm(Box<VmStatus>),
    Incoming(IncomingStatus),
}

impl Status {
    pub fn vm(&self) -> Option<&VmStatus> {
        match self {
            Status::Vm(v) => Some(v),
            Status::Incoming(_) => None,
        }
    }
}

/// `verify`: the guest re-checked every page and disk block it wrote.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub pages_checked: u64,
    pub memory_errors: u64,
    pub blocks_checked: u64,
    pub disk_errors: u64,
    pub elapsed_ms: u64,
}

/// `dirty-sample`: the dirty log's count over a while, beside the guest's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirtySample {
    /// How dirty pages are tracked: `bitmap` or `ring`.
    pub mode: String,
    pub elapsed_ms: f64,
    /// From turning logging on to turning it off: what an outside observer of write
    /// faults (the eBPF probes) saw the log on for.
    pub logging_ms: f64,
    pub dirty_pages: u64,
    pub dirty_pages_in_working_set: u64,
    pub guest_pages_written: u64,
    /// Cost of the final harvest: reading the log, then re-arming it.
    pub fetch_ms: f64,
    pub clear_ms: f64,
    /// Why it ended before its duration (None: it ran its whole duration).
    pub ended_early: Option<String>,
}

/// `snapshot`: where it went and what the pause cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub path: PathBuf,
    pub pause_ms: f64,
    pub memory_bytes: u64,
    pub memory_bytes_written: u64,
    pub disk_bytes_copied: u64,
    pub state_bytes: u64,
    /// Time to read the VM's CPU, irqchip and clock state while paused.
    pub state_save_ms: f64,
    /// The guest's own counters at the snapshot's moment.
    pub heartbeats: u64,
    pub guest_pages_written: u64,
    pub disk_writes: u64,
}

/// `codec-sample`: each codec on a sample of the VM's pages, and the share of its
/// memory that is zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodecSamples {
    pub codec_samples: Vec<CodecSample>,
    pub zero_fraction: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_destination_and_a_vm_are_told_apart() {
        let s: Status = serde_json::from_str(
            r#"{"state":"incoming","pid":7,"incoming":{"rejected_connections":2,
                "failed_migrations":0,"last_rejection":null}}"#,
        )
        .unwrap();
        assert!(s.vm().is_none());
        let Status::Incoming(i) = s else {
            unreachable!()
        };
        assert_eq!(i.incoming.unwrap().rejected_connections, 2);
        // A VM's status that does not read as one is refused, not taken for a
        // waiting destination.
        let broken = r#"{"state":"running","pid":7,"name":"x","vcpus":"two"}"#;
        assert!(serde_json::from_str::<Status>(broken).is_err());
    }
}
