//! The working-set bitmap the programs set bits in, mapped into this process: read
//! and cleared word by word with atomic swaps, so no bit set meanwhile is lost and no
//! system call is needed per word.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::MapData;
use ferry_ebpf::{MAX_VMS, WS_WORDS};

use super::ProbeError;

pub struct WorkingSetBitmap {
    words: *mut AtomicU64,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for WorkingSetBitmap {}

impl WorkingSetBitmap {
    pub fn map(data: &MapData) -> Result<Self, ProbeError> {
        let len = (MAX_VMS * WS_WORDS) as usize;
        let bytes = len * 8;
        // SAFETY: maps the array map's value area (BPF_F_MMAPABLE) shared and
        // read-write; the result is checked before use and unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ProbeError::Map {
                map: "WS_BITMAP",
                message: format!("mmap: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(Self {
            words: p.cast(),
            len,
        })
    }

    /// Distinct pages set in `slot`'s bitmap since the last call, clearing them.
    pub fn take(&self, slot: u32) -> u64 {
        let first = (slot * WS_WORDS) as usize;
        let mut n = 0u64;
        for i in first..(first + WS_WORDS as usize).min(self.len) {
            // SAFETY: i < len, inside the mapping; AtomicU64 has u64's layout and the
            // kernel side only ever ORs bits in atomically.
            let w = unsafe { &*self.words.add(i) };
            if w.load(Ordering::Relaxed) != 0 {
                n += u64::from(w.swap(0, Ordering::AcqRel).count_ones());
            }
        }
        n
    }
}

impl Drop for WorkingSetBitmap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what map() mapped.
        unsafe { libc::munmap(self.words.cast(), self.len * 8) };
    }
}
