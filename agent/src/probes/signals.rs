//! From two readings of a VM's cumulative probe counters to the signals of the window
//! between them. Pure: the readings come in, figures go out.

use std::collections::BTreeMap;

use ferry_ebpf::{DirtySource, ExitKind, HIST_BUCKETS, IoOp, IoStats, VmCounts};
use serde::Serialize;

/// Cumulative counters of one VM (summed over CPUs) at one moment.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub at_ns: u64,
    pub counts: VmCounts,
    /// (kind, reason) → exits.
    pub exits: BTreeMap<(u32, u32), u64>,
    /// By [`IoOp`].
    pub io: [IoStats; 3],
    /// Block requests the VM itself submitted (O_DIRECT images), all devices.
    pub block: IoStats,
    /// Distinct pages dirtied since the previous reading (working-set bitmap).
    pub ws_pages: u64,
}

/// Block-layer figures of one device, all submitters.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceIo {
    /// major:minor.
    pub device: String,
    pub ios_per_sec: f64,
    pub bytes_per_sec: f64,
    pub latency_p50_us: Option<f64>,
    pub latency_p99_us: Option<f64>,
}

/// What a window of probe data says about one VM.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Signals {
    pub window_secs: f64,
    /// Null when nothing could see writes: see `dirty_note`.
    pub dirty_pages_per_sec: Option<f64>,
    /// The tracepoint the dirty rate came from.
    pub dirty_source: Option<&'static str>,
    pub dirty_note: Option<String>,
    /// Events per second from every dirty source that delivered any.
    pub dirty_events_per_sec: BTreeMap<&'static str, f64>,
    /// Distinct pages dirtied in the window (where the source gives addresses).
    pub working_set_pages: Option<u64>,
    pub exits_per_sec: f64,
    /// "kind:reason" → exits per second.
    pub exits_by_reason: BTreeMap<String, f64>,
    pub disk_read_bytes_per_sec: f64,
    pub disk_write_bytes_per_sec: f64,
    pub disk_syncs_per_sec: f64,
    pub disk_ops_per_sec: f64,
    /// Latency of the VMM's read and write system calls.
    pub disk_latency_p50_us: Option<f64>,
    pub disk_latency_p99_us: Option<f64>,
    /// Dirty logging seen on (harvest ioctls, or ring pushes) in this window.
    pub dirty_logging: bool,
    /// Every tracepoint that delivered events for this VM in the window.
    pub sources_live: Vec<&'static str>,
}

fn diff_stats(a: &IoStats, b: &IoStats) -> IoStats {
    let mut d = IoStats {
        calls: b.calls.saturating_sub(a.calls),
        bytes: b.bytes.saturating_sub(a.bytes),
        errors: b.errors.saturating_sub(a.errors),
        latency_ns: b.latency_ns.saturating_sub(a.latency_ns),
        ..IoStats::default()
    };
    for i in 0..HIST_BUCKETS {
        d.hist[i] = b.hist[i].saturating_sub(a.hist[i]);
    }
    d
}

/// Adds `v` into `into`: counts, bytes, latency and every histogram bucket.
pub fn add(into: &mut IoStats, v: &IoStats) {
    into.calls += v.calls;
    into.bytes += v.bytes;
    into.errors += v.errors;
    into.latency_ns += v.latency_ns;
    for (a, b) in into.hist.iter_mut().zip(v.hist.iter()) {
        *a += b;
    }
}

/// The q-quantile (0..1) of a log2 histogram of nanoseconds, in microseconds, read
/// linearly inside its bucket; None when empty.
pub fn quantile_us(hist: &[u64; HIST_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
    let mut below = 0u64;
    for (i, &n) in hist.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= want {
            let lo = (1u64 << i) as f64;
            let frac = (want - below as f64) / n as f64;
            return Some((lo + frac * lo) / 1e3);
        }
        below += n;
    }
    None
}

fn exit_kind(kind: u32) -> &'static str {
    match kind {
        k if k == ExitKind::Kvm as u32 => "kvm_exit",
        k if k == ExitKind::Userspace as u32 => "userspace",
        _ => "pio",
    }
}

