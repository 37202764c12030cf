//! The lab guest program, assembled at VMM start with iced-x86.
//!
//! It runs in 64-bit mode at CPL3 (ring-0 code is emulated on software-virtualised KVM
//! and thousands of times slower). Each vCPU enters at [`ENTRY`] with its index in `rdi`
//! and its stack in `rsp`; it never needs the kernel: I/O ports are reachable with
//! IOPL=3, and `rdtsc` is allowed at CPL3.
//!
//! Per vCPU, the loop: write pages of its share of the working set (paced by the TSC
//! against `pages_per_sec`, or unpaced), write disk blocks (paced by
//! `disk_ops_per_sec`), re-check a sample of pages every verify interval, heartbeat at
//! least every `heartbeat_tsc` ticks, and park through the heartbeat port when there
//! is nothing to do. Every written page carries a stamp (page number, generation,
//! vCPU, content kind) and a body copied from a corpus window derived from (page,
//! generation), so any page can be re-derived and compared. The generation of every
//! page and disk block lives in tables in guest memory, so a page that silently went
//! back to an older version is caught too.
//!
//! Register conventions inside the program: r15 = this vCPU's mailbox, r14 = the
//! parameter block, rbx = the random generator's state. Subroutines may clobber rax,
//! rcx, rdx, rsi, rdi and r8–r11; r12, r13 and rbp are saved by whoever uses them.

use std::mem::offset_of;

use iced_x86::IcedError;
use iced_x86::code_asm::*;

use super::abi::{
    BLOCK_MAGIC, BlockOp, Command, ContentKind, GuestParams, INTEGRITY_DISK, INTEGRITY_MEMORY,
    MAILBOX_LOCALS, Mailbox, PAGE_HEADER, PAGE_MAGIC, PAGE_SIZE, PORT_BLOCK, PORT_HEARTBEAT,
    PORT_INTEGRITY, PORT_VERIFY_DONE, PatternKind,
};
use super::layout;

/// Where the 64-bit entry point sits: the first byte of the program.
pub const ENTRY: u64 = layout::CODE;

const WINDOW_K1: u64 = 0x9e37_79b9_7f4a_7c15;
const WINDOW_K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
/// Salt for the per-page content choice of `content = "mixed"`.
pub const MIX_SALT: u64 = 0x6d69_7865_6421_0001;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Pages written per loop iteration at most, so disk writes and verification keep
/// their turn.
const BATCH: u64 = 16;

// Guest-private variables in the mailbox page.
#[derive(Clone, Copy)]
#[repr(u64)]
enum Local {
    Vcpu,
    First,
    Count,
    Hot,
    Seq,
    T0,
    Written,
    LastHb,
    LastVerify,
    DFirst,
    DCount,
    DT0,
    DDone,
    DiskBuf,
    Backlog,
    DBacklog,
    Now,
}

/// Mailbox offsets of the page-write pacing state (start TSC, pages written since,
/// the TSC at the latest loop): the VMM restarts the pace from "now" when it changes
/// the rate, so a step in the rate is a step in the guest's writes.
pub const PACE_T0: u64 = MAILBOX_LOCALS + Local::T0 as u64 * 8;
pub const PACE_WRITTEN: u64 = MAILBOX_LOCALS + Local::Written as u64 * 8;
pub const PACE_NOW: u64 = MAILBOX_LOCALS + Local::Now as u64 * 8;

fn loc(l: Local) -> AsmMemoryOperand {
    qword_ptr(r15 + (MAILBOX_LOCALS + l as u64 * 8))
}

macro_rules! mb {
    ($f:ident) => {
        qword_ptr(r15 + offset_of!(Mailbox, $f))
    };
}

macro_rules! par {
    ($f:ident) => {
        qword_ptr(r14 + offset_of!(GuestParams, $f))
    };
}

/// Kind of page body → corpus address: `[r14 + kind*8 + CORPUS_BASE]` (text = 1, random = 2).
const CORPUS_BASE: usize = offset_of!(GuestParams, text_corpus) - 8;
const _: () = assert!(offset_of!(GuestParams, random_corpus) == CORPUS_BASE + 16);

struct Labels {
    rng: CodeLabel,
    mix64: CodeLabel,
    window: CodeLabel,
    page_kind: CodeLabel,
    next_index: CodeLabel,
    write_page: CodeLabel,
    verify_page: CodeLabel,
    heartbeat: CodeLabel,
    maybe_heartbeat: CodeLabel,
    full_verify: CodeLabel,
    sample_verify: CodeLabel,
    disk_op: CodeLabel,
    fill_block: CodeLabel,
    checksum: CodeLabel,
    check_block: CodeLabel,
    block_io: CodeLabel,
}

