//! The control loop of `ferry migrate`: every tick it turns the VMM's progress and the
//! probes' latest sample into an [`Observation`], asks the policy, and pushes what
//! changed to the VMM (`set-params` with the reasons, `start-postcopy`, `cancel`).

use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};

use super::client::get;
use crate::control::request;
use crate::policy::{
    Codec, CodecPerf, Decision, Limits, Observation, Policy, Prediction, Settings, Stage,
};
use crate::probes::follow::Sample;

/// How long a probe sample's window is (`ferry migrate` samples every 250 ms).
pub const PROBE_WINDOW_MS: f64 = 250.0;
/// Until then the stream's rate includes what filled the socket buffers.
const PREDICT_AFTER_MS: f64 = 1000.0;
/// Bytes on the wire before the stream's rate counts as the link's.
const LINK_MEASURED_BYTES: f64 = 16.0 * 1024.0 * 1024.0;

/// A change the loop made, with the policy's reason.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub t_ms: f64,
    pub setting: &'static str,
    pub value: String,
    pub reason: String,
}

/// The policy `--policy NAME` names: `adaptive`, a peer preset, or `static` (None:
/// the flags as given, nothing adjusted).
pub fn policy(
    name: &str,
    pins: crate::policy::Pins,
    limits: &Limits,
) -> anyhow::Result<Option<Box<dyn Policy>>> {
    match name {
        "static" => Ok(None),
        "adaptive" => Ok(Some(Box::new(crate::policy::engine::Adaptive::new(
            pins, limits,
        )))),
        other => match crate::policy::presets::Preset::by_name(other) {
            Some(p) => Ok(Some(Box::new(p))),
            None => anyhow::bail!(
                "unknown policy {other:?}: use adaptive, static or a preset ({})",
                crate::policy::presets::NAMES.join(", ")
            ),
        },
    }
}

pub struct Steering {
    policy: Box<dyn Policy>,
    limits: Limits,
    memory_pages: u64,
    round: u32,
    pass_start_ms: f64,
    applied: Settings,
    /// First pass: the probes' samples so far (time, pages/s of pages new since
    /// logging began).
    first_pass: Vec<(f64, f64)>,
    /// The VMM's first-pass windows measured the guest.
    windows_seen: bool,
    /// The first pass's estimates of a round's fixed cost so far (sum, count): each
    /// is one reading of a jittery round trip.
    overhead_estimates: (f64, u32),
    /// The set the guest dirties within, in pages, once the first pass showed it.
    set_pages: Option<f64>,
    /// This round's highest probe rate from a window that began after the round's
    /// harvest (0: none yet).
    round_peak: f64,
    /// The rate last estimated, for rounds whose count says nothing new.
    rate: f64,
    /// The rate known before the migration started (the guest's, from the VMM), until
    /// the probes or the rounds measure one.
    start_rate: f64,
    /// The first prediction made with the link measured (and when), and the latest.
    first_prediction: Option<(f64, Prediction)>,
    /// What the first prediction rested on: the report shows it beside the figures.
    first_basis: Option<Observation>,
    last_prediction: Option<(f64, Prediction)>,
    last_basis: Option<Observation>,
    /// The first pass's latest link rate from a stream the destination did not hold
    /// back (the memory it sends before the disks' first copy).
    unhindered_link: Option<f64>,
    /// The destination holds the disks' first copy back and the link's own rate or
    /// the copy's is not known yet: no prediction is worth keeping.
    held_unmeasured: bool,
    pub steps: Vec<Step>,
}

