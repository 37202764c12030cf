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
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::codec::{Codec, Compressor, Stored};
use super::disk_stream::DiskMirror;
use super::migratable::Migratable;
use super::protocol::{self, Hello, Message, PageBatchWriter, ProtocolError};
use super::wire::Wire;
use crate::guest::abi::PAGE_SIZE;
use crate::vmm::dirty::DirtyBitmap;
use crate::vmm::machine::{Machine, RunState};
use crate::vmm::snapshot::{MachineState, is_zero};

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
}

/// Setting name → why it has its value.
pub type Reasons = std::collections::BTreeMap<String, String>;

pub use ferry_api::{Mode, Switchover};

/// What can change while a migration runs (`set-params`; later the policy engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub codec: Codec,
    /// Bytes per second on the wire; None = unlimited.
    pub bandwidth: Option<u64>,
    /// Share of each vCPU's time taken away (0-99), as QEMU's auto-converge does.
    pub throttle_pct: u32,
    pub max_downtime_ms: u64,
    /// Disks that travel: a cap on the guest's disk writes, bytes per second (None:
    /// none), so the disks' rounds shrink when its writes would outrun the link.
    pub disk_write_limit: Option<u64>,
    /// How the switchover moment is judged once the pause fits `max_downtime_ms`.
    pub switchover: Switchover,
    /// Disks that travel: rounds only, or each guest write mirrored as well.
    pub disk_mirror: DiskMirror,
}

/// The settings in force and every change to them, shared between the migration
/// thread and `set-params`.
#[derive(Debug, Clone)]
pub struct Live {
    pub settings: Settings,
    pub decisions: Vec<Decision>,
    pub throttle_max_pct: u32,
    t0: Instant,
}

impl Live {
    pub fn new(settings: Settings, reasons: &Reasons) -> Self {
        let mut live = Self {
            settings,
            decisions: Vec::new(),
            throttle_max_pct: settings.throttle_pct,
            t0: Instant::now(),
        };
        for (setting, value) in live.describe(&settings) {
            // Most migrations have no disks travelling (no cap is no news there) and
            // switch over by the VMM's own rule.
            if (setting == "disk_write_limit_mbps" && settings.disk_write_limit.is_none())
                || (setting == "switchover" && settings.switchover == Switchover::Halving)
                || (setting == "disk_mirror" && settings.disk_mirror == DiskMirror::Background)
            {
                continue;
            }
            let why = reasons
                .get(setting)
                .map_or("set by the operator (migrate)", String::as_str);
            live.record(setting, value, why);
        }
        live
    }

    fn describe(&self, s: &Settings) -> [(&'static str, String); 7] {
        [
            ("codec", s.codec.to_string()),
            (
                "bandwidth_mbit",
                s.bandwidth
                    .map(|b| (b * 8 / 1_000_000).to_string())
                    .unwrap_or_else(|| "unlimited".into()),
            ),
            ("throttle_pct", s.throttle_pct.to_string()),
            ("max_downtime_ms", s.max_downtime_ms.to_string()),
            (
                "disk_write_limit_mbps",
                s.disk_write_limit
                    .map(|b| format!("{:.1}", b as f64 / 1e6))
                    .unwrap_or_else(|| "unlimited".into()),
            ),
            ("switchover", s.switchover.to_string()),
            ("disk_mirror", s.disk_mirror.to_string()),
        ]
    }

    fn record(&mut self, setting: &str, value: String, reason: &str) {
        self.decisions.push(Decision {
            t_ms: self.t0.elapsed().as_millis() as f64,
            setting: setting.into(),
            value,
            reason: reason.into(),
        });
    }

    /// Applies new settings, recording each one that changed with its reason (or
    /// `default`).
    pub fn change(&mut self, new: Settings, reasons: &Reasons, default: &str) {
        let before = self.describe(&self.settings);
        let after = self.describe(&new);
        for ((setting, old), (_, value)) in before.into_iter().zip(after) {
            if old != value {
                let why = reasons.get(setting).map_or(default, String::as_str);
                self.record(setting, value, why);
            }
        }
        self.settings = new;
        self.throttle_max_pct = self.throttle_max_pct.max(new.throttle_pct);
    }
}

/// Token bucket for the bandwidth cap: at most 50 ms of burst, so any one-second
/// window stays within a few percent of the rate.
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: Option<u64>, bytes: usize) {
        let now = Instant::now();
        let Some(rate) = rate.map(|r| r.max(1) as f64) else {
            self.tokens = 0.0;
            self.last = now;
            return;
        };
        let burst = rate * 0.05;
        self.tokens = (self.tokens + (now - self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / rate));
        }
    }
}

