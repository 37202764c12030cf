//! Policies that reproduce what peers do, configured as a careful operator configures
//! them, so the adaptive engine is measured against them on the same simulator and the
//! same lab migrations.
//!
//! Every preset takes the operator's downtime limit wherever its peer has that knob,
//! and the migration gives up at the operator's `max_total_secs` (the VMM's deadline)
//! as a management layer would. Each switches over the way its peer does: as soon as
//! the estimated pause fits the limit ([`Switchover::WhenFits`]), without the extra
//! round Ferry's own VMM makes while the dirty set still halves. Where a peer has no
//! knob the operator could set, its default stays, and the preset says so.
//!
//! Sources, one per preset (release and file):
//! * `qemu-default`: QEMU 7.2–9.2, `migration/options.c` (`migration.c` before 8.0):
//!   `max-bandwidth` defaults to `MAX_THROTTLE` (128 MiB/s); `downtime-limit` from
//!   `migrate-set-parameters`; `migration_completion` once `pending_size` fits
//!   `threshold_size` (bandwidth × downtime limit) in `migration_iteration_run`.
//! * `qemu-autoconverge`: the same, with `auto-converge` on: `migration/ram.c`,
//!   `migration_bitmap_sync` checks at most once a second
//!   (`end_time > time_last_bitmap_sync + 1000`) whether the bytes dirtied in the
//!   period exceed `throttle-trigger-threshold` (50 %) of the bytes transferred;
//!   `migration_trigger_throttle` throttles only when that held in two periods
//!   (`++dirty_rate_high_cnt >= 2`, then reset to 0), starting at
//!   `cpu-throttle-initial` 20 % and adding `cpu-throttle-increment` 10 % up to
//!   `max-cpu-throttle` 99 % (`mig_throttle_guest_down`).
//! * `libvirt-default`: libvirt 9.x, `src/qemu/qemu_migration_params.c`: libvirt sets
//!   QEMU's speed to unlimited (`QEMU_DOMAIN_MIG_BANDWIDTH_MAX`) unless the operator
//!   gives `--bandwidth`; `virsh migrate-setmaxdowntime` sets the downtime limit.
//! * `libvirt-postcopy-after-precopy`: the same with `virsh migrate --postcopy
//!   --postcopy-after-precopy`: post-copy starts once the first pre-copy pass is over
//!   (`qemuMigrationSrcWaitForCompletion` / `VIR_MIGRATE_POSTCOPY_AFTER_PRECOPY`).
//! * `libvirt-copy-storage-sync`: libvirt 8.0+ `virsh migrate --copy-storage-all
//!   --copy-storage-synchronous-writes` (`VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES`):
//!   `src/qemu/qemu_migration.c`, `qemuMigrationSrcNBDStorageCopyOne` starts each
//!   disk's `blockdev-mirror` with `copy-mode=write-blocking` (QEMU `block/mirror.c`,
//!   `MIRROR_COPY_MODE_WRITE_BLOCKING`): once the mirror runs, a guest write completes
//!   only when the destination has it too, so the disk copy converges by pacing the
//!   guest's writes to the link. Otherwise as `libvirt-default`. Without disks that
//!   travel it is `libvirt-default`.
//! * `kubevirt-default`: KubeVirt 1.8, `pkg/virt-launcher/virtwrap/live-migration-source.go`
//!   and `MigrationConfiguration` defaults: `bandwidthPerMigration` unset (unlimited),
//!   `completionTimeoutPerGiB` 150 s, `progressTimeout` 150 s, `allowPostCopy` and
//!   `allowAutoConverge` false; `maxDowntimeMs` (VEP 252) set to the operator's limit.
//! * `kubevirt-dynamic-downtime`: KubeVirt 1.9 alpha (PR #17480, merged 2026-04;
//!   VEP 291; `AdvancedLiveMigration` feature gate, `spec.experimental.downtimeTuning`
//!   of a MigrationPolicy): `kubevirt-default`, with the downtime target starting at
//!   `initialMs` 150 and, from memory iteration `startAfterIteration` 3 on, raised by
//!   one of `steps` 7 equal steps towards the `maxDowntimeMs` ceiling each time
//!   `cooldownSeconds` 10 have passed and the iteration has advanced. The ceiling is
//!   the operator's limit; a limit at or below 150 ms leaves the ramp nowhere to go,
//!   and the preset then behaves as `kubevirt-default` does.
//! * `cloud-hypervisor`: Cloud Hypervisor with PR #7835 (merged 2026-03),
//!   `vmm/src/lib.rs`, `send-migration` with `downtime_ms` (the operator's limit),
//!   `timeout_s` and `timeout_strategy=force`: pre-copy only, no compression, no
//!   throttle, no bandwidth cap; the loop switches over once no pages remain or the
//!   estimated downtime fits, and at the timeout switches over whatever is left. The
//!   operator's `timeout_s` is a tenth short of the management layer's give-up time,
//!   so that the forced switchover can still finish inside it.