/// Assembles the guest program for loading at [`layout::CODE`].
pub fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut l = Labels {
        rng: a.create_label(),
        mix64: a.create_label(),
        window: a.create_label(),
        page_kind: a.create_label(),
        next_index: a.create_label(),
        write_page: a.create_label(),
        verify_page: a.create_label(),
        heartbeat: a.create_label(),
        maybe_heartbeat: a.create_label(),
        full_verify: a.create_label(),
        sample_verify: a.create_label(),
        disk_op: a.create_label(),
        fill_block: a.create_label(),
        checksum: a.create_label(),
        check_block: a.create_label(),
        block_io: a.create_label(),
    };
    entry(&mut a, &l)?;
    rng(&mut a, &mut l)?;
    mix64(&mut a, &mut l)?;
    window(&mut a, &mut l)?;
    page_kind(&mut a, &mut l)?;
    next_index(&mut a, &mut l)?;
    write_page(&mut a, &mut l)?;
    verify_page(&mut a, &mut l)?;
    heartbeat(&mut a, &mut l)?;
    full_verify(&mut a, &mut l)?;
    sample_verify(&mut a, &mut l)?;
    disk_op(&mut a, &mut l)?;
    fill_block(&mut a, &mut l)?;
    checksum(&mut a, &mut l)?;
    check_block(&mut a, &mut l)?;
    block_io(&mut a, &mut l)?;
    let code = a.assemble(layout::CODE)?;
    debug_assert!(code.len() as u64 <= layout::CODE_MAX);
    Ok(code)
}

