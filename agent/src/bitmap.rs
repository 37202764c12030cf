//! A bitmap over pages or blocks: what the dirty log harvests into, what a migration
//! still owes, which post-copy pages are missing, which disk blocks were written.

use std::ops::Range;

/// One bit per page (or block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    pages: u64,
}

impl Bitmap {
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// How many pages the bitmap covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Sets a page's bit; true if it was clear. Pages past the end are ignored.
    pub fn set(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        let was = self.words[w] & bit;
        self.words[w] |= bit;
        was == 0
    }

    /// Clears a page's bit; true if it was set.
    pub fn unset(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        let was = self.words[w] & bit;
        self.words[w] &= !bit;
        was != 0
    }

    /// A bitmap of `pages` pages with the bits of `words` (KVM layout) set.
    pub fn from_words(pages: u64, words: &[u64]) -> Self {
        let mut b = Self::new(pages);
        b.or_assign_words(words);
        b
    }

    /// Keeps only the bits also set in `other` (same size).
    pub fn and_assign(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= *b;
        }
    }

    /// Clears the bits set in `other` (same size).
    pub fn and_not_assign(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// The pages not set here.
    pub fn complement(&self) -> Bitmap {
        let mut c = Bitmap {
            words: self.words.iter().map(|w| !w).collect(),
            pages: self.pages,
        };
        c.trim_tail();
        c
    }

    /// The set pages as runs (first page, count), ascending; whole words at a time
    /// where they are full.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut push = |first: u64, count: u64| match runs.last_mut() {
            Some((f, n)) if *f + *n == first => *n += count,
            _ => runs.push((first, count)),
        };
        for (i, &w) in self.words.iter().enumerate() {
            let base = i as u64 * 64;
            if w == !0 {
                push(base, 64);
            } else if w != 0 {
                for b in (Bits { word: w, base }) {
                    push(b, 1);
                }
            }
        }
        runs
    }

    /// Sets every page's bit.
    pub fn set_all(&mut self) {
        self.words.fill(!0);
        self.trim_tail();
    }

    /// The first set page at or after `from`, wrapping around to the start.
    pub fn next_set_wrapping(&self, from: u64) -> Option<u64> {
        if self.words.is_empty() {
            return None;
        }
        let from = if from >= self.pages { 0 } else { from };
        let first = (from / 64) as usize;
        let head = self.words[first] & (!0u64 << (from % 64));
        if head != 0 {
            return Some(first as u64 * 64 + u64::from(head.trailing_zeros()));
        }
        let n = self.words.len();
        (1..=n)
            .map(|k| (first + k) % n)
            .find(|&i| self.words[i] != 0)
            .map(|i| i as u64 * 64 + u64::from(self.words[i].trailing_zeros()))
    }

    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Set pages among `range` (clipped to the bitmap).
    pub fn count_in(&self, range: Range<u64>) -> u64 {
        let end = range.end.min(self.pages);
        if range.start >= end {
            return 0;
        }
        let (w0, w1) = ((range.start / 64) as usize, end.div_ceil(64) as usize);
        self.words[w0..w1]
            .iter()
            .enumerate()
            .map(|(k, &w)| {
                let lo = (w0 + k) as u64 * 64;
                u64::from((w & word_mask(lo, range.start, end)).count_ones())
            })
            .sum()
    }

    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// The set pages, in ascending order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .filter(|(_, w)| **w != 0)
            .flat_map(|(i, &w)| Bits {
                word: w,
                base: i as u64 * 64,
            })
    }

    /// ORs KVM-layout bitmap words (bit `p % 64` of word `p / 64` is page `p`) into this
    /// bitmap; returns how many bits went from clear to set. Words or bits past the end
    /// are ignored.
    pub fn or_assign_words(&mut self, words: &[u64]) -> u64 {
        let mut new = 0;
        for (dst, &src) in self.words.iter_mut().zip(words) {
            let fresh = src & !*dst;
            if fresh != 0 {
                *dst |= fresh;
                new += u64::from(fresh.count_ones());
            }
        }
        new - self.trim_tail()
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// ORs one word in; returns the bits newly set.
    pub(crate) fn or_word(&mut self, index: usize, bits: u64) -> u64 {
        let mask = if index + 1 == self.words.len() {
            self.tail_mask()
        } else {
            !0
        };
        let Some(dst) = self.words.get_mut(index) else {
            return 0;
        };
        let fresh = bits & mask & !*dst;
        *dst |= fresh;
        u64::from(fresh.count_ones())
    }

    fn tail_mask(&self) -> u64 {
        match self.pages % 64 {
            0 => !0,
            n => (1 << n) - 1,
        }
    }

    /// Clears bits past the last page; returns how many were set.
    fn trim_tail(&mut self) -> u64 {
        let mask = self.tail_mask();
        match self.words.last_mut() {
            Some(last) if *last & !mask != 0 => {
                let extra = u64::from((*last & !mask).count_ones());
                *last &= mask;
                extra
            }
            _ => 0,
        }
    }
}

