//! Dirty-page tracking in both KVM modes behind one interface.
//!
//! * **Bitmap** (`dirty_tracking = "bitmap"`): KVM keeps one bit per guest page of the
//!   slot. With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled (mode
//!   `"bitmap-manual-protect"`), `KVM_GET_DIRTY_LOG` only copies the bitmap out and
//!   `KVM_CLEAR_DIRTY_LOG` clears bits and write-protects those pages again, so the two
//!   halves can be split ("clear a range just before sending it"). Without the cap
//!   (mode `"bitmap"`), `KVM_GET_DIRTY_LOG` copies, clears and write-protects in one go.
//! * **Ring** (`dirty_tracking = "ring"`): each vCPU pushes (slot, page) entries into a
//!   ring shared with userspace; a harvest walks the rings, marks the entries collected
//!   and asks KVM to re-protect them (`KVM_RESET_DIRTY_RINGS`). A vCPU whose ring is
//!   (nearly) full leaves KVM_RUN with `KVM_EXIT_DIRTY_RING_FULL` (kvm-ioctls:
//!   `VcpuExit::Unsupported(31)`); its thread calls [`DirtyLog::on_ring_full`], which
//!   moves the entries into a pending bitmap that the next harvest returns.
//!
//! Protocol for callers (both modes): a page must be **copied after** the harvest (or
//! the [`DirtyLog::clear`]) that re-armed its tracking; a write that lands after the
//! re-arm is then either in the copy or in the next harvest. Copying first and
//! re-arming afterwards loses writes.
//!
//! The VMM's own writes into guest memory (device DMA) never reach KVM's log; they are
//! recorded with [`DirtyLog::mark_dirty`] and come out of the next harvest or fetch.
//!
//! Only the one memory slot of [`boot::Vm`] ([`boot::MEMORY_SLOT`], guest-physical 0 up
//! to the memory size) exists, so a page number is a guest-physical address / 4096.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::raw::c_ulong;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET, KVM_MEM_LOG_DIRTY_PAGES, KVMIO,
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_dirty_log, kvm_enable_cap,
};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::{_IOC_NONE, _IOC_READ, _IOC_WRITE, ioctl_expr};

use super::boot::{BootError, MEMORY_SLOT, Vm};
use super::config::DirtyTracking;
use crate::bitmap::{Bitmap, word_mask};
use crate::guest::abi::PAGE_SIZE;

/// Ring entry flag: KVM filled the entry, userspace has not collected it yet.
const DIRTY_GFN_F_DIRTY: u32 = 1;
/// Ring entry flag: userspace collected the entry; KVM re-protects the page and frees the
/// entry at the next `KVM_RESET_DIRTY_RINGS`.
const DIRTY_GFN_F_RESET: u32 = 2;

/// The ring size Ferry asks for, unless the kernel's maximum is smaller: 65536 entries
/// of 16 bytes, which is also KVM's own upper limit (`KVM_DIRTY_RING_MAX_ENTRIES`).
///
/// Why the largest: a vCPU may dirty this many distinct pages (256 MiB) between two
/// harvests before it has to stop for a ring-full exit (an exit to userspace costs
/// ~26 µs on this host plus a ring walk under the log's lock), and at the 70–150k
/// first-touch pages/s measured here that is 0.4 s or more, longer than any harvest
/// interval a migration uses, so ring-full exits stay rare. A harvest only walks the
/// entries that were filled, so a large ring costs nothing per harvest; its price is
/// 1 MiB of memory per vCPU (16 MiB at the 16-vCPU maximum).
pub const MAX_RING_BYTES: u32 = 1 << 20;

const KVM_GET_DIRTY_LOG: c_ulong =
    ioctl_expr(_IOC_WRITE, KVMIO, 0x42, size_of::<kvm_dirty_log>() as u32);
const KVM_CLEAR_DIRTY_LOG: c_ulong = ioctl_expr(
    _IOC_READ | _IOC_WRITE,
    KVMIO,
    0xc0,
    size_of::<kvm_clear_dirty_log>() as u32,
);
const KVM_RESET_DIRTY_RINGS: c_ulong = ioctl_expr(_IOC_NONE, KVMIO, 0xc7, 0);
const _: () = assert!(KVM_GET_DIRTY_LOG == 0x4010_AE42);
const _: () = assert!(KVM_CLEAR_DIRTY_LOG == 0xC018_AEC0);
const _: () = assert!(KVM_RESET_DIRTY_RINGS == 0xAEC7);
const _: () = assert!(size_of::<kvm_dirty_gfn>() == 16);

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error(
        "dirty_tracking = \"ring\" needs KVM_CAP_DIRTY_LOG_RING_ACQ_REL or \
         KVM_CAP_DIRTY_LOG_RING, and this kernel reports neither; use \
         dirty_tracking = \"bitmap\""
    )]
    RingUnsupported,
    #[error("KVM does not offer KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with MANUAL_PROTECT_ENABLE")]
    ManualProtectUnsupported,
    #[error("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 failed: {0}")]
    EnableManualProtect(#[source] kvm_ioctls::Error),
    #[error(
        "a dirty ring of {bytes} bytes is not possible: it must be a power of two between \
         {min} and {max} bytes (the maximum reported by KVM_CHECK_EXTENSION({cap}))"
    )]
    RingSize {
        bytes: u32,
        min: u32,
        max: u32,
        cap: &'static str,
    },
    #[error(
        "enabling {cap} with a {bytes}-byte ring failed: {source} (the ring must be enabled \
         before any vCPU is created)"
    )]
    EnableRing {
        cap: &'static str,
        bytes: u32,
        source: kvm_ioctls::Error,
    },
    #[error("duplicating the VM fd for the dirty log failed: {0}")]
    DupVmFd(#[source] io::Error),
    #[error("vCPU index {index} is out of range: the dirty log was set up for {vcpus} vCPUs")]
    VcpuIndex { index: u32, vcpus: u32 },
    #[error("vCPU {0}'s dirty ring is already mapped (attach_vcpu was called twice)")]
    AlreadyAttached(u32),
    #[error("vCPU {0}'s dirty ring is not mapped: call attach_vcpu after creating the vCPU")]
    NotAttached(u32),
    #[error(
        "mmap of vCPU {index}'s dirty ring ({bytes} bytes of the vCPU fd at \
         KVM_DIRTY_LOG_PAGE_OFFSET) failed: {source}"
    )]
    MapRing {
        index: u32,
        bytes: usize,
        source: io::Error,
    },
    #[error("turning dirty logging {} (KVM_MEM_LOG_DIRTY_PAGES): {source}", if *.on { "on" } else { "off" })]
    SetFlags {
        on: bool,
        #[source]
        source: BootError,
    },
    #[error("dirty logging is off: call start() before harvest, fetch or clear")]
    NotLogging,
    #[error("the bitmap covers {got} pages but guest memory has {want}")]
    BitmapSize { got: u64, want: u64 },
    #[error("KVM_GET_DIRTY_LOG on slot {slot} failed: {source}")]
    GetDirtyLog { slot: u32, source: io::Error },
    #[error("KVM_CLEAR_DIRTY_LOG for pages {first}..{end} failed: {source}")]
    ClearDirtyLog {
        first: u64,
        end: u64,
        source: io::Error,
    },
    #[error("clear of pages {first}..{end} reaches outside guest memory ({pages} pages)")]
    ClearRange { first: u64, end: u64, pages: u64 },
    #[error("KVM_RESET_DIRTY_RINGS failed: {0}")]
    ResetRings(#[source] io::Error),
    #[error(
        "vCPU {vcpu}'s dirty ring holds an entry for slot {slot} page {offset}, but only slot \
         {MEMORY_SLOT} with {pages} pages exists (corrupt ring or ABI mismatch): dirty \
         tracking can no longer be trusted, send all memory"
    )]
    BadRingEntry {
        vcpu: u32,
        slot: u32,
        offset: u64,
        pages: u64,
    },
}

