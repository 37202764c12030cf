//! Which stale pages a post-copy switch drops on the destination while the guest still
//! runs, and which it holds back to send whole during the pause.
//!
//! Before pausing, the source has the destination drop, in rounds, the pages the guest
//! dirtied since they were sent. A dropped page costs a fault the next time the guest
//! touches it after the resume: a round trip to the source with that vCPU stopped,
//! and right after the resume every such fault delays the guest's return. Pages the
//! guest wrote in two rounds in a row (its stack, counters, tables) are the ones it is
//! about to touch again, so they are held rather than dropped, and go out during the
//! pause, hottest first, as many as the link moves in a millisecond or two.

use crate::vmm::dirty::DirtyBitmap;

/// Link time the pause may spend on pages the guest is about to touch: each saves a
/// fault of about a round trip plus the page's own transfer after the resume.
pub(super) const PAUSE_SEND_SECS: f64 = 1.5e-3;
/// Bounds on pages sent during the pause, whatever the link's measured rate.
pub(super) const PAUSE_PAGES_MIN: u64 = 32;
pub(super) const PAUSE_PAGES_MAX: u64 = 1024;

/// The discard rounds' memory: what the previous round found dirty, and what is held.
pub(super) struct HotPages {
    previous: DirtyBitmap,
    held: DirtyBitmap,
}

impl HotPages {
    pub(super) fn new(pages: u64) -> Self {
        Self {
            previous: DirtyBitmap::new(pages),
            held: DirtyBitmap::new(pages),
        }
    }

    /// Takes one round's dirty pages; returns those to drop on the destination now.
    /// A page written in this round and in the one before (or held since) is held; a
    /// held page the guest left alone this round has cooled down and is dropped.
    pub(super) fn round(&mut self, dirty: &DirtyBitmap) -> DirtyBitmap {
        let mut recent = self.previous.clone();
        recent.or_assign_words(self.held.words());
        let mut hot = dirty.clone();
        hot.and_assign(&recent);
        let mut drop = dirty.clone();
        drop.or_assign_words(self.held.words());
        drop.and_not_assign(&hot);
        self.held = hot;
        self.previous.clone_from(dirty);
        drop
    }

    /// Stale on the destination but not dropped: sent in the pause, or dropped then.
    pub(super) fn held(&self) -> &DirtyBitmap {
        &self.held
    }
}

/// How many pages the pause may send at `bytes_per_sec` on the wire (counted raw:
/// the pages a guest keeps rewriting seldom compress much); the floor when the link
/// is not measured yet.
pub(crate) fn pause_budget(bytes_per_sec: f64) -> u64 {
    if bytes_per_sec.is_nan() || bytes_per_sec <= 0.0 {
        return PAUSE_PAGES_MIN;
    }
    let pages = bytes_per_sec * PAUSE_SEND_SECS / crate::guest::abi::PAGE_SIZE as f64;
    (pages as u64).clamp(PAUSE_PAGES_MIN, PAUSE_PAGES_MAX)
}

/// Splits the pages stale at the pause (`held`, and `late`: dirtied since the last
/// round) into up to `budget` to send now, hottest first (held and dirtied again,
/// then held, then only just dirtied), and the rest, which the destination drops.
pub(super) fn pause_split(
    held: &DirtyBitmap,
    late: &DirtyBitmap,
    budget: u64,
) -> (Vec<u64>, DirtyBitmap) {
    let mut both = held.clone();
    both.and_assign(late);
    let mut held_only = held.clone();
    held_only.and_not_assign(late);
    let mut late_only = late.clone();
    late_only.and_not_assign(held);
    let mut rest = held.clone();
    rest.or_assign_words(late.words());
    let send: Vec<u64> = both
        .iter_set()
        .chain(held_only.iter_set())
        .chain(late_only.iter_set())
        .take(budget as usize)
        .collect();
    for &p in &send {
        rest.unset(p);
    }
    (send, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(pages: &[u64]) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(256);
        for &p in pages {
            b.set(p);
        }
        b
    }

    fn set(b: &DirtyBitmap) -> Vec<u64> {
        b.iter_set().collect()
    }

    #[test]
    fn pages_written_in_consecutive_rounds_are_held_and_cooled_ones_dropped() {
        let mut h = HotPages::new(256);
        // Nothing is known to be hot in the first round: all of it goes.
        assert_eq!(set(&h.round(&bitmap(&[1, 2, 3]))), vec![1, 2, 3]);
        assert_eq!(set(h.held()), Vec::<u64>::new());
        // 1 and 2 again: held. 7 is new: dropped.
        assert_eq!(set(&h.round(&bitmap(&[1, 2, 7]))), vec![7]);
        assert_eq!(set(h.held()), vec![1, 2]);
        // 1 again stays held; 2 cooled down and is dropped now; 7 again is held.
        assert_eq!(set(&h.round(&bitmap(&[1, 7, 9]))), vec![2, 9]);
        assert_eq!(set(h.held()), vec![1, 7]);
    }

    #[test]
    fn every_stale_page_is_either_dropped_or_held() {
        // Whatever the rounds, a page dirtied at any point is dropped in some round or
        // still held at the end: none is left stale and unaccounted for.
        let rounds = [vec![5, 6, 7], vec![6, 7, 8], vec![7, 8], vec![1, 8]];
        let mut h = HotPages::new(256);
        let mut accounted = DirtyBitmap::new(256);
        let mut dirtied = DirtyBitmap::new(256);
        for r in &rounds {
            let d = bitmap(r);
            dirtied.or_assign_words(d.words());
            accounted.or_assign_words(h.round(&d).words());
        }
        accounted.or_assign_words(h.held().words());
        assert_eq!(accounted, dirtied);
    }

    #[test]
    fn the_pause_sends_the_hottest_pages_within_budget_and_drops_the_rest() {
        let held = bitmap(&[10, 11, 12]);
        let late = bitmap(&[12, 40, 41]);
        let (send, rest) = pause_split(&held, &late, 3);
        assert_eq!(send, vec![12, 10, 11]);
        assert_eq!(set(&rest), vec![40, 41]);
        let (send, rest) = pause_split(&held, &late, 100);
        assert_eq!(send, vec![12, 10, 11, 40, 41]);
        assert!(rest.count() == 0);
    }

    #[test]
    fn the_budget_follows_the_link() {
        assert_eq!(pause_budget(0.0), PAUSE_PAGES_MIN);
        assert_eq!(pause_budget(f64::NAN), PAUSE_PAGES_MIN);
        // 1 Gbit/s: 1.5 ms is about 45 pages.
        assert_eq!(pause_budget(125e6), 45);
        assert_eq!(pause_budget(1e12), PAUSE_PAGES_MAX);
    }
}
