//! Save and restore of the KVM state of a stopped VM, guest memory aside.
//!
//! Fixed-size KVM structs are kept as the kernel ABI structs and serialized through
//! kvm-bindings' `serde` feature, which writes their raw bytes and, on reading, zero-pads or
//! truncates to the local struct size: a kernel that appends a field still reads old blobs.
//! Variable-length state (MSRs, XSAVE) and `kvm_fpu` (not covered by that feature) use the
//! small mirrors below. Any change here must bump `blob::FORMAT_VERSION`.
//!
//! All functions expect the vCPUs to be out of `KVM_RUN`.

use std::sync::OnceLock;

use kvm_bindings::{
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, Xsave, kvm_clock_data, kvm_debugregs,
    kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::errno;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

const XSAVE_LEGACY_SIZE: usize = size_of::<kvm_xsave>();

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(errno::Error),
    #[error("KVM_CREATE_VM failed for the MSR probe VM: {0}")]
    CreateVm(errno::Error),
    #[error("KVM_CREATE_IRQCHIP failed for the MSR probe VM: {0}")]
    CreateIrqchip(errno::Error),
    #[error("KVM_CREATE_VCPU failed for the MSR probe VM: {0}")]
    CreateVcpu(errno::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed for the MSR probe VM: {0}")]
    GetSupportedCpuid(errno::Error),
    #[error("KVM_SET_CPUID2 failed for the MSR probe VM: {0}")]
    SetCpuid(errno::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    GetMsrIndexList(errno::Error),
    #[error("KVM_GET_REGS failed on vCPU: {0}")]
    GetRegs(errno::Error),
    #[error("KVM_SET_REGS failed on vCPU: {0}")]
    SetRegs(errno::Error),
    #[error("KVM_GET_SREGS failed on vCPU: {0}")]
    GetSregs(errno::Error),
    #[error("KVM_SET_SREGS failed on vCPU (segment/control register state rejected): {0}")]
    SetSregs(errno::Error),
    #[error("KVM_GET_FPU failed on vCPU: {0}")]
    GetFpu(errno::Error),
    #[error("KVM_SET_FPU failed on vCPU: {0}")]
    SetFpu(errno::Error),
    #[error("KVM_GET_XSAVE failed on vCPU: {0}")]
    GetXsave(errno::Error),
    #[error(
        "KVM_SET_XSAVE failed on vCPU (the saved XSAVE features may exceed what this host's CPUID allows): {0}"
    )]
    SetXsave(errno::Error),
    #[error("XSAVE area of {0} bytes cannot be allocated")]
    XsaveSize(usize),
    #[error("KVM_GET_XCRS failed on vCPU: {0}")]
    GetXcrs(errno::Error),
    #[error("KVM_SET_XCRS failed on vCPU (XCR0 not allowed by this vCPU's CPUID): {0}")]
    SetXcrs(errno::Error),
    #[error("KVM_GET_LAPIC failed on vCPU (was the irqchip created?): {0}")]
    GetLapic(errno::Error),
    #[error("KVM_SET_LAPIC failed on vCPU (was the irqchip created?): {0}")]
    SetLapic(errno::Error),
    #[error("KVM_GET_MSRS failed on vCPU: {0}")]
    GetMsrs(errno::Error),
    #[error(
        "KVM_GET_MSRS could not read MSR {0:#x}; build the MSR list with probe_msrs on this host"
    )]
    MsrUnreadable(u32),
    #[error("KVM_SET_MSRS failed on vCPU: {0}")]
    SetMsrs(errno::Error),
    #[error(
        "KVM_SET_MSRS rejected MSR {index:#x} = {data:#x}; this host's KVM or vCPU CPUID does not accept it"
    )]
    MsrRejected { index: u32, data: u64 },
    #[error("MSR buffer for {0} entries cannot be allocated")]
    MsrBuffer(usize),
    #[error("KVM_GET_VCPU_EVENTS failed on vCPU: {0}")]
    GetVcpuEvents(errno::Error),
    #[error("KVM_SET_VCPU_EVENTS failed on vCPU: {0}")]
    SetVcpuEvents(errno::Error),
    #[error("KVM_GET_MP_STATE failed on vCPU: {0}")]
    GetMpState(errno::Error),
    #[error("KVM_SET_MP_STATE failed on vCPU: {0}")]
    SetMpState(errno::Error),
    #[error("KVM_GET_DEBUGREGS failed on vCPU: {0}")]
    GetDebugRegs(errno::Error),
    #[error("KVM_SET_DEBUGREGS failed on vCPU: {0}")]
    SetDebugRegs(errno::Error),
    #[error("KVM_GET_IRQCHIP failed for the {chip} (was the irqchip created?): {source}")]
    GetIrqchip {
        chip: &'static str,
        source: errno::Error,
    },
    #[error("KVM_SET_IRQCHIP failed for the {chip} (was the irqchip created?): {source}")]
    SetIrqchip {
        chip: &'static str,
        source: errno::Error,
    },
    #[error("KVM_GET_CLOCK failed: {0}")]
    GetClock(errno::Error),
    #[error("KVM_SET_CLOCK failed: {0}")]
    SetClock(errno::Error),
    #[error("KVM_GET_PIT2 failed (was a PIT created?): {0}")]
    GetPit2(errno::Error),
    #[error("KVM_SET_PIT2 failed (the destination VM must create a PIT too): {0}")]
    SetPit2(errno::Error),
}