/// What one harvest cost and found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Pages newly set in the caller's bitmap.
    pub new_pages: u64,
    /// Reading the log: `KVM_GET_DIRTY_LOG`, or walking the rings. Ring mode includes the
    /// walks vCPU threads did at ring-full exits since the previous harvest.
    pub fetch_ns: u64,
    /// Re-arming: `KVM_CLEAR_DIRTY_LOG`, or `KVM_RESET_DIRTY_RINGS` (with ring-full resets,
    /// as above). 0 in plain bitmap mode, where GET re-arms and its cost is in `fetch_ns`.
    pub clear_ns: u64,
    /// Ring-full exits handled since the previous harvest.
    pub ring_full_exits: u64,
}

/// How a [`DirtyLog`] reads KVM's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyMode {
    /// Bitmap with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: GET copies, CLEAR re-arms.
    BitmapManualProtect,
    /// Bitmap with plain `KVM_GET_DIRTY_LOG`, which copies and re-arms at once.
    Bitmap,
    /// Per-vCPU dirty rings.
    Ring,
}

impl DirtyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DirtyMode::BitmapManualProtect => "bitmap-manual-protect",
            DirtyMode::Bitmap => "bitmap",
            DirtyMode::Ring => "ring",
        }
    }
}

impl fmt::Display for DirtyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Dirty-page tracking for one VM, shared (`Arc`) by the control thread (start, stop,
/// harvest, fetch, clear) and the vCPU threads (on_ring_full, mark_dirty).
///
/// It holds a duplicate of the VM fd, so its ioctls stay valid whatever the owner of the
/// [`boot::Vm`] does; the VM object in the kernel lives until both are closed.
pub struct DirtyLog {
    mode: DirtyMode,
    vm_fd: OwnedFd,
    pages: u64,
    vcpus: u32,
    ring_bytes: u32,
    /// Mirrors `Inner::active` for mark_dirty, which must not take the lock.
    logging: AtomicBool,
    /// Pages the VMM wrote itself (mark_dirty), in KVM's bitmap layout.
    marked: Box<[AtomicU64]>,
    marked_any: AtomicBool,
    inner: Mutex<Inner>,
}

struct Inner {
    active: bool,
    backend: Backend,
}

enum Backend {
    Bitmap(BitmapLog),
    Ring(RingLog),
}

struct BitmapLog {
    manual: bool,
    /// The last KVM_GET_DIRTY_LOG minus what was cleared since: exactly the bits a
    /// CLEAR may remove (clearing a bit the caller never saw would lose that write).
    snapshot: Vec<u64>,
    /// Masked words for a partial clear; allocated once.
    scratch: Vec<u64>,
}

struct RingLog {
    rings: Vec<Option<RingMap>>,
    /// Pages collected at ring-full exits, returned by the next harvest.
    pending: Bitmap,
    full_exits: u64,
    full_fetch_ns: u64,
    full_clear_ns: u64,
}

impl DirtyLog {
    /// Sets up tracking; must run before any vCPU exists (KVM only accepts the ring cap
    /// then). Ring: enables `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (else `KVM_CAP_DIRTY_LOG_RING`)
    /// with the largest ring up to [`MAX_RING_BYTES`]. Bitmap: enables
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` = 1 if offered, else plain GET_DIRTY_LOG
    /// (see [`DirtyLog::mode`]).
    pub fn new(mode: DirtyTracking, vm: &Vm, vcpus: u32) -> Result<Self, DirtyError> {
        match mode {
            DirtyTracking::Ring => Self::new_ring(vm, vcpus, None),
            DirtyTracking::Bitmap => Self::with_mode(DirtyMode::BitmapManualProtect, vm, vcpus)
                .or_else(|e| {
                    tracing::warn!("{e}; using plain KVM_GET_DIRTY_LOG");
                    Self::with_mode(DirtyMode::Bitmap, vm, vcpus)
                }),
        }
    }

    /// Exactly the given mode, or an error if KVM lacks it (for benchmarks and tests
    /// that compare modes; [`DirtyLog::new`] picks the best one for a config).
    pub fn with_mode(mode: DirtyMode, vm: &Vm, vcpus: u32) -> Result<Self, DirtyError> {
        match mode {
            DirtyMode::Ring => Self::new_ring(vm, vcpus, None),
            DirtyMode::Bitmap => Self::build(mode, vm, vcpus, 0),
            DirtyMode::BitmapManualProtect => {
                let offered = vm
                    .fd
                    .check_extension_raw(c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
                if offered <= 0 || (offered as u32) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
                    return Err(DirtyError::ManualProtectUnsupported);
                }
                // Value 1 without INITIALLY_SET (2): enabling logging then write-protects
                // everything and starts from an empty bitmap, as the other modes do.
                vm.fd
                    .enable_cap(&kvm_enable_cap {
                        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                        args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
                        ..Default::default()
                    })
                    .map_err(DirtyError::EnableManualProtect)?;
                Self::build(mode, vm, vcpus, 0)
            }
        }
    }

    /// Ring mode with a chosen ring size in bytes (power of two, at least one page, at
    /// most the kernel's maximum); `None` picks the default described at
    /// [`MAX_RING_BYTES`]. Small rings are for exercising ring-full exits.
    pub fn new_ring(vm: &Vm, vcpus: u32, ring_bytes: Option<u32>) -> Result<Self, DirtyError> {
        let (cap, name) = [
            (
                KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
            ),
            (KVM_CAP_DIRTY_LOG_RING, "KVM_CAP_DIRTY_LOG_RING"),
        ]
        .into_iter()
        .find(|&(cap, _)| vm.fd.check_extension_raw(c_ulong::from(cap)) > 0)
        .ok_or(DirtyError::RingUnsupported)?;
        let max = vm.fd.check_extension_raw(c_ulong::from(cap)) as u32;
        let min = host_page_size() as u32;
        let bytes = ring_bytes.unwrap_or_else(|| {
            let max_pow2 = if max.is_power_of_two() {
                max
            } else {
                1 << (31 - max.leading_zeros())
            };
            max_pow2.min(MAX_RING_BYTES)
        });
        if !bytes.is_power_of_two() || bytes < min || bytes > max {
            return Err(DirtyError::RingSize {
                bytes,
                min,
                max,
                cap: name,
            });
        }
        vm.fd
            .enable_cap(&kvm_enable_cap {
                cap,
                args: [u64::from(bytes), 0, 0, 0],
                ..Default::default()
            })
            .map_err(|source| DirtyError::EnableRing {
                cap: name,
                bytes,
                source,
            })?;
        tracing::debug!(cap = name, bytes, "dirty ring enabled");
        Self::build(DirtyMode::Ring, vm, vcpus, bytes)
    }

    fn build(mode: DirtyMode, vm: &Vm, vcpus: u32, ring_bytes: u32) -> Result<Self, DirtyError> {
        // SAFETY: `vm.fd` is an open VM fd for the whole call (`vm` is borrowed), and the
        // borrowed fd is only used to make an owned duplicate.
        let vm_fd = unsafe { BorrowedFd::borrow_raw(vm.fd.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(DirtyError::DupVmFd)?;
        let pages = vm.layout.memory_bytes / PAGE_SIZE;
        let words = pages.div_ceil(64) as usize;
        let backend = match mode {
            DirtyMode::Ring => Backend::Ring(RingLog {
                rings: (0..vcpus).map(|_| None).collect(),
                pending: Bitmap::new(pages),
                full_exits: 0,
                full_fetch_ns: 0,
                full_clear_ns: 0,
            }),
            DirtyMode::Bitmap | DirtyMode::BitmapManualProtect => Backend::Bitmap(BitmapLog {
                manual: mode == DirtyMode::BitmapManualProtect,
                snapshot: vec![0; words],
                scratch: vec![0; words],
            }),
        };
        Ok(Self {
            mode,
            vm_fd,
            pages,
            vcpus,
            ring_bytes,
            logging: AtomicBool::new(false),
            marked: (0..words).map(|_| AtomicU64::new(0)).collect(),
            marked_any: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                active: false,
                backend,
            }),
        })
    }

    /// `"bitmap-manual-protect"`, `"bitmap"` or `"ring"`.
    pub fn mode(&self) -> &'static str {
        self.mode.as_str()
    }

    pub fn dirty_mode(&self) -> DirtyMode {
        self.mode
    }

    /// Bytes per vCPU ring (ring mode only).
    pub fn ring_bytes(&self) -> Option<u32> {
        (self.mode == DirtyMode::Ring).then_some(self.ring_bytes)
    }

    /// Guest pages tracked (the size a [`Bitmap`] for harvests must have).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Ring mode: maps vCPU `index`'s ring (the vCPU fd at `KVM_DIRTY_LOG_PAGE_OFFSET`
    /// pages). The mapping lives until the log is dropped. No-op in bitmap mode.
    pub fn attach_vcpu(&self, index: u32, vcpu: &VcpuFd) -> Result<(), DirtyError> {
        self.check_index(index)?;
        let mut inner = self.lock();
        let Backend::Ring(ring) = &mut inner.backend else {
            return Ok(());
        };
        let slot = &mut ring.rings[index as usize];
        if slot.is_some() {
            return Err(DirtyError::AlreadyAttached(index));
        }
        *slot = Some(
            RingMap::map(vcpu, self.ring_bytes as usize).map_err(|source| DirtyError::MapRing {
                index,
                bytes: self.ring_bytes as usize,
                source,
            })?,
        );
        Ok(())
    }

    /// Turns logging on (`KVM_MEM_LOG_DIRTY_PAGES` on the slot, which write-protects all
    /// guest memory) and forgets anything logged before. Calling it while logging is
    /// already on restarts the log.
    pub fn start(&self, vm: &Vm) -> Result<(), DirtyError> {
        let mut inner = self.lock();
        let active = inner.active;
        match &mut inner.backend {
            // Turning the flag on gives a fresh, empty kernel bitmap; only a log that
            // is already on has to be emptied by hand.
            Backend::Bitmap(b) => {
                if active {
                    b.get(&self.vm_fd)?;
                    if b.manual {
                        b.clear_all(&self.vm_fd, self.pages)?;
                    }
                }
                b.snapshot.fill(0);
            }
            Backend::Ring(r) => {
                let mut discard = |_| {};
                let mut first_err = None;
                for (i, ring) in r.rings.iter_mut().enumerate() {
                    if let Some(ring) = ring
                        && let Err(e) = ring.collect(i as u32, self.pages, &mut discard)
                    {
                        first_err.get_or_insert(e);
                    }
                }
                reset_rings(&self.vm_fd)?;
                r.pending.clear_all();
                r.full_exits = 0;
                r.full_fetch_ns = 0;
                r.full_clear_ns = 0;
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
        }
        self.drop_marked();
        self.logging.store(true, Ordering::Release);
        if let Err(source) = vm.set_memory_flags(KVM_MEM_LOG_DIRTY_PAGES) {
            self.logging.store(false, Ordering::Release);
            return Err(DirtyError::SetFlags { on: true, source });
        }
        inner.active = true;
        Ok(())
    }

    /// Turns logging off. Whatever was not harvested is gone (KVM frees its bitmap), so
    /// the final harvest of a migration comes before this.
    pub fn stop(&self, vm: &Vm) -> Result<(), DirtyError> {
        let mut inner = self.lock();
        self.logging.store(false, Ordering::Release);
        inner.active = false;
        self.drop_marked();
        vm.set_memory_flags(0)
            .map_err(|source| DirtyError::SetFlags { on: false, source })
    }

    /// ORs every page dirtied since the last harvest into `out`, re-arms tracking for
    /// them and returns how many bits of `out` went from clear to set.
    pub fn harvest(&self, out: &mut Bitmap) -> Result<u64, DirtyError> {
        self.harvest_with_stats(out).map(|s| s.new_pages)
    }

    /// [`DirtyLog::harvest`] with its cost.
    ///
    /// On an error the log cannot be trusted any more (a page may have been re-armed
    /// without being reported): the caller must fall back to sending all memory.
    pub fn harvest_with_stats(&self, out: &mut Bitmap) -> Result<HarvestStats, DirtyError> {
        let mut stats = self.harvest_kvm(out, false)?;
        stats.new_pages += self.take_marked(out);
        Ok(stats)
    }

    /// Starts a fresh window for measuring the guest's dirty rate without losing what
    /// must be sent again: re-arms what the guest dirtied since the last harvest and
    /// parks it with the VMM-marked pages, so the next harvest or fetch still reports
    /// it. `window` gets the pages dirtied since the last harvest (or re-arm); returns
    /// how many.
    pub fn rearm(&self, window: &mut Bitmap) -> Result<u64, DirtyError> {
        window.clear_all();
        Ok(self.harvest_kvm(window, true)?.new_pages)
    }

    /// The kernel's part of a harvest: ORs what KVM logged into `out` and re-arms it;
    /// with `park`, also into the marked pages before the log's lock is let go (a
    /// concurrent fetch sees each page in one place or the other).
    fn harvest_kvm(&self, out: &mut Bitmap, park: bool) -> Result<HarvestStats, DirtyError> {
        self.check_bitmap(out)?;
        let mut inner = self.lock();
        if !inner.active {
            return Err(DirtyError::NotLogging);
        }
        let mut stats = HarvestStats::default();
        match &mut inner.backend {
            Backend::Bitmap(b) => {
                let t = Instant::now();
                b.get(&self.vm_fd)?;
                stats.new_pages = out.or_assign_words(&b.snapshot);
                stats.fetch_ns = nanos(t);
                if b.manual {
                    let t = Instant::now();
                    b.clear_all(&self.vm_fd, self.pages)?;
                    stats.clear_ns = nanos(t);
                }
            }
            Backend::Ring(r) => {
                stats.ring_full_exits = std::mem::take(&mut r.full_exits);
                stats.fetch_ns = std::mem::take(&mut r.full_fetch_ns);
                stats.clear_ns = std::mem::take(&mut r.full_clear_ns);
                let t = Instant::now();
                stats.new_pages = out.or_assign_words(r.pending.words());
                r.pending.clear_all();
                let mut first_err = None;
                for (i, ring) in r.rings.iter_mut().enumerate() {
                    if let Some(ring) = ring {
                        let mut record = |page| stats.new_pages += u64::from(out.set(page));
                        if let Err(e) = ring.collect(i as u32, self.pages, &mut record) {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                stats.fetch_ns += nanos(t);
                let t = Instant::now();
                reset_rings(&self.vm_fd)?;
                stats.clear_ns += nanos(t);
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
        }
        if park && stats.new_pages > 0 {
            for (i, &w) in out.words().iter().enumerate() {
                if w != 0 {
                    self.marked[i].fetch_or(w, Ordering::Release);
                }
            }
            self.marked_any.store(true, Ordering::Release);
        }
        drop(inner);
        Ok(stats)
    }

    /// First half of "clear as pages are sent": ORs the dirty pages into `out` without
    /// re-arming them (bitmap with manual protect); [`DirtyLog::clear`] re-arms a range
    /// later, just before its pages are copied. Pages stay in the log until cleared, so a
    /// second fetch reports them again. In ring and plain bitmap mode this is
    /// [`DirtyLog::harvest`].
    pub fn fetch(&self, out: &mut Bitmap) -> Result<u64, DirtyError> {
        if self.mode != DirtyMode::BitmapManualProtect {
            return self.harvest(out);
        }
        self.check_bitmap(out)?;
        let mut inner = self.lock();
        if !inner.active {
            return Err(DirtyError::NotLogging);
        }
        let Backend::Bitmap(b) = &mut inner.backend else {
            return Ok(0);
        };
        b.get(&self.vm_fd)?;
        let new = out.or_assign_words(&b.snapshot);
        Ok(new + self.take_marked(out))
    }

    /// Re-arms tracking for the pages `first_page..first_page + pages` that the last
    /// [`DirtyLog::fetch`] reported (pages dirtied after that fetch stay logged). Any
    /// range works; KVM's 64-page alignment is handled here. Copy the pages after this
    /// returns. No-op in ring and plain bitmap mode, where fetch already re-armed.
    pub fn clear(&self, first_page: u64, pages: u64) -> Result<(), DirtyError> {
        if self.mode != DirtyMode::BitmapManualProtect || pages == 0 {
            return Ok(());
        }
        let end = first_page.saturating_add(pages);
        if end > self.pages {
            return Err(DirtyError::ClearRange {
                first: first_page,
                end,
                pages: self.pages,
            });
        }
        let mut inner = self.lock();
        if !inner.active {
            return Err(DirtyError::NotLogging);
        }
        let Backend::Bitmap(b) = &mut inner.backend else {
            return Ok(());
        };
        b.clear_range(&self.vm_fd, first_page, end, self.pages)
    }

    /// For a vCPU thread at a ring-full exit (`VcpuExit::Unsupported(31)`): collects
    /// that vCPU's ring into the pending set (returned by the next harvest) and resets
    /// it, so the vCPU can run on. Waits for a harvest in progress (which empties the
    /// ring too). No-op in bitmap mode.
    pub fn on_ring_full(&self, index: u32) -> Result<(), DirtyError> {
        self.check_index(index)?;
        let mut inner = self.lock();
        let Backend::Ring(r) = &mut inner.backend else {
            return Ok(());
        };
        let RingLog {
            rings,
            pending,
            full_exits,
            full_fetch_ns,
            full_clear_ns,
        } = r;
        let ring = rings[index as usize]
            .as_mut()
            .ok_or(DirtyError::NotAttached(index))?;
        let t = Instant::now();
        let collected = ring.collect(index, self.pages, &mut |page| {
            pending.set(page);
        });
        *full_fetch_ns += nanos(t);
        let t = Instant::now();
        let reset = reset_rings(&self.vm_fd);
        *full_clear_ns += nanos(t);
        *full_exits += 1;
        collected?;
        reset
    }

    /// Records the VMM's own write of `len` bytes at guest-physical `gpa` (device DMA),
    /// which KVM's log never sees; it comes out of the next harvest or fetch. Lock-free
    /// and cheap (one atomic OR per 64 pages), for vCPU threads at I/O exits. While
    /// logging is off the write is dropped: nothing is being tracked then, and
    /// [`DirtyLog::start`] forgets everything before it anyway. Parts outside guest
    /// memory are ignored.
    pub fn mark_dirty(&self, gpa: u64, len: u64) {
        if len == 0 || !self.logging.load(Ordering::Acquire) {
            return;
        }
        let first = gpa / PAGE_SIZE;
        if first >= self.pages {
            return;
        }
        let end = (gpa.saturating_add(len - 1) / PAGE_SIZE + 1).min(self.pages);
        for w in (first / 64)..end.div_ceil(64) {
            let mask = word_mask(w * 64, first, end);
            self.marked[w as usize].fetch_or(mask, Ordering::Release);
        }
        self.marked_any.store(true, Ordering::Release);
    }

    fn take_marked(&self, out: &mut Bitmap) -> u64 {
        if !self.marked_any.swap(false, Ordering::AcqRel) {
            return 0;
        }
        let mut new = 0;
        for (i, word) in self.marked.iter().enumerate() {
            if word.load(Ordering::Relaxed) != 0 {
                new += out.or_word(i, word.swap(0, Ordering::AcqRel));
            }
        }
        new
    }

    fn drop_marked(&self) {
        self.marked_any.store(false, Ordering::Release);
        for word in &self.marked {
            word.store(0, Ordering::Relaxed);
        }
    }

    fn check_index(&self, index: u32) -> Result<(), DirtyError> {
        if index < self.vcpus {
            Ok(())
        } else {
            Err(DirtyError::VcpuIndex {
                index,
                vcpus: self.vcpus,
            })
        }
    }

    fn check_bitmap(&self, out: &Bitmap) -> Result<(), DirtyError> {
        if out.pages() == self.pages {
            Ok(())
        } else {
            Err(DirtyError::BitmapSize {
                got: out.pages(),
                want: self.pages,
            })
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update to Inner is complete before anything that can fail or panic, so
        // a poisoned lock still guards consistent state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<DirtyLog>();
};

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("mode", &self.mode())
            .field("pages", &self.pages)
            .field("vcpus", &self.vcpus)
            .field("logging", &self.logging.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl BitmapLog {
    /// KVM_GET_DIRTY_LOG into the snapshot (plain mode: also clears and re-protects).
    fn get(&mut self, vm_fd: &OwnedFd) -> Result<(), DirtyError> {
        let mut log = kvm_dirty_log {
            slot: MEMORY_SLOT,
            ..Default::default()
        };
        log.__bindgen_anon_1.dirty_bitmap = self.snapshot.as_mut_ptr().cast();
        // SAFETY: KVM writes the slot's bitmap, ceil(pages / 64) u64 words, to the
        // pointer; the snapshot has exactly that many words (sized from the slot when the
        // log was built) and is borrowed mutably for the whole call.
        let ret = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_GET_DIRTY_LOG, &log) };
        if ret < 0 {
            return Err(DirtyError::GetDirtyLog {
                slot: MEMORY_SLOT,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// KVM_CLEAR_DIRTY_LOG of the whole snapshot, which is empty afterwards.
    fn clear_all(&mut self, vm_fd: &OwnedFd, pages: u64) -> Result<(), DirtyError> {
        if self.snapshot.iter().all(|&w| w == 0) {
            return Ok(());
        }
        kvm_clear(vm_fd, 0, pages, &mut self.snapshot)?;
        self.snapshot.fill(0);
        Ok(())
    }

    /// KVM_CLEAR_DIRTY_LOG of the snapshot's bits in `first..end`. KVM wants a 64-page
    /// aligned window, so the window is widened and the bitmap handed over masked.
    fn clear_range(
        &mut self,
        vm_fd: &OwnedFd,
        first: u64,
        end: u64,
        pages: u64,
    ) -> Result<(), DirtyError> {
        let lo = first & !63;
        let hi = end.next_multiple_of(64).min(pages);
        let (w0, w1) = ((lo / 64) as usize, hi.div_ceil(64) as usize);
        let scratch = &mut self.scratch[..w1 - w0];
        let mut any = 0;
        for (k, s) in scratch.iter_mut().enumerate() {
            *s = self.snapshot[w0 + k] & word_mask((w0 + k) as u64 * 64, first, end);
            any |= *s;
        }
        if any == 0 {
            return Ok(());
        }
        kvm_clear(vm_fd, lo, hi - lo, scratch)?;
        for (k, s) in scratch.iter().enumerate() {
            self.snapshot[w0 + k] &= !s;
        }
        Ok(())
    }
}

/// KVM_CLEAR_DIRTY_LOG: clears and write-protects the pages whose bits are set in
/// `bits` (bit 0 = `first`); `first` is 64-aligned, `num` a multiple of 64 or reaching
/// the slot's end.
fn kvm_clear(vm_fd: &OwnedFd, first: u64, num: u64, bits: &mut [u64]) -> Result<(), DirtyError> {
    let fail = |source| DirtyError::ClearDirtyLog {
        first,
        end: first + num,
        source,
    };
    let num_pages =
        u32::try_from(num).map_err(|_| fail(io::Error::from_raw_os_error(libc::E2BIG)))?;
    if bits.len() < num.div_ceil(64) as usize {
        return Err(fail(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let mut clear = kvm_clear_dirty_log {
        slot: MEMORY_SLOT,
        num_pages,
        first_page: first,
        ..Default::default()
    };
    clear.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
    // SAFETY: KVM reads ceil(num_pages / 64) u64 words from the pointer (checked above
    // to be inside `bits`, which is borrowed for the whole call) and writes nothing back.
    let ret = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &mut clear) };
    if ret < 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    Ok(())
}

fn reset_rings(vm_fd: &OwnedFd) -> Result<(), DirtyError> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches no user memory; the
    // rings it reads are mappings KVM itself owns.
    let ret = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
    if ret < 0 {
        return Err(DirtyError::ResetRings(io::Error::last_os_error()));
    }
    Ok(())
}

/// One vCPU's dirty ring, mapped from its fd. Only touched through `&mut self`, under the
/// log's lock; the kernel side synchronises through each entry's flags.
struct RingMap {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    bytes: usize,
    /// Next entry to collect (free-running; the slot is `fetch % entries`).
    fetch: u32,
}

// SAFETY: RingMap owns its mapping outright (unmapped only in Drop) and is only used
// through `&mut self`, so moving it to another thread cannot create shared access.
unsafe impl Send for RingMap {}

impl RingMap {
    fn map(vcpu: &VcpuFd, bytes: usize) -> io::Result<Self> {
        let offset = libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * host_page_size() as libc::off_t;
        // SAFETY: a new shared mapping at an address the kernel picks, of the vCPU fd at
        // the offset KVM documents for the dirty ring; no existing memory is affected and
        // the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        Self::from_mmap(ptr, bytes)
    }

    fn from_mmap(ptr: *mut libc::c_void, bytes: usize) -> io::Result<Self> {
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<kvm_dirty_gfn>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self {
            base,
            entries: (bytes / size_of::<kvm_dirty_gfn>()) as u32,
            bytes,
            fetch: 0,
        })
    }

    /// Walks the ring from the fetch index while entries are DIRTY: hands each valid
    /// page to `record` and flags every entry RESET (even a bad one, so the ring keeps
    /// moving). The caller issues KVM_RESET_DIRTY_RINGS afterwards. A bad entry is
    /// reported after the walk.
    fn collect(
        &mut self,
        vcpu: u32,
        pages: u64,
        record: &mut dyn FnMut(u64),
    ) -> Result<u32, DirtyError> {
        let mut bad = None;
        let mut n = 0;
        // Bounded by the ring: the kernel cannot reuse an entry before the reset ioctl.
        while n < self.entries {
            let index = (self.fetch % self.entries) as usize;
            // SAFETY: index < entries, and the mapping holds `entries` whole entries.
            let entry = unsafe { self.base.as_ptr().add(index) };
            // SAFETY: `flags` is the 4-byte-aligned u32 at offset 0 of an entry inside the
            // mapping, which stays valid while `self` lives; KVM and this code only ever
            // access it atomically, and the reference is used in this iteration only.
            let flags = unsafe { AtomicU32::from_ptr(&raw mut (*entry).flags) };
            if flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: the acquire load saw DIRTY, which KVM publishes (release) after
            // writing slot and offset, and KVM leaves the entry alone until userspace
            // flags it RESET; the pointers are in bounds as above.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(&raw const (*entry).slot),
                    std::ptr::read_volatile(&raw const (*entry).offset),
                )
            };
            flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
            if slot == MEMORY_SLOT && offset < pages {
                record(offset);
            } else if bad.is_none() {
                bad = Some(DirtyError::BadRingEntry {
                    vcpu,
                    slot,
                    offset,
                    pages,
                });
            }
        }
        match bad {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: base and bytes describe a mapping this RingMap created and owns; no
        // reference into it outlives `self`, and it is unmapped exactly once, here.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.bytes);
        }
    }
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------
// A one-vCPU lab guest runner for this module's tests, and the harvest cost measured
// on it. The product measures harvest cost through the VMM (`dirty-sample`, used by
// `cargo xtask bench vmm`); this is the bare-KVM view, kept with the tests.

#[cfg(test)]
mod harness {
    use std::time::Duration;

    use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
    use kvm_ioctls::VcpuExit;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::guest::abi::{Mailbox, PORT_HEARTBEAT, PORT_INTEGRITY};
    use crate::guest::layout::Layout;
    use crate::vmm::boot;
    use crate::vmm::config::{ConfigError, VmConfig};

    #[derive(Debug, thiserror::Error)]
    pub enum MeasureError {
        #[error("measurement guest config: {0}")]
        Config(#[from] ConfigError),
        #[error("booting the measurement guest: {0}")]
        Boot(#[from] BootError),
        #[error("dirty log: {0}")]
        Dirty(#[from] DirtyError),
        #[error("{what} failed: {source}")]
        Kvm {
            what: &'static str,
            source: kvm_ioctls::Error,
        },
        #[error("lab guest: {0}")]
        Guest(String),
    }

    /// Harvests of a guest whose working set was entirely rewritten before each one.
    #[derive(Debug, Clone)]
    pub struct HarvestMeasurement {
        pub mode: &'static str,
        pub memory_mib: u64,
        pub working_set_pages: u64,
        /// One per round: a full pass over the working set, vCPU stopped, then a harvest
        /// into an empty bitmap.
        pub rounds: Vec<HarvestStats>,
    }

    const PAGES_PER_GIB: f64 = (1u64 << 30) as f64 / PAGE_SIZE as f64;

    impl HarvestMeasurement {
        /// Reading the log, in ms per GiB of dirty memory (mean over rounds).
        pub fn get_ms_per_gib(&self) -> f64 {
            self.per_gib(|s| s.fetch_ns)
        }

        /// Re-arming the log, in ms per GiB of dirty memory (mean over rounds).
        pub fn clear_ms_per_gib(&self) -> f64 {
            self.per_gib(|s| s.clear_ns)
        }

        pub(super) fn per_gib(&self, ns: impl Fn(&HarvestStats) -> u64) -> f64 {
            let pages: u64 = self.rounds.iter().map(|s| s.new_pages).sum();
            let ns: u64 = self.rounds.iter().map(ns).sum();
            if pages == 0 {
                return 0.0;
            }
            ns as f64 / 1e6 / pages as f64 * PAGES_PER_GIB
        }
    }

    impl fmt::Display for HarvestMeasurement {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "{}: {} MiB guest, {} working-set pages; get {:.2} ms/GiB, clear {:.2} ms/GiB",
                self.mode,
                self.memory_mib,
                self.working_set_pages,
                self.get_ms_per_gib(),
                self.clear_ms_per_gib()
            )?;
            for (i, s) in self.rounds.iter().enumerate() {
                write!(
                    f,
                    "\n  round {}: {} pages, get {:.3} ms, clear {:.3} ms, {} ring-full exits",
                    i + 1,
                    s.new_pages,
                    s.fetch_ns as f64 / 1e6,
                    s.clear_ns as f64 / 1e6,
                    s.ring_full_exits
                )?;
            }
            Ok(())
        }
    }

    /// Measures harvest cost with every page of the working set dirty: boots the lab guest
    /// on one vCPU with an unpaced sequential workload (zero pages, filled once before
    /// logging starts, so first-touch faults stay out of the figures), starts logging, and
    /// `rounds` times lets the guest rewrite the whole working set, stops the vCPU and
    /// harvests. Costs are per GiB of dirty memory; for ring mode they include the work done
    /// at ring-full exits during the pass.
    pub fn measure_harvest(
        mode: DirtyMode,
        memory_mib: u64,
        working_set_mib: u64,
        rounds: u32,
    ) -> Result<HarvestMeasurement, MeasureError> {
        let cfg = VmConfig::parse(
            &format!(
                "name = \"harvest-bench\"\nmemory_mib = {memory_mib}\nvcpus = 1\n\
                 [workload]\npattern = \"sequential\"\ndirty_pages_per_sec = 0\n\
                 working_set_mib = {working_set_mib}\nfill = true\ncontent = \"zero\"\n"
            ),
            std::path::Path::new("measure_harvest"),
            std::path::Path::new("/"),
        )?;
        let mut guest = LabGuest::boot(&cfg, |vm| DirtyLog::with_mode(mode, vm, 1))?;
        let ws_pages = guest.vm.layout.ws_pages;
        // A pass over the working set at first touch runs at ≥70k pages/s here.
        let pass_timeout = Duration::from_secs(30 + ws_pages / 10_000);
        guest.run_while(|g| g.wait_for("the fill pass", pass_timeout, |g| g.fill_done()))?;
        guest.log.start(&guest.vm)?;
        let mut out = Bitmap::new(guest.log.pages());
        let mut measured = Vec::new();
        for _ in 0..rounds {
            let w0 = guest.pages_written()?;
            guest.run_while(|g| {
                g.wait_for("a full pass", pass_timeout, |g| {
                    Ok(g.pages_written()? >= w0 + ws_pages)
                })
            })?;
            out.clear_all();
            measured.push(guest.log.harvest_with_stats(&mut out)?);
        }
        guest.log.stop(&guest.vm)?;
        Ok(HarvestMeasurement {
            mode: guest.log.mode(),
            memory_mib,
            working_set_pages: ws_pages,
            rounds: measured,
        })
    }

    /// Longest park for a guest sleep request.
    const MAX_SLEEP: Duration = Duration::from_millis(10);

    /// The lab guest on one vCPU with a dirty log, run in bursts on a helper thread.
    pub(super) struct LabGuest {
        pub(super) vm: Vm,
        pub(super) log: DirtyLog,
        vcpu: VcpuFd,
    }

    /// What a burst of running did.
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct RunReport {
        exits: u64,
        pub(super) ring_full_exits: u64,
    }

    /// The view of a running guest given to the control side of [`LabGuest::run_while`].
    pub(super) struct Running<'a> {
        pub(super) vm: &'a Vm,
        pub(super) log: &'a DirtyLog,
        vcpu_done: &'a AtomicBool,
    }

    impl LabGuest {
        /// `make_log` sets up the dirty log for one vCPU, before the vCPU exists.
        pub(super) fn boot(
            cfg: &VmConfig,
            make_log: impl FnOnce(&Vm) -> Result<DirtyLog, DirtyError>,
        ) -> Result<Self, MeasureError> {
            let vm = Vm::create(cfg)?;
            let log = make_log(&vm)?;
            let vcpu = vm.fd.create_vcpu(0).map_err(|source| MeasureError::Kvm {
                what: "KVM_CREATE_VCPU",
                source,
            })?;
            log.attach_vcpu(0, &vcpu)?;
            let tsc_khz = vcpu.get_tsc_khz().map_err(|source| MeasureError::Kvm {
                what: "KVM_GET_TSC_KHZ",
                source,
            })?;
            vm.load_guest(cfg, u64::from(tsc_khz) * 1000, 42)?;
            boot::setup_vcpu(&vm.kvm, &vcpu, 0, cfg.entry)?;
            Ok(Self { vm, log, vcpu })
        }

        pub(super) fn pages_written(&self) -> Result<u64, MeasureError> {
            mailbox_field(&self.vm, std::mem::offset_of!(Mailbox, pages_written))
        }

        /// Runs the vCPU on a helper thread while `control` runs on this one; the vCPU stops
        /// at its next exit after `control` returns (the guest exits at least every 0.9 ms).
        pub(super) fn run_while<R>(
            &mut self,
            control: impl FnOnce(&Running<'_>) -> Result<R, MeasureError>,
        ) -> Result<(R, RunReport), MeasureError> {
            let stop = AtomicBool::new(false);
            let vcpu_done = AtomicBool::new(false);
            let Self { vm, log, vcpu } = self;
            let (vm, log) = (&*vm, &*log);
            std::thread::scope(|s| {
                let (stop, done) = (&stop, &vcpu_done);
                let runner = s.spawn(move || {
                    let result = run_vcpu(vm, log, vcpu, stop);
                    done.store(true, Ordering::Release);
                    result
                });
                let result = control(&Running {
                    vm,
                    log,
                    vcpu_done: done,
                });
                stop.store(true, Ordering::Release);
                let report = runner
                    .join()
                    .map_err(|_| MeasureError::Guest("the vCPU thread panicked".into()))??;
                Ok((result?, report))
            })
        }
    }

    impl Running<'_> {
        pub(super) fn pages_written(&self) -> Result<u64, MeasureError> {
            mailbox_field(self.vm, std::mem::offset_of!(Mailbox, pages_written))
        }

        pub(super) fn fill_done(&self) -> Result<bool, MeasureError> {
            Ok(mailbox_field(self.vm, std::mem::offset_of!(Mailbox, fill_done))? != 0)
        }

        /// Polls `done` every millisecond; fails if the vCPU stopped or time ran out.
        pub(super) fn wait_for(
            &self,
            what: &str,
            timeout: Duration,
            done: impl Fn(&Self) -> Result<bool, MeasureError>,
        ) -> Result<(), MeasureError> {
            let t0 = Instant::now();
            while !done(self)? {
                if self.vcpu_done.load(Ordering::Acquire) {
                    return Err(MeasureError::Guest(format!(
                        "the vCPU stopped while waiting for {what}"
                    )));
                }
                if t0.elapsed() > timeout {
                    return Err(MeasureError::Guest(format!(
                        "{what} took longer than {timeout:?} ({} pages written)",
                        self.pages_written()?
                    )));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        }
    }

    pub(super) fn mailbox_field(vm: &Vm, offset: usize) -> Result<u64, MeasureError> {
        let addr = GuestAddress(Layout::mailbox(0) + offset as u64);
        vm.memory
            .load::<u64>(addr, Ordering::Acquire)
            .map_err(|e| MeasureError::Guest(format!("reading the mailbox at {:#x}: {e}", addr.0)))
    }

    /// vCPU 0's loop: answers heartbeats with "no command" and sleeps as the guest asks,
    /// harvests full rings, and stops at the first exit after `stop` is set.
    pub(super) fn run_vcpu(
        vm: &Vm,
        log: &DirtyLog,
        vcpu: &mut VcpuFd,
        stop: &AtomicBool,
    ) -> Result<RunReport, MeasureError> {
        let mut report = RunReport::default();
        while !stop.load(Ordering::Acquire) {
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => {
                    return Err(MeasureError::Kvm {
                        what: "KVM_RUN",
                        source,
                    });
                }
            };
            report.exits += 1;
            match exit {
                VcpuExit::IoIn(PORT_HEARTBEAT, data) => {
                    data.fill(0);
                    let sleep_ns = mailbox_field(vm, std::mem::offset_of!(Mailbox, sleep_ns))?;
                    if sleep_ns > 0 {
                        std::thread::sleep(Duration::from_nanos(sleep_ns).min(MAX_SLEEP));
                    }
                }
                VcpuExit::IoIn(_, data) => data.fill(0),
                VcpuExit::IoOut(PORT_INTEGRITY, _) => {
                    return Err(MeasureError::Guest(
                        "the guest reported an integrity error".into(),
                    ));
                }
                VcpuExit::IoOut(..) => {}
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    log.on_ring_full(0)?;
                    report.ring_full_exits += 1;
                }
                other => {
                    return Err(MeasureError::Guest(format!(
                        "the vCPU stopped unexpectedly: {other:?}"
                    )));
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::time::Duration;

    use super::harness::*;
    use super::*;

    use crate::vmm::boot::tests::{kvm_or_skip, small_config};
    use crate::vmm::config::VmConfig;

    fn ws_range(vm: &Vm) -> Range<u64> {
        let first = vm.layout.ws_base / PAGE_SIZE;
        first..first + vm.layout.ws_pages
    }

    fn paced_config() -> VmConfig {
        small_config(
            "[workload]\npattern = \"sequential\"\ndirty_pages_per_sec = 5000\n\
             working_set_mib = 32\nfill = false\n",
        )
    }

    fn log_for(
        mode: DirtyMode,
        ring_bytes: Option<u32>,
    ) -> impl FnOnce(&Vm) -> Result<DirtyLog, DirtyError> {
        move |vm| match ring_bytes {
            Some(bytes) => DirtyLog::new_ring(vm, 1, Some(bytes)),
            None => DirtyLog::with_mode(mode, vm, 1),
        }
    }

    /// Harvests while the guest writes distinct pages at 5000/s and compares the
    /// working-set pages found with the guest's own count, over two intervals.
    fn accuracy(mode: DirtyMode, ring_bytes: Option<u32>) {
        if !kvm_or_skip() {
            return;
        }
        let mut g = LabGuest::boot(&paced_config(), log_for(mode, ring_bytes)).unwrap();
        assert_eq!(g.log.dirty_mode(), mode);
        let ws = ws_range(&g.vm);
        let (rounds, report) = g
            .run_while(|r| {
                std::thread::sleep(Duration::from_millis(100));
                r.log.start(r.vm)?;
                // The guest's count read just before and just after each harvest: the
                // pages it finds were written between the previous harvest and this
                // one, so their number lies between the two readings' spans, however
                // long this thread is kept off the CPU around a harvest.
                let w0 = r.pages_written()?;
                let mut prev = (w0, w0);
                let mut rounds = Vec::new();
                for interval in [1000, 500] {
                    std::thread::sleep(Duration::from_millis(interval));
                    let mut out = Bitmap::new(r.log.pages());
                    let before = r.pages_written()?;
                    let stats = r.log.harvest_with_stats(&mut out)?;
                    let after = r.pages_written()?;
                    let span = (before.saturating_sub(prev.1), after.saturating_sub(prev.0));
                    rounds.push((span, out.count_in(ws.clone()), stats));
                    prev = (before, after);
                }
                r.log.stop(r.vm)?;
                Ok(rounds)
            })
            .unwrap();
        for (i, ((least, most), found, stats)) in rounds.iter().enumerate() {
            let written = least;
            let error = if found < least {
                (*found as f64 - *least as f64) / *least as f64
            } else if found > most {
                (*found as f64 - *most as f64) / *most as f64
            } else {
                0.0
            };
            println!(
                "{} (ring {:?} bytes) round {}: guest wrote {least}..{most} pages, harvest \
                 found {found} in the working set ({:+.2}% outside), {} new pages in all, {} \
                 ring-full exits, get {} µs, clear {} µs",
                g.log.mode(),
                g.log.ring_bytes(),
                i + 1,
                error * 100.0,
                stats.new_pages,
                stats.ring_full_exits,
                stats.fetch_ns / 1000,
                stats.clear_ns / 1000,
            );
            assert!(
                *written > 1500,
                "round {}: the guest wrote only {written} pages",
                i + 1
            );
            assert!(
                error.abs() <= 0.05,
                "round {}: found {found} dirty working-set pages, the guest wrote \
                 {least}..{most}",
                i + 1
            );
        }
        if ring_bytes.is_some() {
            assert!(report.ring_full_exits > 0, "the small ring never filled");
            let in_stats: u64 = rounds.iter().map(|r| r.2.ring_full_exits).sum();
            assert_eq!(in_stats, report.ring_full_exits);
        }
    }

    #[test]
    fn bitmap_manual_harvest_matches_guest_writes() {
        accuracy(DirtyMode::BitmapManualProtect, None);
    }

    #[test]
    fn bitmap_plain_harvest_matches_guest_writes() {
        accuracy(DirtyMode::Bitmap, None);
    }

    #[test]
    fn ring_harvest_matches_guest_writes() {
        accuracy(DirtyMode::Ring, None);
    }

    #[test]
    fn small_ring_fills_and_loses_nothing() {
        // 4 KiB = 256 entries: full every ~200 pages, ~25 ring-full exits a second.
        accuracy(DirtyMode::Ring, Some(4096));
    }

    fn second_harvest_of_stopped_guest_is_empty(mode: DirtyMode) {
        if !kvm_or_skip() {
            return;
        }
        let mut g = LabGuest::boot(&paced_config(), log_for(mode, None)).unwrap();
        g.log.start(&g.vm).unwrap();
        g.run_while(|r| {
            r.wait_for("500 pages", Duration::from_secs(10), |r| {
                Ok(r.pages_written()? >= 500)
            })
        })
        .unwrap();
        let mut first = Bitmap::new(g.log.pages());
        let n = g.log.harvest(&mut first).unwrap();
        assert_eq!(n, first.count());
        assert!(first.count_in(ws_range(&g.vm)) >= 500, "{n} pages");
        let mut second = Bitmap::new(g.log.pages());
        assert_eq!(g.log.harvest(&mut second).unwrap(), 0);
        assert_eq!(second.count(), 0);
        // Also with the first bitmap: nothing new, nothing lost.
        let before = first.clone();
        assert_eq!(g.log.harvest(&mut first).unwrap(), 0);
        assert_eq!(first, before);
    }

    #[test]
    fn bitmap_manual_second_harvest_is_empty() {
        second_harvest_of_stopped_guest_is_empty(DirtyMode::BitmapManualProtect);
    }

    #[test]
    fn bitmap_plain_second_harvest_is_empty() {
        second_harvest_of_stopped_guest_is_empty(DirtyMode::Bitmap);
    }

    #[test]
    fn ring_second_harvest_is_empty() {
        second_harvest_of_stopped_guest_is_empty(DirtyMode::Ring);
    }

    fn mark_dirty_shows_in_next_harvest(mode: DirtyMode) {
        if !kvm_or_skip() {
            return;
        }
        let vm = Vm::create(&small_config("[workload]\nworking_set_mib = 16\n")).unwrap();
        let log = DirtyLog::with_mode(mode, &vm, 1).unwrap();
        let vcpu = vm.fd.create_vcpu(0).unwrap();
        log.attach_vcpu(0, &vcpu).unwrap();
        let pages = log.pages();
        let mut out = Bitmap::new(pages);

        log.mark_dirty(0x5000, 4096); // logging off: dropped
        log.start(&vm).unwrap();
        assert_eq!(log.harvest(&mut out).unwrap(), 0, "{}", log.mode());

        log.mark_dirty(5 * 4096 + 100, 8192); // pages 5, 6, 7
        log.mark_dirty(192 * 4096 - 8, 16); // pages 191 and 192 (two bitmap words)
        log.mark_dirty(pages * 4096 - 10, 100); // last page; the rest is outside memory
        log.mark_dirty(u64::MAX - 5, 100); // outside memory
        log.mark_dirty(0x9000, 0); // empty
        assert_eq!(log.harvest(&mut out).unwrap(), 6);
        let set: Vec<u64> = out.iter_set().collect();
        assert_eq!(set, vec![5, 6, 7, 191, 192, pages - 1]);

        out.clear_all();
        assert_eq!(log.harvest(&mut out).unwrap(), 0);

        // Through fetch as well (bitmap manual protect has its own path).
        log.mark_dirty(10 * 4096, 1);
        assert_eq!(log.fetch(&mut out).unwrap(), 1);
        assert!(out.is_set(10));

        log.stop(&vm).unwrap();
        log.mark_dirty(20 * 4096, 1); // off again: dropped
        log.start(&vm).unwrap();
        out.clear_all();
        assert_eq!(log.harvest(&mut out).unwrap(), 0);
        log.stop(&vm).unwrap();
        assert!(matches!(log.harvest(&mut out), Err(DirtyError::NotLogging)));
    }

    #[test]
    fn mark_dirty_shows_in_next_harvest_in_every_mode() {
        for mode in [
            DirtyMode::BitmapManualProtect,
            DirtyMode::Bitmap,
            DirtyMode::Ring,
        ] {
            mark_dirty_shows_in_next_harvest(mode);
        }
    }

    /// Re-arming starts a fresh window (each sees only its own writes) while the next
    /// harvest still reports everything since logging began.
    fn rearm_measures_windows_and_loses_nothing(mode: DirtyMode) {
        if !kvm_or_skip() {
            return;
        }
        let mut g = LabGuest::boot(&paced_config(), log_for(mode, None)).unwrap();
        let ws = ws_range(&g.vm);
        let ((windows, all, written), _) = g
            .run_while(|r| {
                std::thread::sleep(Duration::from_millis(100));
                r.log.start(r.vm)?;
                let w0 = r.pages_written()?;
                let mut windows = Vec::new();
                for _ in 0..2 {
                    std::thread::sleep(Duration::from_millis(300));
                    let w = r.pages_written()?;
                    let mut window = Bitmap::new(r.log.pages());
                    let n = r.log.rearm(&mut window)?;
                    assert_eq!(n, window.count());
                    windows.push((window, w));
                }
                std::thread::sleep(Duration::from_millis(100));
                let mut all = Bitmap::new(r.log.pages());
                r.log.harvest(&mut all)?;
                let written = r.pages_written()? - w0;
                r.log.stop(r.vm)?;
                Ok((windows, all, written))
            })
            .unwrap();
        // The guest writes distinct pages in order (5000/s within 8192): each window
        // holds about its own 300 ms of writes, not the one before.
        let first_written = windows[0].1;
        let second = windows[1].0.count_in(ws.clone()) as f64;
        let expected = (windows[1].1 - first_written) as f64;
        assert!(
            (second - expected).abs() <= expected * 0.1 + 20.0,
            "{}: second window found {second} pages, the guest wrote {expected}",
            g.log.mode()
        );
        for (w, _) in &windows {
            let mut missing = w.clone();
            missing.and_not_assign(&all);
            assert_eq!(
                missing.count(),
                0,
                "{}: a window's page was lost",
                g.log.mode()
            );
        }
        let found = all.count_in(ws) as f64;
        assert!(
            (found - written as f64).abs() <= written as f64 * 0.05,
            "{}: the harvest after re-arming found {found} pages, the guest wrote {written}",
            g.log.mode()
        );
    }

    #[test]
    fn rearm_measures_windows_and_loses_nothing_in_every_mode() {
        for mode in [
            DirtyMode::BitmapManualProtect,
            DirtyMode::Bitmap,
            DirtyMode::Ring,
        ] {
            rearm_measures_windows_and_loses_nothing(mode);
        }
    }

    #[test]
    fn config_modes_map_to_the_best_mode() {
        if !kvm_or_skip() {
            return;
        }
        let cfg = small_config("[workload]\nworking_set_mib = 16\n");
        let vm = Vm::create(&cfg).unwrap();
        // The machine notes: this host offers manual protect (value 3).
        let log = DirtyLog::new(DirtyTracking::Bitmap, &vm, 1).unwrap();
        assert_eq!(log.mode(), "bitmap-manual-protect");
        assert_eq!(log.ring_bytes(), None);
        let vm = Vm::create(&cfg).unwrap();
        let log = DirtyLog::new(DirtyTracking::Ring, &vm, 2).unwrap();
        assert_eq!(log.mode(), "ring");
        assert_eq!(log.ring_bytes(), Some(MAX_RING_BYTES));
        let vcpu = vm.fd.create_vcpu(0).unwrap();
        log.attach_vcpu(0, &vcpu).unwrap();
        assert!(matches!(
            log.attach_vcpu(0, &vcpu),
            Err(DirtyError::AlreadyAttached(0))
        ));
        assert!(matches!(
            log.attach_vcpu(2, &vcpu),
            Err(DirtyError::VcpuIndex { .. })
        ));
        assert!(matches!(
            log.on_ring_full(1),
            Err(DirtyError::NotAttached(1))
        ));
        // The ring cannot be enabled once a vCPU exists.
        let vm = Vm::create(&cfg).unwrap();
        let _vcpu = vm.fd.create_vcpu(0).unwrap();
        let e = DirtyLog::new(DirtyTracking::Ring, &vm, 1).unwrap_err();
        assert!(matches!(e, DirtyError::EnableRing { .. }), "{e}");
        assert!(e.to_string().contains("before any vCPU"), "{e}");
    }

    #[test]
    fn clear_rearms_only_the_given_range() {
        if !kvm_or_skip() {
            return;
        }
        let cfg = small_config(
            "[workload]\npattern = \"sequential\"\ndirty_pages_per_sec = 0\n\
             working_set_mib = 4\nfill = true\ncontent = \"zero\"\n",
        );
        let mut g = LabGuest::boot(&cfg, log_for(DirtyMode::BitmapManualProtect, None)).unwrap();
        let ws = ws_range(&g.vm);
        let ws_pages = ws.end - ws.start;
        assert_eq!(ws.start % 64, 0);
        let two_passes = |g: &mut LabGuest| {
            let w0 = g.pages_written().unwrap();
            g.run_while(|r| {
                r.wait_for("two passes", Duration::from_secs(20), |r| {
                    Ok(r.pages_written()? >= w0 + 2 * ws_pages)
                })
            })
            .unwrap();
        };
        g.log.start(&g.vm).unwrap();
        two_passes(&mut g);

        // Fetch does not re-arm: a second fetch sees the same pages.
        let mut fetched = Bitmap::new(g.log.pages());
        g.log.fetch(&mut fetched).unwrap();
        assert_eq!(fetched.count_in(ws.clone()), ws_pages);
        let mut again = Bitmap::new(g.log.pages());
        g.log.fetch(&mut again).unwrap();
        assert_eq!(again, fetched);

        // Clear an aligned range and an unaligned one.
        let aligned = ws.start..ws.start + 512;
        let unaligned = ws.start + 600..ws.start + 630;
        g.log.clear(aligned.start, 512).unwrap();
        g.log.clear(unaligned.start, 30).unwrap();
        let mut after = Bitmap::new(g.log.pages());
        g.log.fetch(&mut after).unwrap();
        for p in 0..g.log.pages() {
            let cleared = aligned.contains(&p) || unaligned.contains(&p);
            assert_eq!(after.is_set(p), fetched.is_set(p) && !cleared, "page {p}");
        }
        assert_eq!(after.count_in(ws.clone()), ws_pages - 512 - 30);

        // The cleared pages were write-protected again: the guest's next writes to them
        // are logged.
        two_passes(&mut g);
        let mut rearmed = Bitmap::new(g.log.pages());
        g.log.fetch(&mut rearmed).unwrap();
        assert_eq!(rearmed.count_in(ws.clone()), ws_pages);

        // Out of range is an error, not a panic; harvest then empties the log.
        assert!(matches!(
            g.log.clear(g.log.pages() - 10, 11),
            Err(DirtyError::ClearRange { .. })
        ));
        let mut out = Bitmap::new(g.log.pages());
        assert!(g.log.harvest(&mut out).unwrap() >= ws_pages);
        out.clear_all();
        assert_eq!(g.log.harvest(&mut out).unwrap(), 0);
        g.log.stop(&g.vm).unwrap();
    }

    #[test]
    fn measure_harvest_on_a_small_guest() {
        if !kvm_or_skip() {
            return;
        }
        for mode in [
            DirtyMode::BitmapManualProtect,
            DirtyMode::Bitmap,
            DirtyMode::Ring,
        ] {
            let m = measure_harvest(mode, 64, 56, 2).unwrap();
            println!("{m}");
            assert_eq!(m.rounds.len(), 2);
            for s in &m.rounds {
                assert!(s.new_pages >= m.working_set_pages, "{m}");
            }
        }
    }

    /// Ring parsing against an anonymous mapping laid out like KVM's ring.
    #[test]
    fn ring_walk_stops_at_clean_entries_and_reports_bad_ones() {
        let bytes = 4096;
        // SAFETY: a fresh private anonymous mapping; the result is checked by from_mmap.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let mut ring = RingMap::from_mmap(ptr, bytes).unwrap();
        assert_eq!(ring.entries, 256);
        let write = |ring: &RingMap, i: usize, flags, slot, offset| {
            // SAFETY: i < 256 entries of the mapping, which `ring` owns and keeps alive.
            unsafe {
                ring.base.as_ptr().add(i).write(kvm_dirty_gfn {
                    flags,
                    slot,
                    offset,
                })
            };
        };
        write(&ring, 0, DIRTY_GFN_F_DIRTY, 0, 7);
        write(&ring, 1, DIRTY_GFN_F_DIRTY, 0, 9);
        let mut seen = Vec::new();
        assert_eq!(ring.collect(0, 100, &mut |p| seen.push(p)).unwrap(), 2);
        assert_eq!(seen, vec![7, 9]);
        assert_eq!(ring.fetch, 2);
        // SAFETY: entry 0 is inside the mapping.
        assert_eq!(unsafe { (*ring.base.as_ptr()).flags }, DIRTY_GFN_F_RESET);

        write(&ring, 2, DIRTY_GFN_F_DIRTY, 3, 1); // wrong slot
        write(&ring, 3, DIRTY_GFN_F_DIRTY, 0, 100); // past the end
        write(&ring, 4, DIRTY_GFN_F_DIRTY, 0, 11);
        seen.clear();
        let err = ring.collect(2, 100, &mut |p| seen.push(p)).unwrap_err();
        assert!(
            matches!(
                err,
                DirtyError::BadRingEntry {
                    vcpu: 2,
                    slot: 3,
                    offset: 1,
                    pages: 100
                }
            ),
            "{err}"
        );
        assert_eq!(seen, vec![11]);
        assert_eq!(ring.fetch, 5, "bad entries are consumed too");

        // Wrap-around: the index runs on past the end of the ring.
        ring.fetch = 255;
        write(&ring, 255, DIRTY_GFN_F_DIRTY, 0, 1);
        write(&ring, 0, DIRTY_GFN_F_DIRTY, 0, 2);
        seen.clear();
        assert_eq!(ring.collect(0, 100, &mut |p| seen.push(p)).unwrap(), 2);
        assert_eq!(seen, vec![1, 2]);
    }
}
