//! Building a lab VM: guest memory with its page tables, GDT, parameters, program and
//! corpora, and vCPUs that enter the program directly in 64-bit mode at CPL3.

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

use super::config::{Content, Entry, Pattern, VmConfig};
use crate::guest::abi::{
    ABI_VERSION, ContentKind, GuestParams, PAGE_HEADER, PARAMS_MAGIC, PatternKind,
};
use crate::guest::layout::{self, Layout};
use crate::guest::{corpus, program};

/// The slot guest memory is registered in (the only one).
pub const MEMORY_SLOT: u32 = 0;
/// How often each vCPU reports, at the latest, in microseconds. A little under the
/// 1 ms promise so that timer slack on the host never stretches a gap past it.
pub const HEARTBEAT_US: u64 = 900;
/// Pages re-checked per verify interval per vCPU.
pub const VERIFY_SAMPLE: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you root?)")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM refused to create a VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("memory_mib = {wanted} cannot be given: the host has {available} MiB available")]
    NoMemory { wanted: u64, available: u64 },
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Mmap {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("the preallocated guest memory could not be used as the VM's")]
    Prealloc,
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing guest memory at {addr:#x}: {source}")]
    Memory {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("assembling the lab guest: {0}")]
    Assemble(#[from] iced_x86::IcedError),
    #[error("{0}")]
    Layout(String),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Ioctl { what, source }
}

/// A VM with memory registered but no vCPUs yet (the dirty ring must be enabled
/// between the two).
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub memory: GuestMemoryMmap,
    pub layout: Layout,
}

impl Vm {
    pub fn create(cfg: &VmConfig) -> Result<Self, BootError> {
        Self::create_in(cfg, None)
    }

    /// As [`Vm::create`], on `memory` when given: a mapping of exactly the config's
    /// memory size that reads as zero (memory preallocated for an incoming VM).
    pub fn create_in(cfg: &VmConfig, memory: Option<MmapRegion>) -> Result<Self, BootError> {
        let layout = cfg.layout().map_err(BootError::Layout)?;
        let memory = match memory {
            Some(region) if region.size() as u64 == layout.memory_bytes => {
                GuestRegionMmap::new(region, GuestAddress(0))
                    .and_then(|r| GuestMemoryMmap::from_regions(vec![r]).ok())
                    .ok_or(BootError::Prealloc)?
            }
            _ => {
                if let Some(available) = host_available_mib()
                    && cfg.memory_mib > available
                {
                    return Err(BootError::NoMemory {
                        wanted: cfg.memory_mib,
                        available,
                    });
                }
                GuestMemoryMmap::<()>::from_ranges(&[(
                    GuestAddress(0),
                    layout.memory_bytes as usize,
                )])
                .map_err(|source| BootError::Mmap {
                    mib: cfg.memory_mib,
                    source,
                })?
            }
        };
        let kvm = Kvm::new().map_err(BootError::Kvm)?;
        let fd = kvm.create_vm().map_err(BootError::CreateVm)?;
        // The TSS area only matters on VMX hosts; harmless elsewhere.
        let _ = fd.set_tss_address(0xfffb_d000);
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let vm = Self {
            kvm,
            fd,
            memory,
            layout,
        };
        vm.set_memory_flags(0)?;
        Ok(vm)
    }

    pub fn host_base(&self) -> *mut u8 {
        // The region exists: it was created with exactly one range starting at 0.
        self.memory
            .iter()
            .next()
            .map(|r| r.as_ptr())
            .unwrap_or(std::ptr::null_mut())
    }

