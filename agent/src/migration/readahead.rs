//! Which neighbours of a post-copy fault the source sends along with the page asked
//! for.
//!
//! A fault costs the faulting vCPU a round trip. Where the guest works through a small
//! region (its tables, a buffer it reads in order), the next faults are next door, and
//! sending the neighbourhood with the first answer saves the round trips. Where it
//! touches pages at random, neighbours are wasted bytes on the fault channel, in front
//! of the next answer. So the window goes out only once faults cluster: when a recent
//! fault fell within the same window.

use std::ops::Range;

/// Pages per window (aligned): 32 KiB, well under a millisecond on a 1 Gbit/s link.
pub(super) const WINDOW_PAGES: u64 = 8;
/// Recent faults remembered.
const RECENT: usize = 16;

pub(super) struct Readahead {
    recent: [u64; RECENT],
    next: usize,
}

impl Default for Readahead {
    fn default() -> Self {
        Self {
            recent: [u64::MAX; RECENT],
            next: 0,
        }
    }
}

impl Readahead {
    /// Records a fault on `page`; returns the window to send along with it when an
    /// earlier fault among the recent ones fell in the same window.
    pub(super) fn fault(&mut self, page: u64) -> Option<Range<u64>> {
        let first = page - page % WINDOW_PAGES;
        let clustered = self
            .recent
            .iter()
            .any(|&p| p != page && p != u64::MAX && p - p % WINDOW_PAGES == first);
        self.recent[self.next] = page;
        self.next = (self.next + 1) % RECENT;
        clustered.then_some(first..first + WINDOW_PAGES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_faults_send_nothing_extra() {
        let mut r = Readahead::default();
        for page in [5, 1000, 77_777, 123_456, 9_999] {
            assert_eq!(r.fault(page), None);
        }
    }

    #[test]
    fn a_second_fault_in_a_window_sends_the_window() {
        let mut r = Readahead::default();
        assert_eq!(r.fault(17), None);
        assert_eq!(r.fault(500), None);
        assert_eq!(r.fault(20), Some(16..24));
        // The same page again is a retry, not a cluster.
        let mut r = Readahead::default();
        assert_eq!(r.fault(40), None);
        assert_eq!(r.fault(40), None);
    }

    #[test]
    fn old_faults_are_forgotten() {
        let mut r = Readahead::default();
        assert_eq!(r.fault(3), None);
        for k in 0..RECENT as u64 {
            assert_eq!(r.fault(1_000 + k * 64), None);
        }
        assert_eq!(r.fault(4), None);
    }
}
