//! The policy engine: from what is measured (the guest's dirty rate and working set,
//! the link, each codec's ratio and speed on this VM's pages) and the operator's
//! limits to a migration's settings, a prediction, and the reasons.
//!
//! Pure: observations come in as values (time included), decisions go out; no clocks,
//! files or sockets, so the engine runs the same against a live migration, the
//! simulator ([`sim`]) and a recorded trace. Static peer presets ([`presets`]) implement
//! the same [`Policy`] trait, so they run against the same simulator and benchmark.

pub mod disk;
pub mod engine;
pub mod model;
pub mod presets;
pub mod sim;

use serde::Serialize;

pub use ferry_api::{Codec, Decision, DiskMirror, Mechanics, Settings, Switchover};

pub const PAGE: f64 = 4096.0;

/// A codec's measured performance on this VM's own pages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CodecPerf {
    pub codec: Codec,
    /// Page bytes over wire bytes.
    pub ratio: f64,
    /// Page bytes one core compresses per second.
    pub compress_bytes_per_sec: f64,
}

/// What the operator allows (`ferry migrate` flags, or `[limits]` in a scenario).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    pub max_downtime_ms: f64,
    pub max_total_secs: Option<f64>,
    pub max_throttle_pct: u32,
    pub allow_postcopy: bool,
    /// A cap on the migration stream; None: the link decides.
    pub bandwidth_mbit: Option<f64>,
    /// Cores compression may use.
    pub cpu_budget_cores: f64,
}

impl Limits {
    /// The stream's cap in the settings' unit.
    pub fn bandwidth_bytes_per_sec(&self) -> Option<u64> {
        // At least a byte a second: 0 on the wire means no cap at all.
        self.bandwidth_mbit
            .map(|m| ((m * 1e6 / 8.0).round() as u64).max(1))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_downtime_ms: 300.0,
            max_total_secs: None,
            max_throttle_pct: 99,
            allow_postcopy: false,
            bandwidth_mbit: None,
            cpu_budget_cores: 1.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("not a limits file: {0}")]
    Parse(String),
    #[error("{key} = {value}: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

/// The `[limits]` table of a limits file (`ferry migrate --limits FILE`) or of a bench
/// scenario: the same keys as the flags, each optional.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsTable {
    pub max_downtime_ms: Option<f64>,
    pub max_total_secs: Option<f64>,
    pub max_throttle_pct: Option<u32>,
    pub allow_postcopy: Option<bool>,
    /// 0: no cap.
    pub bandwidth_mbit: Option<f64>,
    pub cpu_budget_cores: Option<f64>,
}

impl LimitsTable {
    /// The `[limits]` table of a TOML document (absent: nothing set).
    pub fn parse(text: &str) -> Result<Self, LimitsError> {
        #[derive(serde::Deserialize)]
        struct Doc {
            #[serde(default)]
            limits: LimitsTable,
        }
        toml::from_str::<Doc>(text)
            .map(|d| d.limits)
            .map_err(|e| LimitsError::Parse(e.to_string()))
    }

    /// `base` with every key given here put over it, each checked.
    pub fn over(&self, mut base: Limits) -> Result<Limits, LimitsError> {
        fn bad(key: &'static str, value: impl ToString, why: &'static str) -> LimitsError {
            LimitsError::Invalid {
                key,
                value: value.to_string(),
                why,
            }
        }
        if let Some(v) = self.max_downtime_ms {
            if !(v > 0.0 && v.is_finite()) {
                return Err(bad("max_downtime_ms", v, "must be more than 0"));
            }
            base.max_downtime_ms = v;
        }
        if let Some(v) = self.max_total_secs {
            if !(v >= 1.0 && v.is_finite()) {
                return Err(bad("max_total_secs", v, "must be at least 1"));
            }
            base.max_total_secs = Some(v);
        }
        if let Some(v) = self.max_throttle_pct {
            if v > 99 {
                return Err(bad("max_throttle_pct", v, "must be 0 to 99"));
            }
            base.max_throttle_pct = v;
        }
        if let Some(v) = self.allow_postcopy {
            base.allow_postcopy = v;
        }
        if let Some(v) = self.bandwidth_mbit {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(bad("bandwidth_mbit", v, "must be 0 (no cap) or more"));
            }
            base.bandwidth_mbit = (v > 0.0).then_some(v);
        }
        if let Some(v) = self.cpu_budget_cores {
            if !(v > 0.0 && v.is_finite()) {
                return Err(bad("cpu_budget_cores", v, "must be more than 0"));
            }
            base.cpu_budget_cores = v;
        }
        Ok(base)
    }
}