/// `kvm_fpu` without its padding; kvm-bindings' serde support does not include it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The whole `kvm_xsave` buffer as KVM fills it: the legacy 4 KiB region, then the
    /// extension KVM_CAP_XSAVE2 asks for (AMX tile data and the like).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<MsrValue>,
    pub vcpu_events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

impl VcpuState {
    /// Reads the state of a stopped vCPU. `msr_list` should come from [`msrs_to_save`] or
    /// [`probe_msrs`]: an MSR KVM cannot read fails the whole save.
    pub fn save(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<Self, StateError> {
        // KVM_GET_MP_STATE first: it makes KVM deliver a latched INIT/SIPI, which rewrites
        // registers; reading it last would save registers from before that delivery.
        let mp_state = vcpu.get_mp_state().map_err(StateError::GetMpState)?;
        Ok(Self {
            mp_state,
            regs: vcpu.get_regs().map_err(StateError::GetRegs)?,
            sregs: vcpu.get_sregs().map_err(StateError::GetSregs)?,
            fpu: FpuState::from(&vcpu.get_fpu().map_err(StateError::GetFpu)?),
            xsave: get_xsave(vcpu)?,
            xcrs: vcpu.get_xcrs().map_err(StateError::GetXcrs)?,
            lapic: vcpu.get_lapic().map_err(StateError::GetLapic)?,
            msrs: get_msrs(vcpu, msr_list)?,
            vcpu_events: vcpu.get_vcpu_events().map_err(StateError::GetVcpuEvents)?,
            debugregs: vcpu.get_debug_regs().map_err(StateError::GetDebugRegs)?,
        })
    }

    /// Writes the state into a fresh vCPU whose CPUID the VMM has already set (KVM checks
    /// XCR0, XSAVE features and several MSRs against it).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        vcpu.set_regs(&self.regs).map_err(StateError::SetRegs)?;
        // sregs before MSRs and LAPIC: it sets CR0/CR4/EFER, which KVM checks some MSR writes
        // against, and the APIC base, which KVM_SET_LAPIC applies to the register page.
        vcpu.set_sregs(&self.sregs).map_err(StateError::SetSregs)?;
        // FPU before XSAVE: XSAVE holds the same x87/SSE state plus more, so it must win.
        vcpu.set_fpu(&kvm_fpu::from(&self.fpu))
            .map_err(StateError::SetFpu)?;
        set_xsave(vcpu, &self.xsave)?;
        vcpu.set_xcrs(&self.xcrs).map_err(StateError::SetXcrs)?;
        // KVM accepts a TSC deadline write and silently discards it unless the LAPIC timer is
        // already in TSC-deadline mode (seen here), and the deadline is relative to the TSC, so it goes after both the other MSRs (IA32_TSC among
        // them) and the LAPIC.
        let (deadline, others): (Vec<MsrValue>, Vec<MsrValue>) = self
            .msrs
            .iter()
            .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        set_msrs(vcpu, &others)?;
        vcpu.set_lapic(&self.lapic).map_err(StateError::SetLapic)?;
        set_msrs(vcpu, &deadline)?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(StateError::SetDebugRegs)?;
        // Last: setting sregs and the LAPIC makes KVM re-evaluate pending interrupts and can
        // queue or drop events, so the saved pending exception/NMI/interrupt and run state
        // are written once nothing else will touch them. mp_state precedes the events because
        // KVM refuses INIT_RECEIVED while the events report a latched INIT.
        vcpu.set_mp_state(self.mp_state)
            .map_err(StateError::SetMpState)?;
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(StateError::SetVcpuEvents)?;
        Ok(())
    }
}

