//! A deterministic simulator of pre-copy and post-copy: the engine and the presets
//! run against it in unit tests and in fast sweeps, with the same observations a live
//! migration gives them every 250 ms.

use serde::Serialize;

use super::model::PauseBasis;
use super::model::{SWITCH_MS, dirtied, postcopy_pause_ms, throughput};
use super::{
    Codec, CodecPerf, Decision, Limits, Mechanics, Observation, PAGE, Policy, Settings, Stage,
};

const STEP_MS: f64 = 10.0;
const TICK_MS: f64 = 250.0;
/// The simulation gives up here whatever the limits say.
const HORIZON_MS: f64 = 3_600_000.0;

/// A guest and a link.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub memory_pages: u64,
    /// Share of memory that is zero (free on the wire).
    pub zero_fraction: f64,
    /// The region the guest dirties within, in pages.
    pub set_pages: u64,
    /// The guest's dirty rate (pages/s) from each time (ms) on.
    pub dirty: Vec<(f64, f64)>,
    /// What the guest could write unthrottled, as a multiple of what it does: 1.0,
    /// a throttle slows it in proportion; 2.0, it keeps its rate until the throttle
    /// takes half its time.
    pub headroom: f64,
    pub link_bytes_per_sec: f64,
    /// The codecs' true performance on this guest's pages.
    pub codecs: Vec<CodecPerf>,
    /// The backend simulated.
    pub mechanics: Mechanics,
}

impl Scenario {
    fn rate_at(&self, t_ms: f64) -> f64 {
        self.dirty
            .iter()
            .rev()
            .find(|(from, _)| *from <= t_ms)
            .map_or(0.0, |&(_, r)| r)
    }

