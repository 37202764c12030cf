//! Ferry's eBPF programs, compiled from `src/probes.bpf.c` by `build.rs` and embedded,
//! and `#[repr(C)]` mirrors of the map types in `src/ferry.h`.
//!
//! The programs are C rather than Rust: aya's Rust eBPF toolchain needs a newer
//! compiler and `rust-src` than Ferry builds with, while Debian's clang builds C with
//! CO-RE relocations that aya applies at load time.

use aya::Pod;

/// The compiled object, aligned as aya's loader wants it.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probes.bpf.o"))
}

pub const MAX_VMS: u32 = 16;
pub const WS_PAGE_BITS: u32 = 22;
pub const WS_WORDS: u32 = 1 << (WS_PAGE_BITS - 6);
pub const HIST_BUCKETS: usize = 32;
/// `Watch::ws_source` when no source feeds the working-set bitmap yet.
pub const WS_NONE: u32 = u32::MAX;

/// Where a dirtied page was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum DirtySource {
    Ring = 0,
    PageFault = 1,
    Walk = 2,
    Spte = 3,
}

impl DirtySource {
    pub const ALL: [DirtySource; 4] = [Self::Ring, Self::PageFault, Self::Walk, Self::Spte];
    /// Which live source a dirty rate comes from, best first: the ring sees each
    /// page exactly once; a hardware fault where the host reports them (VMX/SVM); an
    /// SPTE made writable where it does not (it counts each page once, first touch
    /// included); a page-table walk (guest-virtual, and a first touch may walk twice)
    /// last.
    pub const PREFERENCE: [DirtySource; 4] = [Self::Ring, Self::PageFault, Self::Spte, Self::Walk];

    /// The tracepoint it comes from.
    pub fn tracepoint(self) -> &'static str {
        match self {
            Self::Ring => "kvm:kvm_dirty_ring_push",
            Self::PageFault => "kvm:kvm_page_fault",
            Self::Walk => "kvmmmu:kvm_mmu_pagetable_walk",
            Self::Spte => "kvmmmu:kvm_mmu_set_spte",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ExitKind {
    Kvm = 0,
    Userspace = 1,
    Pio = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum IoOp {
    Read = 0,
    Write = 1,
    Sync = 2,
}

pub const IO_OPS: u32 = 3;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watch {
    pub slot: u32,
    pub ws_source: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmCounts {
    pub dirty: [u64; 4],
    pub read_walks: u64,
    pub readonly_sptes: u64,
    pub harvests: u64,
    pub memslot_ns: u64,
    pub memslot_logging: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ExitKey {
    pub slot: u32,
    pub kind: u32,
    pub reason: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoStart {
    pub ts_ns: u64,
    pub op: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoStats {
    pub calls: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency_ns: u64,
    pub hist: [u64; HIST_BUCKETS],
}

impl Default for IoStats {
    fn default() -> Self {
        Self {
            calls: 0,
            bytes: 0,
            errors: 0,
            latency_ns: 0,
            hist: [0; HIST_BUCKETS],
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RqKey {
    pub dev: u32,
    pub pad: u32,
    pub sector: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RqStart {
    pub ts_ns: u64,
    pub bytes: u64,
    pub slot: u32,
    pub write: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub dev: u32,
    /// A VM's slot, or [`MAX_VMS`] for any other process.
    pub slot: u32,
    pub write: u32,
}

// SAFETY: each is #[repr(C)], made only of integers (every bit pattern valid), and has
// no padding the kernel could leave uninitialised (checked against C below).
unsafe impl Pod for Watch {}
// SAFETY: as above.
unsafe impl Pod for VmCounts {}
// SAFETY: as above.
unsafe impl Pod for ExitKey {}
// SAFETY: as above.
unsafe impl Pod for IoStart {}
// SAFETY: as above.
unsafe impl Pod for IoStats {}
// SAFETY: as above.
unsafe impl Pod for RqKey {}
// SAFETY: as above.
unsafe impl Pod for RqStart {}
// SAFETY: as above.
unsafe impl Pod for BlockKey {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    mod c {
        include!(concat!(env!("OUT_DIR"), "/c_sizes.rs"));
    }

    #[test]
    fn mirrors_match_the_c_layout() {
        assert_eq!(size_of::<Watch>(), c::FERRY_WATCH);
        assert_eq!(size_of::<VmCounts>(), c::FERRY_VM_COUNTS);
        assert_eq!(size_of::<ExitKey>(), c::FERRY_EXIT_KEY);
        assert_eq!(size_of::<IoStart>(), c::FERRY_IO_START);
        assert_eq!(size_of::<IoStats>(), c::FERRY_IO_STATS);
        assert_eq!(size_of::<RqKey>(), c::FERRY_RQ_KEY);
        assert_eq!(size_of::<RqStart>(), c::FERRY_RQ_START);
        assert_eq!(size_of::<BlockKey>(), c::FERRY_BLOCK_KEY);
    }

    #[test]
    fn harvest_ioctl_numbers_are_the_kernels() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr.
        let ioc = |dir: u32, nr: u32, size: u32| dir << 30 | size << 16 | 0xae << 8 | nr;
        let header = include_str!("ferry.h");
        for (name, value) in [
            ("FERRY_KVM_GET_DIRTY_LOG", ioc(1, 0x42, 16)),
            ("FERRY_KVM_CLEAR_DIRTY_LOG", ioc(3, 0xc0, 24)),
            ("FERRY_KVM_RESET_DIRTY_RINGS", ioc(0, 0xc7, 0)),
            ("FERRY_KVM_SET_USER_MEMORY_REGION", ioc(1, 0x46, 32)),
            ("FERRY_KVM_SET_USER_MEMORY_REGION2", ioc(1, 0x49, 160)),
        ] {
            assert!(
                header.contains(&format!("#define {name} {value:#x}u")),
                "{name} should be {value:#x}"
            );
        }
    }

    #[test]
    fn the_object_is_an_ebpf_elf() {
        let o = object();
        assert_eq!(&o[..4], b"\x7fELF");
        // e_machine 247 = EM_BPF.
        assert_eq!(u16::from_le_bytes([o[18], o[19]]), 247);
    }
}
