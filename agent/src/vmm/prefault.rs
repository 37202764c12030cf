//! Faulting in an incoming VM's memory ahead of the migration stream.
//!
//! On the hosts Ferry runs on (often nested), the first write to a fresh host page
//! costs microseconds: for a 1 GiB guest that is half a second or more, and the
//! thread that receives pages would pay it page by page while the socket backs up.
//! A helper thread faults memory in (`MADV_POPULATE_WRITE`) a little ahead of where
//! pages land, so the receiver mostly copies into memory that is already there.
//! The helper never changes what memory holds: a populated page reads as zero,
//! exactly like one never touched, and a page already present is left alone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::guest::abi::PAGE_SIZE;

/// Pages faulted in per call: small enough to follow the stream closely, large
/// enough that the syscall is noise.
const CHUNK_PAGES: u64 = 512;

/// Shared between the receiver, which reports where pages land, and the helper.
#[derive(Default)]
pub struct Ahead {
    landed: AtomicU64,
    stop: AtomicBool,
    started: AtomicBool,
    finished: AtomicBool,
}

impl Ahead {
    /// The receiver wrote `page`; the helper skips past it.
    pub fn landed(&self, page: u64) {
        self.landed.fetch_max(page, Ordering::Relaxed);
        self.started.store(true, Ordering::Relaxed);
    }

    /// The stream is over (or failed): the helper stops after its current chunk.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The helper has returned (or never ran).
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Release);
    }

    /// Stops the helper and waits until it no longer touches memory: pages dropped
    /// after this stay dropped.
    pub fn stop_and_wait(&self) {
        self.stop();
        while !self.finished.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
}

/// A guest memory mapping the helper may fault in: base address and length in
/// pages. Held as an address, not a reference, because the helper never reads or
/// writes the memory itself.
#[derive(Clone, Copy)]
pub struct Region {
    pub base: usize,
    pub pages: u64,
}

/// Once the first page has landed, faults in `region` from the front, always
/// starting past the highest page that has landed, until the end or until told to
/// stop. (A post-copy that sends no page up front never starts it: those pages will
/// come through userfaultfd and must stay absent.) Returns the pages it faulted in.
/// The caller keeps the mapping alive until this returns.
pub fn run(region: Region, ahead: &Ahead) -> u64 {
    while !ahead.started.load(Ordering::Relaxed) {
        if ahead.stop.load(Ordering::Relaxed) {
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut next = 0u64;
    let mut done = 0u64;
    while next < region.pages && !ahead.stop.load(Ordering::Relaxed) {
        next = next.max(ahead.landed.load(Ordering::Relaxed) + 1);
        let count = CHUNK_PAGES.min(region.pages.saturating_sub(next));
        if count == 0 {
            break;
        }
        let addr = region.base + (next * PAGE_SIZE) as usize;
        // SAFETY: [addr, addr + count pages) lies inside the mapping, which the caller
        // keeps alive; MADV_POPULATE_WRITE only allocates missing pages (zero-filled)
        // and leaves present ones, so no byte of guest memory changes.
        let rc = unsafe {
            libc::madvise(
                addr as *mut libc::c_void,
                (count * PAGE_SIZE) as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            // Kernels before 5.14 lack it; the receiver then faults pages itself.
            tracing::debug!(
                "prefaulting guest memory stopped: {}",
                std::io::Error::last_os_error()
            );
            break;
        }
        next += count;
        done += count;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page-aligned stretch of `pages` pages inside `buf`.
    fn aligned(buf: &mut Vec<u8>, pages: u64) -> (usize, &mut [u8]) {
        let page = PAGE_SIZE as usize;
        buf.resize((pages as usize + 1) * page, 0);
        let skip = buf.as_ptr().align_offset(page);
        let slice = &mut buf[skip..skip + pages as usize * page];
        (slice.as_mut_ptr() as usize, slice)
    }

    #[test]
    fn faults_in_without_changing_memory_and_skips_landed_pages() {
        let pages = 4 * CHUNK_PAGES;
        let mut buf = Vec::new();
        let (base, memory) = aligned(&mut buf, pages);
        memory[5] = 7;
        let ahead = Ahead::default();
        ahead.landed(CHUNK_PAGES - 1);
        let done = run(Region { base, pages }, &ahead);
        assert_eq!(done, pages - CHUNK_PAGES, "the landed chunk is skipped");
        assert_eq!(memory[5], 7);
        assert!(memory[6..].iter().all(|&b| b == 0));
    }

    #[test]
    fn stops_when_told() {
        let mut buf = Vec::new();
        let (base, _) = aligned(&mut buf, 2 * CHUNK_PAGES);
        let ahead = Ahead::default();
        ahead.landed(0);
        ahead.stop();
        assert_eq!(
            run(
                Region {
                    base,
                    pages: 2 * CHUNK_PAGES
                },
                &ahead
            ),
            0
        );
    }
}