    /// Guest memory as one byte slice, for loading it whole before any vCPU runs
    /// (restore, incoming migration).
    ///
    /// # Safety
    /// No vCPU may run and no other slice of guest memory may be alive while the
    /// returned one is used.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn memory_mut(&self) -> &mut [u8] {
        // SAFETY: the mapping is memory_bytes long and lives as long as `self`; the
        // caller guarantees exclusive access.
        unsafe {
            std::slice::from_raw_parts_mut(self.host_base(), self.layout.memory_bytes as usize)
        }
    }

    /// (Re-)registers guest memory with the given KVM_MEM_* flags.
    pub fn set_memory_flags(&self, flags: u32) -> Result<(), BootError> {
        let region = kvm_userspace_memory_region {
            slot: MEMORY_SLOT,
            flags,
            guest_phys_addr: 0,
            memory_size: self.layout.memory_bytes,
            userspace_addr: self.host_base() as u64,
        };
        // SAFETY: the region maps memory owned by `self.memory`, which lives as long as
        // the VM (both are fields of `self` and dropped together, the VM fd first).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))
    }

    /// Writes everything the lab guest needs before its first instruction.
    pub fn load_guest(&self, cfg: &VmConfig, tsc_hz: u64, seed: u64) -> Result<(), BootError> {
        let code = program::assemble()?;
        self.write(layout::CODE, &code)?;
        let stub = program::assemble_stub()?;
        self.write(layout::STUB, &stub.code32)?;
        self.write(layout::STUB64, &stub.code64)?;
        self.write(layout::STUB_GDT_PTR, &stub.gdt_ptr)?;
        self.write(layout::GDT, &gdt())?;
        self.write(layout::TSS, &tss())?;
        // Entered through the stub, the guest builds its own page tables.
        if cfg.entry == Entry::Direct {
            self.write_page_tables()?;
        }
        self.write(
            layout::TEXT_CORPUS,
            &corpus::text(layout::CORPUS_LEN as usize, seed),
        )?;
        self.write(
            layout::RANDOM_CORPUS,
            &corpus::random(layout::CORPUS_LEN as usize, seed),
        )?;
        let params = guest_params(cfg, &self.layout, tsc_hz, seed);
        self.memory
            .write_obj(params, GuestAddress(layout::PARAMS))
            .map_err(|source| BootError::Memory {
                addr: layout::PARAMS,
                source,
            })
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
        self.memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| BootError::Memory { addr, source })
    }

    fn write_page_tables(&self) -> Result<(), BootError> {
        const PRESENT_RW_USER: u64 = 0x7;
        // 2 MiB page, present, writable, user, accessed and dirty preset so the CPU
        // never has to set them (which would be emulated here).
        const LARGE_PAGE: u64 = 0x80 | 0x40 | 0x20 | PRESENT_RW_USER;
        self.write(
            layout::PML4,
            &(layout::PDPT | PRESENT_RW_USER).to_le_bytes(),
        )?;
        let two_mib = 2u64 << 20;
        let large_pages = self.layout.memory_bytes.div_ceil(two_mib);
        let pds = large_pages.div_ceil(512).min(layout::PD_PAGES);
        for i in 0..pds {
            let entry = (layout::PD + i * 4096) | PRESENT_RW_USER;
            self.write(layout::PDPT + i * 8, &entry.to_le_bytes())?;
        }
        let entries: Vec<u8> = (0..large_pages)
            .flat_map(|i| ((i * two_mib) | LARGE_PAGE).to_le_bytes())
            .collect();
        self.write(layout::PD, &entries)
    }
}

/// What the host can give right now, from /proc/meminfo (None if unreadable).
pub(crate) fn host_available_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