pub use ferry_api::{Decision, MigrationProgress, MigrationReport, Outcome, Phase, ReportCore};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect to {to}: {source}")]
    Connect { to: String, source: std::io::Error },
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
    Machine(#[from] crate::vmm::machine::MachineError),
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

/// Counters of one migration.
pub(super) struct Stats {
    pub(super) t0: Instant,
    pub(super) pages_sent: u64,
    pub(super) zero_pages: u64,
    pub(super) raw_bytes: u64,
    pub(super) bytes_on_wire: u64,
    pub(super) send_time: Duration,
    /// Wall time of completed rounds, acknowledged end to end.
    pub(super) wall_send_time: Duration,
    /// Bytes of completed rounds.
    pub(super) acked_bytes: u64,
    pub(super) round: u32,
    pub(super) dirty_last: u64,
    pub(super) dirty_rate: f64,
    pub(super) remaining: u64,
    /// Disk bytes sent (`--copy-storage`).
    pub(super) disk_bytes: u64,
    /// Guest write bytes the active disk mirror sent as the guest wrote them (the
    /// guest's vCPUs count them here).
    pub(super) disk_mirrored: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// What the last round took beyond moving its bytes at the stream's rate: the
    /// acknowledgement's round trip, the dirty log's harvest. The guest dirties on
    /// meanwhile, so this bounds how small rounds can get.
    pub(super) round_overhead: Duration,
    /// What the kernel says of the connection (see `link::measure`); None until it
    /// has carried something.
    pub(super) tcp: Option<super::link::Measured>,
    /// `--copy-storage`: when the disks' dirty sets were last taken, and the rate the
    /// guest dirtied disk bytes at, from what it dirtied since then.
    pub(super) disk_round_at: Option<Instant>,
    pub(super) disk_dirty_rate: Option<f64>,
    /// Disk bytes of the current disk pass not sent yet.
    pub(super) disk_pending: u64,
    /// The travelling disks' size, summed.
    pub(super) disk_size: u64,
    /// Disk bytes per second of the disks' first copy, once done.
    pub(super) disk_copy_rate: Option<f64>,
    /// Every disk byte the guest writes per second, rewrites included (what an active
    /// mirror carries), over the same span as `disk_dirty_rate`.
    pub(super) disk_write_rate: Option<f64>,
    /// The disks' first copy: its wire bytes, time spent writing them, and wall time.
    /// The stream's rate for pages leaves it out: a destination writing its disk
    /// copies slower than the link carries holds that phase back, not the pages'.
    pub(super) disk_copy: (u64, Duration, Duration),
    /// What the disk bytes sent took on the wire (disk blocks compress unlike pages:
    /// larger runs, zero runs elided).
    pub(super) disk_wire_bytes: u64,
    /// Disk bytes and their wire bytes over the last few MiB sent, for predictions
    /// under the codec in force.
    pub(super) disk_recent: Recent,
    /// The same for the blocks re-sent because the guest wrote them: those of the
    /// rounds and of the pause.
    pub(super) disk_written: Recent,
    /// Until a round has re-sent any: the ratio of a sample of the blocks the guest
    /// wrote, each encoded as a round would send it, under the codec it was taken
    /// with, and when it was last tried (so the rounds' disk bytes are not costed as
    /// pages).
    pub(super) disk_written_sample: Option<(Codec, Instant, Option<f64>)>,
    /// The stream's round trip with nothing queued (`Ping` after the first pass):
    /// what each exchange of the handover costs beside its work.
    pub(super) idle_rtt: Option<Duration>,
    /// `--copy-storage`: how long the destination's last sync of its copies at a
    /// round's end took.
    pub(super) dst_disk_sync: Option<Duration>,
    /// `--copy-storage`: the destination's datastore as it timed it (`DisksReady`).
    pub(super) dst_datastore: Option<super::disk_stream::DatastoreTiming>,
}

/// Bytes and the wire bytes they took, older ones fading: the codec may have just
/// changed. (Sums, not an average of ratios, which one zero run would send sky-high.)
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Recent {
    raw: f64,
    wire: f64,
}

impl Recent {
    /// Adds `raw` bytes that took `wire`, after fading what was there by `keep`.
    pub(super) fn add(&mut self, raw: f64, wire: f64, keep: f64) {
        self.raw = self.raw * keep + raw;
        self.wire = self.wire * keep + wire;
    }

    /// Bytes over wire bytes (None before any went).
    pub(super) fn ratio(&self) -> Option<f64> {
        (self.wire > 0.0).then(|| self.raw / self.wire)
    }
}

pub(super) struct Sender<'a> {
    /// The VM moved, and the state of its migration.
    pub(super) vm: &'a Migratable,
    pub(super) m: &'a Machine,
    pub(super) params: &'a Params,
    pub(super) w: Wire,
    pub(super) r: TcpStream,
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
        bandwidth_bytes_per_sec: 0.0,
        codec: settings.codec,
        compression_ratio: 1.0,
        throttle_pct: settings.throttle_pct,
        bandwidth_limit_bytes_per_sec: settings.bandwidth,
        max_downtime_ms: settings.max_downtime_ms,
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

/// Runs a migration to its end and returns its report (also kept in the machine's
/// status, and written to `params.report` if given).
/// Runs a migration over `conn` (from [`dial`]) to its end; returns the report.
pub fn run(vm: Arc<Migratable>, params: Params, conn: TcpStream) -> MigrationReport {
    let m = &vm.machine;
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
                if matches!(e, MigrateError::Silent(_)) && params.settings.bandwidth.is_some() {
                    ", and the time a frame takes under the bandwidth cap"
                } else {
                    ""
                }
            )),
        ),
        Err(e) => (Outcome::Failed, Phase::Failed, Some(e.to_string())),
    };
    if let Some(e) = &error {
        tracing::warn!("migration to {} {outcome}: {e}", params.to);
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
        downtime_ms: switch.downtime_ms,
        max_heartbeat_gap_ms: ms(m.max_heartbeat_gap()),
        rounds: s.round,
        bytes_on_wire: s.bytes_on_wire,
        pages_sent: s.pages_sent,
        zero_pages: s.zero_pages,
        codec: live.settings.codec,
        compression_ratio: ratio(&s),
        throttle_max_pct: live.throttle_max_pct,
        memory_verified: switch.memory_verified,
        guest_integrity_errors: m.status().guest_integrity_errors,
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

#[derive(Default)]
pub(super) struct Switch {
    pub(super) committed: bool,
    /// Post-copy ran; what it cost the guest.
    pub(super) postcopy: Option<protocol::PostcopyFigures>,
    pub(super) recoveries: u32,
    memory_verified: Option<bool>,
    downtime_ms: Option<f64>,
    pub(super) switchover_ms: Option<f64>,
}

fn new_stats(t0: Instant) -> Stats {
    Stats {
        t0,
        pages_sent: 0,
        zero_pages: 0,
        raw_bytes: 0,
        bytes_on_wire: 0,
        send_time: Duration::ZERO,
        idle_rtt: None,
        dst_disk_sync: None,
        dst_datastore: None,
        wall_send_time: Duration::ZERO,
        acked_bytes: 0,
        round: 0,
        dirty_last: 0,
        dirty_rate: 0.0,
        round_overhead: Duration::ZERO,
        remaining: 0,
        disk_bytes: 0,
        disk_mirrored: Default::default(),
        disk_copy_rate: None,
        disk_write_rate: None,
        disk_copy: (0, Duration::ZERO, Duration::ZERO),
        tcp: None,
        disk_round_at: None,
        disk_dirty_rate: None,
        disk_pending: 0,
        disk_size: 0,
        disk_written_sample: None,
        disk_wire_bytes: 0,
        disk_recent: Recent::default(),
        disk_written: Recent::default(),
    }
}

/// Disk bytes sent over their wire bytes lately (None before any went).
fn disk_ratio(s: &Stats) -> Option<f64> {
    s.disk_recent.ratio()
}

/// The guest's written blocks' bytes over their wire bytes lately; before a round
/// sent any, the sample's (None before either).
fn disk_written_ratio(s: &Stats) -> Option<f64> {
    s.disk_written
        .ratio()
        .or(s.disk_written_sample.and_then(|(.., r)| r))
}

/// Page bytes sent over the wire bytes they took (disk blocks apart).
fn ratio(s: &Stats) -> f64 {
    let wire = s.bytes_on_wire.saturating_sub(s.disk_wire_bytes);
    if wire == 0 {
        1.0
    } else {
        s.raw_bytes as f64 / wire as f64
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub(super) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_progress(vm: &Migratable, p: &MigrationProgress) {
    *lock(&vm.progress) = Some(p.clone());
}

/// What a `set-params` changes: each `Some` is a new value.
#[derive(Debug, Default)]
pub struct SettingsChange {
    pub codec: Option<Codec>,
    pub bandwidth: Option<Option<u64>>,
    pub throttle_pct: Option<u32>,
    pub max_downtime_ms: Option<u64>,
    pub disk_write_limit: Option<Option<u64>>,
    pub switchover: Option<Switchover>,
    pub disk_mirror: Option<DiskMirror>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetParamsError {
    #[error("no migration is running")]
    NotRunning,
    #[error("{0}")]
    Invalid(String),
}

/// `set-params`: changes what is given, records each change.
pub fn set_params(
    vm: &Migratable,
    change: SettingsChange,
    reasons: &Reasons,
) -> Result<Settings, SetParamsError> {
    let SettingsChange {
        codec,
        bandwidth,
        throttle_pct,
        max_downtime_ms,
        disk_write_limit,
        switchover,
        disk_mirror,
    } = change;
    let m = &vm.machine;
    let mut live = lock(&vm.live);
    let live = live.as_mut().ok_or(SetParamsError::NotRunning)?;
    let mut s = live.settings;
    if let Some(c) = codec {
        s.codec = c;
    }
    if let Some(b) = bandwidth {
        s.bandwidth = b;
    }
    if let Some(t) = throttle_pct {
        if t > 99 {
            return Err(SetParamsError::Invalid(format!(
                "throttle_pct = {t} is outside 0..=99"
            )));
        }
        s.throttle_pct = t;
    }
    if let Some(d) = max_downtime_ms {
        if d == 0 {
            return Err(SetParamsError::Invalid(
                "max_downtime_ms must be at least 1".into(),
            ));
        }
        s.max_downtime_ms = d;
    }
    if let Some(rule) = switchover {
        s.switchover = rule;
    }
    if let Some(l) = disk_write_limit {
        s.disk_write_limit = l;
        // Only disks being copied (`--copy-storage`) have a job to hold the cap.
        m.disks.limit_writes(l);
    }
    if let Some(mirror) = disk_mirror {
        s.disk_mirror = mirror;
        m.disks.mirror_writes(mirror == DiskMirror::Active);
    }
    live.change(s, reasons, "set by the operator (set-params)");
    m.set_throttle(s.throttle_pct);
    Ok(s)
}

fn fill(p: &mut MigrationProgress, s: &Stats, settings: &Settings) {
    p.codec = settings.codec;
    p.throttle_pct = settings.throttle_pct;
    p.bandwidth_limit_bytes_per_sec = settings.bandwidth;
    p.max_downtime_ms = settings.max_downtime_ms;
    p.round = s.round;
    p.elapsed_ms = s.t0.elapsed().as_millis() as u64;
    p.remaining_dirty_pages = s.remaining;
    p.dirty_pages_last_round = s.dirty_last;
    p.dirty_pages_per_sec = s.dirty_rate;
    p.round_overhead_ms = s.round_overhead.as_secs_f64() * 1e3;
    p.link_rtt_ms = s.tcp.map(|t| t.rtt_ms);
    p.peer_limited = s.tcp.is_some_and(|t| t.peer_limited);
    p.idle_rtt_ms = s.idle_rtt.map(|d| d.as_secs_f64() * 1e3);
    p.dst_disk_sync_ms = s.dst_disk_sync.map(|d| d.as_secs_f64() * 1e3);
    p.dst_flush_ms = s
        .dst_datastore
        .filter(|t| t.flush_us > 0)
        .map(|t| f64::from(t.flush_us) / 1e3);
    // The write's own time: a sync's fixed cost is counted apart.
    p.dst_write_bytes_per_sec = s.dst_datastore.filter(|t| t.bytes > 0).map(|t| {
        let us = f64::from(
            t.write_us
                .saturating_sub(t.flush_us)
                .max(t.write_us / 2)
                .max(1),
        );
        f64::from(t.bytes) / (us / 1e6)
    });
    p.disk_dirty_bytes_per_sec = s.disk_dirty_rate;
    p.disk_bytes_pending = s.disk_round_at.map(|_| s.disk_pending);
    p.disk_bytes_total = s.disk_round_at.map(|_| s.disk_size);
    p.disk_compression_ratio = disk_ratio(s);
    p.disk_written_compression_ratio = disk_written_ratio(s);
    p.disk_copy_bytes_per_sec = s.disk_copy_rate;
    p.disk_write_bytes_per_sec = s.disk_write_rate;
    p.pages_sent = s.pages_sent;
    p.zero_pages = s.zero_pages;
    p.bytes_on_wire = s.bytes_on_wire;
    p.bandwidth_bytes_per_sec = bandwidth(s);
    p.compression_ratio = ratio(s);
}

/// Throughput of the stream end to end: bytes of acknowledged rounds over their wall
/// time; before the first acknowledgement, what the kernel says the connection
/// delivered while busy, or else what the socket took so far.
pub(super) fn bandwidth(s: &Stats) -> f64 {
    link_rate(s)
        .or(s.tcp.and_then(|t| t.delivery_rate))
        .unwrap_or_else(|| {
            let (bytes, t) = without_disk_copy(s.bytes_on_wire, s.send_time, s.disk_copy.1, s);
            if t > 0.0 { bytes / t } else { 0.0 }
        })
}

/// What the link carries, once acknowledged rounds have measured it: bytes of those
/// rounds over their wall time. None before the first acknowledgement.
pub(super) fn link_rate(s: &Stats) -> Option<f64> {
    (s.wall_send_time > Duration::ZERO).then(|| {
        let (bytes, t) = without_disk_copy(s.acked_bytes, s.wall_send_time, s.disk_copy.2, s);
        bytes / t
    })
}

/// `bytes` over `time` without the disks' first copy (its bytes, and `copy_time` of
/// it), unless too little is left to say anything: then with it.
fn without_disk_copy(bytes: u64, time: Duration, copy_time: Duration, s: &Stats) -> (f64, f64) {
    let left = time.saturating_sub(copy_time);
    let left_bytes = bytes.saturating_sub(s.disk_copy.0);
    if s.disk_copy.0 > 0 && left >= Duration::from_millis(50) && left_bytes > 0 {
        (left_bytes as f64, left.as_secs_f64())
    } else {
        (bytes as f64, time.as_secs_f64())
    }
}

/// Runs the migration; returns its counters and how it ended.
fn migrate(
    vm: &Migratable,
    (params, conn): (&Params, TcpStream),
    t0: Instant,
    switch: &mut Switch,
) -> (Stats, Result<(), MigrateError>) {
    let m = &vm.machine;
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
    let _ = tx.m.dirty.stop(&tx.m.vm);
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
                let _ = tx.m.disks.set_locked(true);
                if tx.m.state() == RunState::Paused {
                    let _ = tx.m.resume();
                }
                tx.close_after_abort();
            }
            (tx.stats, Err(e))
        }
    }
}

/// A name for one migration, unique enough to tell two apart on one destination.
fn migration_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: fills the 8-byte buffer it is given.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n == 8 {
        u64::from_le_bytes(b)
    } else {
        crate::clock::monotonic_ns() ^ u64::from(std::process::id()) << 32
    }
}

