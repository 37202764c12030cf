//! How far an operation has got, as `status` shows it while it runs.

use serde::{Deserialize, Serialize};

use crate::Codec;
use crate::StorageMode;
use crate::report::{MigrationReport, StorageReport};

/// Where a live migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Setup,
    Precopy,
    Switchover,
    /// The guest runs on the destination; its missing pages are being sent.
    Postcopy,
    /// Post-copy's link stayed down past the recovery window: `ferry migrate --resume`.
    PostcopyPaused,
    Completed,
    Failed,
    Cancelled,
    InDoubt,
}

named!(
    Phase,
    "migration phase",
    [
        Setup = "setup",
        Precopy = "precopy",
        Switchover = "switchover",
        Postcopy = "postcopy",
        PostcopyPaused = "postcopy-paused",
        Completed = "completed",
        Failed = "failed",
        Cancelled = "cancelled",
        InDoubt = "in-doubt",
    ]
);

impl Phase {
    /// The guest already runs on the destination: there is no way back.
    pub fn is_postcopy(self) -> bool {
        matches!(self, Phase::Postcopy | Phase::PostcopyPaused)
    }

    /// The migration is over: completed, failed or cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }
}

/// A codec's ratio and speed, measured on a sample of the VM's own pages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CodecSample {
    pub codec: Codec,
    /// Uncompressed bytes over encoded bytes (pages stored raw count as 1.0).
    pub ratio: f64,
    /// Uncompressed bytes per second one thread compresses.
    pub compress_bytes_per_sec: f64,
}

/// The guest's dirty rate over short windows, measured while the first pass runs
/// (each window from a freshly armed dirty log).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DirtyWindows {
    pub windows: u32,
    /// Their mean length, and the pages dirtied in one on average.
    pub window_ms: f64,
    pub pages_per_window: f64,
    /// From logging's start to the last window's end, and the distinct pages dirtied
    /// meanwhile.
    pub since_ms: f64,
    pub distinct_pages: u64,
    /// What re-arming the log took on average: a round's harvest costs about as much.
    pub rearm_ms: f64,
}

/// An outgoing live migration while it runs, and its report at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub phase: Phase,
    pub to: String,
    pub round: u32,
    pub elapsed_ms: u64,
    pub remaining_dirty_pages: u64,
    pub dirty_pages_last_round: u64,
    pub dirty_pages_per_sec: f64,
    /// The latest round's fixed cost beyond sending its pages, milliseconds.
    pub round_overhead_ms: f64,
    /// The stream's round trip with nothing queued (the least measured; None: not yet).
    pub idle_rtt_ms: Option<f64>,
    /// Disks that travel: the destination's last sync of its copies at a round's end.
    pub dst_disk_sync_ms: Option<f64>,
    /// Disks that travel: the destination's datastore, timed when it created the
    /// copies: a one-block rewrite synced whole, milliseconds, and the rate it wrote
    /// and synced a few MiB at, bytes/s (None: not timed).
    pub dst_flush_ms: Option<f64>,
    pub dst_write_bytes_per_sec: Option<f64>,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub bytes_on_wire: u64,
    /// Of `bytes_on_wire`, those that carried disk blocks (the rest carried memory).
    #[serde(default)]
    pub disk_bytes_on_wire: u64,
    pub bandwidth_bytes_per_sec: f64,
    pub codec: Codec,
    pub compression_ratio: f64,
    pub throttle_pct: u32,
    pub bandwidth_limit_bytes_per_sec: Option<u64>,
    pub max_downtime_ms: u64,
    /// Each codec's ratio and speed measured on a sample of this VM's pages.
    pub codec_samples: Vec<CodecSample>,
    /// Share of all memory found zero by the same sampling (None: not sampled yet).
    pub sampled_zero_fraction: Option<f64>,
    /// Post-copy: pages the destination still lacks, and link recoveries so far.
    pub postcopy_pages_left: Option<u64>,
    pub recoveries: u32,
    /// The link's round trip as TCP measures it, queues included; None before data.
    pub link_rtt_ms: Option<f64>,
    /// The destination's receive window held the stream back most of the time: the
    /// destination, not the link, is the bottleneck.
    pub peer_limited: bool,
    /// Disks that travel: disk bytes the guest dirties per second.
    pub disk_dirty_bytes_per_sec: Option<f64>,
    /// Disks that travel: disk bytes of the current pass still to send.
    pub disk_bytes_pending: Option<u64>,
    /// Disks that travel: their size, summed.
    pub disk_bytes_total: Option<u64>,
    /// Disks that travel: disk bytes over the wire bytes they took, lately,
    pub disk_compression_ratio: Option<f64>,
    /// and the same for blocks written since their first copy (they compress less).
    pub disk_written_compression_ratio: Option<f64>,
    /// Disks that travel: disk bytes per second the first copy moved end to end (a
    /// slow datastore shows here); None until it is done.
    pub disk_copy_bytes_per_sec: Option<f64>,
    /// Disks that travel: every disk byte the guest writes per second, rewrites of a
    /// block included (what an active mirror carries).
    pub disk_write_bytes_per_sec: Option<f64>,
    /// The first pass's short-window dirty rates.
    pub dirty_windows: Option<DirtyWindows>,
    pub report: Option<MigrationReport>,
}

