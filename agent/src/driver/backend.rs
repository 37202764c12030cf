//! What the driver needs of whatever moves the VM. Ferry's VMM over its control socket
//! is one backend; a hypervisor with its own migration (QEMU over QMP) is another, so
//! nothing here assumes how the VM is moved, only what can be asked and seen of it.

use ferry_api::{ErrorKind, Mechanics, Migrate, MigrationProgress, Resolution, SettingsChange};

/// The VM, before a migration starts.
#[derive(Debug, Clone, PartialEq)]
pub struct VmFacts {
    pub memory_pages: u64,
    /// The guest's page-write rate now (0: unknown).
    pub dirty_pages_per_sec: f64,
    /// The process the eBPF probes watch (None: none to watch).
    pub pid: Option<u32>,
}

/// A backend said no, or could not be reached; the kind says which, for a front end
/// that answers an HTTP request from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub kind: ErrorKind,
    pub message: String,
}

impl BackendError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

pub trait Backend {
    /// How this backend moves a VM, as a policy models it.
    fn mechanics(&mut self) -> Result<Mechanics, BackendError>;
    /// The VM as it is now.
    fn vm(&mut self) -> Result<VmFacts, BackendError>;
    /// Starts the migration `req` describes; returns once it runs (or was refused).
    fn start(&mut self, req: &Migrate) -> Result<(), BackendError>;
    /// The current or last migration's progress (None: none has started); its report
    /// once it ended.
    fn observe(&mut self) -> Result<Option<MigrationProgress>, BackendError>;
    /// Changes the running migration's settings; `change.reasons` go into its record.
    fn apply(
        &mut self,
        change: &SettingsChange,
        reasons: &ferry_api::Reasons,
    ) -> Result<(), BackendError>;
    /// Switches the running migration to post-copy.
    fn start_postcopy(&mut self) -> Result<(), BackendError>;
    /// Stops the running migration; the VM stays where it was.
    fn cancel(&mut self) -> Result<(), BackendError>;
    /// Settles a handover in doubt with the destination.
    fn resolve(&mut self) -> Result<Resolution, BackendError>;
}