    fn perf(&self, codec: Codec) -> CodecPerf {
        self.codecs
            .iter()
            .copied()
            .find(|c| c.codec == codec)
            .unwrap_or(CodecPerf {
                codec: Codec::None,
                ratio: 1.0,
                compress_bytes_per_sec: f64::INFINITY,
            })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub policy: String,
    /// The guest ended up running on the destination.
    pub completed: bool,
    /// Completed, with the downtime and total time inside the limits, and post-copy
    /// only where the limits allow it.
    pub within_limits: bool,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub bytes_on_wire: f64,
    /// CPU spent compressing.
    pub cpu_ms: f64,
    pub max_throttle_pct: u32,
    pub postcopy: bool,
    /// The first prediction, made before anything was sent.
    pub predicted_total_ms: f64,
    pub predicted_downtime_ms: f64,
    pub error: Option<String>,
    pub changes: Vec<Decision>,
}

/// Runs one migration of `s` under `policy` and `limits`.
pub fn run(s: &Scenario, policy: &mut dyn Policy, limits: &Limits) -> Outcome {
    let memory = s.memory_pages as f64 * PAGE;
    let set = (s.set_pages.min(s.memory_pages) as f64 * PAGE).max(PAGE);
    let mut out = Outcome {
        policy: policy.name().to_string(),
        completed: false,
        within_limits: false,
        total_ms: f64::NAN,
        downtime_ms: f64::NAN,
        bytes_on_wire: 0.0,
        cpu_ms: 0.0,
        max_throttle_pct: 0,
        postcopy: false,
        predicted_total_ms: f64::NAN,
        predicted_downtime_ms: f64::NAN,
        error: None,
        changes: Vec::new(),
    };
    let mut t = 0.0f64;
    let mut stage = Stage::Starting;
    let mut round = 0u32;
    // Page bytes left in this pass (zero pages cost nothing) and the distinct bytes
    // dirtied since it began.
    let mut left = memory * (1.0 - s.zero_fraction);
    let mut dirty = 0.0f64;
    let mut settings = Settings::default();
    let mut next_tick = 0.0;
    let mut pass_start = 0.0;
    // The size of the pass being sent (the first: all of memory).
    let mut round_size = memory;
    loop {
        let cap = settings
            .bandwidth_bytes_per_sec
            .map_or(f64::INFINITY, |b| b as f64);
        let wire = s.link_bytes_per_sec.min(cap);
        let budget = limits.cpu_budget_cores;
        let perf = s.perf(settings.codec);
        let pages_per_sec = throughput(wire, &perf, budget);
        let wants = s.rate_at(t) * PAGE;
        let keep = 1.0 - f64::from(settings.throttle_pct) / 100.0;
        let rate = wants.min(wants * s.headroom.max(1.0) * keep);
        if t >= next_tick {
            let first_zero = if matches!(stage, Stage::Starting | Stage::FirstPass) {
                s.zero_fraction.min(0.99)
            } else {
                0.0
            };
            let obs = Observation {
                t_ms: t,
                stage,
                // The first pass counts zero pages too (they are scanned, not sent).
                remaining_pages: (left.max(0.0) / PAGE / (1.0 - first_zero)) as u64,
                pass_elapsed_ms: t - pass_start,
                round,
                working_set_pages: Some((dirtied(rate, set, 1.0) / PAGE) as u64),
                // What a migration measures: the stream's achieved rate.
                link_bytes_per_sec: Some(wire),
                zero_fraction: first_zero,
                codecs: s.codecs.clone(),
                ..Observation::before_start(s.memory_pages, rate / PAGE, s.mechanics)
            };
            let d = policy.decide(&obs, limits);
            if stage == Stage::Starting {
                out.predicted_total_ms = d.prediction.total_ms;
                out.predicted_downtime_ms = d.prediction.downtime_ms;
                stage = Stage::FirstPass;
            }
            let (_, mut named) = settings.changes_to(&d.settings);
            if d.postcopy {
                named.push(("postcopy", "true".into()));
            }
            for (setting, value) in named {
                let why = d
                    .reasons
                    .iter()
                    .find(|r| r.setting == setting)
                    .map_or(String::new(), |r| r.reason.clone());
                out.changes.push(Decision {
                    t_ms: t,
                    setting: setting.into(),
                    value,
                    reason: why,
                });
            }
            settings = d.settings;
            out.max_throttle_pct = out.max_throttle_pct.max(settings.throttle_pct);
            if let Some(why) = &d.abort {
                out.error = Some(format!("aborted: {why}"));
                out.total_ms = t;
                return out;
            }
            if d.postcopy {
                // The guest moves now; what is left follows at the stream's pace.
                let down = postcopy_pause_ms(pages_per_sec, &PauseBasis::prior(s.mechanics));
                let rest = left + dirty;
                out.postcopy = true;
                out.completed = true;
                out.downtime_ms = down;
                out.total_ms = t + down + rest / pages_per_sec.max(1.0) * 1e3;
                out.bytes_on_wire += rest / perf.ratio.max(1.0);
                break;
            }
            next_tick += TICK_MS;
            continue;
        }
        // One step of sending and dirtying.
        let dt = STEP_MS / 1e3;
        let moved = (pages_per_sec * dt).min(left.max(0.0));
        left -= pages_per_sec * dt;
        out.bytes_on_wire += moved / perf.ratio.max(1.0);
        if perf.codec != Codec::None {
            out.cpu_ms += moved / perf.compress_bytes_per_sec * 1e3;
        }
        dirty += rate * dt * (1.0 - dirty / set).max(0.0);
        t += STEP_MS;
        if left <= 0.0 {
            round += 1;
            stage = Stage::Rounds;
            // The VM pauses once the rest fits; the cap is lifted while it is paused.
            let paused = throughput(s.link_bytes_per_sec, &perf, budget);
            let down = dirty / paused * 1e3 + SWITCH_MS;
            // The VMM's rule: one more round while the dirty set still halves.
            let halving =
                dirty * 2.0 <= round_size && settings.switchover == super::Switchover::Halving;
            let limit = settings.max_downtime_ms as f64;
            if down <= limit + SWITCH_MS && (!halving || down - SWITCH_MS <= limit / 10.0) {
                out.completed = true;
                out.downtime_ms = down;
                out.total_ms = t + down;
                out.bytes_on_wire += dirty / perf.ratio.max(1.0);
                break;
            }
            left = dirty;
            round_size = dirty;
            dirty = 0.0;
            pass_start = t;
        }
        let deadline = limits.max_total_secs.map_or(HORIZON_MS, |s| s * 1e3);
        if t > deadline.min(HORIZON_MS) {
            out.error = Some(format!(
                "did not converge within {:.0} s",
                deadline.min(HORIZON_MS) / 1e3
            ));
            out.total_ms = t;
            return out;
        }
    }
    out.within_limits = out.completed
        && (!out.postcopy || limits.allow_postcopy)
        && out.downtime_ms <= limits.max_downtime_ms + SWITCH_MS
        && limits
            .max_total_secs
            .is_none_or(|s| out.total_ms <= s * 1e3);
    out
}

#[cfg(test)]
mod tests {
    use super::super::engine::{Adaptive, HOLD_MS};
    use super::super::presets::Preset;
    use super::super::{Pins, Policy};
    use super::*;