/// Settings the operator fixed on the command line: the engine keeps them and works
/// around them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Pins {
    pub codec: Option<Codec>,
    pub throttle_pct: Option<u32>,
    /// A cap on the guest's disk writes, bytes per second; Some(0): none, ever.
    pub disk_write_limit_bytes_per_sec: Option<u64>,
    /// How disks that travel keep up with the guest's writes.
    pub disk_mirror: Option<DiskMirror>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Nothing sent yet (a plan).
    Starting,
    /// The first full pass over memory.
    FirstPass,
    /// Re-sending what the guest dirtied.
    Rounds,
    /// The guest runs on the destination; the rest is pulled or pushed.
    Postcopy,
}

/// One look at a running (or planned) migration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    /// Since the migration started.
    pub t_ms: f64,
    pub stage: Stage,
    pub memory_pages: u64,
    /// Pages still to send in this pass (the first pass: those not sent yet).
    pub remaining_pages: u64,
    /// How long this pass has run: what the guest dirtied meanwhile goes next.
    pub pass_elapsed_ms: f64,
    pub round: u32,
    /// The guest's dirty rate as measured (under the throttle in force).
    pub dirty_pages_per_sec: f64,
    /// Distinct pages the guest dirties per second (the probes' working set); None
    /// when unknown.
    pub working_set_pages: Option<u64>,
    /// Bytes per second the stream achieved; None before it was measured.
    pub link_bytes_per_sec: Option<f64>,
    /// The destination takes the stream in slower than the link carries it (its
    /// receive window held the data back most of the time): compressing moves no
    /// more, it only adds work on both sides.
    pub peer_limited: bool,
    /// Share of pages that are zero (they cost nothing on the wire).
    pub zero_fraction: f64,
    /// A round's fixed cost beyond sending its pages (acknowledgement, harvesting
    /// the dirty log), milliseconds; 0 before one was measured.
    pub round_overhead_ms: f64,
    pub codecs: Vec<CodecPerf>,
    /// Disks travelling with the memory (`--copy-storage`): bytes of them the guest
    /// dirties per second. None: the disks stay where they are.
    pub disk_dirty_bytes_per_sec: Option<f64>,
    /// Disk bytes this pass still has to send (their first copy, or a round's).
    pub disk_pending_bytes: f64,
    /// The travelling disks' size, summed (0: unknown).
    pub disk_bytes: f64,
    /// Disk bytes over the wire bytes they take (None: not measured; as pages).
    pub disk_compression_ratio: Option<f64>,
    /// The same for blocks the guest wrote since their first copy, which the rounds
    /// and the pause send (None: none sent yet; as pages).
    pub disk_written_compression_ratio: Option<f64>,
    /// Disk bytes per second the disks' first copy moved end to end, the
    /// destination's writes included (None: not done yet). Where the destination's
    /// datastore is slower than the link, disk bytes go at this rate, not the link's.
    pub disk_copy_bytes_per_sec: Option<f64>,
    /// Every disk byte the guest writes per second, rewrites of a block included:
    /// what an active mirror would carry (None: not measured, or no disks travel).
    pub disk_write_bytes_per_sec: Option<f64>,
    /// What the pause costs beside its bytes, as measured so far on these hosts.
    pub pause_basis: model::PauseBasis,
}

