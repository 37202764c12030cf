//! The sending side of a pre-copy migration, run by the source VMM on a thread of its
//! own: handshake, config, a full pass over memory, rounds of dirty pages until the
//! predicted downtime fits the limit, then the two-phase switchover.
//!
//! Switchover: the source pauses, sends the last dirty pages, the device state and
//! `Complete`; the destination answers `Ready`. The source records the handover and
//! only then sends `Commit`; the destination resumes on `Commit` and answers
//! `Resumed`. Any failure before `Commit` resumes the VM here. After `Commit` this copy
//! never runs again: if `Resumed` does not come, the handover is "in doubt" and both
//! copies stay paused.

use std::io::Write;
use std::net::ToSocketAddrs;

use crate::migration::secure::{Conn, Transport};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::codec::{Codec, Compressor, Stored};
use super::disk_stream::DiskMirror;
use super::migratable::Migratable;
use super::protocol::{self, Hello, Message, PageBatchWriter, ProtocolError};
use super::wire::Wire;
use crate::bitmap::Bitmap;
use crate::guest::abi::PAGE_SIZE;
use crate::vmm::capabilities::Movable;
use crate::vmm::machine::RunState;
use crate::vmm::snapshot::is_zero;

mod bucket;
mod encode;
mod live;
mod precopy;
mod resolve;
mod stats;
mod switchover;
mod transport;

use self::{bucket::*, encode::*, stats::*, transport::*};
pub use encode::sample_pages;
pub(super) use encode::{Buffers, encode};
pub use live::{
    Live, Reasons, SetParamsError, Settings, SettingsChange, check_disk_write_limit, set_params,
};
pub(super) use precopy::MAX_SHRINKING_ROUNDS;
pub use precopy::converged;
pub use resolve::{ResolveError, resolve};
pub(super) use stats::{Stats, bandwidth, link_rate};
pub(super) use switchover::Switch;

pub use transport::dial;

const PAGE: usize = PAGE_SIZE as usize;
/// Pages per batch frame.
pub(super) const BATCH: usize = 256;
/// Batches sent with one set of settings (32 MiB at most).
const GROUP_BATCHES: usize = 32;
/// A send of few pages (the last rounds, the pause) is cut into at least this many
/// batches, each of at least `MIN_BATCH` pages: the link starts on the first while the
/// workers compress the rest. In one batch, the link would wait for all of it: 10 ms
/// of zstd:3 for 256 pages, a third of a pause on a 200 Mbit/s link.
pub(super) const MIN_SPLIT: usize = 4;
pub(super) const MIN_BATCH: usize = 32;

/// Pages per batch for a send of `pages` pages when a batch may hold `cap`.
fn batch_pages(pages: usize, cap: usize) -> usize {
    super::MECHANICS.batch_for(pages, cap)
}

#[derive(Debug, Clone)]
pub struct Params {
    pub to: String,
    pub report: Option<PathBuf>,
    /// Give up (the VM stays here) if not done by then.
    pub max_total: Option<Duration>,
    /// A silent peer is declared dead after this long.
    pub timeout: Duration,
    /// Compare memory digests after the handover.
    pub verify: bool,
    pub settings: Settings,
    pub mode: Mode,
    /// How long a broken post-copy link is retried before waiting for `--resume`.
    pub recover: Duration,
    /// Post-copy: send every page once first (while the guest runs), so only what it
    /// dirties meanwhile is fetched on demand.
    pub precopy_pass: bool,
    /// Send the disks along (the destination has no shared storage).
    pub copy_storage: bool,
    /// Why each initial setting is what it is (a policy's reasons); absent ones were
    /// set by the operator.
    pub reasons: Reasons,
    /// The destination's one-time ticket, proved in the `Hello` (empty: none).
    pub ticket: String,
    /// TLS (the host's certificate, the CA) or plain TCP; every connection of the
    /// migration (the stream, the fault channel, recoveries, a resolve) uses it.
    pub transport: Transport,
    /// The migration's W3C trace context, sent in the `Hello` (empty: none).
    pub traceparent: String,
}

