//! What the code that moves a VM may ask of it, one small capability each (as
//! cloud-hypervisor's `vm-migration` has `Pausable`, `Snapshottable` and the dirty log
//! of `Migratable`): stop and start it, know which pages it wrote, read its memory,
//! save its CPU and device state, reach its disks. The migration's send side holds a
//! `&dyn Movable` and nothing else of the VM; [`Machine`] is the one implementation
//! today. The lab guest's heartbeats, by which Ferry measures downtime from inside the
//! guest, and its own integrity checks are one more capability ([`LabGuest`]), not a
//! part of moving it.

use std::ops::Range;
use std::time::Duration;

use super::block::DiskSet;
use super::config::VmConfig;
use super::dirty::DirtyError;
use super::machine::{Machine, PauseError, ResumeError, RunState};
use super::snapshot::{MachineState, SnapshotError};
use crate::bitmap::Bitmap;

/// Stops and starts the vCPUs; slows them; hands the VM over for good.
pub trait Pausable {
    /// Stops every vCPU at an instruction boundary; returns once all are stopped.
    fn pause(&self) -> Result<(), PauseError>;
    /// Asks every vCPU to stop, without waiting for them.
    fn request_pause(&self);
    fn resume(&self) -> Result<(), ResumeError>;
    fn state(&self) -> RunState;
    /// Takes `pct` (0–99) of each vCPU's time away, at once.
    fn set_throttle(&self, pct: u32);
    /// The VM runs elsewhere now: this copy must never run again.
    fn hand_over(&self);
    fn handed_over(&self) -> bool;
}

/// Which guest pages were written, and since when.
pub trait DirtyTracking {
    /// Turns logging on, forgetting anything logged before.
    fn start_dirty_log(&self) -> Result<(), DirtyError>;
    fn stop_dirty_log(&self) -> Result<(), DirtyError>;
    /// ORs the pages dirtied since they were last re-armed into `into`; returns how
    /// many were new to it. They stay logged until [`DirtyTracking::clear_dirty`].
    fn fetch_dirty(&self, into: &mut Bitmap) -> Result<u64, DirtyError>;
    /// Re-arms pages `first..first + count`: copy them after this returns.
    fn clear_dirty(&self, first: u64, count: u64) -> Result<(), DirtyError>;
    /// Fetches and re-arms at once, into `window` (cleared first); returns the count.
    fn rearm_dirty(&self, window: &mut Bitmap) -> Result<u64, DirtyError>;
}

/// Guest memory, read in place.
pub trait GuestMemory {
    fn memory_bytes(&self) -> u64;
    /// All of guest memory.
    ///
    /// # Safety
    /// vCPUs may write it concurrently: callers treat the contents as racy (copying
    /// pages whose dirty tracking was re-armed first, as pre-copy does) or pause first.
    unsafe fn memory(&self) -> &[u8];
}

/// The CPU, interrupt-controller and clock state, saved while paused.
pub trait StateSave {
    fn save_state(&self) -> Result<MachineState, SnapshotError>;
}

/// The VM's disks, and its configuration as it runs now (disks where they are).
pub trait DiskAccess {
    fn disks(&self) -> &DiskSet;
    fn config(&self) -> VmConfig;
}

/// What the lab guest reports from inside: its heartbeats (how Ferry measures the
/// pause) and the errors its own checks found.
pub trait LabGuest {
    /// Per vCPU: CLOCK_MONOTONIC of its latest heartbeat in this process (0: none).
    fn last_heartbeats_ns(&self) -> Vec<u64>;
    fn max_heartbeat_gap(&self) -> Duration;
    fn guest_integrity_errors(&self) -> u64;
    fn disk_integrity_errors(&self) -> u64;
    /// The pages its workload writes (where a sample of its page contents is taken).
    fn working_set_pages(&self) -> Range<u64>;
}

/// Everything the send side of a migration asks of a VM.
pub trait Movable:
    Pausable + DirtyTracking + GuestMemory + StateSave + DiskAccess + LabGuest + Sync
{
}

impl<T> Movable for T where
    T: Pausable + DirtyTracking + GuestMemory + StateSave + DiskAccess + LabGuest + Sync
{
}

impl Pausable for Machine {
    fn pause(&self) -> Result<(), PauseError> {
        Machine::pause(self)
    }

    fn request_pause(&self) {
        Machine::request_pause(self)
    }

    fn resume(&self) -> Result<(), ResumeError> {
        Machine::resume(self)
    }

    fn state(&self) -> RunState {
        Machine::state(self)
    }

    fn set_throttle(&self, pct: u32) {
        Machine::set_throttle(self, pct)
    }

    fn hand_over(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn handed_over(&self) -> bool {
        self.handed_over.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl DirtyTracking for Machine {
    fn start_dirty_log(&self) -> Result<(), DirtyError> {
        // A dirty-rate sample in progress ends first (it sees the migration that asks
        // and starts no other).
        let _sample = self
            .dirty_sample_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.dirty.start(&self.vm)
    }

    fn stop_dirty_log(&self) -> Result<(), DirtyError> {
        self.dirty.stop(&self.vm)
    }

    fn fetch_dirty(&self, into: &mut Bitmap) -> Result<u64, DirtyError> {
        self.dirty.fetch(into)
    }

    fn clear_dirty(&self, first: u64, count: u64) -> Result<(), DirtyError> {
        self.dirty.clear(first, count)
    }

    fn rearm_dirty(&self, window: &mut Bitmap) -> Result<u64, DirtyError> {
        self.dirty.rearm(window)
    }
}

impl GuestMemory for Machine {
    fn memory_bytes(&self) -> u64 {
        self.vm.layout.memory_bytes
    }

    unsafe fn memory(&self) -> &[u8] {
        // SAFETY: the caller keeps the contract stated on the trait.
        unsafe { self.memory_slice() }
    }
}

impl StateSave for Machine {
    fn save_state(&self) -> Result<MachineState, SnapshotError> {
        MachineState::save(self)
    }
}

impl DiskAccess for Machine {
    fn disks(&self) -> &DiskSet {
        &self.disks
    }

    fn config(&self) -> VmConfig {
        self.current_config()
    }
}

impl LabGuest for Machine {
    fn last_heartbeats_ns(&self) -> Vec<u64> {
        Machine::last_heartbeats_ns(self)
    }

    fn max_heartbeat_gap(&self) -> Duration {
        Machine::max_heartbeat_gap(self)
    }

    fn guest_integrity_errors(&self) -> u64 {
        self.status().guest_integrity_errors
    }

    fn disk_integrity_errors(&self) -> u64 {
        self.status().disk_integrity_errors
    }

    fn working_set_pages(&self) -> Range<u64> {
        let l = &self.vm.layout;
        let first = l.ws_base / crate::guest::abi::PAGE_SIZE;
        first..first + l.ws_pages
    }
}