/// Resolves a HOST:PORT.
pub(super) fn address(to: &str) -> Result<std::net::SocketAddr, MigrateError> {
    to.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| MigrateError::Resolve(to.to_owned()))
}

/// Resolves `to` and connects to it: done before a migration is said to start, so a
/// destination that cannot be reached is an answer, not a report later.
pub fn dial(to: &str) -> Result<TcpStream, MigrateError> {
    let addr = address(to)?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|source| {
        MigrateError::Connect {
            to: to.to_owned(),
            source,
        }
    })
}

fn connect<'a>(
    vm: &'a Migratable,
    params: &'a Params,
    t0: Instant,
    conn: TcpStream,
) -> Result<Sender<'a>, MigrateError> {
    let m: &Machine = &vm.machine;
    let _ = conn.set_nodelay(true);
    // A dead or silent peer shows as a read or write that times out.
    conn.set_read_timeout(Some(params.timeout))
        .map_err(ProtocolError::from)?;
    conn.set_write_timeout(Some(params.timeout))
        .map_err(ProtocolError::from)?;
    let r = conn.try_clone().map_err(ProtocolError::from)?;
    let watchdog = super::watchdog::Watchdog::start(conn.try_clone().map_err(ProtocolError::from)?);
    let mut tx = Sender {
        vm,
        m,
        params,
        w: Wire::new(conn).map_err(ProtocolError::from)?,
        r,
        stats: new_stats(t0),
        compressor: Compressor::new(),
        bufs: Buffers::default(),
        bucket: Bucket {
            tokens: 0.0,
            last: Instant::now(),
        },
        settings: params.settings,
        last_publish: Instant::now(),
        watchdog,
        session: protocol::Session {
            id: migration_id(),
            secret: 0,
        },
        round_pages: Vec::new(),
        sent_upto: 0,
        copy_mark: None,
        dst_prepared: false,
        meter: Default::default(),
    };
    tx.send(&Message::Hello(Hello {
        version: protocol::VERSION,
        name: m.cfg.name.clone(),
        memory_bytes: m.vm.layout.memory_bytes,
        vcpus: m.cfg.vcpus,
        page_size: PAGE as u32,
        timeout_ms: params.timeout.as_millis().min(u128::from(u32::MAX)) as u32,
        id: tx.session.id,
        recover_ms: params.recover.as_millis().min(u128::from(u32::MAX)) as u32,
    }))?;
    tx.w.flush().map_err(ProtocolError::from)?;
    match protocol::recv(&mut tx.r, None)? {
        Message::HelloAck { version, secret } if version == protocol::VERSION => {
            tx.session.secret = secret;
            *lock(&vm.session) = Some(tx.session);
        }
        Message::HelloAck { version, .. } => {
            return Err(ProtocolError::Version {
                ours: protocol::VERSION,
                theirs: version,
            }
            .into());
        }
        Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
        _ => return Err(MigrateError::Unexpected("something other than HelloAck")),
    }
    // Disks travel as names: where they live there is the destination's to say.
    let mut cfg = m.current_config();
    for d in &mut cfg.disks {
        d.path = d.path.file_name().map(PathBuf::from).unwrap_or_default();
    }
    tx.send(&Message::Config {
        toml: cfg.to_toml(),
    })?;
    Ok(tx)
}

