//! Which stale pages a post-copy switch drops on the destination while the guest still
//! runs, and which it holds back to send whole during the pause.
//!
//! Before pausing, the source has the destination drop, in rounds, the pages the guest
//! dirtied since they were sent. A dropped page costs a fault the next time the guest
//! touches it after the resume: a round trip to the source with that vCPU stopped,
//! and right after the resume every such fault delays the guest's return. Pages the
//! guest wrote in two rounds in a row (its stack, counters, tables) are the ones it is
//! about to touch again, so they are held rather than dropped, and go out during the
//! pause, hottest first, as many as the link moves in half a millisecond.

use std::collections::HashMap;

use crate::bitmap::Bitmap;

/// Link time the pause may spend on pages the guest is about to touch: each saves a
/// fault of about a round trip plus the page's own transfer after the resume, but
/// the guest is back at work after its first fault or two whatever follows (it
/// reports between pages), so more than a few dozen only lengthen the pause.
/// Interleaved runs on loopback (2 vCPUs, 100k pages/s): 0.5 ms gave a downtime p50
/// of 4.3–4.5 ms where 1.5 ms gave 5.3–5.6, and none at all 4.0–4.7.
pub(super) const PAUSE_SEND_SECS: f64 = 0.5e-3;
/// Bounds on pages sent during the pause, whatever the link's measured rate.
pub(super) const PAUSE_PAGES_MIN: u64 = 32;
pub(super) const PAUSE_PAGES_MAX: u64 = 1024;

/// The discard rounds' memory: what the previous round found dirty, what is held, and
/// for how many rounds in a row each held page has been written.
pub(super) struct HotPages {
    previous: Bitmap,
    held: Bitmap,
    streaks: HashMap<u64, u32>,
    rounds: u32,
}

impl HotPages {
    pub(super) fn new(pages: u64) -> Self {
        Self {
            previous: Bitmap::new(pages),
            held: Bitmap::new(pages),
            streaks: HashMap::new(),
            rounds: 0,
        }
    }

    /// Takes one round's dirty pages; returns those to drop on the destination now.
    /// A page written in this round and in the one before is held; a held page the
    /// guest left alone this round has cooled down and is dropped.
    ///
    /// The first round holds all it finds, so the second drops only what cooled
    /// down in between. Otherwise the hottest pages would be dropped once before
    /// anything is known to be hot, and on the destination a page landing where one
    /// was dropped costs a fresh host page, which in the pause adds up.
    pub(super) fn round(&mut self, dirty: &Bitmap) -> Bitmap {
        self.rounds += 1;
        if self.rounds == 1 {
            self.held.or_assign_words(dirty.words());
            self.previous.clone_from(dirty);
            self.streaks = dirty.iter_set().map(|p| (p, 1)).collect();
            return Bitmap::new(dirty.pages());
        }
        // Held pages were all written in the previous round (held ⊆ previous).
        let mut hot = dirty.clone();
        hot.and_assign(&self.previous);
        let mut drop = dirty.clone();
        drop.or_assign_words(self.held.words());
        drop.and_not_assign(&hot);
        self.streaks = hot
            .iter_set()
            .map(|p| (p, self.streaks.get(&p).copied().unwrap_or(0) + 1))
            .collect();
        self.held = hot;
        self.previous.clone_from(dirty);
        drop
    }

    /// Stale on the destination but not dropped: sent in the pause, or dropped then.
    pub(super) fn held(&self) -> &Bitmap {
        &self.held
    }
}

/// How many pages the pause may send at `bytes_per_sec` on the wire (counted raw:
/// the pages a guest keeps rewriting seldom compress much); the floor when the link
/// is not measured yet.
pub(super) fn pause_budget(bytes_per_sec: f64) -> u64 {
    super::MECHANICS.postcopy_pause_pages(bytes_per_sec)
}

/// Splits the pages stale at the pause (`held`, and `late`: dirtied since the last
/// round) into up to `budget` to send now, hottest first, and the rest, which the
/// destination drops. Hottest: written in the most rounds in a row (tables and stacks
/// the guest writes all the time come before pages it happened to write twice), and
/// among equals, dirtied again since the last round.
pub(super) fn pause_split(hot: &HotPages, late: &Bitmap, budget: u64) -> (Vec<u64>, Bitmap) {
    let mut rest = hot.held.clone();
    rest.or_assign_words(late.words());
    if budget == 0 {
        return (Vec::new(), rest);
    }
    // Held pages have a streak, so they all rank above pages only dirtied late; only
    // they need sorting (late can be all of memory).
    let heat = |p: u64| 2 * hot.streaks.get(&p).copied().unwrap_or(0) + u32::from(late.is_set(p));
    let mut held: Vec<(u32, u64)> = hot.held.iter_set().map(|p| (heat(p), p)).collect();
    // Stable, so pages of equal heat keep their address order.
    held.sort_by_key(|&(heat, _)| std::cmp::Reverse(heat));
    let send: Vec<u64> = held
        .into_iter()
        .map(|(_, p)| p)
        .chain(late.iter_set().filter(|&p| !hot.held.is_set(p)))
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

    fn bitmap(pages: &[u64]) -> Bitmap {
        let mut b = Bitmap::new(256);
        for &p in pages {
            b.set(p);
        }
        b
    }

    fn set(b: &Bitmap) -> Vec<u64> {
        b.iter_set().collect()
    }

    #[test]
    fn pages_written_in_consecutive_rounds_are_held_and_cooled_ones_dropped() {
        let mut h = HotPages::new(256);
        // Nothing is known to be hot in the first round: all of it is held for now.
        assert_eq!(set(&h.round(&bitmap(&[1, 2, 3]))), Vec::<u64>::new());
        assert_eq!(set(h.held()), vec![1, 2, 3]);
        // 1 and 2 again: held. 3 cooled down and 7 is new: dropped.
        assert_eq!(set(&h.round(&bitmap(&[1, 2, 7]))), vec![3, 7]);
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
        let mut accounted = Bitmap::new(256);
        let mut dirtied = Bitmap::new(256);
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
        let mut h = HotPages::new(256);
        // 10 is written in every round, 11 and 12 from the second on.
        h.round(&bitmap(&[10, 30]));
        h.round(&bitmap(&[10, 11, 12]));
        h.round(&bitmap(&[10, 11, 12]));
        assert_eq!(set(h.held()), vec![10, 11, 12]);
        let late = bitmap(&[12, 40, 41]);
        let (send, rest) = pause_split(&h, &late, 3);
        assert_eq!(send, vec![10, 12, 11]);
        assert_eq!(set(&rest), vec![40, 41]);
        let (send, rest) = pause_split(&h, &late, 100);
        assert_eq!(send, vec![10, 12, 11, 40, 41]);
        assert!(rest.count() == 0);
    }

    #[test]
    fn the_budget_follows_the_link() {
        assert_eq!(pause_budget(0.0), PAUSE_PAGES_MIN);
        assert_eq!(pause_budget(f64::NAN), PAUSE_PAGES_MIN);
        // 1 GB/s: 0.5 ms is about 122 pages; at 1 Gbit/s the floor applies.
        assert_eq!(pause_budget(1e9), 122);
        assert_eq!(pause_budget(125e6), PAUSE_PAGES_MIN);
        assert_eq!(pause_budget(1e12), PAUSE_PAGES_MAX);
    }
}