pub use ferry_api::{Mode, Switchover};

pub use ferry_api::{Decision, MigrationProgress, MigrationReport, Outcome, Phase, ReportCore};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect to {to}: {source}")]
    Connect { to: String, source: std::io::Error },
    #[error("{0}; nothing was sent")]
    Handshake(#[from] crate::migration::secure::HandshakeError),
    #[error(
        "the stream's TLS failed ({0}): a record was altered on the way, or the peer broke the session"
    )]
    Tls(String),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("the destination refused: {0}")]
    Refused(String),
    #[error("the destination sent {0} where it should not")]
    Unexpected(&'static str),
    #[error("cancelled")]
    Cancelled,
    #[error("did not converge within --max-total-secs ({0} s); the VM stays on the source")]
    NotConverged(u64),
    #[error("the VM {0}")]
    Vm(String),
    #[error("{0}")]
    Pause(#[from] crate::vmm::machine::PauseError),
    #[error("saving device state: {0}")]
    State(#[from] crate::vmm::snapshot::SnapshotError),
    #[error("{0}")]
    Disk(#[from] crate::vmm::block::DiskError),
    #[error("dirty log: {0}")]
    Dirty(#[from] crate::vmm::dirty::DirtyError),
    /// Pre-copy: the destination, which answers at least every quarter of the
    /// timeout while the stream flows, said nothing for longer than the timeout.
    #[error("the destination said nothing for over {:.1} s", .0.as_secs_f64())]
    Silent(Duration),
    #[error(
        "the destination went away without a word (connection: {0}): its VMM stopped, or \
         its host or the path to it failed"
    )]
    Gone(std::io::Error),
    /// Not a failure: `start-postcopy` arrived; the pre-copy loop switches.
    #[error("switching to post-copy")]
    StartPostcopy,
}

impl MigrateError {
    /// The peer stayed silent for this long (a read or a write timed out after
    /// `timeout`, or the watch gave up on it).
    fn silence(&self, timeout: Duration) -> Option<Duration> {
        match self {
            MigrateError::Silent(d) => Some(*d),
            MigrateError::Protocol(ProtocolError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Some(timeout)
            }
            _ => None,
        }
    }
}

pub(super) struct Sender<'a> {
    /// The VM moved, and the state of its migration.
    pub(super) vm: &'a Migratable,
    /// What the VM can do for its migration; nothing else of it.
    pub(super) m: &'a dyn Movable,
    pub(super) params: &'a Params,
    pub(super) w: Wire,
    pub(super) r: Conn,
    pub(super) stats: Stats,
    pub(super) compressor: Compressor,
    pub(super) bufs: Buffers,
    bucket: Bucket,
    /// The settings as of the last batch.
    pub(super) settings: Settings,
    last_publish: Instant,
    /// Gives up on a destination that stops answering in pre-copy.
    pub(super) watchdog: super::watchdog::Watchdog,
    /// This migration's name on the wire: its id, and the destination's secret once
    /// its `HelloAck` came (every later connection of the migration carries both).
    pub(super) session: protocol::Session,
    /// The pages of the round being sent, and how many of them went out so far (a
    /// switch to post-copy mid-round sends the rest on demand).
    round_pages: Vec<u64>,
    sent_upto: usize,
    /// The disks' first copy: when, and at how many disk bytes, its rate began to be
    /// measured (see `first_copy_rate_so_far`).
    pub(super) copy_mark: Option<(Instant, u64)>,
    /// The destination has built the VM (`Prepared`): pausing no longer waits on it.
    dst_prepared: bool,
    /// The kernel's view of the connection, over a recent window.
    meter: super::link::Meter,
}

/// A migration's progress before anything moved.
pub fn starting(to: &str, settings: &Settings) -> MigrationProgress {
    MigrationProgress {
        codec: settings.codec,
        throttle_pct: settings.throttle_pct,
        bandwidth_limit_bytes_per_sec: settings.bandwidth_bytes_per_sec,
        max_downtime_ms: settings.max_downtime_ms,
        ..MigrationProgress::setup(to)
    }
}

/// Runs a migration to its end and returns its report (also kept in the machine's
/// status, and written to `params.report` if given).
/// Runs a migration over `conn` (from [`dial`]) to its end; returns the report.
pub fn run(vm: Arc<Migratable>, params: Params, conn: Conn) -> MigrationReport {
    let _log = crate::migration::log_span(&params.traceparent).entered();
    tracing::info!("migration to {} started", params.to);
    let m = vm.movable();
    let t0 = Instant::now();
    let mut progress = starting(&params.to, &params.settings);
    set_progress(&vm, &progress);
    *lock(&vm.live) = Some(Live::new(params.settings, &params.reasons));
    m.set_throttle(params.settings.throttle_pct);
    let mut switch = Switch::default();
    let (s, result) = migrate(&vm, (&params, conn), t0, &mut switch);
    let (outcome, phase, error) = match result {
        Ok(()) => (Outcome::Completed, Phase::Completed, None),
        Err(MigrateError::Cancelled) => (
            Outcome::Cancelled,
            Phase::Cancelled,
            Some("cancelled".into()),
        ),
        Err(e) if switch.committed => (
            Outcome::Failed,
            Phase::InDoubt,
            Some(format!(
                "handover in doubt: the destination was told to resume but did not confirm ({e}); both copies stay paused"
            )),
        ),
        Err(e) if e.silence(params.timeout).is_some() => (
            Outcome::Failed,
            Phase::Failed,
            Some(format!(
                "the destination did not answer within {:.1} s (the peer timeout, \
                 --timeout-secs{})",
                e.silence(params.timeout).unwrap_or_default().as_secs_f64(),
                if matches!(e, MigrateError::Silent(_))
                    && params.settings.bandwidth_bytes_per_sec.is_some()
                {
                    ", and the time a frame takes under the bandwidth cap"
                } else {
                    ""
                }
            )),
        ),
        Err(e) => (Outcome::Failed, Phase::Failed, Some(e.to_string())),
    };
    match &error {
        Some(e) => tracing::warn!("migration to {} {outcome}: {e}", params.to),
        None => tracing::info!("migration to {} {outcome}", params.to),
    }
    m.set_throttle(0);
    let live = lock(&vm.live)
        .take()
        .unwrap_or_else(|| Live::new(params.settings, &params.reasons));
    let report = MigrationReport {
        core: ReportCore {
            outcome,
            error,
            total_ms: ms(t0.elapsed()),
            switchover_ms: switch.switchover_ms,
        },
        mode: params.mode,
        to: params.to.clone(),
        tls: params.transport.is_tls(),
        downtime_ms: switch.downtime_ms,
        max_heartbeat_gap_ms: ms(m.max_heartbeat_gap()),
        rounds: s.round,
        bytes_on_wire: s.bytes_on_wire,
        disk_bytes_on_wire: s.disk_wire_bytes,
        pages_sent: s.pages_sent,
        zero_pages: s.zero_pages,
        codec: live.settings.codec,
        compression_ratio: ratio(&s),
        throttle_max_pct: live.throttle_max_pct,
        memory_verified: switch.memory_verified,
        guest_integrity_errors: m.guest_integrity_errors(),
        decisions: live.decisions,
        postcopy_faults: switch.postcopy.map(|f| f.faults),
        fault_latency_p50_us: switch.postcopy.map(|f| f.latency_p50_us),
        fault_latency_p99_us: switch.postcopy.map(|f| f.latency_p99_us),
        vcpu_blocked_ms: switch.postcopy.map(|f| f.blocked_us as f64 / 1e3),
        recoveries: switch.recoveries,
        disk_bytes_copied: params
            .copy_storage
            .then(|| s.disk_bytes + s.disk_mirrored.load(std::sync::atomic::Ordering::Relaxed)),
        disk_bytes_mirrored: params
            .copy_storage
            .then(|| s.disk_mirrored.load(std::sync::atomic::Ordering::Relaxed)),
    };
    if let Some(path) = &params.report
        && let Err(e) = std::fs::write(path, serde_json::to_vec_pretty(&report).unwrap_or_default())
    {
        tracing::warn!("cannot write migration report {}: {e}", path.display());
    }
    fill(&mut progress, &s, &live.settings);
    if let Some(p) = lock(&vm.progress).as_ref() {
        progress.codec_samples = p.codec_samples.clone();
        progress.sampled_zero_fraction = p.sampled_zero_fraction;
    }
    progress.phase = phase;
    progress.report = Some(report.clone());
    set_progress(&vm, &progress);
    report
}

pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub(super) use crate::sync::lock;

fn set_progress(vm: &Migratable, p: &MigrationProgress) {
    *lock(&vm.progress) = Some(p.clone());
}

/// Runs the migration; returns its counters and how it ended.
fn migrate(
    vm: &Migratable,
    (params, conn): (&Params, Conn),
    t0: Instant,
    switch: &mut Switch,
) -> (Stats, Result<(), MigrateError>) {
    let m = vm.movable();
    if m.state() != RunState::Running {
        let e = MigrateError::Vm(format!("is {:?}, not running", m.state()));
        return (new_stats(t0), Err(e));
    }
    let mut tx = match connect(vm, params, t0, conn) {
        Ok(tx) => tx,
        Err(e) => return (new_stats(t0), Err(e)),
    };
    let result = tx.precopy_and_switch(switch).map_err(|e| {
        if let Some(limit) = tx.watchdog.fired() {
            MigrateError::Silent(limit)
        } else {
            tx.peer_reason(e)
        }
    });
    let _ = tx.m.stop_dirty_log();
    tx.disks_stop();
    match result {
        Ok(()) => (tx.stats, Ok(())),
        Err(e) => {
            if !switch.committed {
                let _ = tx.send(&Message::Abort {
                    reason: e.to_string(),
                });
                let _ = tx.w.flush();
                // Before the handover the VM is ours: take the disks back and run on.
                let _ = tx.m.disks().set_locked(true);
                if tx.m.state() == RunState::Paused {
                    let _ = tx.m.resume();
                }
                tx.close_after_abort();
            }
            (tx.stats, Err(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converges_only_when_it_fits_and_rounds_stop_paying() {
        let ferry = Switchover::Halving;
        // Does not fit: keep going.
        assert!(!converged(80.0, 50.0, (1000, 100_000), 1, ferry));
        // Fits, but the last round cut the set by 5x: one more round is cheap.
        assert!(!converged(40.0, 50.0, (20_000, 100_000), 1, ferry));
        // Fits and the set no longer halves: switch.
        assert!(converged(40.0, 50.0, (900, 1000), 4, ferry));
        // Fits by a wide margin: switch.
        assert!(converged(4.0, 50.0, (100, 1000), 4, ferry));
        // Still halving after many rounds: stop anyway.
        assert!(converged(
            40.0,
            50.0,
            (10, 100),
            MAX_SHRINKING_ROUNDS,
            ferry
        ));
        // A peer's rule: as soon as it fits, halving or not; never before.
        let peer = Switchover::WhenFits;
        assert!(converged(40.0, 50.0, (20_000, 100_000), 1, peer));
        assert!(!converged(80.0, 50.0, (1000, 100_000), 1, peer));
        assert_eq!("when-fits".parse::<Switchover>(), Ok(peer));
        assert!("sometimes".parse::<Switchover>().is_err());
    }

    #[test]
    fn small_sends_are_cut_so_the_link_starts_early() {
        // A pass: full batches.
        assert_eq!(batch_pages(65_536, BATCH), BATCH);
        // A pause of about a batch: four of them.
        assert_eq!(batch_pages(258, BATCH), 65);
        // Few pages: batches stay big enough to compress well.
        assert_eq!(batch_pages(40, BATCH), MIN_BATCH);
        // A bandwidth cap's smaller batches win.
        assert_eq!(batch_pages(65_536, 8), 8);
        assert_eq!(batch_pages(0, BATCH), MIN_BATCH);
    }
}