/// Each codec's ratio and speed as the VMM reports them (`codec_samples`, in a
/// migration's progress or the `codec-sample` answer).
pub fn codec_perfs(samples: &Value) -> Vec<CodecPerf> {
    samples
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| {
                    Some(CodecPerf {
                        codec: c["codec"].as_str()?.parse::<Codec>().ok()?,
                        ratio: c["ratio"].as_f64()?,
                        compress_bytes_per_sec: c["compress_bytes_per_sec"].as_f64()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Share of the first pass's remaining pages that are zero: what the sample of all
/// memory expects, less the zero pages already met (memory is not uniform: a pass
/// that began in the busy part has met few); without a sample, the share so far.
fn remaining_zero_fraction(sampled: Option<f64>, memory: u64, sent: u64, zero: u64) -> f64 {
    let remaining = memory.saturating_sub(sent + zero);
    match sampled {
        Some(z) if remaining > 0 => {
            ((z * memory as f64 - zero as f64) / remaining as f64).clamp(0.0, 1.0)
        }
        _ if sent + zero > 0 => zero as f64 / (sent + zero) as f64,
        _ => 0.0,
    }
}

/// A round's fixed cost: as the rounds measured it, or, until one after the first
/// pass has (the first pass's own is lost in its length), what its parts cost in the
/// first pass: the link's round trip under load (the closing acknowledgement waits
/// for it) and a harvest of the dirty log. 0: unknown.
fn round_overhead_ms(p: &Value) -> f64 {
    let measured = get(p, "round_overhead_ms").as_f64().unwrap_or(0.0);
    if get(p, "round").as_u64().unwrap_or(0) >= 2 {
        return measured;
    }
    match get(p, "link_rtt_ms").as_f64() {
        Some(rtt) => rtt + get(p, "dirty_windows")["rearm_ms"].as_f64().unwrap_or(0.0),
        None => measured,
    }
}

impl Steering {
    pub fn new(policy: Box<dyn Policy>, limits: Limits) -> Self {
        Self {
            policy,
            limits,
            memory_pages: 0,
            round: 0,
            pass_start_ms: 0.0,
            applied: Settings::default(),
            first_pass: Vec::new(),
            windows_seen: false,
            overhead_estimates: (0.0, 0),
            set_pages: None,
            unhindered_link: None,
            held_unmeasured: false,
            round_peak: 0.0,
            rate: 0.0,
            start_rate: 0.0,
            first_prediction: None,
            first_basis: None,
            last_prediction: None,
            last_basis: None,
            steps: Vec::new(),
        }
    }

    /// The prediction to hold the migration to: the first made once the link was
    /// measured, and when it was made.
    pub fn prediction(&self) -> Option<(f64, Prediction)> {
        self.first_prediction.or(self.last_prediction)
    }

    /// The observation [`prediction`](Self::prediction) was made from (None: the
    /// migration ended before one was).
    pub fn prediction_basis(&self) -> Option<&Observation> {
        self.first_basis.as_ref().or(self.last_basis.as_ref())
    }

    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }

    /// How the VMM is to judge the switchover moment for this policy.
    pub fn switchover_rule(&self) -> crate::policy::Switchover {
        self.policy.switchover_rule()
    }

    /// The settings to start with, before anything is measured but what the
    /// operator said; the reasons go into the migrate request.
    /// `status` is the VMM's, read before the migration starts.
    pub fn initial(&mut self, status: &Value) -> Decision {
        self.memory_pages = get(status, "memory_mib").as_u64().unwrap_or(0) * 256;
        let dirty_pages_per_sec = get(status, "pages_written_per_sec").as_f64().unwrap_or(0.0);
        self.start_rate = dirty_pages_per_sec;
        let obs = Observation {
            t_ms: 0.0,
            stage: Stage::Starting,
            memory_pages: self.memory_pages,
            remaining_pages: self.memory_pages,
            pass_elapsed_ms: 0.0,
            round: 0,
            dirty_pages_per_sec,
            working_set_pages: None,
            link_bytes_per_sec: None,
            peer_limited: false,
            zero_fraction: 0.0,
            round_overhead_ms: 0.0,
            codecs: Vec::new(),
            disk_dirty_bytes_per_sec: None,
            disk_pending_bytes: 0.0,
            disk_bytes: 0.0,
            disk_compression_ratio: None,
            disk_written_compression_ratio: None,
            disk_copy_bytes_per_sec: None,
            disk_write_bytes_per_sec: None,
            pause_basis: crate::policy::model::PauseBasis::prior(crate::migration::MECHANICS),
        };
        let d = self.policy.decide(&obs, &self.limits);
        self.applied = d.settings.clone();
        d
    }

    fn observe(&mut self, p: &Value, sample: Option<&Sample>) -> Observation {
        let t_ms = get(p, "elapsed_ms").as_f64().unwrap_or(0.0);
        let round = get(p, "round").as_u64().unwrap_or(0) as u32;
        if round != self.round {
            self.round = round;
            self.pass_start_ms = t_ms;
            self.round_peak = 0.0;
        }
        let sent = get(p, "pages_sent").as_u64().unwrap_or(0);
        let zero = get(p, "zero_pages").as_u64().unwrap_or(0);
        let stage = match get(p, "phase").as_str() {
            Some("postcopy" | "postcopy-paused") => Stage::Postcopy,
            _ if round == 0 => Stage::FirstPass,
            _ => Stage::Rounds,
        };
        let remaining = if round == 0 {
            self.memory_pages.saturating_sub(sent + zero)
        } else {
            get(p, "remaining_dirty_pages").as_u64().unwrap_or(0)
        };
        // The stream's rate means little until it has carried more than the socket
        // buffers swallow at once (or run a second).
        let wire = get(p, "bytes_on_wire").as_f64().unwrap_or(0.0);
        let bw = if wire >= LINK_MEASURED_BYTES || t_ms >= PREDICT_AFTER_MS {
            get(p, "bandwidth_bytes_per_sec").as_f64().unwrap_or(0.0)
        } else {
            0.0
        };
        let peer_limited = get(p, "peer_limited").as_bool().unwrap_or(false);
        let disk_copy = get(p, "disk_copy_bytes_per_sec").as_f64();
        let disks_travel = get(p, "disk_dirty_bytes_per_sec").as_f64().is_some();
        // A destination slower to write the disks than the link carries them holds the
        // stream back during their first copy (and while it drains what its socket
        // buffers took): the stream's rate is then the datastore's, not the one the
        // memory moves at. The link is then the rate the memory showed before the
        // copy began, and the copy goes at its own measured rate.
        let held = round == 0 && peer_limited && disks_travel;
        let link = if held {
            self.unhindered_link
        } else {
            if round == 0 && !peer_limited && bw > 0.0 {
                self.unhindered_link = Some(bw);
            }
            (bw > 0.0).then_some(bw)
        };
        // The copy's rate: measured as it goes, or until then what the destination
        // timed its datastore at (the engine takes that).
        let datastore = get(p, "dst_write_bytes_per_sec").as_f64();
        self.held_unmeasured = held && (link.is_none() || disk_copy.or(datastore).is_none());
        let codecs = codec_perfs(get(p, "codec_samples"));
        let (dirty, working_set) = self.dirty_rate(p, sample, round);
        // What the stream achieved: with a codec, wire bytes, so the link itself.
        Observation {
            t_ms,
            stage,
            memory_pages: self.memory_pages,
            remaining_pages: remaining,
            pass_elapsed_ms: t_ms - self.pass_start_ms,
            round,
            dirty_pages_per_sec: dirty,
            working_set_pages: working_set,
            link_bytes_per_sec: link,
            peer_limited,
            zero_fraction: remaining_zero_fraction(
                get(p, "sampled_zero_fraction").as_f64(),
                self.memory_pages,
                sent,
                zero,
            ),
            round_overhead_ms: self.round_overhead_ms(p),
            codecs,
            disk_dirty_bytes_per_sec: get(p, "disk_dirty_bytes_per_sec").as_f64(),
            disk_pending_bytes: get(p, "disk_bytes_pending").as_f64().unwrap_or(0.0),
            disk_bytes: get(p, "disk_bytes_total").as_f64().unwrap_or(0.0),
            disk_compression_ratio: get(p, "disk_compression_ratio").as_f64(),
            disk_written_compression_ratio: get(p, "disk_written_compression_ratio").as_f64(),
            disk_copy_bytes_per_sec: disk_copy,
            disk_write_bytes_per_sec: get(p, "disk_write_bytes_per_sec").as_f64(),
            pause_basis: crate::policy::model::PauseBasis {
                mechanics: crate::migration::MECHANICS,
                idle_rtt_ms: get(p, "idle_rtt_ms").as_f64(),
                dst_flush_ms: get(p, "dst_flush_ms").as_f64(),
                dst_write_bytes_per_sec: get(p, "dst_write_bytes_per_sec").as_f64(),
            },
        }
    }

    /// A round's fixed cost, the first pass's readings averaged.
    fn round_overhead_ms(&mut self, p: &Value) -> f64 {
        let v = round_overhead_ms(p);
        if get(p, "round").as_u64().unwrap_or(0) >= 2 || v <= 0.0 {
            return v;
        }
        let (sum, n) = &mut self.overhead_estimates;
        *sum += v;
        *n += 1;
        *sum / f64::from(*n)
    }

    /// The guest's dirty rate and distinct pages per second, as the engine wants them.
    ///
    /// The log is harvested once a round, so both the probes and the VMM see pages
    /// new since the last harvest, a figure that sinks as a round goes on when the
    /// guest re-dirties what it already touched. In the first pass the earliest
    /// samples are closest to the guest's real rate, and how the count of new pages
    /// bends shows the set it dirties within; from then on the VMM's count per round
    /// is read back through that set to a rate.
    fn dirty_rate(&mut self, p: &Value, sample: Option<&Sample>, round: u32) -> (f64, Option<u64>) {
        use crate::policy::engine::{dirty_set_pages_over, fit_dirtying};
        use crate::policy::model::dirtied;
        let memory = self.memory_pages as f64;
        let vmm_rate = get(p, "dirty_pages_per_sec").as_f64().unwrap_or(0.0);
        // The VMM's windows, each from a freshly armed log, see what the probes (whose
        // windows start anywhere in the pass) cannot: the rate over a short span.
        let windows = get(p, "dirty_windows");
        if round == 0
            && let Some(n) = windows["windows"].as_u64().filter(|&n| n > 0)
        {
            let f = |k: &str| windows[k].as_f64().unwrap_or(0.0);
            let short = (f("window_ms") / 1e3, f("pages_per_window"));
            let (rate, set) = if n >= 2 {
                fit_dirtying(short, (f("since_ms") / 1e3, f("distinct_pages")), memory)
            } else {
                (short.1 / short.0.max(1e-3), None)
            };
            self.set_pages = set;
            self.rate = rate;
            self.windows_seen = true;
            return (rate, set.map(|s| dirtied(rate, s, 1.0) as u64));
        }
        if round == 0 {
            if let Some(s) = sample
                && let Some(r) = s.dirty_pages_per_sec
                && self.first_pass.last().is_none_or(|&(t, _)| t < s.at_ms)
            {
                self.first_pass.push((s.at_ms, r));
            }
            let Some(&(t0, _)) = self.first_pass.first() else {
                return (self.start_rate.max(vmm_rate), None);
            };
            let peak = self.first_pass.iter().map(|&(_, r)| r).fold(0.0, f64::max);
            let mut distinct = 0.0;
            let mut prev = t0 - 250.0;
            for &(t, r) in &self.first_pass {
                distinct += r * (t - prev) / 1e3;
                prev = t;
            }
            let secs = (prev - (t0 - 250.0)) / 1e3;
            self.set_pages = dirty_set_pages_over(peak, distinct, secs, memory);
            let ws = self.set_pages.map(|s| dirtied(peak, s, 1.0) as u64);
            self.rate = peak;
            return (peak, ws);
        }
        // Right after a round's harvest every page the guest writes is new to the
        // log, so a probe window that began then sees the guest's own rate.
        if let Some(s) = sample
            && let Some(r) = s.dirty_pages_per_sec
            && s.at_ms - PROBE_WINDOW_MS >= self.pass_start_ms
        {
            self.round_peak = self.round_peak.max(r);
        }
        let count = get(p, "dirty_pages_last_round").as_f64().unwrap_or(0.0);
        let rate = if self.round_peak > 0.0 {
            self.round_peak
        } else {
            match self.set_pages {
                Some(set) if vmm_rate > 0.0 && count < set * 0.95 => {
                    let took = count / vmm_rate;
                    -(set / took) * (1.0 - count / set).ln()
                }
                // The whole set was dirtied: the count only bounds the rate from
                // below, and the last estimate knows better.
                Some(_) => vmm_rate.max(self.rate),
                None => vmm_rate,
            }
        };
        self.rate = rate;
        let ws = self.set_pages.map(|s| dirtied(rate, s, 1.0) as u64);
        (rate, ws)
    }

    /// Attaching to a migration under way: what it runs with now is what is applied
    /// (`progress` is its entry in the VMM's status).
    pub fn adopt(&mut self, progress: &Value) {
        if let Some(c) = get(progress, "codec").as_str().and_then(|c| c.parse().ok()) {
            self.applied.codec = c;
        }
        if let Some(t) = get(progress, "throttle_pct").as_u64() {
            self.applied.throttle_pct = t.min(99) as u32;
        }
        self.applied.bandwidth_mbit = get(progress, "bandwidth_limit_bytes_per_sec")
            .as_f64()
            .map(|b| b * 8.0 / 1e6);
        if let Some(d) = get(progress, "max_downtime_ms").as_f64() {
            self.applied.max_downtime_ms = d;
        }
    }

    /// One tick: observe, decide, push what changed.
    pub fn tick(&mut self, control: &Path, p: &Value, sample: Option<&Sample>) {
        if p.is_null() || matches!(get(p, "phase").as_str(), Some("setup") | None) {
            return;
        }
        let obs = self.observe(p, sample);
        let d = self.policy.decide(&obs, &self.limits);
        // The first prediction worth keeping has the guest measured and the link past
        // the burst that fills the socket buffers; a migration over sooner keeps its
        // last one.
        // With disks travelling and a destination slower to write them than the link
        // carries, a prediction waits until both the link's rate and the copy's are
        // known (see `observe`), or the first pass is over.
        let measured = (!self.first_pass.is_empty() || self.windows_seen || obs.round > 0)
            && !self.held_unmeasured;
        if obs.link_bytes_per_sec.is_some() && measured {
            if self.first_prediction.is_none() && obs.t_ms >= PREDICT_AFTER_MS {
                self.first_prediction = Some((obs.t_ms, d.prediction));
                self.first_basis = Some(obs.clone());
            }
            self.last_prediction = Some((obs.t_ms, d.prediction));
            if self.first_prediction.is_none() {
                self.last_basis = Some(obs.clone());
            }
        }
        let why = |setting: &str| {
            d.reasons
                .iter()
                .find(|r| r.setting == setting || r.setting == "preset")
                .map_or(String::new(), |r| r.why.clone())
        };
        let s = &d.settings;
        // What changed: (setting, its key in set-params, the new value).
        let mut changed: Vec<(&'static str, &'static str, Value)> = Vec::new();
        if s.bandwidth_mbit != self.applied.bandwidth_mbit {
            let mbit = s.bandwidth_mbit.map_or(0, |m| m.round() as u64);
            changed.push(("bandwidth_mbit", "bandwidth_mbit", json!(mbit)));
        }
        if s.codec != self.applied.codec {
            changed.push(("codec", "compression", json!(s.codec.to_string())));
        }
        if s.throttle_pct != self.applied.throttle_pct {
            changed.push(("throttle_pct", "throttle_pct", json!(s.throttle_pct)));
        }
        let target = |s: &Settings| s.max_downtime_ms.floor().max(1.0) as u64;
        if target(s) != target(&self.applied) {
            changed.push(("max_downtime_ms", "max_downtime_ms", json!(target(s))));
        }
        if s.disk_write_limit_mbps != self.applied.disk_write_limit_mbps {
            changed.push((
                "disk_write_limit_mbps",
                "disk_write_limit_mbps",
                json!(s.disk_write_limit_mbps.unwrap_or(0.0)),
            ));
        }
        if s.disk_mirror != self.applied.disk_mirror {
            changed.push((
                "disk_mirror",
                "disk_mirror",
                json!(s.disk_mirror.to_string()),
            ));
        }
        if !changed.is_empty() {
            let mut req = json!({"cmd": "set-params"});
            let mut reasons = serde_json::Map::new();
            for (setting, key, value) in changed {
                let reason = why(setting);
                self.steps.push(Step {
                    t_ms: obs.t_ms,
                    setting,
                    value: value.to_string(),
                    reason: reason.clone(),
                });
                req[key] = value;
                reasons.insert(setting.into(), json!(reason));
            }
            req["reasons"] = Value::Object(reasons);
            // A migration that just ended refuses: nothing to do then.
            if request(control, &req).is_ok() {
                self.applied.codec = s.codec;
                self.applied.throttle_pct = s.throttle_pct;
                self.applied.bandwidth_mbit = s.bandwidth_mbit;
                self.applied.disk_write_limit_mbps = s.disk_write_limit_mbps;
                self.applied.disk_mirror = s.disk_mirror;
                self.applied.max_downtime_ms = s.max_downtime_ms;
            }
        }
        if s.postcopy && !self.applied.postcopy {
            self.applied.postcopy = true;
            self.steps.push(Step {
                t_ms: obs.t_ms,
                setting: "postcopy",
                value: "true".into(),
                reason: why("postcopy"),
            });
            let _ = request(control, &json!({"cmd": "start-postcopy"}));
        }
        if let Some(abort) = &s.abort
            && self.applied.abort.is_none()
        {
            self.applied.abort = Some(abort.clone());
            self.steps.push(Step {
                t_ms: obs.t_ms,
                setting: "abort",
                value: "true".into(),
                reason: abort.clone(),
            });
            let _ = request(control, &json!({"cmd": "cancel"}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::remaining_zero_fraction;

    #[test]
    fn a_rounds_cost_is_measured_or_built_from_the_first_pass() {
        use serde_json::json;
        let first = json!({"round": 0, "round_overhead_ms": 0.0, "link_rtt_ms": 2.5,
                           "dirty_windows": {"rearm_ms": 1.0}});
        assert_eq!(super::round_overhead_ms(&first), 3.5);
        let after_pass = json!({"round": 1, "round_overhead_ms": 0.03, "link_rtt_ms": 2.5});
        assert_eq!(super::round_overhead_ms(&after_pass), 2.5);
        let measured = json!({"round": 2, "round_overhead_ms": 6.0, "link_rtt_ms": 2.5});
        assert_eq!(super::round_overhead_ms(&measured), 6.0);
        assert_eq!(super::round_overhead_ms(&json!({"round": 0})), 0.0);
    }

    #[test]
    fn zero_pages_still_ahead_come_from_the_sample_less_those_met() {
        // Half of 1000 pages are zero; the pass met 400 busy pages and 100 zero ones:
        // 400 of the 500 left are zero.
        assert!((remaining_zero_fraction(Some(0.5), 1000, 400, 100) - 0.8).abs() < 1e-9);
        // More zero pages met than the sample expected: none assumed ahead.
        assert_eq!(remaining_zero_fraction(Some(0.1), 1000, 0, 500), 0.0);
        // No sample: the share so far.
        assert!((remaining_zero_fraction(None, 1000, 300, 100) - 0.25).abs() < 1e-9);
        assert_eq!(remaining_zero_fraction(None, 1000, 0, 0), 0.0);
    }
}