/// Names of KVM_EXIT_* reasons userspace sees most.
fn userspace_reason(r: u32) -> String {
    match r {
        2 => "io".into(),
        3 => "hypercall".into(),
        5 => "hlt".into(),
        6 => "mmio".into(),
        7 => "irq_window_open".into(),
        8 => "shutdown".into(),
        9 => "fail_entry".into(),
        10 => "intr".into(),
        17 => "internal_error".into(),
        other => other.to_string(),
    }
}

/// An exit's kind and reason as one label: `kvm_exit:48`, `userspace:io`, `pio:0`.
pub fn exit_label(kind: u32, reason: u32) -> String {
    let reason = if kind == ExitKind::Userspace as u32 {
        userspace_reason(reason)
    } else {
        reason.to_string()
    };
    format!("{}:{reason}", exit_kind(kind))
}

/// What the caller knows of the VMM's dirty logging over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Logging {
    /// Nothing: the probes judge from harvests, ring pushes and memslot updates.
    Unknown,
    /// On throughout (a migration runs).
    On,
    /// On for this many seconds of the window (a sample): rates are per second of it.
    OnFor(f64),
}

/// The signals of the window `a` → `b`.
pub fn window(a: &Reading, b: &Reading, known: Logging) -> Signals {
    let secs = (b.at_ns.saturating_sub(a.at_ns) as f64 / 1e9).max(1e-9);
    let c = |f: fn(&VmCounts) -> u64| f(&b.counts).saturating_sub(f(&a.counts));
    let dirty: Vec<(DirtySource, u64)> = DirtySource::ALL
        .iter()
        .map(|&s| {
            let i = s as usize;
            (s, b.counts.dirty[i].saturating_sub(a.counts.dirty[i]))
        })
        .collect();
    let pushes = dirty[DirtySource::Ring as usize].1;
    let harvests = c(|v| v.harvests);
    // Logging is on if the VMM harvested or its ring filled in the window, or its last
    // memslot update (if the probes saw one) turned logging on.
    let memslot_on = b.counts.memslot_ns > 0 && b.counts.memslot_logging != 0;
    let logging = known != Logging::Unknown || harvests > 0 || pushes > 0 || memslot_on;
    let logging_secs = match known {
        Logging::OnFor(s) => Some(s),
        _ => None,
    };

    let mut sources_live: Vec<&'static str> = Vec::new();
    for &(s, n) in &dirty {
        if n > 0 {
            sources_live.push(s.tracepoint());
        }
    }
    if c(|v| v.read_walks) > 0 && !sources_live.contains(&DirtySource::Walk.tracepoint()) {
        sources_live.push(DirtySource::Walk.tracepoint());
    }
    if c(|v| v.readonly_sptes) > 0 && !sources_live.contains(&DirtySource::Spte.tracepoint()) {
        sources_live.push(DirtySource::Spte.tracepoint());
    }
    if harvests > 0 {
        sources_live.push("syscalls:sys_enter_ioctl");
    }

    let mut exits_by_reason = BTreeMap::new();
    let (mut kvm_exits, mut user_exits) = (0u64, 0u64);
    let mut kinds_live = [false; 3];
    for (&(kind, reason), &n) in &b.exits {
        let n = n.saturating_sub(a.exits.get(&(kind, reason)).copied().unwrap_or(0));
        if n == 0 {
            continue;
        }
        kinds_live[(kind as usize).min(2)] = true;
        match kind {
            k if k == ExitKind::Kvm as u32 => kvm_exits += n,
            k if k == ExitKind::Userspace as u32 => user_exits += n,
            _ => {}
        }
        exits_by_reason.insert(exit_label(kind, reason), n as f64 / secs);
    }
    for (live, name) in
        kinds_live
            .iter()
            .zip(["kvm:kvm_exit", "kvm:kvm_userspace_exit", "kvm:kvm_pio"])
    {
        if *live {
            sources_live.push(name);
        }
    }
    // Every exit where the hardware reports them; where it does not (this kind of
    // host), the ones that reach the VMM.
    let exits = if kvm_exits > 0 { kvm_exits } else { user_exits };

    let io: Vec<IoStats> = (0..3).map(|i| diff_stats(&a.io[i], &b.io[i])).collect();
    let mut rw = io[IoOp::Read as usize];
    add(&mut rw, &io[IoOp::Write as usize]);
    if rw.calls + io[IoOp::Sync as usize].calls > 0 {
        sources_live.push("syscalls:disk_io");
    }
    if diff_stats(&a.block, &b.block).calls > 0 {
        sources_live.push("block:block_rq_complete");
    }

    let best = DirtySource::PREFERENCE
        .into_iter()
        .find(|&s| dirty[s as usize].1 > 0);
    let (rate, source, note) = if !logging {
        (
            None,
            None,
            Some(
                "dirty logging is off in this VMM: a write to a page already mapped \
                 writable faults nowhere, so no tracepoint sees it"
                    .to_string(),
            ),
        )
    } else {
        let per = logging_secs.unwrap_or(secs).max(1e-9);
        match best {
            Some(s) => (
                Some(dirty[s as usize].1 as f64 / per),
                Some(s.tracepoint()),
                None,
            ),
            None => (Some(0.0), None, None),
        }
    };
    Signals {
        window_secs: secs,
        dirty_pages_per_sec: rate,
        dirty_source: source,
        dirty_note: note,
        dirty_events_per_sec: dirty
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|&(s, n)| (s.tracepoint(), n as f64 / secs))
            .collect(),
        working_set_pages: (logging && best.is_some()).then_some(b.ws_pages),
        exits_per_sec: exits as f64 / secs,
        exits_by_reason,
        disk_read_bytes_per_sec: io[IoOp::Read as usize].bytes as f64 / secs,
        disk_write_bytes_per_sec: io[IoOp::Write as usize].bytes as f64 / secs,
        disk_syncs_per_sec: io[IoOp::Sync as usize].calls as f64 / secs,
        disk_ops_per_sec: rw.calls as f64 / secs,
        disk_latency_p50_us: quantile_us(&rw.hist, 0.5),
        disk_latency_p99_us: quantile_us(&rw.hist, 0.99),
        dirty_logging: logging,
        sources_live,
    }
}