use super::{
    Choice, Decision, DiskMirror, Limits, Observation, PAGE, Policy, Prediction, Settings, Stage,
    Switchover, whole_ms,
};

/// QEMU's `MAX_THROTTLE`: 128 MiB/s.
const QEMU_MAX_BANDWIDTH_BYTES_PER_SEC: u64 = 128 << 20;
/// QEMU's auto-converge: `throttle-trigger-threshold`, `cpu-throttle-initial`,
/// `cpu-throttle-increment`, `max-cpu-throttle`.
const QEMU_THROTTLE_TRIGGER: f64 = 0.5;
const QEMU_THROTTLE_INITIAL: u32 = 20;
const QEMU_THROTTLE_INCREMENT: u32 = 10;
const QEMU_THROTTLE_MAX: u32 = 99;
/// `migration_bitmap_sync` looks at the dirty rate at most this often, ms.
const QEMU_SYNC_PERIOD_MS: f64 = 1000.0;
/// KubeVirt: `completionTimeoutPerGiB` and `progressTimeout`, ms.
const KUBEVIRT_COMPLETION_PER_GIB_MS: f64 = 150_000.0;
const KUBEVIRT_PROGRESS_TIMEOUT_MS: f64 = 150_000.0;
/// KubeVirt downtime tuning's defaults (VEP 291, PR #17480).
const KUBEVIRT_TUNING_INITIAL_MS: f64 = 150.0;
const KUBEVIRT_TUNING_STEPS: f64 = 7.0;
const KUBEVIRT_TUNING_START_ITERATION: u32 = 3;
const KUBEVIRT_TUNING_COOLDOWN_MS: f64 = 10_000.0;
/// Cloud Hypervisor's `timeout_s` as a share of the operator's give-up time.
const CLOUD_HYPERVISOR_TIMEOUT_SHARE: f64 = 0.9;
/// A downtime limit that any pause fits: what `timeout_strategy=force` amounts to.
pub const FORCE_DOWNTIME_MS: u64 = 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Fixed settings: the bandwidth cap (None: the operator's, else unlimited).
    Fixed {
        bandwidth_bytes_per_sec: Option<u64>,
    },
    AutoConverge,
    PostcopyAfterPrecopy,
    /// libvirt with its disks mirrored write-blocking.
    CopyStorageSync,
    Kubevirt {
        dynamic_downtime: bool,
    },
    CloudHypervisor,
}

/// One peer's behaviour; its state is what that peer keeps during a migration.
#[derive(Debug, Clone)]
pub struct Preset {
    name: &'static str,
    kind: Kind,
    last_round: u32,
    throttle_pct: u32,
    /// QEMU: when the current dirty-rate period began, and how many periods in a row
    /// (since the last throttle step) dirtied too fast.
    period_start_ms: f64,
    dirty_rate_high_cnt: u32,
    /// KubeVirt: least remaining seen, and when.
    best_remaining: Option<(u64, f64)>,
    /// KubeVirt downtime tuning: the target in force, when its cooldown began, and
    /// the iteration of the last step.
    tuning_target_ms: Option<f64>,
    cooldown_from_ms: Option<f64>,
    tuned_at_iteration: u32,
}

