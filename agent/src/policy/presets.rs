//! Static policies that reproduce what peers do by default, so the adaptive engine
//! can be measured against them on the same simulator and the same lab migrations.
//!
//! Sources:
//! * QEMU `migration/migration.c` (and `migration/options.c` in later releases):
//!   `MAX_THROTTLE (128 << 20)` — max-bandwidth 128 MiB/s;
//!   `DEFAULT_MIGRATE_SET_DOWNTIME 300` ms; `DEFAULT_MIGRATE_CPU_THROTTLE_INITIAL 20`,
//!   `..._INCREMENT 10`, `DEFAULT_MIGRATE_MAX_CPU_THROTTLE 99`, and
//!   `throttle-trigger-threshold` 50 % (qapi/migration.json): auto-converge throttles
//!   once the guest dirties more than half of what a sync interval transferred.
//! * libvirt `qemu_migration_params.c`/`qemu_domain.h`: libvirt sets QEMU's migration
//!   speed to unlimited (`QEMU_DOMAIN_MIG_BANDWIDTH_MAX`) unless told otherwise;
//!   `virsh migrate --auto-converge`, `--postcopy --postcopy-after-precopy`.
//! * KubeVirt `MigrationConfiguration` defaults: `bandwidthPerMigration` unset
//!   (unlimited), `completionTimeoutPerGiB` 150 s, `progressTimeout` 150 s,
//!   `allowPostCopy` false, `allowAutoConverge` false.
//! * Cloud Hypervisor `docs/live_migration.md` / `vm-migration`: pre-copy only, no
//!   compression, no throttling; Ferry gives it QEMU's 300 ms downtime target.

use super::{Decision, Limits, Observation, Policy, Prediction, Reason, Settings, Stage};
use crate::migration::codec::Codec;

const QEMU_MAX_BANDWIDTH_MBIT: f64 = (128u64 << 20) as f64 * 8.0 / 1e6;
const QEMU_DOWNTIME_MS: f64 = 300.0;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Fixed,
    AutoConverge,
    PostcopyAfterPrecopy,
    Kubevirt,
}

#[derive(Debug, Clone)]
pub struct Preset {
    name: &'static str,
    kind: Kind,
    settings: Settings,
    last_round: u32,
    /// KubeVirt: least remaining seen, and when.
    best_remaining: Option<(u64, f64)>,
}

pub const NAMES: &[&str] = &[
    "qemu-default",
    "libvirt-default",
    "qemu-autoconverge",
    "libvirt-postcopy-after-precopy",
    "kubevirt-default",
    "cloud-hypervisor",
];

impl Preset {
    pub fn by_name(name: &str) -> Option<Self> {
        let base = Settings {
            codec: Codec::None,
            bandwidth_mbit: None,
            throttle_pct: 0,
            max_downtime_ms: QEMU_DOWNTIME_MS,
            postcopy: false,
            disk_write_limit_mbps: None,
            abort: None,
        };
        let (name, kind, settings) = match name {
            "qemu-default" => (
                "qemu-default",
                Kind::Fixed,
                Settings {
                    bandwidth_mbit: Some(QEMU_MAX_BANDWIDTH_MBIT),
                    ..base
                },
            ),
            "libvirt-default" => ("libvirt-default", Kind::Fixed, base),
            "qemu-autoconverge" => ("qemu-autoconverge", Kind::AutoConverge, base),
            "libvirt-postcopy-after-precopy" => (
                "libvirt-postcopy-after-precopy",
                Kind::PostcopyAfterPrecopy,
                base,
            ),
            "kubevirt-default" => ("kubevirt-default", Kind::Kubevirt, base),
            "cloud-hypervisor" => ("cloud-hypervisor", Kind::Fixed, base),
            _ => return None,
        };
        Some(Self {
            name,
            kind,
            settings,
            last_round: 0,
            best_remaining: None,
        })
    }

    pub fn all() -> Vec<Preset> {
        NAMES.iter().filter_map(|n| Self::by_name(n)).collect()
    }
}

impl Policy for Preset {
    fn name(&self) -> &str {
        self.name
    }

    /// Presets ignore the operator's limits except the bandwidth cap they do not set
    /// themselves: they are what the peer would do.
    fn decide(&mut self, obs: &Observation, limits: &Limits) -> Decision {
        let mut why = "the peer's default".to_string();
        if self.settings.bandwidth_mbit.is_none() {
            self.settings.bandwidth_mbit = limits.bandwidth_mbit;
        }
        let link = obs.link_bytes_per_sec.unwrap_or(0.0);
        match self.kind {
            Kind::Fixed => {}
            Kind::AutoConverge => {
                // At each sync: throttle (more) while the guest dirties over half of
                // what the stream moves.
                if obs.round > self.last_round && obs.dirty_pages_per_sec * super::PAGE > 0.5 * link
                {
                    self.settings.throttle_pct = match self.settings.throttle_pct {
                        0 => 20,
                        p => (p + 10).min(99),
                    };
                    why = format!(
                        "auto-converge: the guest dirties more than half of {:.1} MB/s",
                        link / 1e6
                    );
                }
            }
            Kind::PostcopyAfterPrecopy => {
                if obs.stage == Stage::Rounds {
                    self.settings.postcopy = true;
                    why = "post-copy after the first full pass".into();
                }
            }
            Kind::Kubevirt => {
                let gib = obs.memory_pages as f64 * super::PAGE / (1u64 << 30) as f64;
                let deadline_ms = 150_000.0 * gib.max(1.0);
                match self.best_remaining {
                    Some((best, _)) if obs.remaining_pages < best => {
                        self.best_remaining = Some((obs.remaining_pages, obs.t_ms))
                    }
                    None => self.best_remaining = Some((obs.remaining_pages, obs.t_ms)),
                    _ => {}
                }
                if obs.t_ms > deadline_ms {
                    self.settings.abort = Some(format!(
                        "completionTimeoutPerGiB: not done in {:.0} s",
                        deadline_ms / 1e3
                    ));
                } else if let Some((_, at)) = self.best_remaining
                    && obs.t_ms - at > 150_000.0
                {
                    self.settings.abort = Some("progressTimeout: no progress in 150 s".to_string());
                }
            }
        }
        self.last_round = obs.round;
        Decision {
            settings: self.settings.clone(),
            prediction: Prediction {
                total_ms: f64::NAN,
                downtime_ms: f64::NAN,
                converges: true,
            },
            reasons: vec![Reason {
                setting: "preset",
                value: self.name.to_string(),
                why,
            }],
        }
    }
}