/// Size of the buffer KVM_GET/SET_XSAVE use in this process.
///
/// KVM_CAP_XSAVE2 reports it; it only changes if the process asks for more XSTATE permission
/// (arch_prctl), which Ferry never does, so one query per process is enough. The system fd
/// answers the same as a VM fd, which `save`/`restore` do not have.
fn xsave_size() -> Result<usize, StateError> {
    static SIZE: OnceLock<usize> = OnceLock::new();
    if let Some(size) = SIZE.get() {
        return Ok(*size);
    }
    let kvm = Kvm::new().map_err(StateError::OpenKvm)?;
    let reported = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    Ok(*SIZE.get_or_init(|| reported.max(XSAVE_LEGACY_SIZE)))
}

fn xsave_buffer(size: usize) -> Result<Xsave, StateError> {
    let extra_words = (size - XSAVE_LEGACY_SIZE).div_ceil(size_of::<u32>());
    Xsave::new(extra_words).map_err(|_| StateError::XsaveSize(size))
}

fn get_xsave(vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let size = xsave_size()?;
    if size <= XSAVE_LEGACY_SIZE {
        return Ok(vcpu
            .get_xsave()
            .map_err(StateError::GetXsave)?
            .region
            .to_vec());
    }
    let mut buf = xsave_buffer(size)?;
    // SAFETY: `buf` holds `size` bytes, the KVM_CAP_XSAVE2 size this process was given, and
    // KVM_GET_XSAVE2 writes no more than that.
    unsafe { vcpu.get_xsave2(&mut buf) }.map_err(StateError::GetXsave)?;
    let mut words = buf.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(buf.as_slice());
    Ok(words)
}

fn set_xsave(vcpu: &VcpuFd, words: &[u32]) -> Result<(), StateError> {
    let saved = words.len().saturating_mul(size_of::<u32>());
    let size = xsave_size()?.max(saved);
    let (region, extra) = words.split_at(words.len().min(1024));
    if size <= XSAVE_LEGACY_SIZE {
        let mut xsave = kvm_xsave::default();
        xsave.region[..region.len()].copy_from_slice(region);
        // SAFETY: KVM reads the KVM_CAP_XSAVE2 size of this process, which is at most
        // `size`, which is at most `size_of::<kvm_xsave>()` in this branch.
        return unsafe { vcpu.set_xsave(&xsave) }.map_err(StateError::SetXsave);
    }
    let mut buf = xsave_buffer(size)?;
    // SAFETY: only the fixed region is written; the FAM length field is left as allocated.
    unsafe { buf.as_mut_fam_struct() }.xsave.region[..region.len()].copy_from_slice(region);
    buf.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: `buf` holds `size` bytes, at least the KVM_CAP_XSAVE2 size KVM reads.
    unsafe { vcpu.set_xsave2(&buf) }.map_err(StateError::SetXsave)
}