pub fn guest_params(cfg: &VmConfig, layout: &Layout, tsc_hz: u64, seed: u64) -> GuestParams {
    let w = &cfg.workload;
    let vcpus = u64::from(cfg.vcpus);
    GuestParams {
        magic: PARAMS_MAGIC,
        version: ABI_VERSION,
        vcpus,
        tsc_hz,
        seed,
        ws_base: layout.ws_base,
        ws_pages: layout.ws_pages,
        pattern: match w.pattern {
            Pattern::Sequential => PatternKind::Sequential,
            Pattern::Random => PatternKind::Random,
            Pattern::Hotcold => PatternKind::Hotcold,
            Pattern::Idle => PatternKind::Idle,
        } as u64,
        content: match w.content {
            Content::Zero => ContentKind::Zero,
            Content::Text => ContentKind::Text,
            Content::Random => ContentKind::Random,
            Content::Mixed => ContentKind::Mixed,
        } as u64,
        hot_permille: ((w.hot_fraction * 1000.0).round() as u64).clamp(1, 999),
        pages_per_sec: w.dirty_pages_per_sec.div_ceil(vcpus),
        fill: u64::from(w.fill),
        heartbeat_tsc: tsc_hz * HEARTBEAT_US / 1_000_000,
        heartbeat_ns: HEARTBEAT_US * 1000,
        verify_interval_tsc: (tsc_hz / 1000).saturating_mul(w.verify_interval_ms),
        verify_sample: VERIFY_SAMPLE,
        text_corpus: layout::TEXT_CORPUS,
        random_corpus: layout::RANDOM_CORPUS,
        corpus_len: layout::CORPUS_LEN,
        gen_table: layout::GEN_TABLE,
        disk_gen_table: layout.disk_gen_table,
        disk_blocks: layout.disk_blocks,
        disk_block_bytes: u64::from(w.disk.block_kib) * 1024,
        disk_ops_per_sec: w.disk.write_ops_per_sec.div_ceil(vcpus),
        disk_buf_base: layout::DISK_BUF,
        disk_buf_stride: layout::DISK_BUF_STRIDE,
        mailbox_base: layout::MAILBOX,
    }
}

const _: () = assert!(PAGE_HEADER == 32);

fn gdt() -> Vec<u8> {
    let tss_base = layout::TSS;
    let tss_limit = layout::TSS_LIMIT;
    // Descriptor words: flags in bits 52-55 (G, D/B, L), access byte in 40-47.
    let entries: [u64; 5] = [
        0,
        0x00af_9a00_0000_ffff, // 0x08 kernel code, 64-bit
        0x00cf_9200_0000_ffff, // 0x10 kernel data
        0x00af_fa00_0000_ffff, // 0x18 user code, 64-bit, DPL 3
        0x00cf_f200_0000_ffff, // 0x20 user data, DPL 3
    ];
    let tss_low = (tss_limit & 0xffff)
        | ((tss_base & 0xff_ffff) << 16)
        | (0x89u64 << 40)
        | (((tss_limit >> 16) & 0xf) << 48)
        | (((tss_base >> 24) & 0xff) << 56);
    let tss_high = tss_base >> 32;
    entries
        .iter()
        .chain([tss_low, tss_high].iter())
        .flat_map(|e| e.to_le_bytes())
        .collect()
}

/// A TSS whose I/O bitmap grants every port.
fn tss() -> Vec<u8> {
    let mut tss = vec![0u8; (layout::TSS_LIMIT + 1) as usize];
    tss[0x66..0x68].copy_from_slice(&(layout::TSS_IOMAP_OFFSET as u16).to_le_bytes());
    if let Some(last) = tss.last_mut() {
        *last = 0xff;
    }
    tss
}

/// Flat 32-bit protected mode, paging off, as a multiboot loader leaves the CPU.
fn enter_stub32(vcpu: &VcpuFd) -> Result<(), BootError> {
    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(layout::SEL_KERNEL_CODE, 0xb);
    let data = flat(layout::SEL_KERNEL_DATA, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    // PE | ET
    sregs.cr0 = 0x11;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: layout::STUB,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Gives a vCPU the host's supported CPUID with its own APIC id (also needed before
/// restoring saved state: KVM checks XCR0 and MSRs against CPUID).
pub fn set_cpuid(kvm: &Kvm, vcpu: &VcpuFd, index: u32) -> Result<(), BootError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))
}

