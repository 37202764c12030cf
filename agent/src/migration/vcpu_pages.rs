//! The pages a paused vCPU touches first when it runs again: the page at its
//! instruction pointer, at its stack pointer and wherever its other registers point,
//! and the page tables that translate those addresses. After a post-copy resume each
//! of them not yet on the destination is a fault (a round trip, in series, before the
//! guest does anything at all); sent during the pause they cost microseconds each.

use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::guest::abi::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
/// A PDPTE or PDE that maps a 1 GiB or 2 MiB page rather than the next table.
const LARGE: u64 = 1 << 7;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// Guest-physical page numbers (each at most once, registers' order) of the pages a
/// vCPU's registers point at, and of the page tables on the way, inside `memory` (all
/// of guest memory, from guest-physical 0).
pub fn pages(regs: &kvm_regs, s: &kvm_sregs, memory: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut push = |page: u64| {
        if page < memory.len() as u64 / PAGE && !out.contains(&page) {
            out.push(page);
        }
    };
    let long_mode = s.cr0 & CR0_PG != 0 && s.cr4 & CR4_PAE != 0 && s.efer & EFER_LMA != 0;
    for addr in addresses(regs)
        .into_iter()
        .chain([s.gdt.base, s.idt.base, s.tr.base])
    {
        if s.cr0 & CR0_PG == 0 {
            // No paging: addresses are physical.
            push(addr / PAGE);
        } else if long_mode {
            walk(memory, s.cr3, addr, &mut push);
        }
        // 32-bit paging: no guest Ferry runs uses it, and a missed page is only a fault.
    }
    out
}

/// What the general-purpose registers hold, the instruction and stack pointers first.
fn addresses(r: &kvm_regs) -> [u64; 17] {
    [
        r.rip, r.rsp, r.rbp, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
        r.r12, r.r13, r.r14, r.r15,
    ]
}

/// Walks the four-level tables at `cr3` for `addr`, pushing each table page and then
/// the mapped page; stops at the first entry that is absent or outside memory.
fn walk(memory: &[u8], cr3: u64, addr: u64, push: &mut impl FnMut(u64)) {
    let mut table = cr3 & ADDRESS;
    for level in (0..4).rev() {
        push(table / PAGE);
        let index = (addr >> (12 + 9 * level)) & 0x1ff;
        let Some(entry) = read_u64(memory, table + index * 8) else {
            return;
        };
        if entry & PRESENT == 0 {
            return;
        }
        let next = entry & ADDRESS;
        if level == 0 || (level <= 2 && entry & LARGE != 0) {
            // The mapped page: 4 KiB, or the 4 KiB page of `addr` inside a large one.
            let span = 1u64 << (12 + 9 * level);
            let base = next & !(span - 1);
            push((base + (addr & (span - 1))) / PAGE);
            return;
        }
        table = next;
    }
}

fn read_u64(memory: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    let bytes = memory.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 MiB of memory with tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD): the
    /// first 2 MiB identity-mapped by one large page, the second by a page table at
    /// 0x4000 whose entry 5 maps 0x30_5000 → 0x20_0000 + 0x7000.
    fn memory() -> Vec<u8> {
        let mut m = vec![0u8; 4 << 20];
        let mut put = |at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(0x1000, 0x2000 | PRESENT);
        put(0x2000, 0x3000 | PRESENT);
        put(0x3000, PRESENT | LARGE);
        put(0x3008, 0x4000 | PRESENT);
        put(0x4000 + 5 * 8, 0x20_7000 | PRESENT);
        m
    }

    /// Long mode with the tables above; every register and descriptor-table base
    /// holds `fill`, except the instruction and stack pointers.
    fn cpu(rip: u64, rsp: u64, fill: u64) -> (kvm_regs, kvm_sregs) {
        let regs = kvm_regs {
            rip,
            rsp,
            rbp: fill,
            rax: fill,
            rbx: fill,
            rcx: fill,
            rdx: fill,
            rsi: fill,
            rdi: fill,
            r8: fill,
            r9: fill,
            r10: fill,
            r11: fill,
            r12: fill,
            r13: fill,
            r14: fill,
            r15: fill,
            ..Default::default()
        };
        let mut s = kvm_sregs {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            ..Default::default()
        };
        s.gdt.base = fill;
        s.idt.base = fill;
        s.tr.base = fill;
        (regs, s)
    }

    #[test]
    fn the_walk_and_the_pages_registers_point_at() {
        let m = memory();
        // rip in the large page, rsp through the 4 KiB table, the rest at 0.
        let (r, s) = cpu(0x1_2345, 0x20_5008, 0);
        assert_eq!(pages(&r, &s, &m), vec![1, 2, 3, 0x12, 4, 0x207, 0]);
    }

    #[test]
    fn absent_entries_and_addresses_outside_memory_stop_the_walk() {
        let m = memory();
        // PML4 entry 1 is absent.
        let (r, s) = cpu(1 << 39, 1 << 39, 1 << 39);
        assert_eq!(pages(&r, &s, &m), vec![1]);
        // A PD entry mapping a large page past the end of memory.
        let mut m = memory();
        m[0x3010..0x3018].copy_from_slice(&(0x4000_0000u64 | PRESENT | LARGE).to_le_bytes());
        let (r, s) = cpu(0x40_0000, 0x40_0000, 0x40_0000);
        assert_eq!(pages(&r, &s, &m), vec![1, 2, 3]);
    }

    #[test]
    fn without_paging_addresses_are_physical() {
        let m = memory();
        let (r, mut s) = cpu(0x5000, 0x9000, 0x9000);
        s.cr0 = 1;
        assert_eq!(pages(&r, &s, &m), vec![5, 9]);
        // Past the end of memory: nothing.
        let (r, mut s) = cpu(8 << 20, 8 << 20, 8 << 20);
        s.cr0 = 1;
        assert!(pages(&r, &s, &m).is_empty());
    }
}
