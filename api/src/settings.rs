//! How a migration moves: its mode, its switchover rule, how travelling disks keep up,
//! and the settings it runs with.

use serde::{Deserialize, Serialize};

use crate::Codec;

/// A value that does not name one of a setting's choices; the message lists them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// How memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Rounds of dirty pages until the rest fits the downtime limit.
    #[default]
    Precopy,
    /// The guest moves at once; its pages follow, on demand and in the background.
    Postcopy,
    /// Pre-copy, switching to post-copy when told (`start-postcopy`).
    Hybrid,
}
named!(
    Mode,
    "migration mode",
    [
        Precopy = "precopy",
        Postcopy = "postcopy",
        Hybrid = "hybrid"
    ]
);

/// When pre-copy switches over, once the estimated pause fits the downtime target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Switchover {
    /// Ferry's: one more round while the dirty set still halves and the pause is not
    /// yet tiny (a short round then cuts the downtime the guest sees).
    #[default]
    Halving,
    /// QEMU's, libvirt's, KubeVirt's and Cloud Hypervisor's: as soon as it fits.
    WhenFits,
}
named!(
    Switchover,
    "switchover rule",
    [Halving = "halving", WhenFits = "when-fits"]
);

/// How disks that travel with the memory keep up with the guest's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DiskMirror {
    /// With each pre-copy round, the blocks written since the last one.
    #[default]
    Background,
    /// Each guest write also goes to the destination before it completes (libvirt's
    /// `--copy-storage-synchronous-writes`, QEMU's write-blocking mirror): the disks
    /// converge because the link paces the guest's writes.
    Active,
}
named!(
    DiskMirror,
    "disk mirror",
    [Background = "background", Active = "active"]
);

/// How a storage migration copies a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StorageMode {
    /// Background first, active once a round shows the guest writing distinct blocks
    /// too fast for background rounds to converge.
    #[default]
    Auto,
    Background,
    Active,
}
named!(
    StorageMode,
    "storage migration mode",
    [Auto = "auto", Background = "background", Active = "active"]
);

/// What a live migration runs with, in one set of units (bytes per second, whole
/// milliseconds): a policy chooses it, the driver sends it, the VMM holds it and
/// `set-params` answers with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub codec: Codec,
    /// A cap on the memory stream, bytes per second (None: none).
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Share of each vCPU's time taken away (0–99), as QEMU's auto-converge does.
    pub throttle_pct: u32,
    /// Pre-copy switches over once the estimated pause fits this.
    pub max_downtime_ms: u64,
    /// Disks that travel: a cap on the guest's disk writes, bytes per second (None:
    /// none), so that the disks' rounds shrink when its writes would outrun the link.
    pub disk_write_limit_bytes_per_sec: Option<u64>,
    /// How the switchover moment is judged once the pause fits `max_downtime_ms`.
    pub switchover: Switchover,
    /// Disks that travel: rounds only, or each guest write mirrored as well.
    pub disk_mirror: DiskMirror,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            codec: Codec::None,
            bandwidth_bytes_per_sec: None,
            throttle_pct: 0,
            max_downtime_ms: 300,
            disk_write_limit_bytes_per_sec: None,
            switchover: Switchover::Halving,
            disk_mirror: DiskMirror::Background,
        }
    }
}

impl Settings {
    /// The settings a migration starts with, as its first decisions: (setting,
    /// value, why), the why from `reasons` (a policy's) or else the operator's. Those
    /// at a default that is no news are left out: no disk cap (most migrations have no
    /// disks travelling), the VMM's own switchover rule, a background disk mirror.
    pub fn starting_decisions(
        &self,
        reasons: &crate::Reasons,
    ) -> Vec<(&'static str, String, String)> {
        self.named()
            .into_iter()
            .filter(|(setting, _)| match *setting {
                "disk_write_limit_bytes_per_sec" => self.disk_write_limit_bytes_per_sec.is_some(),
                "switchover" => self.switchover != Switchover::Halving,
                "disk_mirror" => self.disk_mirror != DiskMirror::Background,
                _ => true,
            })
            .map(|(setting, value)| {
                let why = reasons
                    .get(setting)
                    .map_or("set by the operator (migrate)", String::as_str);
                (setting, value, why.to_owned())
            })
            .collect()
    }

