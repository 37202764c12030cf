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

#[cfg(test)]
mod tests {
    use super::*;

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