fn msr_buffer(entries: &[kvm_msr_entry]) -> Result<Msrs, StateError> {
    Msrs::from_entries(entries).map_err(|_| StateError::MsrBuffer(entries.len()))
}

fn get_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<MsrValue>, StateError> {
    let mut out = Vec::with_capacity(list.len());
    for chunk in list.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_buffer(&entries)?;
        let read = vcpu.get_msrs(&mut msrs).map_err(StateError::GetMsrs)?;
        // KVM stops at the first MSR it cannot read and returns how many it did.
        if let Some(&index) = chunk.get(read) {
            return Err(StateError::MsrUnreadable(index));
        }
        out.extend(msrs.as_slice().iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
    }
    Ok(out)
}

fn set_msrs(vcpu: &VcpuFd, values: &[MsrValue]) -> Result<(), StateError> {
    for chunk in values.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let written = vcpu
            .set_msrs(&msr_buffer(&entries)?)
            .map_err(StateError::SetMsrs)?;
        if let Some(m) = chunk.get(written) {
            return Err(StateError::MsrRejected {
                index: m.index,
                data: m.data,
            });
        }
    }
    Ok(())
}

/// MTRRdefType and the fixed- and variable-range MTRRs: KVM emulates them but leaves them
/// out of KVM_GET_MSR_INDEX_LIST, and a guest that programmed them would otherwise find them
/// reset after a move.
fn unlisted_msrs() -> impl Iterator<Item = u32> {
    [0x2ff, 0x250, 0x258, 0x259]
        .into_iter()
        .chain(0x268..=0x26f)
        .chain(0x200..=0x20f)
}

/// KVM_GET_MSR_INDEX_LIST plus the MTRRs, filtered to the MSRs `vcpu` can actually read.
///
/// The list names MSRs the host CPU or this KVM cannot serve for a guest, and KVM_GET_MSRS
/// stops at the first such one, so each is tried alone. KVM gates some MSRs on the guest
/// CPUID, so probe a vCPU whose CPUID is set as the VMM sets it. IA32_TSC is put first:
/// restoring it moves the TSC offset, and TSC-relative MSRs written after it then land where
/// intended.
pub fn probe_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(StateError::GetMsrIndexList)?;
    let mut candidates = list.as_slice().to_vec();
    candidates.extend(unlisted_msrs().filter(|index| !list.as_slice().contains(index)));
    let mut readable = Vec::with_capacity(candidates.len());
    for index in candidates {
        let mut one = msr_buffer(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])?;
        if vcpu.get_msrs(&mut one) == Ok(1) {
            readable.push(index);
        }
    }
    readable.sort_by_key(|&index| index != MSR_IA32_TSC);
    Ok(readable)
}

/// [`probe_msrs`] for each vCPU of a VM that has not run yet.
pub fn probe_vcpus(kvm: &Kvm, vcpus: &[VcpuFd]) -> Result<Vec<Vec<u32>>, StateError> {
    vcpus.iter().map(|fd| probe_msrs(kvm, fd)).collect()
}

/// [`probe_msrs`] on a throwaway vCPU with the host's full supported CPUID, once per process.
/// A VMM that hides CPUID features may need [`probe_msrs`] on its own vCPU instead.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list.clone());
    }
    let vm = kvm.create_vm().map_err(StateError::CreateVm)?;
    // The TSC deadline and x2APIC MSRs need an in-kernel LAPIC.
    vm.create_irq_chip().map_err(StateError::CreateIrqchip)?;
    let vcpu = vm.create_vcpu(0).map_err(StateError::CreateVcpu)?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(StateError::GetSupportedCpuid)?;
    vcpu.set_cpuid2(&cpuid).map_err(StateError::SetCpuid)?;
    let list = probe_msrs(kvm, &vcpu)?;
    Ok(LIST.get_or_init(|| list).clone())
}