fn rdtsc(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// rax = share * index / parts, for splitting pages and blocks between vCPUs.
fn share_start(
    a: &mut CodeAssembler,
    total: AsmMemoryOperand,
    index: AsmRegister64,
) -> Result<(), IcedError> {
    a.mov(rax, total)?;
    a.mul(index)?;
    a.div(par!(vcpus))
}

fn entry(a: &mut CodeAssembler, l: &Labels) -> Result<(), IcedError> {
    a.mov(r15, layout::MAILBOX)?;
    a.mov(rax, rdi)?;
    a.shl(rax, 12)?;
    a.add(r15, rax)?;
    a.mov(r14, layout::PARAMS)?;
    a.mov(loc(Local::Vcpu), rdi)?;
    a.lea(r12, qword_ptr(rdi + 1))?;

    // This vCPU's pages: [ws*v/n, ws*(v+1)/n).
    share_start(a, par!(ws_pages), rdi)?;
    a.mov(loc(Local::First), rax)?;
    a.mov(rdi, loc(Local::Vcpu))?;
    share_start(a, par!(ws_pages), r12)?;
    a.sub(rax, loc(Local::First))?;
    a.mov(loc(Local::Count), rax)?;
    a.mul(par!(hot_permille))?;
    a.mov(rcx, 1000u64)?;
    a.div(rcx)?;
    let mut hot_ok = a.create_label();
    a.cmp(rax, 1)?;
    a.jae(hot_ok)?;
    a.mov(eax, 1)?;
    a.set_label(&mut hot_ok)?;
    a.mov(loc(Local::Hot), rax)?;

    // This vCPU's disk blocks, the same way.
    a.mov(rdi, loc(Local::Vcpu))?;
    share_start(a, par!(disk_blocks), rdi)?;
    a.mov(loc(Local::DFirst), rax)?;
    share_start(a, par!(disk_blocks), r12)?;
    a.sub(rax, loc(Local::DFirst))?;
    a.mov(loc(Local::DCount), rax)?;
    a.mov(rax, par!(disk_buf_stride))?;
    a.mov(rdi, loc(Local::Vcpu))?;
    a.mul(rdi)?;
    a.add(rax, par!(disk_buf_base))?;
    a.mov(loc(Local::DiskBuf), rax)?;

    // At most 50 ms of catch-up after a stall (a pause or a migration must not turn
    // into a burst that no real workload would make).
    a.mov(rax, par!(pages_per_sec))?;
    a.xor(edx, edx)?;
    a.mov(ecx, 20)?;
    a.div(rcx)?;
    a.add(rax, BATCH as i32)?;
    a.mov(loc(Local::Backlog), rax)?;
    a.mov(rax, par!(disk_ops_per_sec))?;
    a.xor(edx, edx)?;
    a.div(rcx)?;
    a.inc(rax)?;
    a.mov(loc(Local::DBacklog), rax)?;

    // Random state: the seed mixed with the vCPU, never zero.
    a.mov(rbx, par!(seed))?;
    a.mov(rax, WINDOW_K1)?;
    a.imul_2(rax, r12)?;
    a.xor(rbx, rax)?;
    a.or(rbx, 1)?;
    a.mov(qword_ptr(r15 + (MAILBOX_LOCALS + Local::Seq as u64 * 8)), 0)?;
    rdtsc(a)?;
    a.mov(loc(Local::LastHb), rax)?;
    a.mov(loc(Local::LastVerify), rax)?;

    // Fill: write every page of the share once, unpaced.
    let mut fill_done = a.create_label();
    let mut fill_loop = a.create_label();
    a.cmp(par!(fill), 0)?;
    a.je(fill_done)?;
    a.xor(r12d, r12d)?;
    a.set_label(&mut fill_loop)?;
    a.cmp(r12, loc(Local::Count))?;
    a.jae(fill_done)?;
    a.mov(rdi, loc(Local::First))?;
    a.add(rdi, r12)?;
    a.call(l.write_page)?;
    a.call(l.maybe_heartbeat)?;
    a.inc(r12)?;
    a.jmp(fill_loop)?;
    a.set_label(&mut fill_done)?;
    a.mov(mb!(fill_done), 1)?;

    rdtsc(a)?;
    a.mov(loc(Local::T0), rax)?;
    a.mov(loc(Local::DT0), rax)?;
    a.mov(loc(Local::Written), 0)?;
    a.mov(loc(Local::DDone), 0)?;

    let mut main_loop = a.create_label();
    let mut disk = a.create_label();
    let mut verify = a.create_label();
    let mut hb = a.create_label();
    let mut busy = a.create_label();
    a.set_label(&mut main_loop)?;
    a.xor(ebp, ebp)?;
    rdtsc(a)?;
    a.mov(loc(Local::Now), rax)?;

    // Memory writes.
    a.cmp(par!(pattern), PatternKind::Idle as i32)?;
    a.je(disk)?;
    a.mov(rcx, par!(pages_per_sec))?;
    a.test(rcx, rcx)?;
    let mut paced = a.create_label();
    a.jnz(paced)?;
    a.mov(r12d, BATCH as u32)?;
    let mut batch = a.create_label();
    a.jmp(batch)?;
    a.set_label(&mut paced)?;
    // due = (now - t0) * rate / tsc_hz. A quotient past 64 bits would fault the div
    // (#DE, a triple fault here): with a rate that high, start the pace over from now.
    a.sub(rax, loc(Local::T0))?;
    a.mul(rcx)?;
    let mut fits = a.create_label();
    a.cmp(rdx, par!(tsc_hz))?;
    a.jb(fits)?;
    a.mov(rax, loc(Local::Now))?;
    a.mov(loc(Local::T0), rax)?;
    a.mov(loc(Local::Written), 0)?;
    a.jmp(disk)?;
    a.set_label(&mut fits)?;
    a.div(par!(tsc_hz))?;
    a.mov(r12, rax)?;
    a.sub(r12, loc(Local::Written))?;
    a.jle(disk)?;
    let mut no_cap = a.create_label();
    a.cmp(r12, loc(Local::Backlog))?;
    a.jbe(no_cap)?;
    a.mov(r12, loc(Local::Backlog))?;
    a.sub(rax, r12)?;
    a.mov(loc(Local::Written), rax)?;
    a.set_label(&mut no_cap)?;
    let mut clamp_ok = a.create_label();
    a.cmp(r12, BATCH as i32)?;
    a.jbe(clamp_ok)?;
    a.mov(r12d, BATCH as u32)?;
    a.set_label(&mut clamp_ok)?;
    a.add(loc(Local::Written), r12)?;
    a.set_label(&mut batch)?;
    a.call(l.next_index)?;
    a.call(l.write_page)?;
    // After every page, not every batch: a page that stalls (a post-copy fault) then
    // delays the heartbeat by its own wait, not by the rest of the batch's too, so a
    // stall shows as a heartbeat gap rather than as downtime.
    a.call(l.maybe_heartbeat)?;
    a.dec(r12)?;
    a.jnz(batch)?;
    a.mov(ebp, 1)?;

    // Disk writes.
    a.set_label(&mut disk)?;
    a.mov(rcx, par!(disk_ops_per_sec))?;
    a.test(rcx, rcx)?;
    a.jz(verify)?;
    a.cmp(loc(Local::DCount), 0)?;
    a.je(verify)?;
    a.mov(rax, loc(Local::Now))?;
    a.sub(rax, loc(Local::DT0))?;
    a.mul(rcx)?;
    let mut dfits = a.create_label();
    a.cmp(rdx, par!(tsc_hz))?;
    a.jb(dfits)?;
    a.mov(rax, loc(Local::Now))?;
    a.mov(loc(Local::DT0), rax)?;
    a.mov(loc(Local::DDone), 0)?;
    a.jmp(verify)?;
    a.set_label(&mut dfits)?;
    a.div(par!(tsc_hz))?;
    a.mov(rdx, rax)?;
    a.sub(rdx, loc(Local::DDone))?;
    a.jle(verify)?;
    let mut no_dcap = a.create_label();
    a.cmp(rdx, loc(Local::DBacklog))?;
    a.jbe(no_dcap)?;
    a.sub(rax, loc(Local::DBacklog))?;
    a.mov(loc(Local::DDone), rax)?;
    a.set_label(&mut no_dcap)?;
    a.inc(loc(Local::DDone))?;
    a.call(l.disk_op)?;
    a.mov(ebp, 1)?;

    // Sampled re-check of pages already written.
    a.set_label(&mut verify)?;
    a.mov(rax, loc(Local::Now))?;
    a.sub(rax, loc(Local::LastVerify))?;
    a.cmp(rax, par!(verify_interval_tsc))?;
    a.jb(hb)?;
    a.mov(rax, loc(Local::Now))?;
    a.mov(loc(Local::LastVerify), rax)?;
    a.call(l.sample_verify)?;

    // Nothing due: park until the next heartbeat, which the sleep itself is.
    a.set_label(&mut hb)?;
    a.test(ebp, ebp)?;
    a.jnz(busy)?;
    a.mov(rdi, par!(heartbeat_ns))?;
    a.call(l.heartbeat)?;
    a.jmp(main_loop)?;
    a.set_label(&mut busy)?;
    a.call(l.maybe_heartbeat)?;
    a.jmp(main_loop)?;
    Ok(())
}

/// xorshift64*: rax = next random number (state in rbx).
fn rng(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.rng)?;
    a.mov(rax, rbx)?;
    a.shr(rax, 12)?;
    a.xor(rbx, rax)?;
    a.mov(rax, rbx)?;
    a.shl(rax, 25)?;
    a.xor(rbx, rax)?;
    a.mov(rax, rbx)?;
    a.shr(rax, 27)?;
    a.xor(rbx, rax)?;
    a.mov(rax, 0x2545_f491_4f6c_dd1du64)?;
    a.imul_2(rax, rbx)?;
    a.ret()
}