    const GIB_PAGES: u64 = 1 << 18;

    fn codecs(text: bool) -> Vec<CodecPerf> {
        // This host's measured speeds on one core (MACHINE-NOTES): lz4 ~0.35 GB/s and
        // zstd-1 ~0.2 GB/s on text; random pages do not compress.
        let (lz4, zstd) = if text { (1.8, 2.7) } else { (1.0, 1.0) };
        vec![
            CodecPerf {
                codec: Codec::Lz4,
                ratio: lz4,
                compress_bytes_per_sec: 350e6,
            },
            CodecPerf {
                codec: Codec::Zstd(1),
                ratio: zstd,
                compress_bytes_per_sec: 200e6,
            },
        ]
    }

    fn scenario(name: &str, rate: f64, set_pages: u64, link: f64, text: bool) -> Scenario {
        Scenario {
            name: name.into(),
            memory_pages: GIB_PAGES,
            zero_fraction: 0.3,
            set_pages,
            dirty: vec![(0.0, rate)],
            headroom: 1.0,
            link_bytes_per_sec: link,
            codecs: codecs(text),
            mechanics: super::super::fixture::mechanics(),
        }
    }

    fn adaptive(limits: &Limits) -> Adaptive {
        Adaptive::new(Pins::default(), limits)
    }

    const GBIT: f64 = 125e6;
    const MBIT200: f64 = 25e6;

    #[test]
    fn no_compression_on_a_fast_link_with_a_slow_cpu() {
        let s = scenario("fast", 2_000.0, GIB_PAGES, 10.0 * GBIT, true);
        let limits = Limits::default();
        let o = run(&s, &mut adaptive(&limits), &limits);
        assert!(o.within_limits, "{o:?}");
        assert!(o.changes.iter().all(|c| c.setting != "codec"), "{o:?}");
        assert_eq!(o.cpu_ms, 0.0);
    }

    #[test]
    fn zstd_on_a_slow_link_with_compressible_pages() {
        let s = scenario("slow", 1_000.0, GIB_PAGES, MBIT200, true);
        let limits = Limits::default();
        let o = run(&s, &mut adaptive(&limits), &limits);
        assert!(o.within_limits, "{o:?}");
        let codec = o
            .changes
            .iter()
            .find(|c| c.setting == "codec")
            .expect("a codec");
        assert_eq!(codec.value, "zstd:1", "{o:?}");
        assert!(codec.reason.contains("bottleneck"), "{}", codec.reason);
        // The same link with random pages: nothing to gain.
        let s = scenario("slow-random", 1_000.0, GIB_PAGES, MBIT200, false);
        let o = run(&s, &mut adaptive(&limits), &limits);
        assert!(o.changes.iter().all(|c| c.setting != "codec"), "{o:?}");
    }

