//! The settings a migration runs with, and the ledger of every change to them and why
//! (`set-params`, a policy's reasons).

use super::*;
use crate::vmm::block::MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC;

pub use ferry_api::{Reasons, Settings, SettingsChange};

/// The settings in force and every change to them, shared between the migration
/// thread and `set-params`.
#[derive(Debug, Clone)]
pub struct Live {
    pub settings: Settings,
    pub decisions: Vec<Decision>,
    pub throttle_max_pct: u32,
    pub(super) t0: Instant,
}

impl Live {
    pub fn new(settings: Settings, reasons: &Reasons) -> Self {
        let mut live = Self {
            settings,
            decisions: Vec::new(),
            throttle_max_pct: settings.throttle_pct,
            t0: Instant::now(),
        };
        for (setting, value, why) in settings.starting_decisions(reasons) {
            live.record(setting, value, &why);
        }
        live
    }

    pub(super) fn record(&mut self, setting: &str, value: String, reason: &str) {
        self.decisions.push(Decision {
            t_ms: self.t0.elapsed().as_millis() as f64,
            setting: setting.into(),
            value,
            reason: reason.into(),
        });
    }

    /// Applies new settings, recording each one that changed with its reason (or
    /// `default`).
    pub fn change(&mut self, new: Settings, reasons: &Reasons, default: &str) {
        let before = self.settings.named();
        let after = new.named();
        for ((setting, old), (_, value)) in before.into_iter().zip(after) {
            if old != value {
                let why = reasons.get(setting).map_or(default, String::as_str);
                self.record(setting, value, why);
            }
        }
        self.settings = new;
        self.throttle_max_pct = self.throttle_max_pct.max(new.throttle_pct);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetParamsError {
    #[error("no migration is running")]
    NotRunning,
    #[error("{0}")]
    Invalid(String),
}

/// `set-params`: changes what is given, records each change.
pub fn set_params(
    vm: &Migratable,
    change: &SettingsChange,
    reasons: &Reasons,
) -> Result<Settings, SetParamsError> {
    let m = vm.movable();
    let mut live = lock(&vm.live);
    let live = live.as_mut().ok_or(SetParamsError::NotRunning)?;
    if let Some(t) = change.throttle_pct
        && t > 99
    {
        return Err(SetParamsError::Invalid(format!(
            "throttle_pct = {t} is outside 0..=99"
        )));
    }
    if change.max_downtime_ms == Some(0) {
        return Err(SetParamsError::Invalid(
            "max_downtime_ms must be at least 1".into(),
        ));
    }
    check_disk_write_limit(change.disk_write_limit_bytes_per_sec)
        .map_err(SetParamsError::Invalid)?;
    let s = live.settings.with(change);
    if change.disk_write_limit_bytes_per_sec.is_some() {
        // Only disks being copied (`--copy-storage`) have a job to hold the cap.
        m.disks().limit_writes(s.disk_write_limit_bytes_per_sec);
    }
    if change.disk_mirror.is_some() {
        m.disks().mirror_writes(s.disk_mirror == DiskMirror::Active);
    }
    live.change(s, reasons, "set by the operator (set-params)");
    m.set_throttle(s.throttle_pct);
    Ok(s)
}

/// A cap on the guest's disk writes is none (0) or one a guest write can live with.
pub fn check_disk_write_limit(limit: Option<u64>) -> Result<(), String> {
    match limit {
        Some(b) if b != 0 && b < MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC => Err(format!(
            "disk_write_limit_bytes_per_sec = {b}: must be 0 (none) or at least \
             {MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC} (a guest write waits its share of it)"
        )),
        _ => Ok(()),
    }
}