impl Observation {
    /// Before anything moves: a VM of `memory_pages` whose guest dirties
    /// `dirty_pages_per_sec`, nothing else measured, on a backend with `mechanics`.
    pub fn before_start(memory_pages: u64, dirty_pages_per_sec: f64, mechanics: Mechanics) -> Self {
        Self {
            t_ms: 0.0,
            stage: Stage::Starting,
            memory_pages,
            remaining_pages: memory_pages,
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
            pause_basis: model::PauseBasis::prior(mechanics),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    /// From the migration's start to the guest running on the destination.
    pub total_ms: f64,
    pub downtime_ms: f64,
    /// Pre-copy converges with these settings (or post-copy makes it moot).
    pub converges: bool,
}

/// What a policy chose on one tick: the settings (in the API's units), whether to
/// switch to post-copy or give up, what it predicts, and a record per setting of its
/// value and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    pub settings: Settings,
    /// Switch to post-copy now.
    pub postcopy: bool,
    /// Give up (a preset's timeout): the VM stays on the source.
    pub abort: Option<String>,
    pub prediction: Prediction,
    pub reasons: Vec<Decision>,
}

/// Something that chooses a migration's settings, tick by tick.
pub trait Policy {
    fn name(&self) -> &str;
    fn decide(&mut self, obs: &Observation, limits: &Limits) -> Choice;
}

/// A downtime target as the settings hold it: whole milliseconds, at least one.
pub fn whole_ms(ms: f64) -> u64 {
    ms.floor().max(1.0) as u64
}

/// The policy `name` names: `adaptive`, a peer preset, or `static` (None: the
/// settings as given, nothing adjusted).
pub fn by_name(name: &str, pins: Pins, limits: &Limits) -> Result<Option<Box<dyn Policy>>, String> {
    match name {
        "static" => Ok(None),
        "adaptive" => Ok(Some(Box::new(engine::Adaptive::new(pins, limits)))),
        other => match presets::Preset::by_name(other) {
            Some(p) => Ok(Some(Box::new(p))),
            None => Err(format!(
                "unknown policy {other:?}: use adaptive, static or a preset ({})",
                presets::NAMES.join(", ")
            )),
        },
    }
}

/// The tests' backend: one with Ferry's VMM's mechanics (a live migration gets them
/// from the backend it drives).
#[cfg(test)]
pub(crate) mod fixture {
    pub fn mechanics() -> super::Mechanics {
        super::Mechanics {
            page_bytes: 4096,
            batch_pages: 256,
            min_split_batches: 4,
            min_batch_pages: 32,
            max_rounds: 30,
            disk_block_bytes: 64 << 10,
            min_disk_write_limit_bytes_per_sec: 1_000_000,
            postcopy_pause_send_secs: 0.5e-3,
            postcopy_pause_pages_min: 32,
            postcopy_pause_pages_max: 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limits_table_overrides_only_what_it_names() {
        let t = LimitsTable::parse(
            "[limits]\nmax_downtime_ms = 50\nallow_postcopy = true\nbandwidth_mbit = 0\n",
        )
        .unwrap();
        let base = Limits {
            bandwidth_mbit: Some(100.0),
            ..Limits::default()
        };
        let l = t.over(base).unwrap();
        assert_eq!(l.max_downtime_ms, 50.0);
        assert!(l.allow_postcopy);
        assert_eq!(l.bandwidth_mbit, None);
        assert_eq!(l.max_throttle_pct, 99);
        assert_eq!(LimitsTable::parse("").unwrap(), LimitsTable::default());
    }

    #[test]
    fn bad_limits_name_the_key() {
        let e = LimitsTable::parse("[limits]\nmax_throttle = 5\n").unwrap_err();
        assert!(e.to_string().contains("max_throttle"), "{e}");
        let e = LimitsTable::parse("[limits]\nmax_throttle_pct = 100\n")
            .unwrap()
            .over(Limits::default())
            .unwrap_err();
        assert!(e.to_string().contains("max_throttle_pct = 100"), "{e}");
        let e = LimitsTable::parse("[limits]\nmax_downtime_ms = \"fast\"\n").unwrap_err();
        assert!(e.to_string().contains("max_downtime_ms"), "{e}");
    }
}
