//! Guest memory allocated and faulted in before a migration needs it.
//!
//! An incoming VMM sits idle until its source connects. Told the size of the VM it
//! expects (`ferry vmm --incoming … --memory-mib N`; an agent always says), it spends
//! that wait faulting the memory in, as QEMU's `-mem-prealloc` does: the first write
//! to a fresh host page costs microseconds here (0.3–1 s per GiB), and without this
//! the migration stream pays it page by page. The memory is plain anonymous memory
//! that reads as zero, exactly what a fresh VM gets; a migration of another size
//! gets a fresh mapping instead and this one is let go.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use vm_memory::MmapRegion;

use crate::guest::abi::PAGE_SIZE;

/// Pages faulted in per call: the stop flag is looked at between calls, so a
/// migration that arrives waits at most this long for the memory.
const CHUNK_PAGES: u64 = 2048;

/// Memory being (or done being) faulted in for the VM an incoming VMM expects.
pub struct Prealloc {
    // Declared before `region`: dropped (joined) first, so the thread never
    // outlives the mapping it works on.
    worker: Worker,
    region: MmapRegion,
}

struct Worker {
    stop: Arc<AtomicBool>,
    pages: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Prealloc {
    /// Maps `bytes` of memory and starts faulting it in on a thread of its own.
    pub fn start(bytes: u64) -> std::io::Result<Self> {
        // The mapping reserves nothing: faulting in more than the host has would
        // wake the OOM killer rather than fail.
        if let Some(available) = super::boot::host_available_mib()
            && bytes >> 20 > available
        {
            return Err(std::io::Error::other(format!(
                "the host has {available} MiB available"
            )));
        }
        let region = MmapRegion::<()>::new(bytes as usize).map_err(std::io::Error::other)?;
        let base = region.as_ptr() as usize;
        let total = bytes / PAGE_SIZE;
        let stop = Arc::new(AtomicBool::new(false));
        let pages = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new().name("prealloc".into()).spawn({
            let (stop, pages) = (stop.clone(), pages.clone());
            move || populate(base, total, &stop, &pages)
        })?;
        Ok(Self {
            worker: Worker {
                stop,
                pages,
                thread: Some(thread),
            },
            region,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.region.size() as u64
    }

    /// Pages faulted in so far.
    pub fn pages_done(&self) -> u64 {
        self.worker.pages.load(Ordering::Relaxed)
    }

    /// The memory, for a VM of `bytes`: the faulting in stops (whatever is left
    /// faults in as pages land). `Err(self)` when the size differs.
    pub fn take(mut self, bytes: u64) -> Result<MmapRegion, Self> {
        if self.bytes() != bytes {
            return Err(self);
        }
        self.worker.stop();
        Ok(self.region)
    }
}

fn populate(base: usize, total: u64, stop: &AtomicBool, done: &AtomicU64) {
    let t0 = Instant::now();
    let mut next = 0;
    while next < total && !stop.load(Ordering::Relaxed) {
        let count = CHUNK_PAGES.min(total - next);
        // SAFETY: [base + next pages, + count pages) lies inside the mapping, which
        // outlives this thread (Prealloc joins it before letting the mapping go);
        // MADV_POPULATE_WRITE only allocates missing pages, zero-filled.
        let rc = unsafe {
            libc::madvise(
                (base + (next * PAGE_SIZE) as usize) as *mut libc::c_void,
                (count * PAGE_SIZE) as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            tracing::warn!(
                "preallocating guest memory stopped after {} MiB: {}",
                (next * PAGE_SIZE) >> 20,
                std::io::Error::last_os_error()
            );
            return;
        }
        next += count;
        done.store(next, Ordering::Relaxed);
    }
    if next == total {
        tracing::info!(
            "preallocated {} MiB of guest memory in {:.2} s",
            (total * PAGE_SIZE) >> 20,
            t0.elapsed().as_secs_f64()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident_pages(p: &Prealloc) -> usize {
        let page = PAGE_SIZE as usize;
        let n = p.bytes() as usize / page;
        let mut vec = vec![0u8; n];
        // SAFETY: the range is the mapping itself; mincore only reports.
        let rc = unsafe {
            libc::mincore(
                p.region.as_ptr() as *mut libc::c_void,
                p.bytes() as usize,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn faults_the_whole_mapping_in_and_hands_it_over_zeroed() {
        let bytes = 8 * CHUNK_PAGES * PAGE_SIZE;
        let p = Prealloc::start(bytes).unwrap();
        while p.pages_done() < bytes / PAGE_SIZE {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(resident_pages(&p), (bytes / PAGE_SIZE) as usize);
        let region = p.take(bytes).map_err(|_| "size").unwrap();
        // SAFETY: the mapping is `bytes` long and nothing else uses it.
        let mem = unsafe { std::slice::from_raw_parts(region.as_ptr(), bytes as usize) };
        assert!(mem.iter().all(|&b| b == 0));
    }

    #[test]
    fn another_size_is_refused_and_taking_stops_the_thread() {
        let bytes = 64 * CHUNK_PAGES * PAGE_SIZE;
        let p = Prealloc::start(bytes).unwrap();
        let p = match p.take(bytes / 2) {
            Err(p) => p,
            Ok(_) => panic!("a region of another size was handed over"),
        };
        let region = p.take(bytes).map_err(|_| "size").unwrap();
        assert_eq!(region.size() as u64, bytes);
    }
}