pub const NAMES: &[&str] = &[
    "qemu-default",
    "libvirt-default",
    "qemu-autoconverge",
    "libvirt-postcopy-after-precopy",
    "libvirt-copy-storage-sync",
    "kubevirt-default",
    "kubevirt-dynamic-downtime",
    "cloud-hypervisor",
];

impl Preset {
    pub fn by_name(name: &str) -> Option<Self> {
        let (name, kind) = match name {
            "qemu-default" => (
                "qemu-default",
                Kind::Fixed {
                    bandwidth_bytes_per_sec: Some(QEMU_MAX_BANDWIDTH_BYTES_PER_SEC),
                },
            ),
            "libvirt-default" => (
                "libvirt-default",
                Kind::Fixed {
                    bandwidth_bytes_per_sec: None,
                },
            ),
            "qemu-autoconverge" => ("qemu-autoconverge", Kind::AutoConverge),
            "libvirt-postcopy-after-precopy" => {
                ("libvirt-postcopy-after-precopy", Kind::PostcopyAfterPrecopy)
            }
            "libvirt-copy-storage-sync" => ("libvirt-copy-storage-sync", Kind::CopyStorageSync),
            "kubevirt-default" => (
                "kubevirt-default",
                Kind::Kubevirt {
                    dynamic_downtime: false,
                },
            ),
            "kubevirt-dynamic-downtime" => (
                "kubevirt-dynamic-downtime",
                Kind::Kubevirt {
                    dynamic_downtime: true,
                },
            ),
            "cloud-hypervisor" => ("cloud-hypervisor", Kind::CloudHypervisor),
            _ => return None,
        };
        Some(Self {
            name,
            kind,
            last_round: 0,
            throttle_pct: 0,
            period_start_ms: 0.0,
            dirty_rate_high_cnt: 0,
            best_remaining: None,
            tuning_target_ms: None,
            cooldown_from_ms: None,
            tuned_at_iteration: 0,
        })
    }

    pub fn all() -> Vec<Preset> {
        NAMES.iter().filter_map(|n| Self::by_name(n)).collect()
    }