    #[test]
    fn throttles_when_the_guest_outruns_the_link_and_postcopy_is_not_allowed() {
        // 40k pages/s = 164 MB/s of random pages against 1 Gbit/s.
        let s = scenario("hot", 40_000.0, GIB_PAGES, GBIT, false);
        let limits = Limits {
            max_downtime_ms: 300.0,
            ..Limits::default()
        };
        let o = run(&s, &mut adaptive(&limits), &limits);
        assert!(o.within_limits, "{o:?}");
        assert!(o.max_throttle_pct > 0 && !o.postcopy, "{o:?}");
        let t = o
            .changes
            .iter()
            .find(|c| c.setting == "throttle_pct")
            .unwrap();
        assert!(
            t.reason.contains("dirties") && t.reason.contains("predicted"),
            "{}",
            t.reason
        );
        // Unthrottled, the same guest never converges.
        let mut none = Preset::by_name("libvirt-default").unwrap();
        let limits = Limits {
            max_total_secs: Some(120.0),
            ..limits
        };
        assert!(!run(&s, &mut none, &limits).within_limits);
    }

    #[test]
    fn learns_that_a_guest_with_headroom_shrugs_off_a_light_throttle() {
        // Paced with 2.5x headroom: a throttle under 60% does not slow it at all.
        let mut s = scenario("paced", 40_000.0, GIB_PAGES, GBIT, false);
        s.headroom = 2.5;
        let limits = Limits {
            max_downtime_ms: 300.0,
            max_total_secs: Some(120.0),
            ..Limits::default()
        };
        let o = run(&s, &mut adaptive(&limits), &limits);
        assert!(o.within_limits, "{o:?}");
        // Proportional slowing would have stopped near 40%; it went on once the rounds
        // showed the guest unmoved.
        let steps: Vec<u32> = o
            .changes
            .iter()
            .filter(|c| c.setting == "throttle_pct")
            .map(|c| c.value.parse().unwrap())
            .collect();
        assert!(steps.len() >= 2 && steps[0] <= 50, "{steps:?}");
        assert!(o.max_throttle_pct >= 70, "{o:?}");
    }

    #[test]
    fn postcopy_when_allowed_and_throttling_would_break_the_limits() {
        let s = scenario("hot", 40_000.0, GIB_PAGES, GBIT, false);
        let limits = Limits {
            max_downtime_ms: 50.0,
            max_throttle_pct: 30,
            allow_postcopy: true,
            ..Limits::default()
        };
        let o = run(&s, &mut adaptive(&limits), &limits);
        assert!(o.within_limits && o.postcopy, "{o:?}");
        assert!(o.max_throttle_pct <= 30, "{o:?}");
        let p = o.changes.iter().find(|c| c.setting == "postcopy").unwrap();
        assert_eq!(p.value, "true");
        // Not allowed: it throttles as far as it may and says it cannot make it.
        let limits = Limits {
            allow_postcopy: false,
            max_total_secs: Some(120.0),
            ..limits
        };
        let o = run(&s, &mut adaptive(&limits), &limits);
        assert!(!o.postcopy && o.max_throttle_pct == 30, "{o:?}");
    }

    fn grid() -> Vec<(Scenario, Limits)> {
        let lim = |down: f64, total: f64, post: bool| Limits {
            max_downtime_ms: down,
            max_total_secs: Some(total),
            allow_postcopy: post,
            ..Limits::default()
        };
        vec![
            (
                scenario("idle", 0.0, GIB_PAGES, GBIT, true),
                lim(50.0, 60.0, false),
            ),
            (
                scenario("hotcold", 20_000.0, GIB_PAGES / 16, GBIT, true),
                lim(50.0, 60.0, false),
            ),
            (
                scenario("write-heavy", 60_000.0, GIB_PAGES, GBIT, false),
                lim(100.0, 120.0, true),
            ),
            (
                scenario("random-slow", 3_000.0, GIB_PAGES, MBIT200, false),
                lim(300.0, 180.0, false),
            ),
            (
                scenario("text-slow", 3_000.0, GIB_PAGES, MBIT200, true),
                lim(300.0, 40.0, false),
            ),
            (
                scenario("fast-link", 30_000.0, GIB_PAGES / 4, 8.0 * GBIT, true),
                lim(20.0, 30.0, false),
            ),
        ]
    }