#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub clock: kvm_clock_data,
    /// Present only when the VMM created an in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
}

impl std::fmt::Debug for VmState {
    // kvm_irqchip is a union without Debug; the chips are summarized.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field(
                "irqchips",
                &[
                    self.pic_master.chip_id,
                    self.pic_slave.chip_id,
                    self.ioapic.chip_id,
                ],
            )
            .field("clock", &self.clock)
            .field("pit", &self.pit)
            .finish()
    }
}

const IRQCHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "master PIC"),
    (KVM_IRQCHIP_PIC_SLAVE, "slave PIC"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

impl VmState {
    /// Reads VM-wide state; the vCPUs must be stopped so the clock and irqchips hold still.
    pub fn save(vm: &VmFd, has_pit: bool) -> Result<Self, StateError> {
        let [pic_master, pic_slave, ioapic] = IRQCHIPS.map(|(chip_id, chip)| {
            let mut state = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut state)
                .map(|()| state)
                .map_err(|source| StateError::GetIrqchip { chip, source })
        });
        Ok(Self {
            pic_master: pic_master?,
            pic_slave: pic_slave?,
            ioapic: ioapic?,
            clock: vm.get_clock().map_err(StateError::GetClock)?,
            pit: has_pit
                .then(|| vm.get_pit2().map_err(StateError::GetPit2))
                .transpose()?,
        })
    }

    /// Writes VM-wide state into a VM whose irqchip (and PIT, if saved) the VMM created.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for (state, (_, chip)) in [&self.pic_master, &self.pic_slave, &self.ioapic]
            .into_iter()
            .zip(IRQCHIPS)
        {
            vm.set_irqchip(state)
                .map_err(|source| StateError::SetIrqchip { chip, source })?;
        }
        if let Some(pit) = &self.pit {
            vm.set_pit2(pit).map_err(StateError::SetPit2)?;
        }
        // KVM_SET_CLOCK rejects the TSC_STABLE and HOST_TSC flags GET_CLOCK reports. REALTIME
        // is kept when present: KVM then advances the clock by the wall time elapsed since the
        // save (never moves it back), so the guest's kvmclock counts the downtime instead of
        // resuming from the frozen value. That assumes the two hosts' clocks are in sync.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            flags: self.clock.flags & KVM_CLOCK_REALTIME,
            realtime: self.clock.realtime,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(StateError::SetClock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::blob::{self, BlobKind};
    use kvm_bindings::{KVM_MP_STATE_HALTED, kvm_userspace_memory_region};
    use std::time::Instant;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const DISTINCTIVE_MSRS: [u32; 5] = [
        MSR_IA32_SYSENTER_CS,
        MSR_LSTAR,
        MSR_KERNEL_GS_BASE,
        MSR_IA32_TSC_DEADLINE,
        MSR_MTRR_DEF_TYPE,
    ];
    const TIMED_RUNS: usize = 21;
    const APIC_LVTT: usize = 0x320;
    const APIC_SPIV: usize = 0xf0;
    const MEM_SIZE: usize = 2 << 20;

    /// A VM with an irqchip, 2 MiB of memory and one vCPU with the host's supported CPUID.
    struct TestVm {
        vcpu: VcpuFd,
        vm: VmFd,
        // Dropped after the VM: KVM keeps the host address of this mapping in a memslot.
        _mem: GuestMemoryMmap,
    }

    fn open_kvm() -> Option<Kvm> {
        if !std::path::Path::new("/dev/kvm").exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "/dev/kvm missing: CI must run on a KVM host"
            );
            println!("SKIPPED: /dev/kvm missing");
            return None;
        }
        Some(Kvm::new().expect("/dev/kvm exists but cannot be opened"))
    }

    fn test_vm(kvm: &Kvm) -> TestVm {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem.get_host_address(GuestAddress(0)).unwrap() as u64,
            flags: 0,
        };
        // SAFETY: the region is the MEM_SIZE mapping owned by `mem`, which TestVm drops only
        // after the VM fd.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        TestVm {
            vcpu,
            vm,
            _mem: mem,
        }
    }

    fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
        let b = &lapic.regs[offset..offset + 4];
        u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
    }

    fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
        for (dst, src) in lapic.regs[offset..offset + 4]
            .iter_mut()
            .zip(value.to_le_bytes())
        {
            *dst = src as _;
        }
    }

    fn read_msr(vcpu: &VcpuFd, index: u32) -> u64 {
        get_msrs(vcpu, &[index]).unwrap()[0].data
    }

    /// Long mode at CPL3 as the lab guests run, plus recognizable values everywhere.
    fn make_distinctive(vcpu: &VcpuFd) {
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0xfeed_face_cafe_beef;
        regs.r15 = 0x1234_5678_9abc_def0;
        regs.rip = 0x1000;
        regs.rsp = 0x1f_f000;
        regs.rflags = 0x3002;
        vcpu.set_regs(&regs).unwrap();

        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cr0 = 0x8001_0033; // PG|WP|NE|ET|MP|PE
        sregs.cr3 = 0x10_0000;
        sregs.cr4 = 0x620; // PAE|OSFXSR|OSXMMEXCPT
        sregs.efer = 0x500; // LME|LMA
        sregs.cs.selector = 0x1b;
        sregs.cs.dpl = 3;
        sregs.cs.l = 1;
        sregs.cs.db = 0;
        sregs.cs.type_ = 0xb;
        sregs.cs.s = 1;
        sregs.cs.present = 1;
        for seg in [&mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
            seg.selector = 0x23;
            seg.dpl = 3;
            seg.type_ = 0x3;
            seg.s = 1;
            seg.present = 1;
            seg.db = 1;
        }
        vcpu.set_sregs(&sregs).unwrap();

        let mut fpu = vcpu.get_fpu().unwrap();
        fpu.xmm[3] = *b"ferry-xmm3-state";
        fpu.mxcsr = 0x1fa0;
        vcpu.set_fpu(&fpu).unwrap();

        let mut xcrs = vcpu.get_xcrs().unwrap();
        if xcrs.nr_xcrs > 0 {
            xcrs.xcrs[0].value = 0x3; // x87|SSE
            vcpu.set_xcrs(&xcrs).unwrap();
        }

        let mut debugregs = vcpu.get_debug_regs().unwrap();
        debugregs.db = [0x1111, 0x2222, 0x3333, 0x4444];
        vcpu.set_debug_regs(&debugregs).unwrap();

        // TSC-deadline timer mode, so the deadline MSR is kept (vector 0xec, masked).
        let mut lapic = vcpu.get_lapic().unwrap();
        set_lapic_reg(&mut lapic, APIC_SPIV, 0x1ff);
        set_lapic_reg(&mut lapic, APIC_LVTT, (2 << 17) | (1 << 16) | 0xec);
        vcpu.set_lapic(&lapic).unwrap();

        let tsc = read_msr(vcpu, MSR_IA32_TSC);
        set_msrs(
            vcpu,
            &[
                MsrValue {
                    index: MSR_MTRR_DEF_TYPE,
                    data: 0xc06,
                },
                MsrValue {
                    index: MSR_IA32_SYSENTER_CS,
                    data: 0x1b,
                },
                MsrValue {
                    index: MSR_LSTAR,
                    data: 0xffff_8000_dead_0000,
                },
                MsrValue {
                    index: MSR_KERNEL_GS_BASE,
                    data: 0xffff_8000_beef_0000,
                },
                MsrValue {
                    index: MSR_IA32_TSC_DEADLINE,
                    data: tsc + (1 << 50),
                },
            ],
        )
        .unwrap();

        let mut events = vcpu.get_vcpu_events().unwrap();
        events.nmi.masked = 1;
        vcpu.set_vcpu_events(&events).unwrap();

        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_HALTED,
        })
        .unwrap();
    }

    fn median_time(mut f: impl FnMut()) -> std::time::Duration {
        let mut times: Vec<_> = (0..TIMED_RUNS)
            .map(|_| {
                let started = Instant::now();
                f();
                started.elapsed()
            })
            .collect();
        times.sort();
        times[TIMED_RUNS / 2]
    }

    fn msr(state: &VcpuState, index: u32) -> Option<u64> {
        state.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }

    #[test]
    fn vcpu_and_vm_state_move_to_a_second_vm() {
        let Some(kvm) = open_kvm() else { return };

        let msr_list = msrs_to_save(&kvm).unwrap();
        let src = test_vm(&kvm);
        let started = Instant::now();
        let probed = probe_msrs(&kvm, &src.vcpu).unwrap();
        let probe_time = started.elapsed();
        assert_eq!(probed, msr_list);
        let index_list = kvm.get_msr_index_list().unwrap();
        let unreadable: Vec<String> = index_list
            .as_slice()
            .iter()
            .filter(|i| !msr_list.contains(i))
            .map(|i| format!("{i:#x}"))
            .collect();
        println!(
            "MSRs: {} listed, {} saved (MTRRs added), probe {probe_time:?}; unreadable: {unreadable:?}",
            index_list.as_slice().len(),
            msr_list.len()
        );
        assert_eq!(msr_list.first(), Some(&MSR_IA32_TSC));
        for index in DISTINCTIVE_MSRS {
            assert!(
                msr_list.contains(&index),
                "MSR {index:#x} not in the save list"
            );
        }

        make_distinctive(&src.vcpu);
        let started = Instant::now();
        let saved = VcpuState::save(&src.vcpu, &msr_list).unwrap();
        let first_save = started.elapsed();
        let vcpu_save = median_time(|| {
            VcpuState::save(&src.vcpu, &msr_list).unwrap();
        });
        let vm_save = median_time(|| {
            VmState::save(&src.vm, false).unwrap();
        });
        let saved_vm = VmState::save(&src.vm, false).unwrap();

        assert_eq!(saved.regs.rax, 0xfeed_face_cafe_beef);
        assert_eq!(saved.sregs.efer & 0x500, 0x500);
        assert_eq!(saved.mp_state.mp_state, KVM_MP_STATE_HALTED);
        assert_eq!(msr(&saved, MSR_IA32_SYSENTER_CS), Some(0x1b));
        let saved_deadline = msr(&saved, MSR_IA32_TSC_DEADLINE).unwrap();
        assert_ne!(saved_deadline, 0, "TSC deadline not kept on the source");

        let dst = test_vm(&kvm);
        saved_vm.restore(&dst.vm).unwrap();
        let started = Instant::now();
        saved.restore(&dst.vcpu).unwrap();
        let first_restore = started.elapsed();
        // Restoring the same state again is idempotent, so repeat it to get a stable figure.
        let vcpu_restore = median_time(|| saved.restore(&dst.vcpu).unwrap());
        let vm_restore = median_time(|| saved_vm.restore(&dst.vm).unwrap());

        let back = VcpuState::save(&dst.vcpu, &msr_list).unwrap();
        assert_eq!(back.regs, saved.regs);
        assert_eq!(back.sregs, saved.sregs);
        assert_eq!(back.fpu, saved.fpu);
        assert_eq!(back.fpu.xmm[3], *b"ferry-xmm3-state");
        assert_eq!(back.xsave, saved.xsave);
        assert_eq!(back.xcrs, saved.xcrs);
        assert_eq!(back.debugregs, saved.debugregs);
        assert_eq!(back.vcpu_events, saved.vcpu_events);
        assert_eq!(back.mp_state, saved.mp_state);
        assert_eq!(back.lapic.regs, saved.lapic.regs);
        assert_eq!((lapic_reg(&back.lapic, APIC_LVTT) >> 17) & 3, 2);
        for index in DISTINCTIVE_MSRS {
            assert_eq!(msr(&back, index), msr(&saved, index), "MSR {index:#x}");
        }
        // The TSC keeps running between the two reads; it must not go backwards.
        assert!(msr(&back, MSR_IA32_TSC) >= msr(&saved, MSR_IA32_TSC));
        let differing: Vec<String> = saved
            .msrs
            .iter()
            .zip(&back.msrs)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("{:#x}: {:#x} -> {:#x}", a.index, a.data, b.data))
            .collect();
        println!("MSRs differing after restore: {differing:?}");

        let back_vm = VmState::save(&dst.vm, false).unwrap();
        assert!(
            back_vm.clock.clock >= saved_vm.clock.clock,
            "kvmclock went backwards"
        );
        let encode_chips =
            |s: &VmState| postcard::to_allocvec(&(s.pic_master, s.pic_slave, s.ioapic)).unwrap();
        assert_eq!(encode_chips(&back_vm), encode_chips(&saved_vm));

        let machine = TestMachine {
            vm: saved_vm,
            vcpus: vec![saved],
        };
        let blob = blob::encode(BlobKind::MachineState, &machine).unwrap();
        println!(
            "vCPU save {vcpu_save:?} (first {first_save:?}), vCPU restore {vcpu_restore:?} \
             (first {first_restore:?}), VM save {vm_save:?}, VM restore {vm_restore:?} (medians \
             of {TIMED_RUNS}); blob {} bytes (1 vCPU, {} MSRs, xsave {} bytes), clock flags {:#x}",
            blob.len(),
            msr_list.len(),
            machine.vcpus[0].xsave.len() * 4,
            machine.vm.clock.flags,
        );
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct TestMachine {
        vm: VmState,
        vcpus: Vec<VcpuState>,
    }

    #[test]
    fn machine_state_survives_a_blob_round_trip() {
        let Some(kvm) = open_kvm() else { return };
        let msr_list = msrs_to_save(&kvm).unwrap();
        let src = test_vm(&kvm);
        make_distinctive(&src.vcpu);
        let machine = TestMachine {
            vm: VmState::save(&src.vm, false).unwrap(),
            vcpus: vec![VcpuState::save(&src.vcpu, &msr_list).unwrap()],
        };
        let blob = blob::encode(BlobKind::MachineState, &machine).unwrap();
        let back: TestMachine = blob::decode(BlobKind::MachineState, &blob).unwrap();
        assert_eq!(back.vcpus, machine.vcpus);
        assert_eq!(
            postcard::to_allocvec(&back.vm).unwrap(),
            postcard::to_allocvec(&machine.vm).unwrap()
        );
        assert!(back.vm.pit.is_none());
    }

    #[test]
    fn pit_state_moves_when_present() {
        let Some(kvm) = open_kvm() else { return };
        let src = test_vm(&kvm);
        src.vm.create_pit2(Default::default()).unwrap();
        let mut pit = src.vm.get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        pit.channels[0].mode = 2;
        src.vm.set_pit2(&pit).unwrap();
        let saved = VmState::save(&src.vm, true).unwrap();

        let dst = test_vm(&kvm);
        dst.vm.create_pit2(Default::default()).unwrap();
        saved.restore(&dst.vm).unwrap();
        let back = dst.vm.get_pit2().unwrap();
        assert_eq!(back.channels[0].count, 0x1234);
        assert_eq!(back.channels[0].mode, 2);
    }

    #[test]
    fn restoring_a_pit_without_one_names_the_ioctl() {
        let Some(kvm) = open_kvm() else { return };
        let src = test_vm(&kvm);
        src.vm.create_pit2(Default::default()).unwrap();
        let saved = VmState::save(&src.vm, true).unwrap();
        let dst = test_vm(&kvm);
        let err = saved.restore(&dst.vm).unwrap_err();
        assert!(matches!(err, StateError::SetPit2(_)), "{err}");
        assert!(err.to_string().contains("KVM_SET_PIT2"));
    }
}
