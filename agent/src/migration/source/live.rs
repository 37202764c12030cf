//! The settings a migration runs with, and the ledger of every change to them and why
//! (`set-params`, a policy's reasons).

use super::*;

/// Setting name → why it has its value.
pub type Reasons = std::collections::BTreeMap<String, String>;

/// What can change while a migration runs (`set-params`; later the policy engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub codec: Codec,
    /// Bytes per second on the wire; None = unlimited.
    pub bandwidth: Option<u64>,
    /// Share of each vCPU's time taken away (0-99), as QEMU's auto-converge does.
    pub throttle_pct: u32,
    pub max_downtime_ms: u64,
    /// Disks that travel: a cap on the guest's disk writes, bytes per second (None:
    /// none), so the disks' rounds shrink when its writes would outrun the link.
    pub disk_write_limit: Option<u64>,
    /// How the switchover moment is judged once the pause fits `max_downtime_ms`.
    pub switchover: Switchover,
    /// Disks that travel: rounds only, or each guest write mirrored as well.
    pub disk_mirror: DiskMirror,
}

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
        for (setting, value) in live.describe(&settings) {
            // Most migrations have no disks travelling (no cap is no news there) and
            // switch over by the VMM's own rule.
            if (setting == "disk_write_limit_mbps" && settings.disk_write_limit.is_none())
                || (setting == "switchover" && settings.switchover == Switchover::Halving)
                || (setting == "disk_mirror" && settings.disk_mirror == DiskMirror::Background)
            {
                continue;
            }
            let why = reasons
                .get(setting)
                .map_or("set by the operator (migrate)", String::as_str);
            live.record(setting, value, why);
        }
        live
    }

    pub(super) fn describe(&self, s: &Settings) -> [(&'static str, String); 7] {
        [
            ("codec", s.codec.to_string()),
            (
                "bandwidth_mbit",
                s.bandwidth
                    .map(|b| (b * 8 / 1_000_000).to_string())
                    .unwrap_or_else(|| "unlimited".into()),
            ),
            ("throttle_pct", s.throttle_pct.to_string()),
            ("max_downtime_ms", s.max_downtime_ms.to_string()),
            (
                "disk_write_limit_mbps",
                s.disk_write_limit
                    .map(|b| format!("{:.1}", b as f64 / 1e6))
                    .unwrap_or_else(|| "unlimited".into()),
            ),
            ("switchover", s.switchover.to_string()),
            ("disk_mirror", s.disk_mirror.to_string()),
        ]
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
        let before = self.describe(&self.settings);
        let after = self.describe(&new);
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

/// What a `set-params` changes: each `Some` is a new value.
#[derive(Debug, Default)]
pub struct SettingsChange {
    pub codec: Option<Codec>,
    pub bandwidth: Option<Option<u64>>,
    pub throttle_pct: Option<u32>,
    pub max_downtime_ms: Option<u64>,
    pub disk_write_limit: Option<Option<u64>>,
    pub switchover: Option<Switchover>,
    pub disk_mirror: Option<DiskMirror>,
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
    change: SettingsChange,
    reasons: &Reasons,
) -> Result<Settings, SetParamsError> {
    let SettingsChange {
        codec,
        bandwidth,
        throttle_pct,
        max_downtime_ms,
        disk_write_limit,
        switchover,
        disk_mirror,
    } = change;
    let m = &vm.machine;
    let mut live = lock(&vm.live);
    let live = live.as_mut().ok_or(SetParamsError::NotRunning)?;
    let mut s = live.settings;
    if let Some(c) = codec {
        s.codec = c;
    }
    if let Some(b) = bandwidth {
        s.bandwidth = b;
    }
    if let Some(t) = throttle_pct {
        if t > 99 {
            return Err(SetParamsError::Invalid(format!(
                "throttle_pct = {t} is outside 0..=99"
            )));
        }
        s.throttle_pct = t;
    }
    if let Some(d) = max_downtime_ms {
        if d == 0 {
            return Err(SetParamsError::Invalid(
                "max_downtime_ms must be at least 1".into(),
            ));
        }
        s.max_downtime_ms = d;
    }
    if let Some(rule) = switchover {
        s.switchover = rule;
    }
    if let Some(l) = disk_write_limit {
        s.disk_write_limit = l;
        // Only disks being copied (`--copy-storage`) have a job to hold the cap.
        m.disks.limit_writes(l);
    }
    if let Some(mirror) = disk_mirror {
        s.disk_mirror = mirror;
        m.disks.mirror_writes(mirror == DiskMirror::Active);
    }
    live.change(s, reasons, "set by the operator (set-params)");
    m.set_throttle(s.throttle_pct);
    Ok(s)
}