/// rax = mix64(rax); clobbers rdx. Must match [`super::abi::mix64`].
fn mix64(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.mix64)?;
    for (shift, mul) in [(30, 0xbf58_476d_1ce4_e5b9u64), (27, 0x94d0_49bb_1331_11eb)] {
        a.mov(rdx, rax)?;
        a.shr(rdx, shift)?;
        a.xor(rax, rdx)?;
        a.mov(rdx, mul)?;
        a.imul_2(rax, rdx)?;
    }
    a.mov(rdx, rax)?;
    a.shr(rdx, 31)?;
    a.xor(rax, rdx)?;
    a.ret()
}

/// rax = corpus offset for (rdi = index, rsi = generation, rcx = body length).
/// Clobbers rdx and rsi. Must match [`window_offset`].
fn window(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.window)?;
    a.mov(rax, rdi)?;
    a.mov(rdx, WINDOW_K1)?;
    a.imul_2(rax, rdx)?;
    a.mov(rdx, WINDOW_K2)?;
    a.imul_2(rsi, rdx)?;
    a.xor(rax, rsi)?;
    a.call(l.mix64)?;
    a.mov(rsi, par!(corpus_len))?;
    a.sub(rsi, rcx)?;
    a.shr(rsi, 3)?;
    a.inc(rsi)?;
    a.mul(rsi)?;
    a.lea(rax, qword_ptr(rdx * 8))?;
    a.ret()
}

/// rax = content kind of page rdi (0 zero, 1 text, 2 random); clobbers rdx.
fn page_kind(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.page_kind)?;
    a.mov(rax, par!(content))?;
    a.cmp(rax, ContentKind::Mixed as i32)?;
    let mut done = a.create_label();
    a.jne(done)?;
    a.mov(rax, MIX_SALT)?;
    a.xor(rax, rdi)?;
    a.call(l.mix64)?;
    a.mov(edx, 3)?;
    a.mul(rdx)?;
    a.mov(rax, rdx)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// rdi = next page to write, by pattern. Clobbers rax, rcx, rdx.
fn next_index(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.next_index)?;
    let mut not_seq = a.create_label();
    let mut wrap_ok = a.create_label();
    let mut hotcold = a.create_label();
    let mut cold = a.create_label();
    a.cmp(par!(pattern), PatternKind::Sequential as i32)?;
    a.jne(not_seq)?;
    a.mov(rdi, loc(Local::Seq))?;
    a.lea(rax, qword_ptr(rdi + 1))?;
    a.cmp(rax, loc(Local::Count))?;
    a.jb(wrap_ok)?;
    a.xor(eax, eax)?;
    a.set_label(&mut wrap_ok)?;
    a.mov(loc(Local::Seq), rax)?;
    a.add(rdi, loc(Local::First))?;
    a.ret()?;

    a.set_label(&mut not_seq)?;
    a.call(l.rng)?;
    a.cmp(par!(pattern), PatternKind::Hotcold as i32)?;
    a.je(hotcold)?;
    a.mul(loc(Local::Count))?;
    a.mov(rdi, rdx)?;
    a.add(rdi, loc(Local::First))?;
    a.ret()?;

    // 90% of writes to the hot share, the rest to the cold remainder.
    a.set_label(&mut hotcold)?;
    a.mov(rcx, rax)?;
    a.and(ecx, 1023)?;
    a.call(l.rng)?;
    a.cmp(ecx, 922)?;
    a.jae(cold)?;
    let mut pick_hot = a.create_label();
    a.set_label(&mut pick_hot)?;
    a.mul(loc(Local::Hot))?;
    a.mov(rdi, rdx)?;
    a.add(rdi, loc(Local::First))?;
    a.ret()?;
    a.set_label(&mut cold)?;
    a.mov(rcx, loc(Local::Count))?;
    a.sub(rcx, loc(Local::Hot))?;
    a.jz(pick_hot)?;
    a.mul(rcx)?;
    a.mov(rdi, rdx)?;
    a.add(rdi, loc(Local::Hot))?;
    a.add(rdi, loc(Local::First))?;
    a.ret()
}

/// rax = expected first header word of page with kind r8 for this vCPU.
fn page_stamp(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, r8)?;
    a.shl(rax, 32)?;
    a.mov(rcx, loc(Local::Vcpu))?;
    a.shl(rcx, 40)?;
    a.or(rax, rcx)?;
    a.or(rax, PAGE_MAGIC as i32)
}

const BODY_WORDS: u32 = ((PAGE_SIZE - PAGE_HEADER) / 8) as u32;

