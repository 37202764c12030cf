//! A VM as the code that moves it sees it: the machine, and the state of what moves
//! it (an outgoing migration's progress and settings, the operator's requests to it,
//! an incoming post-copy, a storage migration). The machine itself knows nothing of
//! migration; the control server and the migration threads share this.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ferry_api::{MigrationProgress, PostcopyPhase, PostcopyStatus, StorageProgress, VmStatus};

use super::postcopy_dst::Tracker;
use super::source;
use crate::sync::lock;
use crate::vmm::capabilities::Movable;
use crate::vmm::machine::Machine;

pub struct Migratable {
    pub machine: Arc<Machine>,
    /// The current or last outgoing migration.
    pub progress: Mutex<Option<MigrationProgress>>,
    /// The running migration's settings and their history (`set-params`).
    pub live: Mutex<Option<source::Live>>,
    /// Set by `cancel`; a migration stops at its next check and the VM runs on here.
    pub cancel: AtomicBool,
    /// Set by `start-postcopy`: a hybrid migration switches to post-copy at its next
    /// check.
    pub postcopy_requested: AtomicBool,
    /// Set by `ferry migrate --resume`: a post-copy whose link stayed down past the
    /// recovery window tries again.
    pub resume: AtomicBool,
    /// An incoming post-copy still fetching pages (this process is its destination).
    pub incoming: Mutex<Option<Arc<Tracker>>>,
    /// The current or last storage migration.
    pub storage: Mutex<Option<StorageProgress>>,
    /// The last outgoing migration's names on the wire: its id, and the destination's
    /// secret once its handshake completed (a `Resolve` needs both).
    pub session: Mutex<Option<super::protocol::Session>>,
    /// How the last outgoing migration reached its destination: a `Resolve` goes
    /// the same way.
    pub transport: Mutex<Option<super::secure::Transport>>,
    /// The disk copies of an arrival not yet committed: removed with this VM if it is
    /// discarded, kept once the source's Commit (or a Resolve saying it committed)
    /// makes them the VM's disks.
    pub arrival: Mutex<Option<super::disk_stream::Arrival>>,
}

impl Migratable {
    /// The VM as the send side of a migration may use it: its capabilities, not its
    /// insides.
    pub fn movable(&self) -> &dyn Movable {
        &*self.machine
    }

    pub fn new(machine: Arc<Machine>) -> Self {
        Self {
            machine,
            progress: Mutex::new(None),
            live: Mutex::new(None),
            cancel: AtomicBool::new(false),
            postcopy_requested: AtomicBool::new(false),
            resume: AtomicBool::new(false),
            incoming: Mutex::new(None),
            storage: Mutex::new(None),
            session: Mutex::new(None),
            arrival: Mutex::new(None),
            transport: Mutex::new(None),
        }
    }

    /// Post-copy still fetching pages into this process.
    pub fn postcopy_status(&self) -> Option<PostcopyStatus> {
        lock(&self.incoming).as_ref().map(|t| t.status())
    }

    /// Post-copy is still bringing memory in: the VM's pausing is its, and stopping
    /// the process now would lose the guest.
    pub fn receiving_postcopy(&self) -> bool {
        self.postcopy_status()
            .is_some_and(|p| p.phase != PostcopyPhase::Completed)
    }

    /// An outgoing migration is running (it has no report yet).
    pub fn migrating(&self) -> bool {
        lock(&self.progress)
            .as_ref()
            .is_some_and(|p| p.report.is_none())
    }

    /// A storage migration is running.
    pub fn moving_disks(&self) -> bool {
        lock(&self.storage)
            .as_ref()
            .is_some_and(|p| p.report.is_none())
    }

    pub fn status(&self) -> VmStatus {
        VmStatus {
            machine: self.machine.status(),
            migration: lock(&self.progress).clone(),
            incoming_postcopy: self.postcopy_status(),
            storage_migration: lock(&self.storage).clone(),
        }
    }
}