/// Sets CPUID and puts a fresh vCPU at the guest's way in: the program's entry in
/// 64-bit mode at CPL3 with IOPL=3 (so `in`/`out` work without the kernel), or the
/// 32-bit stub in flat protected mode with paging off.
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, index: u32, entry: Entry) -> Result<(), BootError> {
    set_cpuid(kvm, vcpu, index)?;
    if entry == Entry::Stub32 {
        return enter_stub32(vcpu);
    }
    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    sregs.cs = segment(layout::SEL_USER_CODE, true);
    let data = segment(layout::SEL_USER_DATA, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: layout::TSS,
        limit: layout::TSS_LIMIT as u32,
        selector: layout::SEL_TSS,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        unusable: 1,
        type_: 2,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // PG | WP | NE | ET | MP | PE
    sregs.cr0 = 0x8001_0033;
    sregs.cr3 = layout::PML4;
    // PAE | OSFXSR | OSXMMEXCPT
    sregs.cr4 = 0x620;
    // LME | LMA
    sregs.efer = 0x500;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;

    let regs = kvm_bindings::kvm_regs {
        rip: program::ENTRY,
        rsp: Layout::stack_top(index),
        rdi: u64::from(index),
        // IOPL = 3, reserved bit 1.
        rflags: 0x3002,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
    // With the in-kernel LAPIC, every vCPU but the first would wait for a startup IPI;
    // the lab guest starts them all at once.
    vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .map_err(ioctl("KVM_SET_MP_STATE"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::guest::abi::{Mailbox, PORT_HEARTBEAT};
    use kvm_ioctls::VcpuExit;

    /// Fails under CI when /dev/kvm is missing, else reports the test as skipped.
    pub(crate) fn kvm_or_skip() -> bool {
        if std::path::Path::new("/dev/kvm").exists() {
            return true;
        }
        assert!(std::env::var_os("CI").is_none(), "/dev/kvm is missing");
        eprintln!("SKIPPED: /dev/kvm missing");
        false
    }

    pub(crate) fn small_config(extra: &str) -> VmConfig {
        VmConfig::parse(
            &format!("name = \"t\"\nmemory_mib = 64\nvcpus = 1\n{extra}"),
            std::path::Path::new("test"),
            std::path::Path::new("/tmp"),
        )
        .unwrap()
    }

    #[test]
    fn lab_guest_runs_at_cpl3_and_heartbeats() {
        if !kvm_or_skip() {
            return;
        }
        let cfg = small_config("[workload]\nworking_set_mib = 16\ndirty_pages_per_sec = 0\n");
        let vm = Vm::create(&cfg).unwrap();
        let mut vcpu = vm.fd.create_vcpu(0).unwrap();
        let tsc_hz = u64::from(vcpu.get_tsc_khz().unwrap()) * 1000;
        vm.load_guest(&cfg, tsc_hz, 42).unwrap();
        setup_vcpu(&vm.kvm, &vcpu, 0, cfg.entry).unwrap();
        let mut heartbeats = 0;
        while heartbeats < 50 {
            match vcpu.run().unwrap() {
                VcpuExit::IoIn(PORT_HEARTBEAT, data) => {
                    data.fill(0);
                    heartbeats += 1;
                }
                VcpuExit::IoIn(_, data) => data.fill(0),
                VcpuExit::IoOut(port, _) => panic!("unexpected out to {port:#x}"),
                other => {
                    let desc = format!("{other:?}");
                    let regs = vcpu.get_regs().unwrap();
                    let sregs = vcpu.get_sregs().unwrap();
                    panic!(
                        "guest stopped: {desc} after {heartbeats} heartbeats; rflags={:#x} rip={:#x} rsp={:#x} cs={:?} cr0={:#x} efer={:#x}",
                        regs.rflags, regs.rip, regs.rsp, sregs.cs, sregs.cr0, sregs.efer
                    );
                }
            }
        }
        let mb: Mailbox = vm
            .memory
            .read_obj(GuestAddress(Layout::mailbox(0)))
            .unwrap();
        assert_eq!(mb.heartbeats, 50);
        // How far the fill got depends on the machine's load; that it wrote is what counts.
        assert!(mb.pages_written > 0);
        assert_eq!(mb.integrity_errors, 0);
    }
}
