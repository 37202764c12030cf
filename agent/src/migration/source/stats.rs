//! A migration's counters, and the figures `status` shows from them.

use super::*;

/// Counters of one migration.
pub(in crate::migration) struct Stats {
    pub(in crate::migration) t0: Instant,
    pub(in crate::migration) pages_sent: u64,
    pub(in crate::migration) zero_pages: u64,
    pub(in crate::migration) raw_bytes: u64,
    pub(in crate::migration) bytes_on_wire: u64,
    pub(in crate::migration) send_time: Duration,
    /// Wall time of completed rounds, acknowledged end to end.
    pub(in crate::migration) wall_send_time: Duration,
    /// Bytes of completed rounds.
    pub(in crate::migration) acked_bytes: u64,
    pub(in crate::migration) round: u32,
    pub(in crate::migration) dirty_last: u64,
    pub(in crate::migration) dirty_rate: f64,
    pub(in crate::migration) remaining: u64,
    /// Disk bytes sent (`--copy-storage`).
    pub(in crate::migration) disk_bytes: u64,
    /// Guest write bytes the active disk mirror sent as the guest wrote them (the
    /// guest's vCPUs count them here).
    pub(in crate::migration) disk_mirrored: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// What the last round took beyond moving its bytes at the stream's rate: the
    /// acknowledgement's round trip, the dirty log's harvest. The guest dirties on
    /// meanwhile, so this bounds how small rounds can get.
    pub(in crate::migration) round_overhead: Duration,
    /// What the kernel says of the connection (see `link::measure`); None until it
    /// has carried something.
    pub(in crate::migration) tcp: Option<crate::migration::link::Measured>,
    /// `--copy-storage`: when the disks' dirty sets were last taken, and the rate the
    /// guest dirtied disk bytes at, from what it dirtied since then.
    pub(in crate::migration) disk_round_at: Option<Instant>,
    pub(in crate::migration) disk_dirty_rate: Option<f64>,
    /// Disk bytes of the current disk pass not sent yet.
    pub(in crate::migration) disk_pending: u64,
    /// The travelling disks' size, summed.
    pub(in crate::migration) disk_size: u64,
    /// Disk bytes per second of the disks' first copy, once done.
    pub(in crate::migration) disk_copy_rate: Option<f64>,
    /// Every disk byte the guest writes per second, rewrites included (what an active
    /// mirror carries), over the same span as `disk_dirty_rate`.
    pub(in crate::migration) disk_write_rate: Option<f64>,
    /// The disks' first copy: its wire bytes, time spent writing them, and wall time.
    /// The stream's rate for pages leaves it out: a destination writing its disk
    /// copies slower than the link carries holds that phase back, not the pages'.
    pub(in crate::migration) disk_copy: (u64, Duration, Duration),
    /// What the disk bytes sent took on the wire (disk blocks compress unlike pages:
    /// larger runs, zero runs elided).
    pub(in crate::migration) disk_wire_bytes: u64,
    /// Disk bytes and their wire bytes over the last few MiB sent, for predictions
    /// under the codec in force.
    pub(in crate::migration) disk_recent: Recent,
    /// The same for the blocks re-sent because the guest wrote them: those of the
    /// rounds and of the pause.
    pub(in crate::migration) disk_written: Recent,
    /// Until a round has re-sent any: the ratio of a sample of the blocks the guest
    /// wrote, each encoded as a round would send it, under the codec it was taken
    /// with, and when it was last tried (so the rounds' disk bytes are not costed as
    /// pages).
    pub(in crate::migration) disk_written_sample: Option<(Codec, Instant, Option<f64>)>,
    /// The stream's round trip with nothing queued (`Ping` after the first pass):
    /// what each exchange of the handover costs beside its work.
    pub(in crate::migration) idle_rtt: Option<Duration>,
    /// `--copy-storage`: how long the destination's last sync of its copies at a
    /// round's end took.
    pub(in crate::migration) dst_disk_sync: Option<Duration>,
    /// `--copy-storage`: the destination's datastore as it timed it (`DisksReady`).
    pub(in crate::migration) dst_datastore: Option<crate::migration::disk_stream::DatastoreTiming>,
}

