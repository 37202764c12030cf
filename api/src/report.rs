//! What an operation leaves behind: its report, and the decisions that shaped it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Codec, Mode, StorageMode};

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
}
named!(
    Outcome,
    "outcome",
    [
        Completed = "completed",
        Failed = "failed",
        Cancelled = "cancelled"
    ]
);

/// What every report starts with: how it ended, why not (if so), how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportCore {
    pub outcome: Outcome,
    pub error: Option<String>,
    pub total_ms: f64,
    /// The guest's pause for the handover: pause to resume, milliseconds.
    pub switchover_ms: Option<f64>,
}

/// A setting that was set or changed, when (since the operation began), to what,
/// and why: the one record the VMM, the driver and the simulator all keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub t_ms: f64,
    pub setting: String,
    pub value: String,
    pub reason: String,
}

/// A live migration's report, as the VMM that sent the VM writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    #[serde(flatten)]
    pub core: ReportCore,
    pub mode: Mode,
    pub to: String,
    /// The stream was TLS (both ends authenticated); false: plain TCP (`--insecure`).
    #[serde(default)]
    pub tls: bool,
    /// Per vCPU, last heartbeat on the source to first on the destination; the largest.
    pub downtime_ms: Option<f64>,
    pub max_heartbeat_gap_ms: f64,
    pub rounds: u32,
    pub bytes_on_wire: u64,
    /// Of `bytes_on_wire`, those that carried disk blocks.
    #[serde(default)]
    pub disk_bytes_on_wire: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub codec: Codec,
    pub compression_ratio: f64,
    pub throttle_max_pct: u32,
    /// Source and destination memory digests agree (None: not checked).
    pub memory_verified: Option<bool>,
    pub guest_integrity_errors: u64,
    pub decisions: Vec<Decision>,
    /// Post-copy only: faults the guest took on pages still on the source, how long
    /// each waited (p50, p99), the vCPUs' total wait, and link recoveries.
    pub postcopy_faults: Option<u64>,
    pub fault_latency_p50_us: Option<u64>,
    pub fault_latency_p99_us: Option<u64>,
    pub vcpu_blocked_ms: Option<f64>,
    pub recoveries: u32,
    /// Disks that travelled: bytes sent,
    pub disk_bytes_copied: Option<u64>,
    /// and of those, guest writes the active mirror sent as they happened.
    pub disk_bytes_mirrored: Option<u64>,
}

/// One point of what the eBPF probes saw of the guest while it migrated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSample {
    /// Since the driver started following the VM.
    pub at_ms: f64,
    /// None when nothing could see the guest's writes.
    pub dirty_pages_per_sec: Option<f64>,
    /// The tracepoint the dirty rate came from.
    pub dirty_source: Option<String>,
    pub working_set_pages: Option<u64>,
    pub exits_per_sec: f64,
    pub disk_read_bytes_per_sec: f64,
    pub disk_write_bytes_per_sec: f64,
}

/// The prediction a driven migration is held to, and what it rested on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionRecord {
    /// Since the migration began.
    pub prediction_at_ms: f64,
    /// None: the policy did not expect the migration to finish within its limits.
    pub predicted_total_ms: Option<f64>,
    pub predicted_downtime_ms: Option<f64>,
    /// The policy's observation the prediction came from, in the policy's own terms
    /// (as `ferry plan --json` shows it under `observation`): a record for people and
    /// for comparing policies, not a contract of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_basis: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A migration a driver ran (`ferry migrate`): the backend's report, and what the
/// driver adds to it — the policy, each change it made and why, its prediction, and
/// what the probes saw of the guest meanwhile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriverReport {
    #[serde(flatten)]
    pub migration: MigrationReport,
    pub policy: String,
    /// Changes the policy made while it ran (none under `static`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_steps: Option<Vec<Decision>>,
    #[serde(flatten)]
    pub prediction: Option<PredictionRecord>,
    pub probe_signals: Vec<ProbeSample>,
    /// Why the probes could not follow the guest (None: they did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_signals_error: Option<String>,
}

/// One disk a storage migration moved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MovedDisk {
    pub id: String,
    pub from: PathBuf,
    pub to: PathBuf,
    /// The mode this disk's copy ended in, and (auto mode) why.
    pub mode: StorageMode,
    pub mode_reason: Option<String>,
}

/// A storage migration's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageReport {
    #[serde(flatten)]
    pub core: ReportCore,
    pub disk_mode: StorageMode,
    pub disk_bytes_copied: u64,
    pub disk_rounds: u32,
    /// The copy matched its source block by block (blocks the guest wrote after the
    /// switch excepted).
    pub disk_verified: Option<bool>,
    pub disk_integrity_errors: u64,
    /// Active mode: the p99 of what mirroring added to a guest write.
    pub guest_write_latency_added_us_p99: Option<u64>,
    /// Copying and switching over, without the check against the old image.
    pub copy_ms: f64,
    /// How long the write throttle held the guest's disk writes back, in total.
    pub guest_writes_delayed_ms: f64,
    /// Bytes the guest wrote to its disks while they moved (each write counted).
    pub guest_bytes_written: u64,
    pub config_rewritten: Option<PathBuf>,
    pub disks: Vec<MovedDisk>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_keeps_its_core_at_the_top_level() {
        let r = StorageReport {
            core: ReportCore {
                outcome: Outcome::Completed,
                error: None,
                total_ms: 12.5,
                switchover_ms: Some(1.0),
            },
            disk_mode: StorageMode::Active,
            disk_bytes_copied: 1,
            disk_rounds: 2,
            disk_verified: Some(true),
            disk_integrity_errors: 0,
            guest_write_latency_added_us_p99: None,
            copy_ms: 3.0,
            guest_writes_delayed_ms: 0.0,
            guest_bytes_written: 0,
            config_rewritten: None,
            disks: Vec::new(),
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["outcome"], "completed");
        assert_eq!(v["total_ms"], 12.5);
        assert_eq!(v["disk_mode"], "active");
        let back: StorageReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        assert!("sideways".parse::<StorageMode>().is_err());
    }
}
