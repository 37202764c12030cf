//! Creating a machine: booting a fresh lab VM from its config, or restoring one from a
//! snapshot into this process.

use std::path::Path;
use std::time::Instant;

use super::block::{DiskError, DiskSet};
use super::boot::{self, BootError, Vm};
use super::config::VmConfig;
use super::dirty::{DirtyError, DirtyLog};
use super::machine::{Machine, RestoreTimings};
use super::snapshot::{Snapshot, SnapshotError};
use super::state::{StateError, probe_vcpus};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Boot(#[from] BootError),
    #[error("{0}")]
    Disk(#[from] DiskError),
    #[error("dirty tracking: {0}")]
    Dirty(#[from] DirtyError),
    #[error("restoring state: {0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    #[error("creating vCPU {index}: {source}")]
    Vcpu {
        index: u32,
        source: kvm_ioctls::Error,
    },
}

fn create_vcpus(vm: &Vm, dirty: &DirtyLog, n: u32) -> Result<Vec<kvm_ioctls::VcpuFd>, LaunchError> {
    (0..n)
        .map(|index| {
            let fd = vm
                .fd
                .create_vcpu(u64::from(index))
                .map_err(|source| LaunchError::Vcpu { index, source })?;
            dirty.attach_vcpu(index, &fd)?;
            Ok(fd)
        })
        .collect()
}

/// A VM with its vCPUs created and CPUID set, waiting for state (restore, incoming
/// migration).
pub fn prepare(cfg: &VmConfig) -> Result<(Vm, DirtyLog, Vec<kvm_ioctls::VcpuFd>), LaunchError> {
    prepare_in(cfg, None)
}

/// As [`prepare`], on preallocated guest memory when given (see [`Vm::create_in`]).
pub fn prepare_in(
    cfg: &VmConfig,
    memory: Option<vm_memory::MmapRegion>,
) -> Result<(Vm, DirtyLog, Vec<kvm_ioctls::VcpuFd>), LaunchError> {
    let vm = Vm::create_in(cfg, memory)?;
    let dirty = DirtyLog::new(cfg.dirty_tracking, &vm, cfg.vcpus)?;
    let vcpus = create_vcpus(&vm, &dirty, cfg.vcpus)?;
    for (i, fd) in vcpus.iter().enumerate() {
        boot::set_cpuid(&vm.kvm, fd, i as u32)?;
    }
    Ok((vm, dirty, vcpus))
}

/// Builds a fresh lab VM (vCPUs not started yet).
pub fn boot(cfg: VmConfig) -> Result<Machine, LaunchError> {
    let disks = DiskSet::open(&cfg.disks)?;
    let vm = Vm::create(&cfg)?;
    let dirty = DirtyLog::new(cfg.dirty_tracking, &vm, cfg.vcpus)?;
    let vcpus = create_vcpus(&vm, &dirty, cfg.vcpus)?;
    for (i, fd) in vcpus.iter().enumerate() {
        boot::setup_vcpu(&vm.kvm, fd, i as u32, cfg.entry)?;
    }
    let tsc_khz = vcpus[0].get_tsc_khz().map_err(|source| BootError::Ioctl {
        what: "KVM_GET_TSC_KHZ",
        source,
    })?;
    let tsc_hz = u64::from(tsc_khz) * 1000;
    let seed = seed();
    vm.load_guest(&cfg, tsc_hz, seed)?;
    let msr_lists = probe_vcpus(&vm.kvm, &vcpus)?;
    let mut machine = Machine::new(cfg, vm, vcpus, dirty, disks, tsc_hz, seed);
    machine.msr_lists = msr_lists;
    Ok(machine)
}

/// Restores a snapshot into this process (vCPUs not started yet). Disk images are
/// copied from the snapshot to their original paths, or into `disk_dir`.
pub fn restore(dir: &Path, disk_dir: Option<&Path>) -> Result<Machine, LaunchError> {
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let snap = Snapshot::open(dir)?;
    let mut cfg = snap.config.clone();
    let t = Instant::now();
    cfg.disks = snap.restore_disks(disk_dir)?;
    let disks = DiskSet::open(&cfg.disks)?;
    let disks_ms = ms(t);
    let t = Instant::now();
    let (vm, dirty, vcpus) = prepare(&cfg)?;
    let vm_create_ms = ms(t);
    let t = Instant::now();
    snap.state.restore(&vm.fd, &vcpus)?;
    let state_restore_ms = ms(t);
    let t = Instant::now();
    // SAFETY: the mapping is memory_bytes long and no vCPU has run yet, so nothing else
    // touches guest memory while it is loaded.
    let memory = unsafe { vm.memory_mut() };
    snap.load_memory(memory)?;
    let memory_load_ms = ms(t);
    let dev = snap.state.devices;
    let msr_lists = probe_vcpus(&vm.kvm, &vcpus)?;
    let mut machine = Machine::new(cfg, vm, vcpus, dirty, disks, dev.tsc_hz, dev.seed);
    machine.msr_lists = msr_lists;
    machine.restore = Some(RestoreTimings {
        disks_ms,
        vm_create_ms,
        state_restore_ms,
        memory_load_ms,
    });
    Ok(machine)
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    crate::guest::abi::mix64(t ^ u64::from(std::process::id()).rotate_left(32))
}