/// Bytes and the wire bytes they took, older ones fading: the codec may have just
/// changed. (Sums, not an average of ratios, which one zero run would send sky-high.)
#[derive(Debug, Clone, Copy, Default)]
pub(in crate::migration) struct Recent {
    pub(super) raw: f64,
    pub(super) wire: f64,
}

impl Recent {
    /// Adds `raw` bytes that took `wire`, after fading what was there by `keep`.
    pub(in crate::migration) fn add(&mut self, raw: f64, wire: f64, keep: f64) {
        self.raw = self.raw * keep + raw;
        self.wire = self.wire * keep + wire;
    }

    /// Bytes over wire bytes (None before any went).
    pub(in crate::migration) fn ratio(&self) -> Option<f64> {
        (self.wire > 0.0).then(|| self.raw / self.wire)
    }
}

pub(super) fn new_stats(t0: Instant) -> Stats {
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
pub(super) fn disk_ratio(s: &Stats) -> Option<f64> {
    s.disk_recent.ratio()
}

/// The guest's written blocks' bytes over their wire bytes lately; before a round
/// sent any, the sample's (None before either).
pub(super) fn disk_written_ratio(s: &Stats) -> Option<f64> {
    s.disk_written
        .ratio()
        .or(s.disk_written_sample.and_then(|(.., r)| r))
}

/// Page bytes sent over the wire bytes they took (disk blocks apart).
pub(super) fn ratio(s: &Stats) -> f64 {
    let wire = s.bytes_on_wire.saturating_sub(s.disk_wire_bytes);
    if wire == 0 {
        1.0
    } else {
        s.raw_bytes as f64 / wire as f64
    }
}

pub(super) fn fill(p: &mut MigrationProgress, s: &Stats, settings: &Settings) {
    p.codec = settings.codec;
    p.throttle_pct = settings.throttle_pct;
    p.bandwidth_limit_bytes_per_sec = settings.bandwidth_bytes_per_sec;
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
    p.disk_bytes_on_wire = s.disk_wire_bytes;
    p.bandwidth_bytes_per_sec = bandwidth(s);
    p.compression_ratio = ratio(s);
}

/// Throughput of the stream end to end: bytes of acknowledged rounds over their wall
/// time; before the first acknowledgement, what the kernel says the connection
/// delivered while busy, or else what the socket took so far.
pub(in crate::migration) fn bandwidth(s: &Stats) -> f64 {
    link_rate(s)
        .or(s.tcp.and_then(|t| t.delivery_rate))
        .unwrap_or_else(|| {
            let (bytes, t) = without_disk_copy(s.bytes_on_wire, s.send_time, s.disk_copy.1, s);
            if t > 0.0 { bytes / t } else { 0.0 }
        })
}

/// What the link carries, once acknowledged rounds have measured it: bytes of those
/// rounds over their wall time. None before the first acknowledgement.
pub(in crate::migration) fn link_rate(s: &Stats) -> Option<f64> {
    (s.wall_send_time > Duration::ZERO).then(|| {
        let (bytes, t) = without_disk_copy(s.acked_bytes, s.wall_send_time, s.disk_copy.2, s);
        bytes / t
    })
}

/// `bytes` over `time` without the disks' first copy (its bytes, and `copy_time` of
/// it), unless too little is left to say anything: then with it.
pub(super) fn without_disk_copy(
    bytes: u64,
    time: Duration,
    copy_time: Duration,
    s: &Stats,
) -> (f64, f64) {
    let left = time.saturating_sub(copy_time);
    let left_bytes = bytes.saturating_sub(s.disk_copy.0);
    if s.disk_copy.0 > 0 && left >= Duration::from_millis(50) && left_bytes > 0 {
        (left_bytes as f64, left.as_secs_f64())
    } else {
        (bytes as f64, time.as_secs_f64())
    }
}