/// Host I/O pressure: each device's block-layer figures over the window, from two
/// readings of (device, write) → cumulative stats over all submitters.
pub fn devices(a: &BTreeMap<u32, IoStats>, b: &BTreeMap<u32, IoStats>, secs: f64) -> Vec<DeviceIo> {
    let secs = secs.max(1e-9);
    b.iter()
        .filter_map(|(&dev, s)| {
            let d = diff_stats(&a.get(&dev).copied().unwrap_or_default(), s);
            (d.calls > 0).then(|| DeviceIo {
                device: format!("{}:{}", dev >> 20, dev & 0xfffff),
                ios_per_sec: d.calls as f64 / secs,
                bytes_per_sec: d.bytes as f64 / secs,
                latency_p50_us: quantile_us(&d.hist, 0.5),
                latency_p99_us: quantile_us(&d.hist, 0.99),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ns: u64) -> Reading {
        Reading {
            at_ns: ns,
            ..Reading::default()
        }
    }

    #[test]
    fn quantiles_read_inside_log2_buckets() {
        let mut h = [0u64; HIST_BUCKETS];
        assert_eq!(quantile_us(&h, 0.5), None);
        // 99 requests in [64, 128) µs ≈ bucket 16 (65.5–131 µs), one in bucket 20.
        h[16] = 99;
        h[20] = 1;
        let p50 = quantile_us(&h, 0.5).unwrap();
        assert!((65.5..131.1).contains(&p50), "{p50}");
        let p99 = quantile_us(&h, 0.99).unwrap();
        assert!(p99 <= 131.1, "{p99}");
        let p100 = quantile_us(&h, 1.0).unwrap();
        assert!(p100 >= 1048.0, "{p100}");
    }

    #[test]
    fn the_preferred_live_source_gives_the_rate() {
        let a = at(0);
        let mut b = at(2_000_000_000);
        b.counts.harvests = 3;
        b.counts.dirty[DirtySource::Walk as usize] = 20_000;
        b.counts.dirty[DirtySource::Spte as usize] = 19_000;
        b.ws_pages = 15_000;
        let s = window(&a, &b, Logging::Unknown);
        assert_eq!(s.dirty_source, Some("kvmmmu:kvm_mmu_set_spte"));
        assert_eq!(s.dirty_pages_per_sec, Some(9_500.0));
        assert_eq!(s.working_set_pages, Some(15_000));
        assert!(s.dirty_logging);
        // Logging on for half the window: the rate is per second of logging.
        let s = window(&a, &b, Logging::OnFor(1.0));
        assert_eq!(s.dirty_pages_per_sec, Some(19_000.0));
        // Only walks: they give the rate.
        b.counts.dirty[DirtySource::Spte as usize] = 0;
        let s = window(&a, &b, Logging::Unknown);
        assert_eq!(s.dirty_source, Some("kvmmmu:kvm_mmu_pagetable_walk"));
        // The ring, where it delivers, wins.
        b.counts.dirty[DirtySource::Ring as usize] = 18_000;
        let s = window(&a, &b, Logging::Unknown);
        assert_eq!(s.dirty_source, Some("kvm:kvm_dirty_ring_push"));
        assert_eq!(s.dirty_events_per_sec.len(), 2);
    }

    #[test]
    fn a_memslot_update_turning_logging_on_counts_until_turned_off() {
        let a = at(0);
        let mut b = at(1_000_000_000);
        b.counts.dirty[DirtySource::Walk as usize] = 500;
        b.counts.memslot_ns = 5;
        b.counts.memslot_logging = 1;
        assert_eq!(
            window(&a, &b, Logging::Unknown).dirty_pages_per_sec,
            Some(500.0)
        );
        b.counts.memslot_logging = 0;
        assert_eq!(window(&a, &b, Logging::Unknown).dirty_pages_per_sec, None);
    }

    #[test]
    fn without_logging_the_rate_is_null_and_says_why() {
        let a = at(0);
        let mut b = at(1_000_000_000);
        b.counts.dirty[DirtySource::Walk as usize] = 500;
        let s = window(&a, &b, Logging::Unknown);
        assert_eq!(s.dirty_pages_per_sec, None);
        assert!(s.dirty_note.unwrap().contains("logging is off"));
        assert_eq!(s.working_set_pages, None);
    }

    #[test]
    fn exits_and_disk_io_become_rates() {
        let a = at(0);
        let mut b = at(2_000_000_000);
        b.exits.insert((ExitKind::Userspace as u32, 2), 4000);
        b.exits.insert((ExitKind::Pio as u32, 0x3f8), 4000);
        b.io[IoOp::Write as usize].calls = 200;
        b.io[IoOp::Write as usize].bytes = 200 * 4096;
        b.io[IoOp::Write as usize].hist[17] = 200;
        b.io[IoOp::Sync as usize].calls = 10;
        let s = window(&a, &b, Logging::Unknown);
        assert_eq!(s.exits_per_sec, 2000.0);
        assert_eq!(s.exits_by_reason["userspace:io"], 2000.0);
        assert_eq!(s.disk_write_bytes_per_sec, 409_600.0);
        assert_eq!(s.disk_syncs_per_sec, 5.0);
        assert!(s.disk_latency_p99_us.unwrap() > 131.0);
        assert!(s.sources_live.contains(&"kvm:kvm_userspace_exit"));
        assert!(s.sources_live.contains(&"syscalls:disk_io"));
    }

    #[test]
    fn devices_report_only_what_moved() {
        let mut a = BTreeMap::new();
        let mut b = BTreeMap::new();
        let mut s = IoStats::default();
        a.insert((8 << 20) | 16, s);
        s.calls = 100;
        s.bytes = 100 << 12;
        s.hist[15] = 100;
        b.insert((8 << 20) | 16, s);
        b.insert(7 << 20, IoStats::default());
        let d = devices(&a, &b, 1.0);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].device, "8:16");
        assert_eq!(d[0].ios_per_sec, 100.0);
    }
}