    /// Whether this preset, under `limits` (and with disks travelling or not), is
    /// configured exactly as another one is and so must behave as it does: KubeVirt's
    /// downtime ramp with a limit at or below its starting point is
    /// `kubevirt-default`; libvirt's synchronous disk writes with no disks to copy
    /// are `libvirt-default`.
    pub fn same_as(name: &str, limits: &Limits, disks_travel: bool) -> Option<&'static str> {
        match name {
            "kubevirt-dynamic-downtime" if limits.max_downtime_ms <= KUBEVIRT_TUNING_INITIAL_MS => {
                Some("kubevirt-default")
            }
            "libvirt-copy-storage-sync" if !disks_travel => Some("libvirt-default"),
            _ => None,
        }
    }

    /// QEMU's auto-converge at a dirty-log sync: one more period judged, and a
    /// throttle step when two of them dirtied too fast.
    fn auto_converge(&mut self, obs: &Observation) -> Option<String> {
        if obs.round <= self.last_round || obs.t_ms - self.period_start_ms < QEMU_SYNC_PERIOD_MS {
            return None;
        }
        self.period_start_ms = obs.t_ms;
        let link = obs.link_bytes_per_sec.unwrap_or(0.0);
        let dirty = obs.dirty_pages_per_sec * PAGE;
        if dirty <= QEMU_THROTTLE_TRIGGER * link {
            return None;
        }
        self.dirty_rate_high_cnt += 1;
        if self.dirty_rate_high_cnt < 2 {
            return None;
        }
        self.dirty_rate_high_cnt = 0;
        self.throttle_pct = match self.throttle_pct {
            0 => QEMU_THROTTLE_INITIAL,
            p => (p + QEMU_THROTTLE_INCREMENT).min(QEMU_THROTTLE_MAX),
        };
        Some(format!(
            "auto-converge: the guest dirtied {:.1} MB/s, over half of the {:.1} MB/s \
             sent, in two periods",
            dirty / 1e6,
            link / 1e6
        ))
    }

    /// KubeVirt's downtime ramp: the target in force, and why it moved now (if it did).
    fn downtime_ramp(&mut self, obs: &Observation, ceiling: f64) -> (f64, Option<String>) {
        if ceiling <= KUBEVIRT_TUNING_INITIAL_MS {
            return (ceiling, None);
        }
        let target = *self
            .tuning_target_ms
            .get_or_insert(KUBEVIRT_TUNING_INITIAL_MS);
        // libvirt's MemIteration counts the bulk pass as the first.
        let iteration = obs.round + 1;
        if iteration < KUBEVIRT_TUNING_START_ITERATION || target >= ceiling {
            return (target, None);
        }
        let Some(from) = self.cooldown_from_ms else {
            self.cooldown_from_ms = Some(obs.t_ms);
            self.tuned_at_iteration = iteration;
            return (target, None);
        };
        if obs.t_ms - from < KUBEVIRT_TUNING_COOLDOWN_MS || iteration <= self.tuned_at_iteration {
            return (target, None);
        }
        let step = (ceiling - KUBEVIRT_TUNING_INITIAL_MS) / KUBEVIRT_TUNING_STEPS;
        // Seven steps of a seventh land on the ceiling, not a rounding error short of it.
        let next = if ceiling - (target + step) < 1e-6 * ceiling {
            ceiling
        } else {
            target + step
        };
        self.tuning_target_ms = Some(next);
        self.cooldown_from_ms = Some(obs.t_ms);
        self.tuned_at_iteration = iteration;
        (
            next,
            Some(format!(
                "downtime tuning: iteration {iteration}, {:.0} s since the last step: \
                 target raised to {} ms (ceiling {ceiling:.0} ms)",
                KUBEVIRT_TUNING_COOLDOWN_MS / 1e3,
                whole_ms(next)
            )),
        )
    }

    /// KubeVirt's timeouts: no completion within 150 s per GiB, or no progress in 150 s.
    fn kubevirt_timeouts(&mut self, obs: &Observation) -> Option<String> {
        let gib = obs.memory_pages as f64 * PAGE / (1u64 << 30) as f64;
        let deadline_ms = KUBEVIRT_COMPLETION_PER_GIB_MS * gib.max(1.0);
        match self.best_remaining {
            Some((best, _)) if obs.remaining_pages < best => {
                self.best_remaining = Some((obs.remaining_pages, obs.t_ms))
            }
            None => self.best_remaining = Some((obs.remaining_pages, obs.t_ms)),
            _ => {}
        }
        if obs.t_ms > deadline_ms {
            return Some(format!(
                "completionTimeoutPerGiB: not done in {:.0} s",
                deadline_ms / 1e3
            ));
        }
        match self.best_remaining {
            Some((_, at)) if obs.t_ms - at > KUBEVIRT_PROGRESS_TIMEOUT_MS => Some(format!(
                "progressTimeout: no progress in {:.0} s",
                KUBEVIRT_PROGRESS_TIMEOUT_MS / 1e3
            )),
            _ => None,
        }
    }
}

impl Policy for Preset {
    fn name(&self) -> &str {
        self.name
    }