/// Writes page rdi with its next generation.
fn write_page(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.write_page)?;
    a.mov(r9, rdi)?;
    a.mov(r10, par!(gen_table))?;
    a.mov(eax, dword_ptr(r10 + r9 * 4))?;
    a.inc(eax)?;
    a.mov(dword_ptr(r10 + r9 * 4), eax)?;
    a.mov(r11, rax)?;
    a.mov(r10, r9)?;
    a.shl(r10, 12)?;
    a.add(r10, par!(ws_base))?;
    a.call(l.page_kind)?;
    a.mov(r8, rax)?;
    page_stamp(a)?;
    a.mov(qword_ptr(r10), rax)?;
    a.mov(qword_ptr(r10 + 8), r9)?;
    a.mov(qword_ptr(r10 + 16), r11)?;
    a.mov(qword_ptr(r10 + 24), 0)?;
    let mut zero = a.create_label();
    let mut done = a.create_label();
    a.test(r8, r8)?;
    a.jz(zero)?;
    a.mov(rdi, r9)?;
    a.mov(rsi, r11)?;
    a.mov(ecx, (PAGE_SIZE - PAGE_HEADER) as u32)?;
    a.call(l.window)?;
    a.mov(rsi, qword_ptr(r14 + r8 * 8 + CORPUS_BASE))?;
    a.add(rsi, rax)?;
    a.lea(rdi, qword_ptr(r10 + PAGE_HEADER))?;
    a.mov(ecx, BODY_WORDS)?;
    a.rep().movsq()?;
    a.jmp(done)?;
    a.set_label(&mut zero)?;
    a.lea(rdi, qword_ptr(r10 + PAGE_HEADER))?;
    a.mov(ecx, BODY_WORDS)?;
    a.xor(eax, eax)?;
    a.rep().stosq()?;
    a.set_label(&mut done)?;
    a.inc(mb!(pages_written))?;
    a.ret()
}

/// Records an integrity error: index r9, expected generation r11, found at [r10+16],
/// detail code `code`, counter `counter`, then tells the VMM. Returns eax = 1.
fn report_error(
    a: &mut CodeAssembler,
    code: u32,
    counter: AsmMemoryOperand,
    kind: u32,
) -> Result<(), IcedError> {
    a.mov(mb!(error_index), r9)?;
    a.mov(mb!(error_expected_gen), r11)?;
    a.mov(rax, qword_ptr(r10 + 16))?;
    a.mov(mb!(error_found_gen), rax)?;
    a.mov(mb!(error_detail), code as i32)?;
    a.inc(counter)?;
    a.mov(eax, kind)?;
    a.mov(edx, PORT_INTEGRITY as u32)?;
    a.out(dx, eax)?;
    a.mov(eax, 1)?;
    a.ret()
}

/// Detail codes of integrity errors (Mailbox::error_detail).
pub const ERR_HEADER: u32 = 1;
pub const ERR_GENERATION: u32 = 2;
pub const ERR_BODY: u32 = 3;
pub const ERR_NOT_ZERO: u32 = 4;
pub const ERR_IO: u32 = 5;
pub const ERR_CHECKSUM: u32 = 6;

/// eax = 0 if page rdi holds what its generation says, else 1 (and reports it).
fn verify_page(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.verify_page)?;
    let mut written = a.create_label();
    let mut e_zero = a.create_label();
    let mut e_hdr = a.create_label();
    let mut e_gen = a.create_label();
    let mut e_body = a.create_label();
    let mut vzero = a.create_label();
    a.mov(r9, rdi)?;
    a.mov(r10, par!(gen_table))?;
    a.mov(r11d, dword_ptr(r10 + r9 * 4))?;
    a.mov(r10, r9)?;
    a.shl(r10, 12)?;
    a.add(r10, par!(ws_base))?;
    a.test(r11, r11)?;
    a.jnz(written)?;
    // Never written: must still be all zero.
    a.mov(rdi, r10)?;
    a.mov(ecx, (PAGE_SIZE / 8) as u32)?;
    a.xor(eax, eax)?;
    a.repe().scasq()?;
    a.jne(e_zero)?;
    a.xor(eax, eax)?;
    a.ret()?;

    a.set_label(&mut written)?;
    a.call(l.page_kind)?;
    a.mov(r8, rax)?;
    page_stamp(a)?;
    a.cmp(qword_ptr(r10), rax)?;
    a.jne(e_hdr)?;
    a.cmp(qword_ptr(r10 + 8), r9)?;
    a.jne(e_hdr)?;
    a.cmp(qword_ptr(r10 + 16), r11)?;
    a.jne(e_gen)?;
    a.test(r8, r8)?;
    a.jz(vzero)?;
    a.mov(rdi, r9)?;
    a.mov(rsi, r11)?;
    a.mov(ecx, (PAGE_SIZE - PAGE_HEADER) as u32)?;
    a.call(l.window)?;
    a.mov(rsi, qword_ptr(r14 + r8 * 8 + CORPUS_BASE))?;
    a.add(rsi, rax)?;
    a.lea(rdi, qword_ptr(r10 + PAGE_HEADER))?;
    a.mov(ecx, BODY_WORDS)?;
    a.repe().cmpsq()?;
    a.jne(e_body)?;
    a.xor(eax, eax)?;
    a.ret()?;
    a.set_label(&mut vzero)?;
    a.lea(rdi, qword_ptr(r10 + PAGE_HEADER))?;
    a.mov(ecx, BODY_WORDS)?;
    a.xor(eax, eax)?;
    a.repe().scasq()?;
    a.jne(e_body)?;
    a.xor(eax, eax)?;
    a.ret()?;

    for (label, code) in [
        (&mut e_zero, ERR_NOT_ZERO),
        (&mut e_hdr, ERR_HEADER),
        (&mut e_gen, ERR_GENERATION),
        (&mut e_body, ERR_BODY),
    ] {
        a.set_label(label)?;
        report_error(a, code, mb!(integrity_errors), INTEGRITY_MEMORY)?;
    }
    Ok(())
}

