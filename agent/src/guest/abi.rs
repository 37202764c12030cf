//! The contract between the lab guest and the VMM: I/O ports, the parameter block the
//! VMM writes before boot, the per-vCPU mailbox the guest fills before each port access,
//! and the on-page / on-disk record formats. The guest program and the VMM both use
//! these definitions, so they cannot drift apart.
//!
//! Report format: the guest never sends data through the port value itself (beyond a
//! small code); it writes a [`Mailbox`] in guest memory and then touches a port. The
//! VMM reads the mailbox at that exit. Ports:
//!
//! | port | dir | meaning |
//! |------|-----|---------|
//! | `PORT_HEARTBEAT` | in  | heartbeat; `Mailbox::sleep_ns` > 0 asks the VMM to park the vCPU that long; the value read is a [`Command`] |
//! | `PORT_VERIFY_DONE` | out | a full verification finished; results in the mailbox |
//! | `PORT_INTEGRITY` | out | an integrity error (value: 1 memory, 2 disk); details in the mailbox |
//! | `PORT_BLOCK` | out | submit the block request in the mailbox (value: disk index) |

use vm_memory::ByteValued;

pub const PORT_HEARTBEAT: u16 = 0x0f00;
pub const PORT_VERIFY_DONE: u16 = 0x0f01;
pub const PORT_INTEGRITY: u16 = 0x0f02;
pub const PORT_BLOCK: u16 = 0x0f03;

pub const PAGE_SIZE: u64 = 4096;
/// Bytes of each written page taken by its stamp; the body follows.
pub const PAGE_HEADER: u64 = 32;
pub const PAGE_MAGIC: u32 = 0x3159_5246; // "FRY1"
pub const BLOCK_MAGIC: u32 = 0x4b4c_4246; // "FBLK"
pub const PARAMS_MAGIC: u64 = 0x5241_5041_5952_5246; // "FRYPARAR"
pub const ABI_VERSION: u64 = 1;

/// What the VMM answers to a heartbeat.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    None = 0,
    /// Re-check every page and disk block this vCPU has written, then report.
    Verify = 1,
}

#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentKind {
    Zero = 0,
    Text = 1,
    Random = 2,
    /// Per page, chosen by a hash of the page number among the three above.
    Mixed = 3,
}

#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternKind {
    Sequential = 0,
    Random = 1,
    Hotcold = 2,
    Idle = 3,
}

#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    Read = 1,
    Write = 2,
    Flush = 3,
}

pub const INTEGRITY_MEMORY: u32 = 1;
pub const INTEGRITY_DISK: u32 = 2;

/// Written once by the VMM at boot; read-only to the guest. All values are u64 so the
/// guest addresses them with plain 64-bit loads.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestParams {
    pub magic: u64,
    pub version: u64,
    pub vcpus: u64,
    pub tsc_hz: u64,
    pub seed: u64,
    pub ws_base: u64,
    pub ws_pages: u64,
    pub pattern: u64,
    pub content: u64,
    /// Hot pages per mille of each vCPU's share (hotcold).
    pub hot_permille: u64,
    /// Pages per second per vCPU; 0 = unpaced.
    pub pages_per_sec: u64,
    pub fill: u64,
    pub heartbeat_tsc: u64,
    pub heartbeat_ns: u64,
    pub verify_interval_tsc: u64,
    pub verify_sample: u64,
    pub text_corpus: u64,
    pub random_corpus: u64,
    pub corpus_len: u64,
    pub gen_table: u64,
    pub disk_gen_table: u64,
    /// Blocks on disk 0 the workload uses (0 = no disk workload).
    pub disk_blocks: u64,
    pub disk_block_bytes: u64,
    /// Block writes per second per vCPU.
    pub disk_ops_per_sec: u64,
    pub disk_buf_base: u64,
    pub disk_buf_stride: u64,
    pub mailbox_base: u64,
}

// SAFETY: GuestParams is repr(C), made only of u64 fields (no padding), and any bit
// pattern is a valid value.
unsafe impl ByteValued for GuestParams {}

/// One page per vCPU; the guest writes it, the VMM reads it at port exits (and writes
/// the block request status). Counters live here, in guest memory, so they travel with
/// the VM through snapshots and migrations.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Mailbox {
    pub heartbeats: u64,
    pub pages_written: u64,
    pub integrity_errors: u64,
    pub disk_integrity_errors: u64,
    pub disk_writes: u64,
    pub disk_reads: u64,
    pub sleep_ns: u64,
    pub verify_pages: u64,
    pub verify_errors: u64,
    pub verify_blocks: u64,
    pub verify_disk_errors: u64,
    pub error_index: u64,
    pub error_expected_gen: u64,
    pub error_found_gen: u64,
    pub error_detail: u64,
    pub block_op: u64,
    pub block_disk: u64,
    pub block_offset: u64,
    pub block_len: u64,
    pub block_buf: u64,
    pub block_status: u64,
    pub fill_done: u64,
}

// SAFETY: Mailbox is repr(C), made only of u64 fields (no padding), and any bit
// pattern is a valid value.
unsafe impl ByteValued for Mailbox {}

/// Offset of the guest's private variables inside its mailbox page (not part of the ABI).
pub const MAILBOX_LOCALS: u64 = 0x800;

/// splitmix64's finaliser: the guest and the host derive page kinds and corpus
/// windows from it, so both can recompute what a page must hold.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over 64-bit words: cheap enough for the guest to run on every block it
/// writes, and strong enough to catch torn or stale blocks.
pub fn block_checksum(block: u64, generation: u64, body: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ block;
    h = (h ^ generation).wrapping_mul(0x0000_0100_0000_01b3);
    for w in body.chunks_exact(8) {
        let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_structs_have_no_padding() {
        assert_eq!(std::mem::size_of::<GuestParams>(), 27 * 8);
        assert_eq!(std::mem::size_of::<Mailbox>(), 22 * 8);
        assert!((std::mem::size_of::<Mailbox>() as u64) < MAILBOX_LOCALS);
    }
}
