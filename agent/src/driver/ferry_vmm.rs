//! Ferry's own VMM as a backend: `ferry vmm` over its control socket.

use std::path::{Path, PathBuf};

use ferry_api::{
    ErrorKind, Mechanics, Migrate, MigrationProgress, Reasons, Request, Resolution, SettingsChange,
    Status,
};

use super::backend::{Backend, BackendError, VmFacts};
use crate::client::{self, ClientError};

/// A VMM answers every request the driver sends well within this (the slowest,
/// `migrate` and `resolve`, wait on the destination for a few seconds at most); one
/// that does not is wedged or stopped, and the driver is told so rather than held.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

pub struct FerryVmm {
    control: PathBuf,
}

impl FerryVmm {
    /// The VMM whose control socket is at `control`.
    pub fn new(control: &Path) -> Self {
        Self {
            control: control.to_owned(),
        }
    }

    fn call<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Result<T, BackendError> {
        client::call_within(&self.control, req, ANSWER_WITHIN).map_err(backend_error)
    }

    fn vm_status(&self) -> Result<Box<ferry_api::VmStatus>, BackendError> {
        match self.call::<Status>(&Request::Status {})? {
            Status::Vm(s) => Ok(s),
            Status::Incoming(_) => Err(BackendError::new(
                ErrorKind::Unavailable,
                "no VM here yet: the VMM waits for an incoming migration",
            )),
        }
    }
}

fn backend_error(e: ClientError) -> BackendError {
    BackendError::new(e.kind(), e.to_string())
}

impl Backend for FerryVmm {
    fn mechanics(&mut self) -> Result<Mechanics, BackendError> {
        self.call(&Request::Mechanics {})
    }

    fn vm(&mut self) -> Result<VmFacts, BackendError> {
        let s = self.vm_status()?;
        Ok(VmFacts {
            memory_pages: s.machine.memory_mib * 256,
            dirty_pages_per_sec: s.machine.pages_written_per_sec,
            pid: Some(s.machine.pid),
        })
    }

    fn start(&mut self, req: &Migrate) -> Result<(), BackendError> {
        self.call::<serde::de::IgnoredAny>(&Request::Migrate(Box::new(req.clone())))
            .map(|_| ())
    }

    fn observe(&mut self) -> Result<Option<MigrationProgress>, BackendError> {
        Ok(self.vm_status()?.migration)
    }

    fn apply(&mut self, change: &SettingsChange, reasons: &Reasons) -> Result<(), BackendError> {
        self.call::<serde::de::IgnoredAny>(&Request::SetParams {
            settings: change.clone(),
            reasons: reasons.clone(),
        })
        .map(|_| ())
    }

    fn start_postcopy(&mut self) -> Result<(), BackendError> {
        self.call::<serde::de::IgnoredAny>(&Request::StartPostcopy {})
            .map(|_| ())
    }

    fn cancel(&mut self) -> Result<(), BackendError> {
        self.call::<serde::de::IgnoredAny>(&Request::Cancel {})
            .map(|_| ())
    }

    fn resolve(&mut self) -> Result<Resolution, BackendError> {
        self.call(&Request::Resolve {})
    }
}