impl Sender<'_> {
    /// The destination's next message; `Prepared` (which may come any time before the
    /// handover) is noted on the way.
    pub(super) fn recv(&mut self) -> Result<Message, ProtocolError> {
        loop {
            match protocol::recv(&mut self.r, None)? {
                Message::Prepared => self.dst_prepared = true,
                Message::Keepalive => {}
                Message::DiskSynced { us } => {
                    self.stats.dst_disk_sync = Some(Duration::from_micros(u64::from(us)))
                }
                other => return Ok(other),
            }
        }
    }

    /// Ends the stream so that the destination reads the Abort: closing a socket
    /// with unread input (say, an unread `Prepared`) resets the connection, and a
    /// reset can overtake the Abort. So: end our side, then read until the
    /// destination closes (briefly).
    fn close_after_abort(&mut self) {
        let _ = self.w.get_ref().shutdown(std::net::Shutdown::Write);
        let _ = self.r.set_read_timeout(Some(Duration::from_millis(500)));
        let mut sink = [0u8; 64 << 10];
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match std::io::Read::read(&mut self.r, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Waits until the destination has built the VM, so the pause that follows is
    /// not spent waiting for it.
    pub(super) fn wait_prepared(&mut self) -> Result<(), MigrateError> {
        // The config may still sit in the send buffer.
        self.w.flush().map_err(ProtocolError::from)?;
        while !self.dst_prepared {
            match protocol::recv(&mut self.r, None)? {
                Message::Prepared => self.dst_prepared = true,
                Message::Keepalive => {}
                Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
                _ => return Err(MigrateError::Unexpected("something other than Prepared")),
            }
        }
        Ok(())
    }

    pub(super) fn send(&mut self, msg: &Message) -> Result<(), MigrateError> {
        let mut frame = Vec::new();
        protocol::send(&mut frame, msg)?;
        self.write_wire(&frame)
    }

    /// Every byte of the stream goes through here: the bandwidth cap and the counters.
    pub(super) fn write_wire(&mut self, frames: &[u8]) -> Result<(), MigrateError> {
        // Time spent waiting for the cap counts: the measured bandwidth is what the
        // stream achieves, which is what predictions need.
        let t = Instant::now();
        self.bucket.take(self.settings.bandwidth, frames.len());
        self.w.write_all(frames).map_err(ProtocolError::from)?;
        self.stats.send_time += t.elapsed();
        // With the guest's disk writes mirrored, its vCPUs write on the stream too.
        self.stats.bytes_on_wire += frames.len() as u64 + self.w.take_others();
        Ok(())
    }

    /// A stream that broke while sending often broke because the destination refused
    /// something and said why: prefer its reason to "broken pipe".
    fn peer_reason(&mut self, e: MigrateError) -> MigrateError {
        if !matches!(e, MigrateError::Protocol(ProtocolError::Io(_))) {
            return e;
        }
        let _ = self.r.set_read_timeout(Some(Duration::from_millis(500)));
        loop {
            match self.recv() {
                Ok(Message::Abort { reason }) => return MigrateError::Refused(reason),
                Ok(_) => continue,
                Err(_) => return e,
            }
        }
    }

    /// Ends a round and waits until the destination has taken all of it in; the round's
    /// wall time then measures the whole pipeline.
    fn end_round(&mut self, round: u32, started: Instant) -> Result<(), MigrateError> {
        self.send(&Message::RoundEnd { round })?;
        self.w.flush().map_err(ProtocolError::from)?;
        match self.recv()? {
            Message::RoundAck { round: r } if r == round => {}
            Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
            _ => return Err(MigrateError::Unexpected("something other than RoundAck")),
        }
        self.stats.wall_send_time += started.elapsed();
        self.stats.acked_bytes = self.stats.bytes_on_wire;
        Ok(())
    }

    /// The stream's round trip with nothing queued: right after a round's
    /// acknowledgement, the least of a few pings.
    fn measure_idle_rtt(&mut self) -> Result<(), MigrateError> {
        const PINGS: u32 = 3;
        for seq in 0..PINGS {
            let t = Instant::now();
            self.send(&Message::Ping { seq })?;
            self.w.flush().map_err(ProtocolError::from)?;
            match self.recv()? {
                Message::Pong { seq: s } if s == seq => {}
                Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
                _ => return Err(MigrateError::Unexpected("something other than Pong")),
            }
            let rtt = t.elapsed();
            self.stats.idle_rtt = Some(self.stats.idle_rtt.map_or(rtt, |r| r.min(rtt)));
        }
        Ok(())
    }

    /// Test-only fault injection (`FERRY_TEST_FAULT=<point>` in the source VMM's
    /// environment): drops the connection at that point of the switchover, as a
    /// network failure would, so tests can show the handover stays safe.
    pub(super) fn fault(&mut self, point: &str) -> Result<(), MigrateError> {
        if std::env::var("FERRY_TEST_FAULT").is_ok_and(|v| v == point) {
            tracing::warn!("test fault: dropping the connection at {point}");
            let _ = self.r.shutdown(std::net::Shutdown::Both);
            return Err(MigrateError::Vm(format!(
                "lost the connection at {point} (injected fault)"
            )));
        }
        Ok(())
    }

    /// Between batches: cancelled? out of time? new settings?
    pub(super) fn check_cancel(&mut self) -> Result<(), MigrateError> {
        if self.vm.cancel.load(Ordering::Acquire) {
            return Err(MigrateError::Cancelled);
        }
        if let Some(max) = self.params.max_total
            && self.stats.t0.elapsed() > max
        {
            return Err(MigrateError::NotConverged(max.as_secs()));
        }
        if self.params.mode == Mode::Hybrid && self.vm.postcopy_requested.load(Ordering::Acquire) {
            return Err(MigrateError::StartPostcopy);
        }
        // A destination that stopped (a hung host, a SIGSTOP) is found out by its
        // silence (see `watchdog`). It answers between frames: under a bandwidth cap
        // a frame may take a while to arrive whole.
        let precopy = lock(&self.vm.progress)
            .as_ref()
            .is_some_and(|p| p.phase == Phase::Precopy);
        let frame_time = self.settings.bandwidth.map_or(Duration::ZERO, |b| {
            Duration::from_secs_f64(f64::from(protocol::MAX_PAYLOAD) / b.max(1) as f64)
        });
        self.watchdog.set(precopy, self.params.timeout + frame_time);
        if let Some(live) = lock(&self.vm.live).as_ref() {
            self.settings = live.settings;
        }
        // The progress feed stays fresh within long rounds too.
        if self.last_publish.elapsed() >= Duration::from_millis(100) {
            let phase = lock(&self.vm.progress)
                .as_ref()
                .map_or(Phase::Precopy, |p| p.phase);
            self.publish(phase);
        }
        Ok(())
    }

    pub(super) fn publish(&mut self, phase: Phase) {
        self.last_publish = Instant::now();
        if let Some(m) = self.meter.read(self.w.get_ref()) {
            self.stats.tcp = Some(m);
        }
        self.measure_disk_dirtying();
        // Not in the pause: the guest waits on every millisecond of it.
        if phase == Phase::Precopy
            && let Err(e) = self.sample_written()
        {
            // An estimate only: the copy itself reports a disk it cannot read.
            tracing::debug!("sampling the guest's written disk blocks: {e}");
        }
        let mut guard = self.vm.progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = guard.as_mut() {
            p.phase = phase;
            fill(p, &self.stats, &self.settings);
        }
    }

    /// Sends pages of `range` in order for about `secs`; returns the first not sent.
    fn send_pages_for(
        &mut self,
        range: std::ops::Range<u64>,
        secs: Duration,
    ) -> Result<u64, MigrateError> {
        const CHUNK: u64 = 2048;
        let started = Instant::now();
        let mut at = range.start;
        while at < range.end && started.elapsed() < secs {
            let end = (at + CHUNK).min(range.end);
            self.send_pages(at..end)?;
            at = end;
        }
        Ok(at)
    }

    /// Sends the given pages: zero pages as runs, the rest in batches. With a codec,
    /// batches are compressed on worker threads while this one writes them, in order.
    pub(super) fn send_pages(
        &mut self,
        pages: impl Iterator<Item = u64>,
    ) -> Result<(), MigrateError> {
        let m = self.m;
        // SAFETY: pages are read while the guest may write them; every page sent here
        // had its dirty tracking re-armed before this copy, so a racing write is sent
        // again in a later round (or under the final pause).
        let memory = unsafe { m.memory_slice() };
        let pages: Vec<u64> = pages.collect();
        self.round_pages.clone_from(&pages);
        self.sent_upto = 0;
        self.check_cancel()?;
        // A pass goes in groups, each with the settings in force when it starts: a
        // codec the policy picks mid-pass (the first pass is most of the migration)
        // applies from the next group on.
        let mut from = 0;
        while from < pages.len() {
            // Under a bandwidth cap a frame must not take long enough to starve the
            // peer's timeout: at most ~100 ms of the cap per frame.
            let cap = self
                .settings
                .bandwidth
                .map_or(BATCH, |b| (b as usize / 10 / PAGE).clamp(1, BATCH));
            let batch = batch_pages(pages.len() - from, cap);
            let end = (from + batch * GROUP_BATCHES).min(pages.len());
            self.send_group(memory, &pages[from..end], batch)?;
            from = end;
        }
        Ok(())
    }

    fn send_group(
        &mut self,
        memory: &[u8],
        pages: &[u64],
        batch: usize,
    ) -> Result<(), MigrateError> {
        let codec = self.settings.codec;
        let chunks: Vec<&[u64]> = pages.chunks(batch).collect();
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WORKERS);
        if codec == Codec::None || workers < 2 || chunks.len() < 2 {
            let mut bufs = std::mem::take(&mut self.bufs);
            let result = chunks.iter().try_for_each(|chunk| {
                let encoded = encode(memory, chunk, codec, &mut self.compressor, &mut bufs)?;
                self.write_encoded(&encoded)?;
                bufs.spare_frames.push(encoded.frames);
                Ok(())
            });
            self.bufs = bufs;
            return result;
        }
        // Written frame buffers go back to the workers through this pool.
        let pool = std::sync::Mutex::new(Vec::<Vec<u8>>::new());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Result<Encoded, MigrateError>)>(
                workers * 2,
            );
            for _ in 0..workers {
                let (tx, next, stop, chunks, pool) = (tx.clone(), &next, &stop, &chunks, &pool);
                scope.spawn(move || {
                    let mut compressor = Compressor::new();
                    let mut bufs = Buffers::default();
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(chunk) = chunks.get(i) else { break };
                        if let Some(f) = lock(pool).pop() {
                            bufs.spare_frames.push(f);
                        }
                        let encoded = encode(memory, chunk, codec, &mut compressor, &mut bufs);
                        if tx.send((i, encoded)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            // Reorder: frames go out in the order of the pages.
            let mut pending = std::collections::BTreeMap::new();
            let mut due = 0;
            let result = (|| {
                for (i, encoded) in rx.iter() {
                    pending.insert(i, encoded);
                    while let Some(encoded) = pending.remove(&due) {
                        let encoded = encoded?;
                        self.write_encoded(&encoded)?;
                        lock(&pool).push(encoded.frames);
                        due += 1;
                    }
                }
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            result
        })
    }

    /// Writes a batch's frames, under the bandwidth cap, and counts them.
    fn write_encoded(&mut self, e: &Encoded) -> Result<(), MigrateError> {
        self.write_wire(&e.frames)?;
        self.sent_upto += (e.pages_sent + e.zero_pages) as usize;
        self.count_pages(e);
        self.check_cancel()
    }

    pub(super) fn count_pages(&mut self, e: &Encoded) {
        self.stats.pages_sent += e.pages_sent;
        self.stats.zero_pages += e.zero_pages;
        self.stats.raw_bytes += e.pages_sent * PAGE as u64;
    }

    /// How long one core takes to compress `bytes` with the codec in force, as the
    /// codec sample measured it (0 for raw pages or before a sample).
    fn compress_secs(&self, bytes: f64) -> f64 {
        if self.settings.codec == Codec::None {
            return 0.0;
        }
        let codec = self.settings.codec;
        lock(&self.vm.progress)
            .as_ref()
            .and_then(|p| {
                p.codec_samples
                    .iter()
                    .find(|c| c.codec == codec)
                    .map(|c| c.compress_bytes_per_sec)
            })
            .filter(|&s| s > 0.0)
            .map_or(0.0, |s| bytes / s)
    }

    /// Compresses a sample of the working set's non-zero pages with every codec.
    fn sample_codecs(&self) {
        let (samples, zero) = sample_pages(self.m);
        if let Some(p) = lock(&self.vm.progress).as_mut() {
            p.codec_samples = samples;
            p.sampled_zero_fraction = Some(zero);
        }
    }

    fn precopy_and_switch(&mut self, switch: &mut Switch) -> Result<(), MigrateError> {
        match self.precopy(switch) {
            Err(MigrateError::StartPostcopy) => {
                // What the round in flight had not sent yet comes on demand.
                let pages = self.m.vm.layout.memory_bytes / PAGE as u64;
                let mut need = DirtyBitmap::new(pages);
                for &p in self.round_pages.get(self.sent_upto..).unwrap_or_default() {
                    need.set(p);
                }
                self.switch_postcopy(need, true, switch)
            }
            other => other,
        }
    }

    fn precopy(&mut self, switch: &mut Switch) -> Result<(), MigrateError> {
        let pages = self.m.vm.layout.memory_bytes / PAGE as u64;
        self.sample_codecs();
        // Measured at once, so the policy's first prediction has the handover's round
        // trip from these hosts (the first ping may wait for the destination to build
        // the VM: the least of them counts).
        self.measure_idle_rtt()?;
        if self.params.mode == Mode::Postcopy && !self.params.precopy_pass {
            let mut need = DirtyBitmap::new(pages);
            need.set_all();
            return self.switch_postcopy(need, false, switch);
        }
        let mut dirty = DirtyBitmap::new(pages);
        {
            // A dirty-rate sample in progress ends first (it sees this migration and
            // starts no other).
            let _sample = self
                .m
                .dirty_sample_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.m.dirty.start(&self.m.vm)?;
        }
        self.publish(Phase::Precopy);
        let mut round_start = Instant::now();
        let mut round_bytes = self.stats.bytes_on_wire;
        // The windows run from the disks' first copy on: the guest dirties memory
        // meanwhile too.
        super::dirty_windows::during(self.vm, || {
            let mut from = 0;
            if self.params.copy_storage {
                // Memory first, for a moment: the link's own rate is measured before a
                // destination slower to write the disks than the link carries them
                // holds the stream back for the disks' whole first copy (the order
                // costs nothing: the same bytes go either way).
                from = self.send_pages_for(0..pages, LINK_FIRST)?;
                // A switch to post-copy during the disks' copy needs the rest.
                self.round_pages = (from..pages).collect();
                self.sent_upto = 0;
                self.disks_start()?;
            }
            self.send_pages(from..pages)
        })?;
        self.end_round(0, round_start)?;
        self.measure_idle_rtt()?;
        if self.params.mode == Mode::Postcopy {
            // One pass done: what the guest dirtied since comes on demand.
            return self.switch_postcopy(DirtyBitmap::new(pages), true, switch);
        }
        let mut previous = pages;
        loop {
            self.check_cancel()?;
            if self.m.state() != RunState::Running {
                return Err(MigrateError::Vm(format!(
                    "stopped running ({:?})",
                    self.m.state()
                )));
            }
            dirty.clear_all();
            self.m.dirty.fetch(&mut dirty)?;
            let count = dirty.count();
            let took = round_start.elapsed().as_secs_f64().max(1e-6);
            let moving =
                (self.stats.bytes_on_wire - round_bytes) as f64 / bandwidth(&self.stats).max(1.0);
            self.stats.round_overhead = Duration::from_secs_f64((took - moving).max(0.0));
            self.stats.dirty_last = count;
            self.stats.dirty_rate = count as f64 / took;
            self.stats.remaining = count;
            self.stats.round += 1;
            // Predicted downtime: the remaining dirty set at the measured rate; the
            // device state is a few KB and adds nothing measurable.
            let bw = bandwidth(&self.stats).max(1.0);
            // The blocks left are ones the guest wrote: scattered, they compress
            // unlike the first copy's long runs (until a round measured them, as
            // pages do).
            let disk_ratio = disk_written_ratio(&self.stats).unwrap_or(ratio(&self.stats));
            let wire_bytes = count as f64 * PAGE as f64 / ratio(&self.stats).max(1e-3)
                + self.disks_dirty_bytes() as f64 / disk_ratio.max(1e-3);
            // A codec slower than the link makes the pause wait on the CPU instead
            // (one core: the vCPUs are stopped, but the policy budgets one).
            let compress_ms = self.compress_secs(count as f64 * PAGE as f64) * 1e3;
            let predicted_ms = (wire_bytes / bw * 1e3).max(compress_ms);
            self.publish(Phase::Precopy);
            tracing::debug!(
                round = self.stats.round,
                dirty = count,
                took_ms = took * 1e3,
                overhead_ms = self.stats.round_overhead.as_secs_f64() * 1e3,
                predicted_ms,
                bandwidth = bw,
                disk_ratio,
                "pre-copy round"
            );
            let limit = self.settings.max_downtime_ms as f64;
            if converged(
                predicted_ms,
                limit,
                (count, previous),
                self.stats.round,
                self.settings.switchover,
            ) {
                // What the guest wrote through the page cache goes out now, while it
                // runs, not in the flush after the pause (disks that travel need none:
                // see `switchover`).
                if !self.params.copy_storage {
                    self.m.disks.flush_all()?;
                }
                return self.switchover(dirty, switch);
            }
            previous = count;
            self.m.dirty.clear(0, pages)?;
            round_start = Instant::now();
            round_bytes = self.stats.bytes_on_wire;
            if self.params.copy_storage {
                self.disks_round(false)?;
            }
            // A switch to post-copy during this round needs these pages too.
            let result = self.send_pages(dirty.iter_set());
            if matches!(result, Err(MigrateError::StartPostcopy)) {
                // round_pages/sent_upto say which of them went; the dirty log has the rest.
                return Err(MigrateError::StartPostcopy);
            }
            result?;
            self.end_round(self.stats.round, round_start)?;
        }
    }

    fn switchover(
        &mut self,
        mut dirty: DirtyBitmap,
        switch: &mut Switch,
    ) -> Result<(), MigrateError> {
        self.wait_prepared()?;
        self.publish(Phase::Switchover);
        let before = crate::clock::monotonic_ns();
        let quiet = self
            .m
            .last_heartbeats_ns()
            .iter()
            .filter(|&&h| h > 0)
            .map(|&h| before.saturating_sub(h))
            .max()
            .unwrap_or(0);
        // The guest's downtime runs from its last heartbeat: a vCPU held in a capped
        // disk write before the pause is part of it.
        tracing::debug!(
            "handover: the guest's last heartbeat came {:.3} ms before the pause",
            quiet as f64 / 1e6
        );
        let t_pause = Instant::now();
        let mut lap = super::Lap::new();
        if self.params.copy_storage {
            // A guest write the disk cap is holding back would hold the pause as long
            // (64 KiB at 2.4 MB/s is 27 ms). The vCPUs are told to stop first, then the
            // cap goes: the held write completes at once and its vCPU parks rather
            // than run on uncapped (a guest behind its own pace would burst, and the
            // pause would carry the burst). Whatever the cap in force: `set-params`
            // may have set one since this thread last looked.
            self.m.request_pause();
            self.m.disks.limit_writes(None);
        }
        self.m.pause()?;
        lap.mark("paused");
        // The guest is stopped now: the last pages go at full speed (as QEMU lifts
        // its rate limit for the completion stage), its disks are uncapped.
        self.settings.bandwidth = None;
        self.settings.disk_write_limit = None;
        if let Some(live) = lock(&self.vm.live).as_mut() {
            live.settings.bandwidth = None;
            live.settings.disk_write_limit = None;
        }
        let last_heartbeats = self.m.last_heartbeats_ns();
        // Everything dirtied since the last fetch, including by devices.
        self.m.dirty.fetch(&mut dirty)?;
        self.stats.remaining = dirty.count();
        self.send_pages(dirty.iter_set())?;
        lap.mark(&format!("{} pages sent", self.stats.remaining));
        if self.params.copy_storage {
            // Paused: no guest I/O; the last written blocks complete the copies.
            self.disks_round(true)?;
            lap.mark("last disk blocks sent");
            self.disks_logs()?;
        }
        // Shared storage: the destination reads these images next. Disks that travel
        // need no flush here: from the handover the destination's copies (which it
        // syncs before it resumes) are the disks, and a failed migration runs on here
        // through the same page cache.
        if !self.params.copy_storage {
            self.m.disks.flush_all()?;
            lap.mark("disks flushed");
        }
        let state = MachineState::save(self.m)?
            .encode()
            .map_err(|e| MigrateError::Vm(format!("state could not be encoded: {e}")))?;
        self.send(&Message::DeviceState { blob: state })?;
        if !self.params.copy_storage {
            // Shared storage: the destination takes the images' locks from here on.
            self.m.disks.set_locked(false)?;
        }
        self.send(&Message::Complete {
            pages_sent: self.stats.pages_sent,
        })?;
        self.w.flush().map_err(ProtocolError::from)?;
        lap.mark("device state and complete sent");
        self.commit(switch, (t_pause, lap))?;
        self.measure_handover(switch, &last_heartbeats);
        Ok(())
    }

    /// Ready, Commit, Resumed: the handover proper, the same for pre-copy and
    /// post-copy.
    pub(super) fn commit(
        &mut self,
        switch: &mut Switch,
        (t_pause, mut lap): (Instant, super::Lap),
    ) -> Result<(), MigrateError> {
        match self.recv()? {
            Message::Ready => {}
            Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
            _ => return Err(MigrateError::Unexpected("something other than Ready")),
        }
        self.fault("drop-before-commit")?;
        // The handover is recorded before Commit leaves: from here on this copy must
        // never run again, whatever happens to the connection.
        self.m.handed_over.store(true, Ordering::Release);
        switch.committed = true;
        self.send(&Message::Commit)?;
        self.w.flush().map_err(ProtocolError::from)?;
        lap.mark("ready received, commit sent");
        self.fault("drop-after-commit")?;
        match self.recv()? {
            Message::Resumed => {}
            _ => return Err(MigrateError::Unexpected("something other than Resumed")),
        }
        lap.mark("resumed there");
        switch.switchover_ms = Some(ms(t_pause.elapsed()));
        Ok(())
    }

    /// After the handover: compares memory digests and measures downtime.
    pub(super) fn measure_handover(&mut self, switch: &mut Switch, last_heartbeats: &[u64]) {
        // The handover is complete. What follows only measures it: a lost answer leaves
        // a figure unknown (None in the report), never the outcome in doubt.
        match self.recv() {
            Ok(Message::MemoryDigest { digest }) if self.params.verify => {
                // This copy is frozen for good now: hashing it costs the guest nothing.
                // SAFETY: the VM is paused and handed over; nothing writes its memory.
                let ours = protocol::digest(&protocol::page_crcs(unsafe { self.m.memory_slice() }));
                switch.memory_verified = Some(ours == digest);
                if ours != digest {
                    tracing::error!(
                        "memory digest mismatch after migration: source {ours:#010x}, destination {digest:#010x}"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("no memory digest from the destination: {e}"),
        }
        match self.recv() {
            Ok(Message::FirstHeartbeats { ns }) => {
                switch.downtime_ms = ns
                    .iter()
                    .zip(last_heartbeats)
                    .filter(|(first, last)| **first > 0 && **last > 0)
                    .map(|(first, last)| first.saturating_sub(*last) as f64 / 1e6)
                    .reduce(f64::max);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("no heartbeat times from the destination: {e}"),
        }
        self.stats.remaining = 0;
    }
}

/// Each codec's ratio and speed on a sample of the working set's non-zero pages, and
/// the share of all guest pages that are zero (also sampled).
pub fn sample_pages(m: &Machine) -> (Vec<super::codec::CodecSample>, f64) {
    const SAMPLE: u64 = 256;
    // SAFETY: a racy read of guest pages only feeds a measurement.
    let memory = unsafe { m.memory_slice() };
    let layout = &m.vm.layout;
    let first = layout.ws_base / PAGE as u64;
    let step = (layout.ws_pages / SAMPLE).max(1);
    let page = |i: u64| {
        let at = (i * PAGE as u64) as usize;
        &memory[at..at + PAGE]
    };
    let pages: Vec<&[u8]> = (0..layout.ws_pages)
        .step_by(step as usize)
        .map(|i| page(first + i))
        .filter(|p| !is_zero(p))
        .take(SAMPLE as usize)
        .collect();
    let codecs = [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3)];
    let all = (memory.len() / PAGE) as u64;
    let probes: Vec<u64> = (0..all).step_by((all / 4096).max(1) as usize).collect();
    let zero = probes.iter().filter(|&&i| is_zero(page(i))).count();
    (
        super::codec::sample(&codecs, pages.iter().copied()),
        zero as f64 / probes.len().max(1) as f64,
    )
}

/// Most rounds pre-copy makes before switching over once the downtime fits.
pub(super) const MAX_SHRINKING_ROUNDS: u32 = 30;

/// The convergence test: switch over once the predicted downtime fits the limit and
/// another round would not pay: the dirty set stopped halving (rounds have reached the
/// guest's steady dirtying), or it is already under a tenth of the limit. While it
/// still halves, one more short round cuts the downtime the guest will see.
/// `dirty` is this round's dirty set and `previous` the last one's (pages); a peer's
/// rule ([`Switchover::WhenFits`]) switches as soon as the pause fits.
pub fn converged(
    predicted_ms: f64,
    limit_ms: f64,
    (dirty, previous): (u64, u64),
    round: u32,
    rule: Switchover,
) -> bool {
    let fits = predicted_ms <= limit_ms;
    let still_halving = dirty * 2 <= previous;
    fits && (rule == Switchover::WhenFits
        || !still_halving
        || predicted_ms <= limit_ms / 10.0
        || round >= MAX_SHRINKING_ROUNDS)
}

/// With disks travelling, how long the first pass sends memory before the disks'
/// first copy: long enough for the link's rate to be read from TCP (a quarter to half
/// a second of busy time) and reach the policy.
const LINK_FIRST: Duration = Duration::from_millis(600);

/// Compression threads for page batches at most.
const MAX_WORKERS: usize = 4;

/// One batch of pages, ready for the wire: its zero runs and one page-batch frame.
pub(super) struct Encoded {
    pub(super) frames: Vec<u8>,
    pub(super) pages_sent: u64,
    pub(super) zero_pages: u64,
}

/// Buffers a batch is encoded in, kept and reused: fresh megabytes per batch would
/// cost a host page fault per 4 KiB, which is slow on this kind of host.
#[derive(Default)]
pub(super) struct Buffers {
    payload: Vec<u8>,
    pub(super) spare_frames: Vec<Vec<u8>>,
}

/// Encodes `pages` into complete frames (reusing `bufs`).
pub(super) fn encode(
    memory: &[u8],
    pages: &[u64],
    codec: Codec,
    compressor: &mut Compressor,
    bufs: &mut Buffers,
) -> Result<Encoded, MigrateError> {
    let mut frames = bufs.spare_frames.pop().unwrap_or_default();
    frames.clear();
    let mut out = Encoded {
        frames,
        pages_sent: 0,
        zero_pages: 0,
    };
    let payload = &mut bufs.payload;
    payload.clear();
    let mut writer = PageBatchWriter::new(payload, super::codec::wire_id(codec));
    let mut scratch = Vec::with_capacity(PAGE + 64);
    let mut zero_run: Option<(u64, u64)> = None;
    let mut zero_frames = Vec::new();
    for &page in pages {
        let at = page as usize * PAGE;
        let bytes = &memory[at..at + PAGE];
        if is_zero(bytes) {
            out.zero_pages += 1;
            zero_run = match zero_run {
                Some((first, n)) if first + n == page => Some((first, n + 1)),
                other => {
                    if let Some((first, count)) = other {
                        protocol::send(&mut zero_frames, &Message::ZeroPages { first, count })?;
                    }
                    Some((page, 1))
                }
            };
            continue;
        }
        scratch.clear();
        let stored = compressor
            .compress(codec, bytes, &mut scratch)
            .map_err(|e| MigrateError::Vm(e.to_string()))?;
        writer.push(page, stored == Stored::Raw, &scratch);
        out.pages_sent += 1;
    }
    if let Some((first, count)) = zero_run {
        protocol::send(&mut zero_frames, &Message::ZeroPages { first, count })?;
    }
    let has_pages = !writer.is_empty();
    writer.finish();
    if has_pages {
        protocol::write_frame(&mut out.frames, protocol::Kind::Pages, payload)?;
    }
    out.frames.extend_from_slice(&zero_frames);
    Ok(out)
}

/// `ferry migrate --resolve`: settles a handover in doubt by asking the destination
/// what it did, telling it whether this side committed. Updates the report.
pub fn resolve(vm: &Migratable) -> Result<ferry_api::Resolution, String> {
    let m = &vm.machine;
    let to = lock(&vm.progress)
        .as_ref()
        .map(|p| p.to.clone())
        .ok_or("no migration to resolve")?;
    let session = *lock(&vm.session);
    // Without the destination's secret there is nothing it would answer to.
    let session =
        session.ok_or("the last migration never completed its handshake: nothing to resolve")?;
    let committed = m.handed_over.load(Ordering::Acquire);
    let addr = to
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("cannot resolve {to}"))?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("cannot reach the destination {to}: {e}; the VM stays as it is"))?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    protocol::send(&mut conn, &Message::Resolve { session, committed })
        .map_err(|e| e.to_string())?;
    let running = match protocol::recv(&mut conn, None).map_err(|e| e.to_string())? {
        Message::Resolved { running } => running,
        other => return Err(format!("the destination answered {:?}", other.kind())),
    };
    if running != committed {
        // Cannot happen by construction (the destination runs only on Commit); never
        // paper over it.
        return Err(format!(
            "inconsistent handover: committed here = {committed}, running there = {running}"
        ));
    }
    let mut guard = lock(&vm.progress);
    if let Some(p) = guard.as_mut()
        && let Some(r) = p.report.as_mut()
    {
        if committed {
            r.core.outcome = Outcome::Completed;
            r.core.error = None;
            p.phase = Phase::Completed;
        } else {
            r.core.error = Some(format!(
                "{}; resolved: the destination discarded its copy, the VM runs here",
                r.core.error.clone().unwrap_or_default()
            ));
        }
    }
    Ok(ferry_api::Resolution {
        committed,
        destination_running: running,
        vm_runs_on: if running { "destination" } else { "source" }.into(),
    })
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