/// heartbeat(rdi = ns to park) and maybe_heartbeat (only when one is due).
fn heartbeat(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.maybe_heartbeat)?;
    let mut not_due = a.create_label();
    rdtsc(a)?;
    a.sub(rax, loc(Local::LastHb))?;
    a.cmp(rax, par!(heartbeat_tsc))?;
    a.jb(not_due)?;
    a.xor(edi, edi)?;
    a.set_label(&mut l.heartbeat)?;
    a.mov(mb!(sleep_ns), rdi)?;
    a.inc(mb!(heartbeats))?;
    a.mov(edx, PORT_HEARTBEAT as u32)?;
    a.in_(eax, dx)?;
    a.mov(r8d, eax)?;
    // The interval counts from when the guest runs again, so a park is not followed
    // at once by another heartbeat.
    rdtsc(a)?;
    a.mov(loc(Local::LastHb), rax)?;
    a.cmp(r8d, Command::Verify as u32)?;
    a.jne(not_due)?;
    a.call(l.full_verify)?;
    a.set_label(&mut not_due)?;
    a.ret()
}

/// Re-checks every page and every written disk block of this vCPU's share.
fn full_verify(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.full_verify)?;
    a.push(r12)?;
    a.push(r13)?;
    a.push(rbp)?;
    a.xor(ebp, ebp)?;
    a.xor(r12d, r12d)?;
    let mut pages = a.create_label();
    let mut pages_done = a.create_label();
    let mut no_hb = a.create_label();
    a.set_label(&mut pages)?;
    a.cmp(r12, loc(Local::Count))?;
    a.jae(pages_done)?;
    a.mov(rdi, loc(Local::First))?;
    a.add(rdi, r12)?;
    a.call(l.verify_page)?;
    a.add(rbp, rax)?;
    a.inc(r12)?;
    a.test(r12d, 63)?;
    a.jnz(no_hb)?;
    a.call(l.maybe_heartbeat)?;
    a.set_label(&mut no_hb)?;
    a.jmp(pages)?;
    a.set_label(&mut pages_done)?;
    a.mov(mb!(verify_pages), r12)?;
    a.mov(mb!(verify_errors), rbp)?;

    let mut blocks = a.create_label();
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.xor(ebp, ebp)?;
    a.xor(r13d, r13d)?;
    a.xor(r12d, r12d)?;
    a.set_label(&mut blocks)?;
    a.cmp(r12, loc(Local::DCount))?;
    a.jae(done)?;
    a.mov(rdi, loc(Local::DFirst))?;
    a.add(rdi, r12)?;
    a.mov(rax, par!(disk_gen_table))?;
    a.cmp(dword_ptr(rax + rdi * 4), 0)?;
    a.je(next)?;
    a.call(l.check_block)?;
    a.add(rbp, rax)?;
    a.inc(r13)?;
    a.call(l.maybe_heartbeat)?;
    a.set_label(&mut next)?;
    a.inc(r12)?;
    a.jmp(blocks)?;
    a.set_label(&mut done)?;
    a.mov(mb!(verify_blocks), r13)?;
    a.mov(mb!(verify_disk_errors), rbp)?;
    a.mov(edx, PORT_VERIFY_DONE as u32)?;
    a.out(dx, eax)?;
    a.pop(rbp)?;
    a.pop(r13)?;
    a.pop(r12)?;
    a.ret()
}

fn sample_verify(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.sample_verify)?;
    a.push(r12)?;
    a.mov(r12, par!(verify_sample))?;
    let mut lp = a.create_label();
    a.set_label(&mut lp)?;
    a.call(l.rng)?;
    a.mul(loc(Local::Count))?;
    a.mov(rdi, rdx)?;
    a.add(rdi, loc(Local::First))?;
    a.call(l.verify_page)?;
    a.dec(r12)?;
    a.jnz(lp)?;
    a.pop(r12)?;
    a.ret()
}

/// Writes a random block of this vCPU's disk share with its next generation; every
/// fourth write reads a block back and checks it.
fn disk_op(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.disk_op)?;
    a.call(l.rng)?;
    a.mul(loc(Local::DCount))?;
    a.mov(r9, rdx)?;
    a.add(r9, loc(Local::DFirst))?;
    a.mov(r10, par!(disk_gen_table))?;
    a.mov(eax, dword_ptr(r10 + r9 * 4))?;
    a.inc(eax)?;
    a.mov(dword_ptr(r10 + r9 * 4), eax)?;
    a.mov(r11, rax)?;
    a.call(l.fill_block)?;
    a.mov(mb!(block_op), BlockOp::Write as i32)?;
    a.call(l.block_io)?;
    let mut io_err = a.create_label();
    let mut done = a.create_label();
    a.jnz(io_err)?;
    a.inc(mb!(disk_writes))?;
    a.test(mb!(disk_writes), 3)?;
    a.jnz(done)?;
    // Read back a random block of the share; if that one was never written, the one
    // just written.
    a.mov(r8, r9)?;
    a.call(l.rng)?;
    a.mul(loc(Local::DCount))?;
    a.mov(rdi, rdx)?;
    a.add(rdi, loc(Local::DFirst))?;
    a.mov(rax, par!(disk_gen_table))?;
    let mut check = a.create_label();
    a.cmp(dword_ptr(rax + rdi * 4), 0)?;
    a.jne(check)?;
    a.mov(rdi, r8)?;
    a.set_label(&mut check)?;
    a.call(l.check_block)?;
    a.set_label(&mut done)?;
    a.ret()?;
    a.set_label(&mut io_err)?;
    report_error(a, ERR_IO, mb!(disk_integrity_errors), INTEGRITY_DISK)
}

