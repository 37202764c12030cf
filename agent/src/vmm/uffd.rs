//! userfaultfd, the little of it post-copy needs: register guest memory for
//! missing-page faults, read the faults, and fill pages in atomically (copy or zero),
//! which wakes whoever waits on them.
//!
//! Kernel-mode faults must be delivered too (no `UFFD_USER_MODE_ONLY`): KVM touches
//! guest memory from the kernel, and without them a guest access to a missing page
//! fails inside KVM_RUN instead of waiting for the page. That needs CAP_SYS_PTRACE
//! (root) or `vm.unprivileged_userfaultfd = 1`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `_IOWR(0xaa, nr, size)` / `_IOR(0xaa, nr, size)` as in linux/userfaultfd.h.
const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xaa << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xaa << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3f, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct ZeroPage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes, the fault address at offset 16 for page faults.
#[repr(C)]
#[derive(Clone, Copy)]
struct Msg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(
        "userfaultfd is not available ({0}); post-copy needs it with kernel-mode faults \
         (run as root, or set vm.unprivileged_userfaultfd = 1)"
    )]
    Create(io::Error),
    #[error("userfaultfd {what}: {source}")]
    Ioctl {
        what: &'static str,
        source: io::Error,
    },
}

/// What filling a page in found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The page was missing and now holds the data.
    Now,
    /// Someone filled it first; it was left alone.
    Already,
}

pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// A non-blocking userfaultfd that also reports faults taken inside the kernel.
    pub fn new() -> Result<Self, UffdError> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(UffdError::Create(io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let uffd = Self { fd };
        let mut api = Api {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        uffd.ioctl("API handshake", UFFDIO_API, &mut api)?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, what: &'static str, req: u64, arg: &mut T) -> Result<(), UffdError> {
        // SAFETY: `arg` is the #[repr(C)] struct this request expects, valid for the
        // call; the kernel writes only within it.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if rc < 0 {
            return Err(UffdError::Ioctl {
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Missing pages in [start, start + len) fault to this descriptor from now on.
    pub fn register_missing(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let mut reg = Register {
            range: Range {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl("register", UFFDIO_REGISTER, &mut reg)
    }

    /// Missing pages in [start, start + len) no longer fault to this descriptor: a
    /// first touch gets a zero page from the kernel again.
    pub fn unregister(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let mut r = Range {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl("unregister", UFFDIO_UNREGISTER, &mut r)
    }

    /// Atomically fills the missing page at `dst` with `src` and wakes its waiters.
    ///
    /// # Safety
    /// `dst` must be a page-aligned page inside a registered range and `src` must be
    /// readable for one page.
    pub unsafe fn copy(&self, dst: usize, src: &[u8]) -> Result<Filled, UffdError> {
        let mut c = Copy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        self.fill("copy", UFFDIO_COPY, &mut c, dst, src.len())
    }

    /// Atomically maps zeroes at the missing range and wakes its waiters.
    pub fn zero(&self, dst: usize, len: usize) -> Result<Filled, UffdError> {
        let mut z = ZeroPage {
            range: Range {
                start: dst as u64,
                len: len as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        self.fill("zeropage", UFFDIO_ZEROPAGE, &mut z, dst, len)
    }

    fn fill<T>(
        &self,
        what: &'static str,
        req: u64,
        arg: &mut T,
        dst: usize,
        len: usize,
    ) -> Result<Filled, UffdError> {
        match self.ioctl(what, req, arg) {
            Ok(()) => Ok(Filled::Now),
            Err(UffdError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                // Filled by another path meanwhile; make sure nobody is left waiting.
                self.wake(dst, len)?;
                Ok(Filled::Already)
            }
            Err(e) => Err(e),
        }
    }

    /// Wakes threads waiting on [start, start + len) (the pages are already there).
    pub fn wake(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let mut r = Range {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl("wake", UFFDIO_WAKE, &mut r)
    }

    /// The address of the next missing-page fault, if one is queued.
    pub fn next_fault(&self) -> io::Result<Option<usize>> {
        loop {
            let mut msg = std::mem::MaybeUninit::<Msg>::uninit();
            // SAFETY: reads at most one uffd_msg into a buffer of exactly that size.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msg.as_mut_ptr().cast(),
                    std::mem::size_of::<Msg>(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n as usize != std::mem::size_of::<Msg>() {
                return Err(io::Error::other(format!(
                    "short userfaultfd read ({n} bytes)"
                )));
            }
            // SAFETY: the kernel filled all of it (checked just above).
            let msg = unsafe { msg.assume_init() };
            if msg.event == UFFD_EVENT_PAGEFAULT {
                return Ok(Some(msg.address as usize));
            }
            // No other events were asked for in the handshake; skip any.
        }
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::abi::PAGE_SIZE;

    const PAGE: usize = PAGE_SIZE as usize;

    #[test]
    fn struct_sizes_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<Api>(), 24);
        assert_eq!(std::mem::size_of::<Register>(), 32);
        assert_eq!(std::mem::size_of::<Copy>(), 40);
        assert_eq!(std::mem::size_of::<ZeroPage>(), 32);
        assert_eq!(std::mem::size_of::<Msg>(), 32);
    }

    /// A thread touching a missing page waits until it is filled, and sees the data.
    #[test]
    fn missing_page_fault_is_served_by_copy() {
        let uffd = match Uffd::new() {
            Ok(u) => u,
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("SKIPPED: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        // SAFETY: a fresh private anonymous mapping, unmapped at the end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as usize;
        uffd.register_missing(base, 2 * PAGE).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: reads inside the mapping, which outlives the thread (joined).
            unsafe { std::ptr::read_volatile((base + PAGE + 8) as *const u8) }
        });
        let addr = loop {
            if let Some(a) = uffd.next_fault().unwrap() {
                break a;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(addr & !(PAGE - 1), base + PAGE);
        let data = vec![0x5au8; PAGE];
        // SAFETY: the faulting page of the registered mapping, one page of source.
        let first = unsafe { uffd.copy(base + PAGE, &data) };
        assert_eq!(first.unwrap(), Filled::Now);
        assert_eq!(reader.join().unwrap(), 0x5a);
        // SAFETY: as above; the page is present now.
        let again = unsafe { uffd.copy(base + PAGE, &data) };
        assert_eq!(again.unwrap(), Filled::Already);
        assert_eq!(uffd.zero(base, PAGE).unwrap(), Filled::Now);
        // SAFETY: the mapping from above, no longer used.
        unsafe { libc::munmap(base as *mut libc::c_void, 2 * PAGE) };
    }
}
