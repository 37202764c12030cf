//! Which stale pages a post-copy switch drops on the destination while the guest still
//! runs, and which it holds back to send whole during the pause.
//!
//! Before pausing, the source has the destination drop, in rounds, the pages the guest
//! dirtied since they were sent. A dropped page costs a fault the next time the guest
//! touches it after the resume: a round trip to the source with that vCPU stopped,
//! and right after the resume every such fault delays the guest's return. Pages the
//! guest wrote in two rounds in a row (its stack, counters, tables) are the ones it is
//! about to touch again, so they are held rather than dropped, and go out during the
//! pause, hottest first, as many as the link moves in a millisecond and a half.
//!
//! A page is dropped only once a round has shown it cooled (not written again), never
//! in the round that found it dirty: dropping a page that then proves hot would make
//! the pause refill freed memory, a host page fault per page.

use crate::vmm::dirty::DirtyBitmap;

/// Link time the pause may spend on pages the guest is about to touch: each saves a
/// fault of about a round trip plus the page's own transfer after the resume. (On
/// loopback 0.5 ms left hot pages out, and the median downtime rose 2 ms; 3 ms
/// gained nothing over this.)
pub(super) const PAUSE_SEND_SECS: f64 = 1.5e-3;
/// Bounds on pages sent during the pause, whatever the link's measured rate.
pub(super) const PAUSE_PAGES_MIN: u64 = 16;
pub(super) const PAUSE_PAGES_MAX: u64 = 1024;

/// The discard rounds' memory of the stale pages the destination still holds.
pub(super) struct HotPages {
    /// Dirtied in the last round only: hot or not is known after the next one.
    pending: DirtyBitmap,
    /// Dirtied in the last round and in the one before (or held then).
    held: DirtyBitmap,
}

impl HotPages {
    pub(super) fn new(pages: u64) -> Self {
        Self {
            pending: DirtyBitmap::new(pages),
            held: DirtyBitmap::new(pages),
        }
    }

    /// Takes one round's dirty pages; returns those to drop on the destination now:
    /// the stale pages this round did not write again.
    pub(super) fn round(&mut self, dirty: &DirtyBitmap) -> DirtyBitmap {
        let mut stale = self.pending.clone();
        stale.or_assign_words(self.held.words());
        let mut hot = dirty.clone();
        hot.and_assign(&stale);
        let mut drop = stale;
        drop.and_not_assign(dirty);
        self.pending.clone_from(dirty);
        self.pending.and_not_assign(&hot);
        self.held = hot;
        drop
    }

    /// A last, short round right before the pause: too short to tell that a held page
    /// cooled, long enough to drop the pending pages the guest left alone, so the
    /// pause does not have to. Returns those.
    pub(super) fn last_round(&mut self, dirty: &DirtyBitmap) -> DirtyBitmap {
        let mut drop = self.pending.clone();
        drop.and_not_assign(dirty);
        let mut rewritten = self.pending.clone();
        rewritten.and_assign(dirty);
        self.held.or_assign_words(rewritten.words());
        self.pending.clone_from(dirty);
        self.pending.and_not_assign(&self.held);
        drop
    }

    /// Stale on the destination and hot: sent in the pause, or dropped then.
    pub(super) fn held(&self) -> &DirtyBitmap {
        &self.held
    }

    /// Stale on the destination, written once lately: dropped in the pause.
    pub(super) fn pending(&self) -> &DirtyBitmap {
        &self.pending
    }
}

/// How many pages the pause may send at `bytes_per_sec` on the wire (counted raw:
/// the pages a guest keeps rewriting seldom compress much); the floor when the link
/// is not measured yet.
pub(super) fn pause_budget(bytes_per_sec: f64) -> u64 {
    if bytes_per_sec.is_nan() || bytes_per_sec <= 0.0 {
        return PAUSE_PAGES_MIN;
    }
    let pages = bytes_per_sec * PAUSE_SEND_SECS / crate::guest::abi::PAGE_SIZE as f64;
    (pages as u64).clamp(PAUSE_PAGES_MIN, PAUSE_PAGES_MAX)
}

