//! How a backend moves a VM, as far as a policy's predictions depend on it. The
//! backend reports these values; the policy models with them and assumes none of its
//! own, so the same policy can drive Ferry's VMM or another one.

use serde::{Deserialize, Serialize};

/// The backend's fixed mechanics: batch sizes, round limit, disk block size, the
/// smallest disk-write cap it enforces, and how it sizes a post-copy pause.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Mechanics {
    /// Bytes per guest page.
    pub page_bytes: u64,
    /// Pages per batch the send loop compresses and frames at once: a round's first
    /// batch is compressed before the link carries anything.
    pub batch_pages: u32,
    /// A send of few pages (the last rounds, the pause) is cut into at least this many
    /// batches, each of at least `min_batch_pages`, so the link starts on the first
    /// while the rest are compressed.
    pub min_split_batches: u32,
    pub min_batch_pages: u32,
    /// Rounds pre-copy makes at most before it switches over once the pause fits.
    pub max_rounds: u32,
    /// Bytes per block of a travelling disk's dirty log (a guest write marks whole
    /// blocks, and rounds send them whole).
    pub disk_block_bytes: u64,
    /// The smallest cap on the guest's disk writes the backend enforces.
    pub min_disk_write_limit_bytes_per_sec: u64,
    /// Post-copy: link time the pause spends on the hottest pages, seconds,
    pub postcopy_pause_send_secs: f64,
    /// and bounds on how many it sends then, whatever the link's rate.
    pub postcopy_pause_pages_min: u64,
    pub postcopy_pause_pages_max: u64,
}

impl Mechanics {
    /// Pages per batch for a send of `pages` pages when a batch may hold `cap`.
    pub fn batch_for(&self, pages: usize, cap: usize) -> usize {
        pages
            .div_ceil(self.min_split_batches.max(1) as usize)
            .max(self.min_batch_pages as usize)
            .min(cap)
            .max(1)
    }

    /// How many pages a post-copy pause sends at `bytes_per_sec` on the wire (counted
    /// raw: pages a guest keeps rewriting seldom compress much); the floor while the
    /// link is not measured.
    pub fn postcopy_pause_pages(&self, bytes_per_sec: f64) -> u64 {
        if bytes_per_sec.is_nan() || bytes_per_sec <= 0.0 {
            return self.postcopy_pause_pages_min;
        }
        let pages = bytes_per_sec * self.postcopy_pause_send_secs / self.page_bytes as f64;
        (pages as u64).clamp(self.postcopy_pause_pages_min, self.postcopy_pause_pages_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Mechanics {
        Mechanics {
            page_bytes: 4096,
            batch_pages: 256,
            min_split_batches: 4,
            min_batch_pages: 32,
            max_rounds: 30,
            disk_block_bytes: 64 << 10,
            min_disk_write_limit_bytes_per_sec: 1_000_000,
            postcopy_pause_send_secs: 0.5e-3,
            postcopy_pause_pages_min: 32,
            postcopy_pause_pages_max: 1024,
        }
    }

    #[test]
    fn a_small_send_is_split_and_a_large_one_capped() {
        let m = m();
        assert_eq!(m.batch_for(65_536, 256), 256);
        assert_eq!(m.batch_for(258, 256), 65);
        assert_eq!(m.batch_for(40, 256), 32);
        assert_eq!(m.batch_for(65_536, 8), 8);
        assert_eq!(m.batch_for(0, 256), 32);
    }

    #[test]
    fn the_postcopy_pause_follows_the_link_within_its_bounds() {
        let m = m();
        assert_eq!(m.postcopy_pause_pages(0.0), 32);
        assert_eq!(m.postcopy_pause_pages(f64::NAN), 32);
        assert_eq!(m.postcopy_pause_pages(1e9), 122);
        assert_eq!(m.postcopy_pause_pages(1e12), 1024);
    }

    #[test]
    fn it_travels_as_json() {
        let m = m();
        let back: Mechanics = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
