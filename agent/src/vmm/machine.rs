//! A running VM: vCPU threads, their pause/resume protocol, port exits (heartbeats,
//! verification, integrity reports, block requests) and the figures `status` shows.
//!
//! Pausing: the control thread sets the target state, then kicks every vCPU thread
//! out of KVM_RUN with a signal whose handler sets `immediate_exit`. Before parking, a
//! vCPU thread runs KVM_RUN once more with `immediate_exit` set so KVM completes a
//! half-done port access (an `in` whose value is not yet in the guest's register);
//! only then is its saved state consistent. A parked thread releases its `VcpuFd`
//! so the control thread can save or restore the vCPU's state.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use ferry_api::{
    DirtySample, MachineStatus, RestoreTimings, RunState, VcpuStatus, VerifyReport,
};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::block::DiskSet;
use super::boot::Vm;
use super::config::VmConfig;
use super::dirty::DirtyLog;
use crate::clock::monotonic_ns;
use crate::guest::abi::{
    BlockOp, Command, INTEGRITY_DISK, Mailbox, PORT_BLOCK, PORT_HEARTBEAT, PORT_INTEGRITY,
    PORT_VERIFY_DONE,
};
use crate::guest::layout::Layout;
use crate::sync::lock;

/// KVM_EXIT_DIRTY_RING_FULL, which kvm-ioctls does not name.
const EXIT_DIRTY_RING_FULL: u32 = 31;
/// Guest time between two throttle pauses.
const THROTTLE_SLICE: Duration = Duration::from_millis(1);
/// Longest single park for a guest sleep request, so a bogus request cannot hang a vCPU.
const MAX_SLEEP: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Target {
    Run = 0,
    Pause = 1,
    Quit = 2,
}

/// Why the vCPU threads did not start.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStartError {
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// Why `pause` did not stop every vCPU.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("vCPU threads did not stop within {0:?}")]
    Timeout(Duration),
}

/// Why `resume` did not let the guest run.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("the guest crashed: {0}")]
    Crashed(String),
    #[error("the VM was migrated away; this copy must never run again")]
    HandedOver,
    #[error("the VM must stay paused: {0}")]
    Held(String),
}

/// Why a vCPU's mailbox could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error("page {0} has not arrived yet (post-copy in progress)")]
    PageMissing(u64),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Why `verify` has no answer.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the VM is paused; resume it first")]
    Paused,
    #[error("the VM was migrated away; this copy must never run again")]
    HandedOver,
    #[error("the guest crashed: {0}")]
    Crashed(String),
    #[error("the guest did not finish verifying within {0:?}")]
    Timeout(Duration),
}