/// The bits of the word starting at page `lo` that fall inside `first..end`.
pub(crate) fn word_mask(lo: u64, first: u64, end: u64) -> u64 {
    let mut mask = !0u64;
    if first > lo {
        if first - lo >= 64 {
            return 0;
        }
        mask &= !0u64 << (first - lo);
    }
    if end < lo + 64 {
        mask &= (1u64 << end.saturating_sub(lo)) - 1;
    }
    mask
}

struct Bits {
    word: u64,
    base: u64,
}

impl Iterator for Bits {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.word == 0 {
            return None;
        }
        let bit = self.word.trailing_zeros();
        self.word &= self.word - 1;
        Some(self.base + u64::from(bit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_complement_and_intersection() {
        let mut b = Bitmap::new(200);
        for p in [0, 1, 2, 70, 71] {
            b.set(p);
        }
        for p in 128..192 {
            b.set(p);
        }
        assert_eq!(b.runs(), vec![(0, 3), (70, 2), (128, 64)]);
        let c = b.complement();
        assert_eq!(c.count(), 200 - 69);
        assert_eq!(c.runs()[0], (3, 67));
        assert_eq!(*c.runs().last().unwrap(), (192, 8));
        let mut d = b.clone();
        d.and_assign(&c);
        assert_eq!(d.count(), 0);
    }

    #[test]
    fn next_set_wraps_and_unset_clears() {
        let mut b = Bitmap::new(200);
        assert_eq!(b.next_set_wrapping(0), None);
        b.set(3);
        b.set(130);
        assert_eq!(b.next_set_wrapping(0), Some(3));
        assert_eq!(b.next_set_wrapping(4), Some(130));
        assert_eq!(b.next_set_wrapping(131), Some(3));
        assert_eq!(b.next_set_wrapping(500), Some(3));
        assert!(b.unset(3));
        assert!(!b.unset(3));
        assert_eq!(b.next_set_wrapping(131), Some(130));
        b.set_all();
        assert_eq!(b.count(), 200);
        let c = Bitmap::from_words(200, b.words());
        assert_eq!(c.count(), 200);
    }
    #[test]
    fn bitmap_basics() {
        let mut b = Bitmap::new(130);
        assert_eq!(b.words().len(), 3);
        assert!(b.set(0) && b.set(64) && b.set(129));
        assert!(!b.set(129));
        assert!(!b.set(130), "past the end is ignored");
        assert!(b.is_set(64) && !b.is_set(65) && !b.is_set(1000));
        assert_eq!(b.count(), 3);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert_eq!(b.count_in(1..130), 2);
        assert_eq!(b.count_in(64..65), 1);
        assert_eq!(b.count_in(200..300), 0);
        // Bits past page 129 in the input are dropped and not counted.
        assert_eq!(b.or_assign_words(&[0b11, 0, !0]), 1 + 1);
        assert_eq!(b.count(), 5);
        assert_eq!(b.words()[2], 0b11);
        b.clear_all();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn word_masks() {
        assert_eq!(word_mask(0, 0, 64), !0);
        assert_eq!(word_mask(0, 3, 64), !0 << 3);
        assert_eq!(word_mask(64, 3, 66), 0b11);
        assert_eq!(word_mask(64, 70, 72), 0b1100_0000);
        assert_eq!(word_mask(0, 70, 72), 0);
    }
}