    #[test]
    fn every_limit_is_respected_and_no_static_preset_completes_the_grid() {
        let mut preset_ok = vec![true; super::super::presets::NAMES.len()];
        for (s, limits) in grid() {
            let o = run(&s, &mut adaptive(&limits), &limits);
            assert!(o.within_limits, "{}: {o:?}", s.name);
            assert!(o.max_throttle_pct <= limits.max_throttle_pct);
            assert!(o.postcopy <= limits.allow_postcopy);
            for (i, mut p) in Preset::all().into_iter().enumerate() {
                preset_ok[i] &= run(&s, &mut p, &limits).within_limits;
            }
        }
        assert!(
            preset_ok.iter().all(|ok| !ok),
            "a preset completed it all: {preset_ok:?}"
        );
    }

    #[test]
    fn predictions_before_the_start_match_the_simulation() {
        for (s, limits) in grid() {
            let o = run(&s, &mut adaptive(&limits), &limits);
            if o.postcopy || s.dirty[0].1 == 0.0 {
                continue;
            }
            let err = (o.predicted_total_ms - o.total_ms).abs() / o.total_ms;
            assert!(
                err <= 0.25,
                "{}: predicted {} vs {}",
                s.name,
                o.predicted_total_ms,
                o.total_ms
            );
        }
    }

    #[test]
    fn no_setting_flips_faster_than_once_a_second() {
        // A guest whose rate swings every 300 ms across what the link can take.
        let mut s = scenario("swing", 0.0, GIB_PAGES, GBIT, true);
        s.dirty = (0..400)
            .map(|i| {
                (
                    f64::from(i) * 300.0,
                    if i % 2 == 0 { 45_000.0 } else { 2_000.0 },
                )
            })
            .collect();
        let limits = Limits {
            max_total_secs: Some(120.0),
            ..Limits::default()
        };
        let o = run(&s, &mut adaptive(&limits), &limits);
        for setting in ["codec", "throttle_pct", "postcopy"] {
            let times: Vec<f64> = o
                .changes
                .iter()
                .filter(|c| c.setting == setting)
                .map(|c| c.t_ms)
                .collect();
            for w in times.windows(2) {
                assert!(w[1] - w[0] >= HOLD_MS, "{setting} flipped at {times:?}");
            }
        }
    }

    #[test]
    fn a_pinned_codec_is_kept_and_said_so() {
        let s = scenario("slow", 1_000.0, GIB_PAGES, MBIT200, true);
        let limits = Limits::default();
        let mut a = Adaptive::new(
            Pins {
                codec: Some(Codec::Lz4),
                ..Pins::default()
            },
            &limits,
        );
        let o = run(&s, &mut a, &limits);
        let set: Vec<&Decision> = o.changes.iter().filter(|c| c.setting == "codec").collect();
        assert!(set.len() == 1 && set[0].value == "lz4", "{set:?}");
        let obs = Observation {
            t_ms: 0.0,
            stage: Stage::FirstPass,
            memory_pages: GIB_PAGES,
            remaining_pages: GIB_PAGES,
            pass_elapsed_ms: 0.0,
            round: 0,
            dirty_pages_per_sec: 1_000.0,
            working_set_pages: None,
            link_bytes_per_sec: Some(MBIT200),
            peer_limited: false,
            zero_fraction: 0.0,
            round_overhead_ms: 0.0,
            codecs: codecs(true),
            disk_dirty_bytes_per_sec: None,
            disk_pending_bytes: 0.0,
            disk_bytes: 0.0,
            disk_compression_ratio: None,
            disk_written_compression_ratio: None,
            disk_copy_bytes_per_sec: None,
            disk_write_bytes_per_sec: None,
            pause_basis: PauseBasis::prior(super::super::fixture::mechanics()),
        };
        let d = a.decide(&obs, &limits);
        assert_eq!(d.settings.codec, Codec::Lz4);
        assert!(
            d.reasons
                .iter()
                .any(|r| r.setting == "codec" && r.reason.contains("pinned"))
        );
    }
}
