//! The host's monotonic clock as a number every layer (and the eBPF probes, and the
//! guest's heartbeat) can compare.

/// CLOCK_MONOTONIC in nanoseconds (what `Instant` uses, but comparable across
/// processes and with eBPF's `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