/// Why `set-workload` did not change the guest's rate.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("the VM is {0}, not running")]
    NotRunning(RunState),
    #[error("{0}")]
    Pause(#[from] PauseError),
    #[error("{0}")]
    Resume(#[from] ResumeError),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Why `dirty-sample` has no answer.
#[derive(Debug, thiserror::Error)]
pub enum DirtySampleError {
    #[error("a migration is running and owns the dirty log; its progress carries the dirty rate")]
    LogInUse,
    #[error("dirty log: {0}")]
    Dirty(#[from] super::dirty::DirtyError),
    #[error("{0}")]
    Mailbox(#[from] MailboxError),
}

/// What one vCPU has reported, as the VMM saw it.
#[derive(Debug, Clone, Default)]
struct VcpuStats {
    mailbox: Mailbox,
    last_heartbeat: Option<Instant>,
    /// CLOCK_MONOTONIC of the first and latest heartbeat in this process (0: none),
    /// comparable across processes on one host: migration downtime is measured with it.
    first_heartbeat_ns: u64,
    last_heartbeat_ns: u64,
    max_gap: Duration,
    window_start: Option<(Instant, u64)>,
    pages_per_sec: f64,
    verify: VerifyStep,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum VerifyStep {
    #[default]
    Idle,
    Requested,
    Delivered,
    Done,
}

#[derive(Debug, Default)]
struct Control {
    parked: u32,
    exited: u32,
    crash: Option<String>,
    /// Why the vCPUs stopped on their own, a guest write waiting to be retried: a
    /// disk whose file system is full (QEMU's `werror=enospc`). Cleared once the
    /// write succeeds after a resume.
    stopped: Option<String>,
}

pub struct Shared {
    target: AtomicU8,
    /// Share of guest time taken away from every vCPU (0-99).
    throttle_pct: std::sync::atomic::AtomicU32,
    /// CLOCK_MONOTONIC of the first heartbeat this process saw (0: none yet).
    first_heartbeat_ns: AtomicU64,
    control: Mutex<Control>,
    cond: Condvar,
    vcpus: Vec<Mutex<VcpuStats>>,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl Shared {
    fn target(&self) -> Target {
        match self.target.load(Ordering::Acquire) {
            0 => Target::Run,
            1 => Target::Pause,
            _ => Target::Quit,
        }
    }
}

/// The shortest and longest dirty-rate sample, milliseconds.
pub const DIRTY_SAMPLE_MS: std::ops::RangeInclusive<u64> = 10..=60_000;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set while the thread
        // holds its VcpuFd and cleared before it lets go; writing one byte is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Pages a VM does not hold yet, as whatever brings them in knows them.
pub trait AbsentPages: Send + Sync {
    fn is_missing(&self, page: u64) -> bool;
}

pub struct Machine {
    pub cfg: VmConfig,
    pub vm: Vm,
    pub vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    pub dirty: Arc<DirtyLog>,
    pub disks: Arc<DiskSet>,
    pub shared: Arc<Shared>,
    /// Guest TSC rate and workload seed (also in the guest's parameter block).
    pub tsc_hz: u64,
    pub seed: u64,
    pub restore: Option<RestoreTimings>,
    /// Per vCPU, the MSRs KVM reads for it, probed before the VM runs: probing takes
    /// an ioctl per candidate MSR, too slow for the pause of a migration. Empty: probed
    /// at each save.
    pub msr_lists: Vec<Vec<u32>>,
    /// Set once a migration committed the handover: this copy never runs again.
    pub handed_over: std::sync::atomic::AtomicBool,
    /// Held while a dirty-rate sample has the dirty log; a migration takes it before
    /// turning logging on, so the two never share the log.
    pub dirty_sample_lock: Mutex<()>,
    /// Ends a running dirty-rate sample at its next check (`cancel`, a migration's
    /// start).
    pub dirty_sample_end: std::sync::atomic::AtomicBool,
    /// While set, `resume` is refused with this reason (a migration destination
    /// waiting for the source's commit).
    pub hold: Mutex<Option<String>>,
    /// Pages not in this process yet (an incoming post-copy brings them): reading
    /// one would block until it arrives.
    pub absent: Mutex<Option<Arc<dyn AbsentPages>>>,
    /// The config file this VM was started from (rewritten when its disks move).
    pub config_path: Mutex<Option<std::path::PathBuf>>,
    started: Instant,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Machine {
    pub fn new(
        cfg: VmConfig,
        vm: Vm,
        vcpus: Vec<VcpuFd>,
        dirty: DirtyLog,
        disks: DiskSet,
        tsc_hz: u64,
        seed: u64,
    ) -> Self {
        let n = vcpus.len();
        Self {
            cfg,
            vm,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            dirty: Arc::new(dirty),
            disks: Arc::new(disks),
            shared: Arc::new(Shared {
                target: AtomicU8::new(Target::Pause as u8),
                throttle_pct: std::sync::atomic::AtomicU32::new(0),
                first_heartbeat_ns: AtomicU64::new(0),
                control: Mutex::new(Control::default()),
                cond: Condvar::new(),
                vcpus: (0..n).map(|_| Mutex::new(VcpuStats::default())).collect(),
                threads: Mutex::new(Vec::new()),
            }),
            tsc_hz,
            seed,
            restore: None,
            msr_lists: Vec::new(),
            handed_over: std::sync::atomic::AtomicBool::new(false),
            dirty_sample_lock: Mutex::new(()),
            dirty_sample_end: std::sync::atomic::AtomicBool::new(false),
            hold: Mutex::new(None),
            absent: Mutex::new(None),
            config_path: Mutex::new(None),
            started: Instant::now(),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Starts the vCPU threads, paused or running.
    pub fn start(&self, running: bool) -> Result<(), VcpuStartError> {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(VcpuStartError::Signal)?;
        self.disks.commit();
        self.shared.target.store(
            if running { Target::Run } else { Target::Pause } as u8,
            Ordering::Release,
        );
        for (index, fd) in self.vcpus.iter().enumerate() {
            let ctx = VcpuThread {
                index: index as u32,
                fd: fd.clone(),
                shared: self.shared.clone(),
                memory: self.vm.memory.clone(),
                dirty: self.dirty.clone(),
                disks: self.disks.clone(),
                held_write: std::cell::Cell::new(None),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || ctx.run())
                .map_err(VcpuStartError::Thread)?;
            lock(&self.threads).push(handle);
        }
        Ok(())
    }

    pub fn state(&self) -> RunState {
        if lock(&self.shared.control).crash.is_some() {
            RunState::Crashed
        } else if self.handed_over.load(Ordering::Acquire) {
            RunState::Migrated
        } else if self.shared.target() == Target::Run {
            RunState::Running
        } else {
            RunState::Paused
        }
    }

    /// Stops every vCPU at an instruction boundary and waits until all are parked.
    pub fn pause(&self) -> Result<(), PauseError> {
        self.set_target(Target::Pause);
        let timeout = Duration::from_secs(10);
        let all = self.vcpus.len() as u32;
        let ctl = lock(&self.shared.control);
        let (ctl, res) = self
            .shared
            .cond
            .wait_timeout_while(ctl, timeout, |c| c.parked + c.exited < all)
            .unwrap_or_else(|e| e.into_inner());
        drop(ctl);
        if res.timed_out() {
            return Err(PauseError::Timeout(timeout));
        }
        Ok(())
    }

    /// The config as the VM runs now: disks name the images in use (a storage
    /// migration may have moved them).
    pub fn current_config(&self) -> VmConfig {
        let mut cfg = self.cfg.clone();
        for (d, c) in self.disks.disks.iter().zip(cfg.disks.iter_mut()) {
            c.path = d.path();
        }
        cfg
    }

    /// Asks every vCPU to stop without waiting for it: one blocked on a page that
    /// post-copy cannot bring parks as soon as it gets it.
    pub fn request_pause(&self) {
        self.set_target(Target::Pause);
    }

    pub fn resume(&self) -> Result<(), ResumeError> {
        if let Some(crash) = lock(&self.shared.control).crash.clone() {
            return Err(ResumeError::Crashed(crash));
        }
        if self.handed_over.load(Ordering::Acquire) {
            return Err(ResumeError::HandedOver);
        }
        if let Some(reason) = lock(&self.hold).clone() {
            return Err(ResumeError::Held(reason));
        }
        self.set_target(Target::Run);
        Ok(())
    }

    fn set_target(&self, target: Target) {
        {
            let _ctl = lock(&self.shared.control);
            self.shared.target.store(target as u8, Ordering::Release);
            self.shared.cond.notify_all();
        }
        if target != Target::Run {
            for &t in lock(&self.shared.threads).iter() {
                // SAFETY: `t` is a live vCPU thread of this process (threads are only
                // joined in `shutdown`, which clears this list first).
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
        }
    }

    /// Stops the vCPU threads for good.
    pub fn shutdown(&self) {
        self.set_target(Target::Quit);
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        lock(&self.shared.threads).clear();
    }

    pub fn status(&self) -> MachineStatus {
        let now = Instant::now();
        let per_vcpu: Vec<(VcpuStatus, Mailbox)> = self
            .shared
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let s = lock(s).clone();
                // Counters come from guest memory itself, so they are current even
                // between heartbeats and after a restore.
                let mb = self.mailbox(i as u32).unwrap_or(s.mailbox);
                (
                    VcpuStatus {
                        heartbeats: mb.heartbeats,
                        pages_written: mb.pages_written,
                        pages_written_per_sec: s.pages_per_sec,
                        max_heartbeat_gap_ms: ms(s.max_gap),
                        last_heartbeat_ms_ago: s.last_heartbeat.map(|t| ms(now - t)),
                    },
                    mb,
                )
            })
            .collect();
        let sum = |f: fn(&Mailbox) -> u64| per_vcpu.iter().map(|(_, m)| f(m)).sum::<u64>();
        // One lock: a guard in the struct literal below would live to its end.
        let (crash, stopped) = {
            let ctl = lock(&self.shared.control);
            (ctl.crash.clone(), ctl.stopped.clone())
        };
        MachineStatus {
            name: self.cfg.name.clone(),
            state: self.state(),
            pid: std::process::id(),
            vcpus: self.cfg.vcpus,
            memory_mib: self.cfg.memory_mib,
            dirty_tracking: self.dirty.mode().to_owned(),
            uptime_ms: (now - self.started).as_millis() as u64,
            heartbeats: sum(|m| m.heartbeats),
            guest_pages_written: sum(|m| m.pages_written),
            pages_written_per_sec: per_vcpu.iter().map(|(v, _)| v.pages_written_per_sec).sum(),
            guest_integrity_errors: sum(|m| m.integrity_errors),
            disk_integrity_errors: sum(|m| m.disk_integrity_errors),
            disk_writes: sum(|m| m.disk_writes),
            disk_reads: sum(|m| m.disk_reads),
            max_heartbeat_gap_ms: per_vcpu
                .iter()
                .map(|(v, _)| v.max_heartbeat_gap_ms)
                .fold(0.0, f64::max),
            first_heartbeat_monotonic_ns: match self
                .shared
                .first_heartbeat_ns
                .load(Ordering::Acquire)
            {
                0 => None,
                ns => Some(ns),
            },
            restore: self.restore,
            dirty_sample_running: self.dirty_sample_lock.try_lock().is_err(),
            crash,
            stopped,
            per_vcpu: per_vcpu.into_iter().map(|(v, _)| v).collect(),
        }
    }

    /// Slows every vCPU to (100 - pct)% of its time, applied at once.
    pub fn set_throttle(&self, pct: u32) {
        self.shared
            .throttle_pct
            .store(pct.min(99), Ordering::Release);
    }

    /// Per vCPU: CLOCK_MONOTONIC of its latest heartbeat in this process (0: none).
    pub fn last_heartbeats_ns(&self) -> Vec<u64> {
        self.shared
            .vcpus
            .iter()
            .map(|s| lock(s).last_heartbeat_ns)
            .collect()
    }

    /// Per vCPU: CLOCK_MONOTONIC of its first heartbeat in this process (0: none yet).
    pub fn first_heartbeats_ns(&self) -> Vec<u64> {
        self.shared
            .vcpus
            .iter()
            .map(|s| lock(s).first_heartbeat_ns)
            .collect()
    }

    /// Largest heartbeat gap of any vCPU so far.
    pub fn max_heartbeat_gap(&self) -> Duration {
        self.shared
            .vcpus
            .iter()
            .map(|s| lock(s).max_gap)
            .max()
            .unwrap_or_default()
    }

    /// Guest memory as bytes, for the migration data path.
    ///
    /// # Safety
    /// Guest vCPUs may write this memory concurrently; callers must treat the contents
    /// as racy (copying pages whose dirty tracking was re-armed first, as pre-copy does)
    /// or pause the VM.
    pub unsafe fn memory_slice(&self) -> &[u8] {
        // SAFETY: the mapping is memory_bytes long and lives as long as `self`.
        unsafe {
            std::slice::from_raw_parts(self.vm.host_base(), self.vm.layout.memory_bytes as usize)
        }
    }

    pub fn mailbox(&self, vcpu: u32) -> Result<Mailbox, MailboxError> {
        // A page still on the source would block this read until it arrives.
        let page = Layout::mailbox(vcpu) / crate::guest::abi::PAGE_SIZE;
        if lock(&self.absent)
            .as_ref()
            .is_some_and(|a| a.is_missing(page))
        {
            return Err(MailboxError::PageMissing(page));
        }
        Ok(self
            .vm
            .memory
            .read_obj(GuestAddress(Layout::mailbox(vcpu)))?)
    }

    /// Has every vCPU re-check every page and disk block it wrote.
    pub fn verify(&self, timeout: Duration) -> Result<VerifyReport, VerifyError> {
        match self.state() {
            RunState::Paused => return Err(VerifyError::Paused),
            RunState::Migrated => return Err(VerifyError::HandedOver),
            RunState::Crashed => {
                let crash = lock(&self.shared.control).crash.clone().unwrap_or_default();
                return Err(VerifyError::Crashed(crash));
            }
            RunState::Running => {}
        }
        let start = Instant::now();
        for s in &self.shared.vcpus {
            lock(s).verify = VerifyStep::Requested;
        }
        let ctl = lock(&self.shared.control);
        let all_done = || {
            self.shared
                .vcpus
                .iter()
                .all(|s| lock(s).verify == VerifyStep::Done)
        };
        let (ctl, _) = self
            .shared
            .cond
            .wait_timeout_while(ctl, timeout, |c| c.crash.is_none() && !all_done())
            .unwrap_or_else(|e| e.into_inner());
        if let Some(crash) = ctl.crash.clone() {
            return Err(VerifyError::Crashed(crash));
        }
        drop(ctl);
        if !all_done() {
            for s in &self.shared.vcpus {
                lock(s).verify = VerifyStep::Idle;
            }
            return Err(VerifyError::Timeout(timeout));
        }
        let mut report = VerifyReport {
            elapsed_ms: start.elapsed().as_millis() as u64,
            ..Default::default()
        };
        for s in &self.shared.vcpus {
            let mut s = lock(s);
            s.verify = VerifyStep::Idle;
            let mb = &s.mailbox;
            report.pages_checked += mb.verify_pages;
            report.memory_errors += mb.verify_errors;
            report.blocks_checked += mb.verify_blocks;
            report.disk_errors += mb.verify_disk_errors;
        }
        Ok(report)
    }

    /// Changes the guest's page-write rate (pages/s over all vCPUs; 0 = unpaced) while
    /// it runs, from now on: a lab knob for workloads whose rate steps.
    pub fn set_dirty_rate(&self, pages_per_sec: u64) -> Result<(), WorkloadError> {
        use crate::guest::program::{PACE_NOW, PACE_T0, PACE_WRITTEN};
        let state = self.state();
        if state != RunState::Running {
            return Err(WorkloadError::NotRunning(state));
        }
        // Paused, the guest's pacing state holds still while it is restarted.
        self.pause()?;
        let per_vcpu = pages_per_sec.div_ceil(u64::from(self.cfg.vcpus));
        let result = (|| -> Result<(), WorkloadError> {
            let mem = &self.vm.memory;
            let field = std::mem::offset_of!(crate::guest::abi::GuestParams, pages_per_sec);
            let at = crate::guest::layout::PARAMS + field as u64;
            mem.write_obj(per_vcpu, GuestAddress(at))?;
            // KVM's dirty log never sees the VMM's own writes: a migration in
            // progress must hear of them, or the destination keeps the old values.
            self.dirty.mark_dirty(at, 8);
            for v in 0..self.cfg.vcpus {
                let mb = Layout::mailbox(v);
                let now: u64 = mem.read_obj(GuestAddress(mb + PACE_NOW))?;
                mem.write_obj(now, GuestAddress(mb + PACE_T0))?;
                mem.write_obj(0u64, GuestAddress(mb + PACE_WRITTEN))?;
                self.dirty.mark_dirty(mb + PACE_T0, 8);
                self.dirty.mark_dirty(mb + PACE_WRITTEN, 8);
            }
            Ok(())
        })();
        self.resume()?;
        result
    }

    /// Logs dirty pages for `duration` and compares them with what the guest says it wrote.
    /// Logs dirty pages for `duration` (or until `client_gone()` says nobody waits for
    /// the answer any more, `cancel` or a migration's start) and counts them.
    /// `log_in_use()` says whether something else (a migration) owns the dirty log.
    pub fn dirty_sample(
        &self,
        duration: Duration,
        client_gone: &dyn Fn() -> bool,
        log_in_use: &dyn Fn() -> bool,
    ) -> Result<DirtySample, DirtySampleError> {
        let _log = self
            .dirty_sample_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Cleared before the check below: a migration that starts after the check sets
        // it again, and this sample ends at once.
        self.dirty_sample_end
            .store(false, std::sync::atomic::Ordering::Release);
        if log_in_use() {
            return Err(DirtySampleError::LogInUse);
        }
        let pages = self.vm.layout.memory_bytes / 4096;
        let mut bitmap = crate::bitmap::Bitmap::new(pages);
        let logging_from = Instant::now();
        self.dirty.start(&self.vm)?;
        let written = |m: &Machine| -> Result<u64, MailboxError> {
            (0..m.cfg.vcpus).try_fold(0, |acc, v| Ok(acc + m.mailbox(v)?.pages_written))
        };
        let result = (|| {
            self.dirty.harvest(&mut bitmap)?;
            bitmap.clear_all();
            let w0 = written(self)?;
            let t0 = Instant::now();
            let mut ended_early = None;
            while let Some(left) = duration.checked_sub(t0.elapsed()).filter(|l| !l.is_zero()) {
                if self
                    .dirty_sample_end
                    .load(std::sync::atomic::Ordering::Acquire)
                {
                    ended_early = Some("cancelled, or a migration started");
                    break;
                }
                if client_gone() {
                    ended_early = Some("its client went away");
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(20)));
            }
            let t = Instant::now();
            self.dirty.fetch(&mut bitmap)?;
            let fetch_ms = ms(t.elapsed());
            let t = Instant::now();
            self.dirty.clear(0, pages)?;
            let clear_ms = ms(t.elapsed());
            let elapsed = t0.elapsed();
            let w1 = written(self)?;
            let ws_first = self.vm.layout.ws_base / 4096;
            let in_ws = bitmap
                .iter_set()
                .filter(|&p| p >= ws_first && p < ws_first + self.vm.layout.ws_pages)
                .count() as u64;
            Ok(DirtySample {
                mode: self.dirty.mode().to_owned(),
                elapsed_ms: ms(elapsed),
                logging_ms: 0.0,
                dirty_pages: bitmap.count(),
                dirty_pages_in_working_set: in_ws,
                guest_pages_written: w1 - w0,
                fetch_ms,
                clear_ms,
                ended_early: ended_early.map(str::to_owned),
            })
        })();
        self.dirty.stop(&self.vm)?;
        result.map(|mut r| {
            r.logging_ms = ms(logging_from.elapsed());
            r
        })
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

struct VcpuThread {
    index: u32,
    fd: Arc<Mutex<VcpuFd>>,
    shared: Arc<Shared>,
    memory: GuestMemoryMmap,
    dirty: Arc<DirtyLog>,
    disks: Arc<DiskSet>,
    /// A guest write the disk's full file system refused: the VM stopped, and the
    /// write is retried before this vCPU runs again (its status not yet given).
    held_write: std::cell::Cell<Option<Mailbox>>,
}

impl VcpuThread {
    fn run(self) {
        // SAFETY: pthread_self has no preconditions.
        lock(&self.shared.threads).push(unsafe { libc::pthread_self() });
        let mut fd = lock(&self.fd);
        KVM_RUN.with(|c| c.set(fd.get_kvm_run()));
        let mut guest_time = Duration::ZERO;
        loop {
            if self.shared.target() != Target::Run {
                // Let KVM finish a half-done port access so the saved state is whole.
                fd.set_kvm_immediate_exit(1);
                let _ = fd.run();
                fd.set_kvm_immediate_exit(0);
                KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
                drop(fd);
                if !self.park() {
                    return;
                }
                fd = lock(&self.fd);
                KVM_RUN.with(|c| c.set(fd.get_kvm_run()));
                continue;
            }
            if let Some(mb) = self.held_write.take() {
                // Resumed: the write the guest is still waiting for, again.
                match self.finish_block(&mb) {
                    Err(reason) => self.crash(format!("vCPU {}: {reason}", self.index)),
                    Ok(()) if self.held_write.get().is_none() => {
                        tracing::info!(target: "ferry::vmm", "vCPU {}: the held write went through", self.index);
                        lock(&self.shared.control).stopped = None;
                    }
                    Ok(()) => {}
                }
                continue;
            }
            let entered = Instant::now();
            let ran = fd.run();
            guest_time += entered.elapsed();
            // Throttling as a duty cycle: after each millisecond in the guest, sit out
            // the share the throttle takes (QEMU's auto-converge does the same).
            let throttle = self.shared.throttle_pct.load(Ordering::Relaxed);
            if throttle > 0 && guest_time >= THROTTLE_SLICE {
                self.park_for(guest_time * throttle / (100 - throttle));
                guest_time = Duration::ZERO;
            } else if throttle == 0 {
                guest_time = Duration::ZERO;
            }
            let outcome = match ran {
                Ok(exit) => self.handle_exit(exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    fd.set_kvm_immediate_exit(0);
                    Ok(())
                }
                Err(e) => Err(format!("KVM_RUN failed: {e}")),
            };
            if let Err(reason) = outcome {
                let regs = fd
                    .get_regs()
                    .map(|r| format!(" (rip {:#x}, rsp {:#x})", r.rip, r.rsp))
                    .unwrap_or_default();
                self.crash(format!("vCPU {}: {reason}{regs}", self.index));
            }
        }
    }

    /// Waits while paused; false when the thread must exit.
    fn park(&self) -> bool {
        let mut ctl = lock(&self.shared.control);
        ctl.parked += 1;
        self.shared.cond.notify_all();
        loop {
            match self.shared.target() {
                Target::Quit => {
                    ctl.parked -= 1;
                    ctl.exited += 1;
                    self.shared.cond.notify_all();
                    return false;
                }
                Target::Run if ctl.crash.is_none() => {
                    ctl.parked -= 1;
                    return true;
                }
                _ => {
                    ctl = self
                        .shared
                        .cond
                        .wait(ctl)
                        .unwrap_or_else(|e| e.into_inner())
                }
            }
        }
    }

    /// Stops every vCPU, saying why (this one parks at its next turn of the loop).
    fn stop_for_space(&self, reason: String) {
        tracing::error!(target: "ferry::vmm", "{reason}");
        let mut ctl = lock(&self.shared.control);
        ctl.stopped = Some(reason);
        self.halt(ctl);
    }

    fn crash(&self, reason: String) {
        tracing::error!(target: "ferry::vmm", "guest crashed: {reason}");
        let mut ctl = lock(&self.shared.control);
        if ctl.crash.is_none() {
            ctl.crash = Some(reason);
        }
        self.halt(ctl);
    }

    /// Stops every vCPU of a running VM (a quitting one quits) once the caller has
    /// noted why under `ctl`: parked waiters learn it, and every thread is kicked
    /// out of KVM_RUN.
    fn halt(&self, ctl: std::sync::MutexGuard<'_, Control>) {
        if self.shared.target() == Target::Run {
            self.shared
                .target
                .store(Target::Pause as u8, Ordering::Release);
        }
        self.shared.cond.notify_all();
        drop(ctl);
        for &t in lock(&self.shared.threads).iter() {
            // SAFETY: `t` is a live vCPU thread of this process.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    fn handle_exit(&self, exit: VcpuExit<'_>) -> Result<(), String> {
        match exit {
            VcpuExit::IoIn(PORT_HEARTBEAT, data) => {
                let cmd = self.heartbeat()?;
                let bytes = (cmd as u32).to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&bytes[..n]);
                Ok(())
            }
            VcpuExit::IoIn(port, data) => {
                tracing::warn!("vCPU {} read from unknown port {port:#x}", self.index);
                data.fill(0xff);
                Ok(())
            }
            VcpuExit::IoOut(PORT_VERIFY_DONE, _) => {
                let mb = self.mailbox()?;
                let mut s = lock(&self.shared.vcpus[self.index as usize]);
                s.mailbox = mb;
                s.verify = VerifyStep::Done;
                drop(s);
                let _ctl = lock(&self.shared.control);
                self.shared.cond.notify_all();
                Ok(())
            }
            VcpuExit::IoOut(PORT_INTEGRITY, data) => {
                let mb = self.mailbox()?;
                let what = if data.first().copied() == Some(INTEGRITY_DISK as u8) {
                    "disk block"
                } else {
                    "page"
                };
                tracing::warn!(
                    "integrity error on vCPU {}: {what} {} expected generation {} found {} (detail {})",
                    self.index,
                    mb.error_index,
                    mb.error_expected_gen,
                    mb.error_found_gen,
                    mb.error_detail
                );
                Ok(())
            }
            VcpuExit::IoOut(PORT_BLOCK, _) => self.block_request(),
            VcpuExit::IoOut(port, _) => {
                tracing::warn!("vCPU {} wrote to unknown port {port:#x}", self.index);
                Ok(())
            }
            VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL) => self
                .dirty
                .on_ring_full(self.index)
                .map_err(|e| format!("dirty ring full and could not be harvested: {e}")),
            VcpuExit::Shutdown => Err("triple fault (shutdown exit)".into()),
            VcpuExit::Hlt => Err("halted".into()),
            VcpuExit::InternalError => Err("KVM internal error".into()),
            VcpuExit::FailEntry(reason, cpu) => {
                Err(format!("KVM entry failure {reason:#x} on host CPU {cpu}"))
            }
            other => Err(format!("unexpected exit {other:?}")),
        }
    }

    fn mailbox(&self) -> Result<Mailbox, String> {
        self.memory
            .read_obj(GuestAddress(Layout::mailbox(self.index)))
            .map_err(|e| format!("reading its mailbox: {e}"))
    }

    fn heartbeat(&self) -> Result<Command, String> {
        let now = Instant::now();
        let now_ns = monotonic_ns();
        if self.shared.first_heartbeat_ns.load(Ordering::Relaxed) == 0 {
            let _ = self.shared.first_heartbeat_ns.compare_exchange(
                0,
                now_ns,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
        let mb = self.mailbox()?;
        let mut s = lock(&self.shared.vcpus[self.index as usize]);
        if let Some(last) = s.last_heartbeat {
            s.max_gap = s.max_gap.max(now - last);
        }
        s.last_heartbeat = Some(now);
        s.last_heartbeat_ns = now_ns;
        if s.first_heartbeat_ns == 0 {
            s.first_heartbeat_ns = now_ns;
        }
        match s.window_start {
            Some((t, pages)) if now - t >= Duration::from_secs(1) => {
                s.pages_per_sec =
                    mb.pages_written.saturating_sub(pages) as f64 / (now - t).as_secs_f64();
                s.window_start = Some((now, mb.pages_written));
            }
            Some(_) => {}
            None => s.window_start = Some((now, mb.pages_written)),
        }
        s.mailbox = mb;
        let cmd = if s.verify == VerifyStep::Requested {
            s.verify = VerifyStep::Delivered;
            Command::Verify
        } else {
            Command::None
        };
        drop(s);
        if mb.sleep_ns > 0 && cmd == Command::None {
            self.park_for(Duration::from_nanos(mb.sleep_ns).min(MAX_SLEEP));
        }
        Ok(cmd)
    }

    /// Parks the vCPU thread for a guest sleep. A plain absolute-deadline nanosleep:
    /// an idle guest does this a thousand times a second per vCPU, so it takes no
    /// locks. A pause kick (signal) interrupts the sleep; a verify request waits at
    /// most one sleep.
    fn park_for(&self, sleep: Duration) {
        let deadline = monotonic_ns() + sleep.as_nanos() as u64;
        let ts = libc::timespec {
            tv_sec: (deadline / 1_000_000_000) as libc::time_t,
            tv_nsec: (deadline % 1_000_000_000) as libc::c_long,
        };
        while self.shared.target() == Target::Run {
            // SAFETY: clock_nanosleep only reads the timespec we pass; no remainder
            // pointer is needed with TIMER_ABSTIME.
            let rc = unsafe {
                libc::clock_nanosleep(
                    libc::CLOCK_MONOTONIC,
                    libc::TIMER_ABSTIME,
                    &ts,
                    std::ptr::null_mut(),
                )
            };
            if rc != libc::EINTR {
                break;
            }
        }
    }

    fn block_request(&self) -> Result<(), String> {
        let mb = self.mailbox()?;
        self.finish_block(&mb)
    }

    /// Carries out a block request and gives the guest its status, unless the disk's
    /// file system is full: then the VM stops (every vCPU, as QEMU's `werror=enospc`
    /// does) and the write waits, status untold, until an operator made room and
    /// resumed it. A guest told ENOSPC would lose the write; one that waits loses
    /// nothing.
    fn finish_block(&self, mb: &Mailbox) -> Result<(), String> {
        let status = self.do_block(mb);
        if mb.block_op == BlockOp::Write as u64
            && (status == libc::ENOSPC as u64 || status == libc::EDQUOT as u64)
        {
            let disk = self
                .disks
                .disks
                .get(mb.block_disk as usize)
                .map_or_else(String::new, |d| {
                    format!("{} ({})", d.id, d.path().display())
                });
            self.stop_for_space(format!(
                "disk {disk}: its file system is full (a guest write got {}); the VM \
                 stopped with the write held: make room, then resume",
                if status == libc::ENOSPC as u64 {
                    "ENOSPC"
                } else {
                    "EDQUOT"
                }
            ));
            self.held_write.set(Some(*mb));
            return Ok(());
        }
        let addr = Layout::mailbox(self.index) + std::mem::offset_of!(Mailbox, block_status) as u64;
        self.memory
            .write_obj(status, GuestAddress(addr))
            .map_err(|e| format!("writing block status: {e}"))?;
        self.dirty.mark_dirty(addr, 8);
        Ok(())
    }

    /// Carries out one block request; 0 or an errno for the guest.
    fn do_block(&self, mb: &Mailbox) -> u64 {
        let Some(disk) = self.disks.disks.get(mb.block_disk as usize) else {
            return libc::ENODEV as u64;
        };
        let op = mb.block_op;
        if op == BlockOp::Flush as u64 {
            return match disk.flush() {
                Ok(()) => 0,
                Err(_) => libc::EIO as u64,
            };
        }
        let Ok(len) = usize::try_from(mb.block_len) else {
            return libc::EINVAL as u64;
        };
        // The buffer must lie wholly inside guest memory.
        let host = match self.memory.get_slice(GuestAddress(mb.block_buf), len) {
            Ok(s) => s.ptr_guard_mut().as_ptr(),
            Err(_) => return libc::EFAULT as u64,
        };
        let res = if op == BlockOp::Read as u64 {
            // SAFETY: get_slice checked that block_buf..+len is inside guest memory,
            // which stays mapped for the VM's lifetime.
            let r = unsafe { disk.read_into(mb.block_offset, host, len) };
            if r.is_ok() {
                self.dirty.mark_dirty(mb.block_buf, mb.block_len);
            }
            r
        } else if op == BlockOp::Write as u64 {
            // SAFETY: as above.
            unsafe { disk.write_from(mb.block_offset, host, len) }
        } else {
            Err(libc::EINVAL)
        };
        match res {
            Ok(()) => 0,
            Err(e) => e as u64,
        }
    }
}