    /// A preset takes from the operator what its peer has a knob for (the downtime
    /// limit, a bandwidth cap, the time given) and decides the rest as its peer does.
    fn decide(&mut self, obs: &Observation, limits: &Limits) -> Choice {
        let mut settings = Settings {
            max_downtime_ms: whole_ms(limits.max_downtime_ms),
            bandwidth_bytes_per_sec: limits.bandwidth_bytes_per_sec(),
            switchover: Switchover::WhenFits,
            ..Settings::default()
        };
        let (mut postcopy, mut abort) = (false, None);
        let mut reasons = vec![Decision {
            t_ms: obs.t_ms,
            setting: "preset".into(),
            value: self.name.to_string(),
            reason: format!(
                "{}: the operator's downtime limit, as the peer is configured",
                self.name
            ),
        }];
        let mut why = |setting: &'static str, value: String, why: String| {
            reasons.push(Decision {
                t_ms: obs.t_ms,
                setting: setting.into(),
                value,
                reason: why,
            })
        };
        match self.kind {
            Kind::Fixed {
                bandwidth_bytes_per_sec,
            } => {
                if settings.bandwidth_bytes_per_sec.is_none() {
                    settings.bandwidth_bytes_per_sec = bandwidth_bytes_per_sec;
                }
            }
            Kind::CopyStorageSync => {
                settings.disk_mirror = DiskMirror::Active;
                if obs.disk_dirty_bytes_per_sec.is_some() {
                    why(
                        "disk_mirror",
                        "active".into(),
                        "--copy-storage-synchronous-writes: each guest write reaches the \
                         destination before it completes"
                            .into(),
                    );
                }
            }
            Kind::AutoConverge => {
                if settings.bandwidth_bytes_per_sec.is_none() {
                    settings.bandwidth_bytes_per_sec = Some(QEMU_MAX_BANDWIDTH_BYTES_PER_SEC);
                }
                if let Some(reason) = self.auto_converge(obs) {
                    why("throttle_pct", self.throttle_pct.to_string(), reason);
                }
                settings.throttle_pct = self.throttle_pct;
            }
            Kind::PostcopyAfterPrecopy => {
                if obs.stage == Stage::Rounds {
                    postcopy = true;
                    why(
                        "postcopy",
                        "true".into(),
                        "post-copy after the first full pass".into(),
                    );
                }
            }
            Kind::Kubevirt { dynamic_downtime } => {
                if dynamic_downtime {
                    let (target, moved) = self.downtime_ramp(obs, limits.max_downtime_ms);
                    settings.max_downtime_ms = whole_ms(target);
                    if let Some(reason) = moved {
                        why("max_downtime_ms", whole_ms(target).to_string(), reason);
                    }
                }
                abort = self.kubevirt_timeouts(obs);
            }
            Kind::CloudHypervisor => {
                if let Some(total) = limits.max_total_secs
                    && obs.t_ms >= CLOUD_HYPERVISOR_TIMEOUT_SHARE * total * 1e3
                {
                    settings.max_downtime_ms = FORCE_DOWNTIME_MS;
                    why(
                        "max_downtime_ms",
                        "force".into(),
                        format!(
                            "timeout_s {:.0} passed, timeout_strategy force: switch over \
                             whatever the downtime",
                            CLOUD_HYPERVISOR_TIMEOUT_SHARE * total
                        ),
                    );
                }
            }
        }
        self.last_round = obs.round;
        Choice {
            settings,
            postcopy,
            abort,
            prediction: Prediction {
                total_ms: f64::NAN,
                downtime_ms: f64::NAN,
                converges: true,
            },
            reasons,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Stage;

    fn obs(t_ms: f64, round: u32, dirty_pages_per_sec: f64, link: f64) -> Observation {
        Observation {
            t_ms,
            stage: if round == 0 {
                Stage::FirstPass
            } else {
                Stage::Rounds
            },
            remaining_pages: 1000,
            round,
            link_bytes_per_sec: Some(link),
            ..Observation::before_start(
                1 << 17,
                dirty_pages_per_sec,
                crate::policy::fixture::mechanics(),
            )
        }
    }

    fn limits(down: f64, total: f64) -> Limits {
        Limits {
            max_downtime_ms: down,
            max_total_secs: Some(total),
            ..Limits::default()
        }
    }

    #[test]
    fn every_preset_takes_the_operators_downtime_limit_and_switches_as_its_peer() {
        for mut p in Preset::all() {
            let d = p.decide(&obs(0.0, 0, 0.0, 1e8), &limits(50.0, 60.0));
            assert_eq!(d.settings.max_downtime_ms, 50, "{}", p.name);
            assert_eq!(d.settings.switchover, Switchover::WhenFits, "{}", p.name);
        }
        // An operator's bandwidth cap is kept by every preset; QEMU's own default
        // applies only without one.
        let capped = Limits {
            bandwidth_mbit: Some(400.0),
            ..limits(300.0, 60.0)
        };
        for mut p in Preset::all() {
            let d = p.decide(&obs(0.0, 0, 0.0, 1e8), &capped);
            assert_eq!(
                d.settings.bandwidth_bytes_per_sec,
                Some(50_000_000),
                "{}",
                p.name
            );
        }
        let mut q = Preset::by_name("qemu-default").unwrap();
        let d = q.decide(&obs(0.0, 0, 0.0, 1e8), &limits(300.0, 60.0));
        // QEMU's max-bandwidth default: 128 MiB/s.
        assert_eq!(d.settings.bandwidth_bytes_per_sec, Some(134_217_728));
        let mut l = Preset::by_name("libvirt-default").unwrap();
        let d = l.decide(&obs(0.0, 0, 0.0, 1e8), &limits(300.0, 60.0));
        assert_eq!(d.settings.bandwidth_bytes_per_sec, None);
    }

    #[test]
    fn auto_converge_throttles_after_two_fast_periods_and_steps_every_other() {
        let mut p = Preset::by_name("qemu-autoconverge").unwrap();
        let lim = limits(300.0, 600.0);
        // 100 MB/s link, the guest dirtying 80 MB/s: over half, every period.
        let fast = 80e6 / PAGE;
        let mut throttles = Vec::new();
        let mut t = 0.0;
        for round in 0..12 {
            t += 1100.0;
            let d = p.decide(&obs(t, round, fast, 100e6), &lim);
            throttles.push(d.settings.throttle_pct);
        }
        // Round 0 is the bulk pass (no sync yet); syncs at rounds 1..: the first
        // period only counts, the second throttles to 20, then +10 every second one.
        assert_eq!(
            throttles,
            vec![0, 0, 20, 20, 30, 30, 40, 40, 50, 50, 60, 60],
            "{throttles:?}"
        );
        // Syncs closer than a second apart are not periods of their own.
        let mut p = Preset::by_name("qemu-autoconverge").unwrap();
        let mut last = 0;
        for round in 1..20 {
            last = p
                .decide(&obs(f64::from(round) * 300.0, round, fast, 100e6), &lim)
                .settings
                .throttle_pct;
        }
        // Syncs every 0.3 s for 5.7 s: a period each 1.2 s, four of them, two steps.
        assert_eq!(last, 30);
        // A guest under half the link is never throttled.
        let mut p = Preset::by_name("qemu-autoconverge").unwrap();
        for round in 1..10 {
            let d = p.decide(
                &obs(f64::from(round) * 1100.0, round, 40e6 / PAGE, 100e6),
                &lim,
            );
            assert_eq!(d.settings.throttle_pct, 0);
        }
    }

    #[test]
    fn kubevirt_ramps_the_downtime_target_from_150_ms_to_the_operators_limit() {
        let mut p = Preset::by_name("kubevirt-dynamic-downtime").unwrap();
        let lim = limits(1050.0, 600.0);
        let at = |p: &mut Preset, t: f64, round: u32| {
            p.decide(&obs(t, round, 0.0, 1e8), &lim)
                .settings
                .max_downtime_ms
        };
        assert_eq!(at(&mut p, 0.0, 0), 150);
        // Iteration 3 (round 2) starts the cooldown; nothing moves for 10 s.
        assert_eq!(at(&mut p, 5_000.0, 2), 150);
        assert_eq!(at(&mut p, 14_000.0, 9), 150);
        // 10 s on and the iteration advanced: one step of (1050 - 150) / 7, 128.57 ms
        // (the settings hold whole milliseconds).
        assert_eq!(at(&mut p, 15_000.0, 10), 278);
        // The same iteration 10 s later: no step (it must advance).
        assert_eq!(at(&mut p, 26_000.0, 10), 278);
        assert_eq!(at(&mut p, 26_250.0, 11), 407);
        // It stops at the ceiling.
        let mut t = 26_250.0;
        let mut round = 11;
        for _ in 0..10 {
            t += 10_000.0;
            round += 1;
            at(&mut p, t, round);
        }
        assert_eq!(at(&mut p, t + 10_000.0, round + 1), 1050);
        // A limit below the ramp's start: the limit itself, always, as kubevirt-default.
        let mut p = Preset::by_name("kubevirt-dynamic-downtime").unwrap();
        let mut q = Preset::by_name("kubevirt-default").unwrap();
        let low = limits(100.0, 600.0);
        for (t, round) in [(0.0, 0), (5_000.0, 3), (20_000.0, 9), (40_000.0, 20)] {
            let a = p.decide(&obs(t, round, 0.0, 1e8), &low).settings;
            let b = q.decide(&obs(t, round, 0.0, 1e8), &low).settings;
            assert_eq!(a, b);
            assert_eq!(a.max_downtime_ms, 100);
        }
        assert_eq!(
            Preset::same_as("kubevirt-dynamic-downtime", &low, true),
            Some("kubevirt-default")
        );
        assert_eq!(
            Preset::same_as("kubevirt-dynamic-downtime", &lim, true),
            None
        );
    }

    #[test]
    fn cloud_hypervisor_forces_the_switchover_at_its_timeout() {
        let mut p = Preset::by_name("cloud-hypervisor").unwrap();
        let lim = limits(100.0, 30.0);
        let d = p.decide(&obs(26_000.0, 5, 1e5, 1e8), &lim);
        assert_eq!(d.settings.max_downtime_ms, 100);
        assert_eq!(d.settings.throttle_pct, 0);
        assert_eq!(d.settings.bandwidth_bytes_per_sec, None);
        let d = p.decide(&obs(27_000.0, 6, 1e5, 1e8), &lim);
        assert_eq!(d.settings.max_downtime_ms, FORCE_DOWNTIME_MS);
        assert!(d.reasons.iter().any(|r| r.reason.contains("force")));
    }

    #[test]
    fn libvirt_copy_storage_sync_mirrors_every_write_and_is_libvirt_default_without_disks() {
        let lim = limits(100.0, 60.0);
        let mut sync = Preset::by_name("libvirt-copy-storage-sync").unwrap();
        let mut plain = Preset::by_name("libvirt-default").unwrap();
        let mut o = obs(1_000.0, 1, 1e4, 1e8);
        o.disk_dirty_bytes_per_sec = Some(5e7);
        let (a, b) = (sync.decide(&o, &lim), plain.decide(&o, &lim));
        assert_eq!(a.settings.disk_mirror, DiskMirror::Active);
        assert_eq!(b.settings.disk_mirror, DiskMirror::Background);
        assert!(a.reasons.iter().any(|r| r.setting == "disk_mirror"));
        // Everything else is libvirt's.
        let same = Settings {
            disk_mirror: DiskMirror::Background,
            ..a.settings
        };
        assert_eq!(same, b.settings);
        assert_eq!(
            Preset::same_as("libvirt-copy-storage-sync", &lim, false),
            Some("libvirt-default")
        );
        assert_eq!(
            Preset::same_as("libvirt-copy-storage-sync", &lim, true),
            None
        );
    }
}