/// Submits the request in the mailbox for block r9 of disk 0 through buffer r10;
/// ZF clear when the VMM reports an error.
fn block_io(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.block_io)?;
    a.mov(mb!(block_disk), 0)?;
    a.mov(rax, par!(disk_block_bytes))?;
    a.mov(mb!(block_len), rax)?;
    a.mul(r9)?;
    a.mov(mb!(block_offset), rax)?;
    a.mov(mb!(block_buf), r10)?;
    a.xor(eax, eax)?;
    a.mov(edx, PORT_BLOCK as u32)?;
    a.out(dx, eax)?;
    a.cmp(mb!(block_status), 0)?;
    a.ret()
}

/// Builds block r9, generation r11 in this vCPU's buffer (left in r10).
fn fill_block(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.fill_block)?;
    a.mov(r10, loc(Local::DiskBuf))?;
    a.mov(rax, loc(Local::Vcpu))?;
    a.shl(rax, 32)?;
    a.or(rax, BLOCK_MAGIC as i32)?;
    a.mov(qword_ptr(r10), rax)?;
    a.mov(qword_ptr(r10 + 8), r9)?;
    a.mov(qword_ptr(r10 + 16), r11)?;
    a.mov(rcx, par!(disk_block_bytes))?;
    a.sub(rcx, PAGE_HEADER as i32)?;
    a.mov(rdi, r9)?;
    a.mov(rsi, r11)?;
    a.call(l.window)?;
    a.mov(rsi, par!(text_corpus))?;
    a.add(rsi, rax)?;
    a.lea(rdi, qword_ptr(r10 + PAGE_HEADER))?;
    a.shr(rcx, 3)?;
    a.rep().movsq()?;
    a.call(l.checksum)?;
    a.mov(qword_ptr(r10 + 24), rax)?;
    a.ret()
}

/// rax = block checksum of buffer r10 for block r9, generation r11 (see
/// [`super::abi::block_checksum`]). Clobbers rcx, rsi, r8.
fn checksum(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.checksum)?;
    a.mov(rax, FNV_OFFSET)?;
    a.xor(rax, r9)?;
    a.xor(rax, r11)?;
    a.mov(r8, FNV_PRIME)?;
    a.imul_2(rax, r8)?;
    a.lea(rsi, qword_ptr(r10 + PAGE_HEADER))?;
    a.mov(rcx, par!(disk_block_bytes))?;
    a.sub(rcx, PAGE_HEADER as i32)?;
    a.shr(rcx, 3)?;
    let mut lp = a.create_label();
    a.set_label(&mut lp)?;
    a.xor(rax, qword_ptr(rsi))?;
    a.imul_2(rax, r8)?;
    a.add(rsi, 8)?;
    a.dec(rcx)?;
    a.jnz(lp)?;
    a.ret()
}

/// eax = 0 if block rdi reads back as its generation says, else 1 (and reports it).
fn check_block(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.check_block)?;
    let mut e_io = a.create_label();
    let mut e_hdr = a.create_label();
    let mut e_gen = a.create_label();
    let mut e_sum = a.create_label();
    let mut e_body = a.create_label();
    a.mov(r9, rdi)?;
    a.mov(r10, par!(disk_gen_table))?;
    a.mov(r11d, dword_ptr(r10 + r9 * 4))?;
    a.mov(r10, loc(Local::DiskBuf))?;
    a.mov(mb!(block_op), BlockOp::Read as i32)?;
    a.call(l.block_io)?;
    a.jnz(e_io)?;
    a.inc(mb!(disk_reads))?;
    a.mov(rax, loc(Local::Vcpu))?;
    a.shl(rax, 32)?;
    a.or(rax, BLOCK_MAGIC as i32)?;
    a.cmp(qword_ptr(r10), rax)?;
    a.jne(e_hdr)?;
    a.cmp(qword_ptr(r10 + 8), r9)?;
    a.jne(e_hdr)?;
    a.cmp(qword_ptr(r10 + 16), r11)?;
    a.jne(e_gen)?;
    a.call(l.checksum)?;
    a.cmp(qword_ptr(r10 + 24), rax)?;
    a.jne(e_sum)?;
    a.mov(rcx, par!(disk_block_bytes))?;
    a.sub(rcx, PAGE_HEADER as i32)?;
    a.mov(rdi, r9)?;
    a.mov(rsi, r11)?;
    a.call(l.window)?;
    a.mov(rsi, par!(text_corpus))?;
    a.add(rsi, rax)?;
    a.lea(rdi, qword_ptr(r10 + PAGE_HEADER))?;
    a.shr(rcx, 3)?;
    a.repe().cmpsq()?;
    a.jne(e_body)?;
    a.xor(eax, eax)?;
    a.ret()?;
    for (label, code) in [
        (&mut e_io, ERR_IO),
        (&mut e_hdr, ERR_HEADER),
        (&mut e_gen, ERR_GENERATION),
        (&mut e_sum, ERR_CHECKSUM),
        (&mut e_body, ERR_BODY),
    ] {
        a.set_label(label)?;
        report_error(a, code, mb!(disk_integrity_errors), INTEGRITY_DISK)?;
    }
    Ok(())
}