impl MigrationProgress {
    /// A migration to `to` before anything moved: nothing counted, nothing measured,
    /// no codec, no cap, the default 300 ms downtime target.
    pub fn setup(to: &str) -> Self {
        Self {
            phase: Phase::Setup,
            to: to.to_owned(),
            round: 0,
            elapsed_ms: 0,
            remaining_dirty_pages: 0,
            dirty_pages_last_round: 0,
            dirty_pages_per_sec: 0.0,
            round_overhead_ms: 0.0,
            idle_rtt_ms: None,
            dst_disk_sync_ms: None,
            dst_flush_ms: None,
            dst_write_bytes_per_sec: None,
            pages_sent: 0,
            zero_pages: 0,
            bytes_on_wire: 0,
            disk_bytes_on_wire: 0,
            bandwidth_bytes_per_sec: 0.0,
            codec: Codec::None,
            compression_ratio: 1.0,
            throttle_pct: 0,
            bandwidth_limit_bytes_per_sec: None,
            max_downtime_ms: 300,
            codec_samples: Vec::new(),
            sampled_zero_fraction: None,
            postcopy_pages_left: None,
            recoveries: 0,
            link_rtt_ms: None,
            peer_limited: false,
            disk_dirty_bytes_per_sec: None,
            disk_bytes_pending: None,
            disk_bytes_total: None,
            disk_compression_ratio: None,
            disk_written_compression_ratio: None,
            disk_copy_bytes_per_sec: None,
            disk_write_bytes_per_sec: None,
            dirty_windows: None,
            report: None,
        }
    }

    /// Still running: no report yet.
    pub fn running(&self) -> bool {
        self.report.is_none()
    }
}

/// Where an incoming post-copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PostcopyPhase {
    Running,
    /// The link was lost; waiting for the source to come back.
    Recovering,
    /// The source did not come back in time: the vCPUs stopped.
    Lost,
    Completed,
}
named!(
    PostcopyPhase,
    "post-copy phase",
    [
        Running = "running",
        Recovering = "recovering",
        Lost = "lost",
        Completed = "completed"
    ]
);

/// An incoming post-copy, on its destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostcopyStatus {
    pub phase: PostcopyPhase,
    pub missing_pages: u64,
    pub faults: u64,
    pub recoveries: u32,
    pub error: Option<String>,
}

/// Where a storage migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoragePhase {
    Starting,
    Copying,
    Switchover,
    Verifying,
    Done,
}
named!(
    StoragePhase,
    "storage migration phase",
    [
        Starting = "starting",
        Copying = "copying",
        Switchover = "switchover",
        Verifying = "verifying",
        Done = "done",
    ]
);

/// A storage migration while it runs, and its report at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageProgress {
    pub phase: StoragePhase,
    pub disk: String,
    pub bytes_copied: u64,
    pub round: u32,
    pub remaining_blocks: u64,
    pub mode: StorageMode,
    pub report: Option<StorageReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_phase_says_in_text_what_it_says_on_the_wire() {
        let wire = |v: serde_json::Value| v.as_str().unwrap().to_owned();
        for p in Phase::ALL {
            assert_eq!(p.to_string(), wire(serde_json::to_value(p).unwrap()));
            assert_eq!(p.as_str().parse::<Phase>(), Ok(*p));
        }
        for p in PostcopyPhase::ALL {
            assert_eq!(p.to_string(), wire(serde_json::to_value(p).unwrap()));
        }
        for p in StoragePhase::ALL {
            assert_eq!(p.to_string(), wire(serde_json::to_value(p).unwrap()));
        }
        assert_eq!(serde_json::to_value(Phase::InDoubt).unwrap(), "in-doubt");
        assert!(serde_json::from_str::<Phase>("\"sideways\"").is_err());
    }
}
