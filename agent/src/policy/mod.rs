//! The policy engine: from what is measured (the guest's dirty rate and working set,
//! the link, each codec's ratio and speed on this VM's pages) and the operator's
//! limits to a migration's settings, a prediction, and the reasons.
//!
//! Pure: observations come in as values (time included), decisions go out; no clocks,
//! files or sockets, so the engine runs the same against a live migration, the
//! simulator ([`sim`]) and a recorded trace. Static peer presets ([`presets`]) implement
//! the same [`Policy`] trait, so they run against the same simulator and benchmark.

pub mod engine;
pub mod model;
pub mod presets;
pub mod sim;

use serde::Serialize;

use crate::migration::codec::Codec;

pub const PAGE: f64 = 4096.0;

/// A codec's measured performance on this VM's own pages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CodecPerf {
    #[serde(serialize_with = "display")]
    pub codec: Codec,
    /// Page bytes over wire bytes.
    pub ratio: f64,
    /// Page bytes one core compresses per second.
    pub compress_bytes_per_sec: f64,
}

fn display<S: serde::Serializer>(c: &Codec, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(c)
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

/// Settings the operator fixed on the command line: the engine keeps them and works
/// around them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Pins {
    #[serde(serialize_with = "display_opt")]
    pub codec: Option<Codec>,
    pub throttle_pct: Option<u32>,
}

fn display_opt<S: serde::Serializer>(c: &Option<Codec>, s: S) -> Result<S::Ok, S::Error> {
    match c {
        Some(c) => s.collect_str(c),
        None => s.serialize_none(),
    }
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
    /// Share of pages that are zero (they cost nothing on the wire).
    pub zero_fraction: f64,
    pub codecs: Vec<CodecPerf>,
}

/// What the settings in force are.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    #[serde(serialize_with = "display")]
    pub codec: Codec,
    pub bandwidth_mbit: Option<f64>,
    pub throttle_pct: u32,
    pub max_downtime_ms: f64,
    /// Switch to post-copy now.
    pub postcopy: bool,
    /// Give up (a preset's timeout): the VM stays on the source.
    pub abort: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            codec: Codec::None,
            bandwidth_mbit: None,
            throttle_pct: 0,
            max_downtime_ms: 300.0,
            postcopy: false,
            abort: None,
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

/// One setting's value and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reason {
    pub setting: &'static str,
    pub value: String,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub settings: Settings,
    pub prediction: Prediction,
    pub reasons: Vec<Reason>,
}

/// Something that chooses a migration's settings, tick by tick.
pub trait Policy {
    fn name(&self) -> &str;
    fn decide(&mut self, obs: &Observation, limits: &Limits) -> Decision;
}