/// The 32-bit entry stub, for loaders that start a kernel in flat 32-bit protected
/// mode with paging off (multiboot-style: QEMU's `-kernel`). Entered at
/// [`layout::STUB`] on the bootstrap processor, it builds the identity page tables for
/// the first 4 GiB, loads the GDT and TSS, enables long mode and drops to CPL3 at
/// [`ENTRY`] with IOPL=3 as vCPU 0. Ring-0 code is emulated on software-virtualised
/// KVM, so it does as little as it can.
pub fn assemble_stub() -> Result<Stub, IcedError> {
    const PRESENT_RW_USER: u32 = 0x7;
    const LARGE_PAGE: u32 = 0xe7;
    let mut a = CodeAssembler::new(32)?;
    a.cli()?;
    a.mov(esp, layout::Layout::stack_top(0) as u32)?;
    a.mov(
        dword_ptr(layout::PML4 as u32),
        (layout::PDPT as u32) | PRESENT_RW_USER,
    )?;
    a.mov(dword_ptr(layout::PML4 as u32 + 4), 0)?;
    let mut pdpt = a.create_label();
    a.xor(ecx, ecx)?;
    a.set_label(&mut pdpt)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 12)?;
    a.add(eax, (layout::PD as u32) | PRESENT_RW_USER)?;
    a.mov(dword_ptr(ecx * 8 + layout::PDPT as u32), eax)?;
    a.mov(dword_ptr(ecx * 8 + (layout::PDPT as u32 + 4)), 0)?;
    a.inc(ecx)?;
    a.cmp(ecx, layout::PD_PAGES as u32)?;
    a.jb(pdpt)?;
    let mut pd = a.create_label();
    a.xor(ecx, ecx)?;
    a.set_label(&mut pd)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 21)?;
    a.or(eax, LARGE_PAGE)?;
    a.mov(dword_ptr(ecx * 8 + layout::PD as u32), eax)?;
    a.mov(eax, ecx)?;
    a.shr(eax, 11)?;
    a.mov(dword_ptr(ecx * 8 + (layout::PD as u32 + 4)), eax)?;
    a.inc(ecx)?;
    a.cmp(ecx, (layout::PD_PAGES * 512) as u32)?;
    a.jb(pd)?;
    a.lgdt(dword_ptr(layout::STUB_GDT_PTR as u32))?;
    // PAE | OSFXSR | OSXMMEXCPT, then the page tables, then EFER.LME, then paging.
    a.mov(eax, 0x620u32)?;
    a.mov(cr4, eax)?;
    a.mov(eax, layout::PML4 as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, 0xc000_0080u32)?;
    a.rdmsr()?;
    a.or(eax, 0x100)?;
    a.wrmsr()?;
    a.mov(eax, 0x8001_0033u32)?;
    a.mov(cr0, eax)?;
    // Into the 64-bit kernel code segment.
    a.push(u32::from(layout::SEL_KERNEL_CODE))?;
    a.push(layout::STUB64 as u32)?;
    a.retf()?;
    let stub32 = a.assemble(layout::STUB)?;

    let mut a = CodeAssembler::new(64)?;
    a.mov(eax, u32::from(layout::SEL_KERNEL_DATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(eax, u32::from(layout::SEL_TSS))?;
    a.ltr(ax)?;
    a.xor(edi, edi)?;
    a.push(i32::from(layout::SEL_USER_DATA))?;
    a.push(layout::Layout::stack_top(0) as i32)?;
    a.push(0x3002)?;
    a.push(i32::from(layout::SEL_USER_CODE))?;
    a.push(ENTRY as i32)?;
    a.iretq()?;
    let stub64 = a.assemble(layout::STUB64)?;

    let mut gdt_ptr = Vec::with_capacity(10);
    gdt_ptr.extend_from_slice(&(7u16 * 8 - 1).to_le_bytes());
    gdt_ptr.extend_from_slice(&layout::GDT.to_le_bytes());
    Ok(Stub {
        code32: stub32,
        code64: stub64,
        gdt_ptr,
    })
}

/// The entry stub's pieces, each loaded at its own address.
pub struct Stub {
    /// At [`layout::STUB`].
    pub code32: Vec<u8>,
    /// At [`layout::STUB64`].
    pub code64: Vec<u8>,
    /// At [`layout::STUB_GDT_PTR`].
    pub gdt_ptr: Vec<u8>,
}

/// Host mirror of the guest's corpus window choice.
pub fn window_offset(index: u64, generation: u64, body_len: u64, corpus_len: u64) -> u64 {
    let h = super::abi::mix64(index.wrapping_mul(WINDOW_K1) ^ generation.wrapping_mul(WINDOW_K2));
    let windows = (corpus_len - body_len) / 8 + 1;
    (((u128::from(h) * u128::from(windows)) >> 64) as u64) * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_assembles_and_fits() {
        let code = assemble().unwrap();
        assert!(!code.is_empty());
        assert!(
            code.len() as u64 <= layout::CODE_MAX,
            "{} bytes",
            code.len()
        );
    }
}
