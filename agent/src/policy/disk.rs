//! Disks under a running guest: whether their copy keeps up with its writes. Pure, as
//! the engine is: a storage migration in auto mode asks after each round whether to
//! mirror the guest's writes; the engine caps a travelling disk's writes on the same
//! ground.

/// A background copy converges while the guest's distinct writes stay under this
/// share of the copy's speed: each re-copy round leaves about (write / copy) of the
/// one before, so at one half a few rounds do; `cargo xtask bench storage` measured
/// background rounds converging up to about 50 % and stalling well before 100 %.
pub const BACKGROUND_SHARE: f64 = 0.5;

/// A storage migration's mode after a round: mirror the guest's writes (active) when
/// they outpace [`BACKGROUND_SHARE`] of the copy, else keep re-copying in the
/// background; with the reason, in figures.
pub fn mirror_mode(write_bytes_per_sec: f64, copy_bytes_per_sec: f64) -> (bool, String) {
    let mb = |b: f64| b / 1e6;
    let share = write_bytes_per_sec / copy_bytes_per_sec.max(1.0);
    let active = share > BACKGROUND_SHARE;
    let reason = format!(
        "guest writes {:.1} MB/s of distinct blocks, the copy runs at {:.1} MB/s ({:.0} %): {}",
        mb(write_bytes_per_sec),
        mb(copy_bytes_per_sec),
        share * 100.0,
        if active {
            "background rounds would barely shrink; mirroring writes (active)"
        } else {
            "background re-copy rounds converge"
        }
    );
    (active, reason)
}

/// How long the guest has, on average, already been held in a capped disk write when
/// a pause comes, seconds. A guest write completes only when the cap lets it, and the
/// vCPU that issued it waits meanwhile (this VMM's block requests are synchronous), so
/// the guest's downtime starts with that wait, not with the pause. Under a cap of
/// `cap` bytes/s below the guest's `demand` (distinct bytes/s it would write), each
/// newly written block of `block` bytes waits `block/cap − block/demand`; the vCPU
/// spends `1 − cap/demand` of its time so, and a pause at a random moment finds it
/// half-way through.
pub fn held_write_s(block: f64, cap: f64, demand: f64) -> f64 {
    if cap <= 0.0 || demand <= cap {
        return 0.0;
    }
    let wait = block / cap - block / demand;
    (1.0 - cap / demand) * wait / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_the_guest_does_not_reach_holds_nothing() {
        assert_eq!(held_write_s(65536.0, 10e6, 5e6), 0.0);
        assert_eq!(held_write_s(65536.0, 0.0, 5e6), 0.0);
        // 64 KiB blocks at 2.4 MB/s against 62 MB/s: each waits about 26 ms, and the
        // vCPU is in such a wait 96 % of the time.
        let held = held_write_s(65536.0, 2.4e6, 62e6);
        assert!((held - 0.0126).abs() < 0.0005, "{held}");
        // A looser cap holds each write for less, and less often.
        assert!(held_write_s(65536.0, 12e6, 62e6) < held / 4.0);
    }

    #[test]
    fn the_mode_follows_the_write_rate_against_the_copy() {
        let (active, why) = mirror_mode(30e6, 100e6);
        assert!(!active, "{why}");
        assert!(
            why.contains("30.0 MB/s") && why.contains("100.0 MB/s"),
            "{why}"
        );
        assert!(mirror_mode(60e6, 100e6).0);
        // A round that copied nothing (all written during it) mirrors.
        assert!(mirror_mode(1e6, 0.0).0);
        assert!(!mirror_mode(0.0, 0.0).0);
    }
}