    /// Every setting by name, with its value as a decision records it.
    pub fn named(&self) -> [(&'static str, String); 7] {
        let rate = |v: Option<u64>| v.map_or_else(|| "unlimited".into(), |b| b.to_string());
        [
            ("codec", self.codec.to_string()),
            (
                "bandwidth_bytes_per_sec",
                rate(self.bandwidth_bytes_per_sec),
            ),
            ("throttle_pct", self.throttle_pct.to_string()),
            ("max_downtime_ms", self.max_downtime_ms.to_string()),
            (
                "disk_write_limit_bytes_per_sec",
                rate(self.disk_write_limit_bytes_per_sec),
            ),
            ("switchover", self.switchover.to_string()),
            ("disk_mirror", self.disk_mirror.to_string()),
        ]
    }

    /// These settings with `change` applied (unchecked: the VMM bounds each value).
    pub fn with(mut self, change: &SettingsChange) -> Self {
        let none_if_zero = |v: u64| (v > 0).then_some(v);
        if let Some(c) = change.codec {
            self.codec = c;
        }
        if let Some(b) = change.bandwidth_bytes_per_sec {
            self.bandwidth_bytes_per_sec = none_if_zero(b);
        }
        if let Some(t) = change.throttle_pct {
            self.throttle_pct = t;
        }
        if let Some(d) = change.max_downtime_ms {
            self.max_downtime_ms = d;
        }
        if let Some(l) = change.disk_write_limit_bytes_per_sec {
            self.disk_write_limit_bytes_per_sec = none_if_zero(l);
        }
        if let Some(rule) = change.switchover {
            self.switchover = rule;
        }
        if let Some(m) = change.disk_mirror {
            self.disk_mirror = m;
        }
        self
    }

    /// What changes these settings into `new`, each setting with its name and its
    /// value as a decision records it; nothing if they are the same.
    pub fn changes_to(&self, new: &Settings) -> (SettingsChange, Vec<(&'static str, String)>) {
        let mut change = SettingsChange::default();
        let mut named = Vec::new();
        let rate = |v: Option<u64>| v.map_or_else(|| "unlimited".into(), |b| b.to_string());
        if new.codec != self.codec {
            change.codec = Some(new.codec);
            named.push(("codec", new.codec.to_string()));
        }
        if new.bandwidth_bytes_per_sec != self.bandwidth_bytes_per_sec {
            change.bandwidth_bytes_per_sec = Some(new.bandwidth_bytes_per_sec.unwrap_or(0));
            named.push(("bandwidth_bytes_per_sec", rate(new.bandwidth_bytes_per_sec)));
        }
        if new.throttle_pct != self.throttle_pct {
            change.throttle_pct = Some(new.throttle_pct);
            named.push(("throttle_pct", new.throttle_pct.to_string()));
        }
        if new.max_downtime_ms != self.max_downtime_ms {
            change.max_downtime_ms = Some(new.max_downtime_ms);
            named.push(("max_downtime_ms", new.max_downtime_ms.to_string()));
        }
        if new.disk_write_limit_bytes_per_sec != self.disk_write_limit_bytes_per_sec {
            change.disk_write_limit_bytes_per_sec =
                Some(new.disk_write_limit_bytes_per_sec.unwrap_or(0));
            named.push((
                "disk_write_limit_bytes_per_sec",
                rate(new.disk_write_limit_bytes_per_sec),
            ));
        }
        if new.switchover != self.switchover {
            change.switchover = Some(new.switchover);
            named.push(("switchover", new.switchover.to_string()));
        }
        if new.disk_mirror != self.disk_mirror {
            change.disk_mirror = Some(new.disk_mirror);
            named.push(("disk_mirror", new.disk_mirror.to_string()));
        }
        (change, named)
    }
}

/// Migration settings as a request names them, in the units of [`Settings`]; absent
/// means "unchanged" (or the default, when starting).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SettingsChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<Codec>,
    /// 0 = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_pct: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Disks that travel; 0 = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_write_limit_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<Switchover>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mirror: Option<DiskMirror>,
}

impl SettingsChange {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_applies_and_two_settings_name_what_changes_between_them() {
        let s = Settings::default();
        let change = SettingsChange {
            codec: Some(Codec::Lz4),
            bandwidth_bytes_per_sec: Some(25_000_000),
            disk_write_limit_bytes_per_sec: Some(0),
            ..SettingsChange::default()
        };
        let t = s.with(&change);
        assert_eq!(t.codec, Codec::Lz4);
        assert_eq!(t.bandwidth_bytes_per_sec, Some(25_000_000));
        assert_eq!(t.disk_write_limit_bytes_per_sec, None);
        let (back, named) = s.changes_to(&t);
        assert_eq!(s.with(&back), t);
        assert_eq!(
            named,
            vec![
                ("codec", "lz4".to_string()),
                ("bandwidth_bytes_per_sec", "25000000".to_string())
            ]
        );
        assert!(t.changes_to(&t).0.is_empty());
        let lifted = t.with(&SettingsChange {
            bandwidth_bytes_per_sec: Some(0),
            ..SettingsChange::default()
        });
        assert_eq!(lifted.bandwidth_bytes_per_sec, None);
    }

    #[test]
    fn text_and_serde_agree_for_every_choice() {
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(*m));
            let json = serde_json::to_string(m).unwrap();
            assert_eq!(json, format!("\"{m}\""));
        }
        for s in Switchover::ALL {
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
        }
        for d in DiskMirror::ALL {
            assert_eq!(serde_json::to_string(d).unwrap(), format!("\"{d}\""));
        }
        let e = serde_json::from_str::<StorageMode>("\"fast\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("unknown storage migration mode \"fast\" (one of: auto"),
            "{e}"
        );
        let e = "sideways".parse::<Mode>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown migration mode \"sideways\" (one of: precopy, postcopy, hybrid)"
        );
    }
}
