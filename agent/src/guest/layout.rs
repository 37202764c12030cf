//! Where everything lives in the lab guest's physical memory (identity-mapped, so
//! guest-physical and guest-virtual addresses are the same).
//!
//! ```text
//! 0x0000_1000  GDT
//! 0x0000_2000  GuestParams (VMM → guest, read-only)
//! 0x0000_3000  PML4, PDPT, page directories (2 MiB pages)
//! 0x0000_9000  32-bit entry stub (optional way in)
//! 0x0000_a000  TSS and its I/O permission bitmap
//! 0x0001_0000  guest program (≤ 64 KiB)
//! 0x0002_0000  one mailbox page per vCPU
//! 0x0003_0000  one 16 KiB stack per vCPU
//! 0x0010_0000  one 64 KiB disk bounce buffer per vCPU
//! 0x0020_0000  text corpus, random corpus (128 KiB each)
//! 0x0024_0000  page generation table (u32 per working-set page), disk generation table
//! 2 MiB-aligned  the working set, split evenly between vCPUs
//! ```

use super::abi::PAGE_SIZE;

/// vCPUs the layout has room for: a mailbox, a stack and a disk buffer each.
pub const MAX_VCPUS: u32 = 16;

pub const GDT: u64 = 0x1000;
/// 64-bit TSS followed by an all-zero I/O permission bitmap. With IOPL=3 a CPU never
/// consults the bitmap, but software-virtualised KVM (PVM) strips IOPL from the guest and
/// emulates `in`/`out` against this bitmap, so it must grant every port.
pub const TSS: u64 = 0xa000;
/// The 32-bit entry stub (builds page tables, enters long mode, drops to CPL3), its
/// 64-bit half, and the GDT pointer it loads.
pub const STUB: u64 = 0x9000;
pub const STUB64: u64 = 0x9400;
pub const STUB_GDT_PTR: u64 = 0x9800;
pub const TSS_IOMAP_OFFSET: u64 = 0x68;
/// Limit covers the 8 KiB bitmap plus its terminating 0xff byte.
pub const TSS_LIMIT: u64 = TSS_IOMAP_OFFSET + 8192;
pub const PARAMS: u64 = 0x2000;
pub const PML4: u64 = 0x3000;
pub const PDPT: u64 = 0x4000;
pub const PD: u64 = 0x5000;
/// Page directories for up to 4 GiB.
pub const PD_PAGES: u64 = 4;
pub const CODE: u64 = 0x1_0000;
pub const CODE_MAX: u64 = 0x1_0000;
pub const MAILBOX: u64 = 0x2_0000;
pub const STACKS: u64 = 0x3_0000;
pub const STACK_SIZE: u64 = 0x4000;
pub const DISK_BUF: u64 = 0x10_0000;
pub const DISK_BUF_STRIDE: u64 = 0x1_0000;
pub const TEXT_CORPUS: u64 = 0x20_0000;
pub const RANDOM_CORPUS: u64 = 0x22_0000;
pub const CORPUS_LEN: u64 = 0x2_0000;
pub const GEN_TABLE: u64 = 0x24_0000;

pub const SEL_KERNEL_CODE: u16 = 0x08;
pub const SEL_KERNEL_DATA: u16 = 0x10;
pub const SEL_USER_CODE: u16 = 0x1b;
pub const SEL_USER_DATA: u16 = 0x23;
pub const SEL_TSS: u16 = 0x28;

const _: () = assert!(PD + PD_PAGES * PAGE_SIZE <= STUB && STUB_GDT_PTR + 16 <= TSS);
const _: () = assert!(STACKS + STACK_SIZE * MAX_VCPUS as u64 <= DISK_BUF);
const _: () = assert!(MAILBOX + PAGE_SIZE * MAX_VCPUS as u64 <= STACKS);
const _: () = assert!(DISK_BUF + DISK_BUF_STRIDE * MAX_VCPUS as u64 <= TEXT_CORPUS);

/// The parts of the layout that depend on the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub memory_bytes: u64,
    pub ws_pages: u64,
    pub disk_gen_table: u64,
    pub disk_blocks: u64,
    pub ws_base: u64,
}

impl Layout {
    /// The layout of a guest of `memory_mib` whose workload writes `working_set_mib`
    /// and `disk_blocks` blocks of its first disk.
    pub fn new(memory_mib: u64, working_set_mib: u64, disk_blocks: u64) -> Result<Self, String> {
        let memory_bytes = memory_mib << 20;
        let ws_pages = (working_set_mib << 20) / PAGE_SIZE;
        let disk_gen_table = align_up(GEN_TABLE + ws_pages * 4, PAGE_SIZE);
        let tables_end = disk_gen_table + disk_blocks * 4;
        let ws_base = align_up(tables_end, 2 << 20);
        let ws_end = ws_base + ws_pages * PAGE_SIZE;
        if ws_end > memory_bytes {
            return Err(format!(
                "workload.working_set_mib = {} does not fit in memory_mib = {}: Ferry's lab \
                 guest reserves {} MiB for its code, tables and disk buffers; raise memory_mib \
                 to at least {}",
                working_set_mib,
                memory_mib,
                ws_base >> 20,
                ws_end.div_ceil(1 << 20)
            ));
        }
        Ok(Self {
            memory_bytes,
            ws_pages,
            disk_gen_table,
            disk_blocks,
            ws_base,
        })
    }

    pub fn mailbox(vcpu: u32) -> u64 {
        MAILBOX + u64::from(vcpu) * PAGE_SIZE
    }

    pub fn stack_top(vcpu: u32) -> u64 {
        STACKS + (u64::from(vcpu) + 1) * STACK_SIZE
    }
}

pub fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}
