//! What a running migration tells its subscribers: a progress bar, metrics, traces.

use ferry_api::{Decision, DriverReport, MigrationProgress, Phase, ProbeSample, Resolution};

use crate::policy::Prediction;

#[derive(Debug, Clone)]
pub enum Event {
    /// The migration runs (or was attached to) under `policy`.
    Started {
        policy: String,
        memory_pages: u64,
        attached: bool,
    },
    PhaseStarted {
        phase: Phase,
        t_ms: u64,
    },
    PhaseEnded {
        phase: Phase,
        t_ms: u64,
    },
    /// A pre-copy round began with `remaining_pages` to send.
    Round {
        round: u32,
        remaining_pages: u64,
        t_ms: u64,
    },
    /// Every tick: the backend's progress and the probes' latest sample.
    Progress {
        progress: Box<MigrationProgress>,
        sample: Option<ProbeSample>,
    },
    /// The policy changed a setting, and why.
    Decision(Decision),
    /// The prediction the migration will be held to.
    Prediction {
        t_ms: f64,
        prediction: Prediction,
    },
    /// The driver asked the backend to stop the migration.
    Cancelling {
        why: String,
    },
    /// A try to settle a handover in doubt failed; the next comes after `retry_ms`
    /// (None: it cannot be settled from here, and stays in doubt).
    Resolving {
        attempt: u32,
        error: String,
        retry_ms: Option<u64>,
    },
    /// The handover in doubt is settled: where the VM runs.
    Resolved(Resolution),
    /// The migration ended; its report.
    Outcome(Box<DriverReport>),
}