/// Splits the pages stale at the pause (`held`, `late`: dirtied since the last round,
/// and `pending`) into up to `budget` to send now, hottest first (held and dirtied
/// again, then held, then only just dirtied), and the rest, which the destination
/// drops. Pending pages, written once a round ago and not since, are not worth the
/// pause.
pub(super) fn pause_split(
    hot: &HotPages,
    late: &DirtyBitmap,
    budget: u64,
) -> (Vec<u64>, DirtyBitmap) {
    let held = hot.held();
    let mut both = held.clone();
    both.and_assign(late);
    let mut held_only = held.clone();
    held_only.and_not_assign(late);
    let mut late_only = late.clone();
    late_only.and_not_assign(held);
    let mut rest = held.clone();
    rest.or_assign_words(late.words());
    rest.or_assign_words(hot.pending().words());
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
    fn pages_are_dropped_once_cooled_and_held_while_hot() {
        let mut h = HotPages::new(256);
        // Nothing is known yet: nothing is dropped, all of it waits a round.
        assert_eq!(set(&h.round(&bitmap(&[1, 2, 3]))), Vec::<u64>::new());
        assert_eq!(set(h.pending()), vec![1, 2, 3]);
        // 1 and 2 again: held. 3 cooled: dropped. 7 is new: pending.
        assert_eq!(set(&h.round(&bitmap(&[1, 2, 7]))), vec![3]);
        assert_eq!(set(h.held()), vec![1, 2]);
        assert_eq!(set(h.pending()), vec![7]);
        // 1 again stays held; 2 cooled down and is dropped now; 7 again is held; 9
        // waits.
        assert_eq!(set(&h.round(&bitmap(&[1, 7, 9]))), vec![2]);
        assert_eq!(set(h.held()), vec![1, 7]);
        assert_eq!(set(h.pending()), vec![9]);
    }

    #[test]
    fn every_stale_page_is_dropped_held_or_pending() {
        // Whatever the rounds, a page dirtied at any point is dropped in some round or
        // still held or pending at the end: none is left stale and unaccounted for,
        // and none is in two of those at once.
        let rounds = [vec![5, 6, 7], vec![6, 7, 8], vec![7, 8], vec![1, 8], vec![]];
        let mut h = HotPages::new(256);
        let mut dropped = DirtyBitmap::new(256);
        let mut dirtied = DirtyBitmap::new(256);
        for r in &rounds {
            let d = bitmap(r);
            dirtied.or_assign_words(d.words());
            let drop = h.round(&d);
            let mut overlap = drop.clone();
            overlap.and_assign(h.held());
            assert_eq!(overlap.count(), 0);
            overlap = h.held().clone();
            overlap.and_assign(h.pending());
            assert_eq!(overlap.count(), 0);
            dropped.or_assign_words(drop.words());
        }
        let mut accounted = dropped;
        accounted.or_assign_words(h.held().words());
        accounted.or_assign_words(h.pending().words());
        assert_eq!(accounted, dirtied);
    }

    #[test]
    fn the_last_round_drops_only_what_was_pending() {
        let mut h = HotPages::new(256);
        h.round(&bitmap(&[1, 2, 3]));
        h.round(&bitmap(&[1, 2, 5, 6]));
        // Held: 1, 2. Pending: 5, 6. A short round saw 5 and 9 only: 6 goes, 1 and 2
        // stay held, 5 joins them, 9 waits.
        assert_eq!(set(&h.last_round(&bitmap(&[5, 9]))), vec![6]);
        assert_eq!(set(h.held()), vec![1, 2, 5]);
        assert_eq!(set(h.pending()), vec![9]);
    }

    #[test]
    fn the_pause_sends_the_hottest_pages_within_budget_and_drops_the_rest() {
        let mut h = HotPages::new(256);
        h.round(&bitmap(&[10, 11, 12, 90]));
        h.round(&bitmap(&[10, 11, 12, 60]));
        // Held: 10, 11, 12. Pending: 60.
        let late = bitmap(&[12, 40, 41]);
        let (send, rest) = pause_split(&h, &late, 3);
        assert_eq!(send, vec![12, 10, 11]);
        assert_eq!(set(&rest), vec![40, 41, 60]);
        let (send, rest) = pause_split(&h, &late, 100);
        assert_eq!(send, vec![12, 10, 11, 40, 41]);
        assert_eq!(set(&rest), vec![60]);
    }

    #[test]
    fn the_budget_follows_the_link() {
        assert_eq!(pause_budget(0.0), PAUSE_PAGES_MIN);
        assert_eq!(pause_budget(f64::NAN), PAUSE_PAGES_MIN);
        // 1 Gbit/s: 1.5 ms is about 45 pages; 100 Mbit/s: under the floor.
        assert_eq!(pause_budget(125e6), 45);
        assert_eq!(pause_budget(12.5e6), PAUSE_PAGES_MIN);
        assert_eq!(pause_budget(1e12), PAUSE_PAGES_MAX);
    }
}
