//! The migration driver: runs one migration end to end against a [`Backend`] — start
//! it (or attach to one under way), observe it every tick, ask the policy, apply what
//! changed with its reason, switch to post-copy or give up when the policy says so,
//! honour a cancel and the deadline, and produce the report. Whatever it does it
//! publishes as an [`Event`]: the CLI's progress bar subscribes, and so will metrics
//! and traces. Everything it reads and sends is a type of the API crate.

pub mod backend;
pub mod events;
pub mod ferry_vmm;
pub mod observe;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use ferry_api::DriverReport;
use ferry_api::{
    Decision, ErrorKind, Migrate, MigrationProgress, MigrationReport, Phase, PredictionRecord,
    ProbeSample, Reasons,
};

pub use backend::{Backend, BackendError, VmFacts};
pub use events::Event;
use observe::{Observer, PREDICT_AFTER_MS};

use crate::policy::{Limits, Observation, Policy, Prediction, Settings};
use crate::probes::follow::Follower;
use crate::probes::signals::Logging;

/// How often the driver looks at the migration.
const TICK: Duration = Duration::from_millis(100);
/// Looks at a backend that fail in a row before the driver gives up on it (a VMM
/// busy in a pause may answer late once or twice).
const OBSERVE_MISSES: u32 = 20;
/// The longest wait between two tries to settle a handover in doubt.
const RESOLVE_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub enum Start {
    /// A new migration; the policy (if any) overrides its settings before it starts.
    New(Box<Migrate>),
    /// The migration already under way (its client went away): follow it again.
    Attach,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("no migration to attach to: this VM has not migrated")]
    NothingToAttach,
    #[error("the migration disappeared from the backend while it ran")]
    Vanished,
}

impl DriverError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            DriverError::Backend(e) => e.kind,
            DriverError::NothingToAttach => ErrorKind::NotFound,
            DriverError::Vanished => ErrorKind::Failed,
        }
    }
}

/// The policy's side of a run: what it chose, what was applied, what it predicted.
struct Steer {
    policy: Box<dyn Policy>,
    observer: Observer,
    applied: Settings,
    /// Post-copy was asked for; the policy gave up (each happens once).
    postcopy: bool,
    aborted: bool,
    first_prediction: Option<(f64, Prediction, Observation)>,
    last_prediction: Option<(f64, Prediction)>,
    last_basis: Option<Observation>,
    steps: Vec<Decision>,
}

/// Something that hears of each [`Event`] as it happens.
pub type Subscriber<'a> = Box<dyn FnMut(&Event) + 'a>;

pub struct Driver<'a> {
    policy: Option<Box<dyn Policy>>,
    limits: Limits,
    probes: Option<Duration>,
    cancel: Option<&'a AtomicBool>,
    deadline: Option<Duration>,
    /// Settle a handover in doubt with the destination, first retry after this.
    resolve: Option<Duration>,
    tick: Duration,
    subscribers: Vec<Subscriber<'a>>,
}

impl<'a> Driver<'a> {
    /// A driver that runs `policy` (None: the settings as given, nothing adjusted)
    /// within `limits`.
    pub fn new(policy: Option<Box<dyn Policy>>, limits: Limits) -> Self {
        Self {
            policy,
            limits,
            probes: None,
            cancel: None,
            deadline: None,
            resolve: None,
            tick: TICK,
            subscribers: Vec::new(),
        }
    }

    /// Watch the guest with the eBPF probes, one sample per `window`.
    pub fn with_probes(mut self, window: Duration) -> Self {
        self.probes = Some(window);
        self
    }

    /// Cancel the migration once `flag` is set (a Ctrl-C, an API request).
    pub fn cancel_on(mut self, flag: &'a AtomicBool) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Cancel a migration still short of post-copy `after` this long: for a backend
    /// without a deadline of its own (Ferry's VMM keeps `max_total_secs` itself).
    pub fn with_deadline(mut self, after: Duration) -> Self {
        self.deadline = Some(after);
        self
    }

    /// Settle a handover that ends in doubt (the source committed, the destination's
    /// word was lost) by asking the destination what it did, as `ferry migrate
    /// --resolve` does by hand: first again after `retry`, then less and less often,
    /// for as long as the destination cannot be reached. Both copies stay paused
    /// meanwhile; running either one on a guess could run the VM twice.
    pub fn resolve_in_doubt(mut self, retry: Duration) -> Self {
        self.resolve = Some(retry);
        self
    }

    /// Look at the migration this often (default 100 ms).
    pub fn every(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    pub fn subscribe(&mut self, f: impl FnMut(&Event) + 'a) {
        self.subscribers.push(Box::new(f));
    }

    fn emit(&mut self, e: &Event) {
        for s in &mut self.subscribers {
            s(e);
        }
    }

    /// Runs the migration to its end and returns its report.
    pub fn run(
        mut self,
        backend: &mut dyn Backend,
        start: Start,
    ) -> Result<DriverReport, DriverError> {
        let vm = backend.vm()?;
        let mechanics = backend.mechanics()?;
        let observer = Observer::new(vm.memory_pages, vm.dirty_pages_per_sec, mechanics);
        let mut steer = self.policy.take().map(|policy| Steer {
            policy,
            observer,
            applied: Settings::default(),
            postcopy: false,
            aborted: false,
            first_prediction: None,
            last_prediction: None,
            last_basis: None,
            steps: Vec::new(),
        });
        let policy_name = steer
            .as_ref()
            .map_or("static".to_owned(), |s| s.policy.name().to_owned());
        // The probes watch the guest from before it starts to move (loading them
        // takes a few hundred milliseconds, beside whatever runs); where they cannot
        // load, the report says why.
        let load_probes = |window: Option<Duration>| match (window, vm.pid) {
            (Some(window), Some(pid)) => Some(Follower::start(pid, window)),
            _ => None,
        };
        let mut probes;
        match start {
            Start::New(mut req) => {
                probes = load_probes(self.probes);
                if let Some(s) = steer.as_mut() {
                    self.initial(s, &mut req);
                }
                backend.start(&req)?;
                if steer.is_some() {
                    self.starting(&req);
                }
                self.emit(&Event::Started {
                    policy: policy_name.clone(),
                    memory_pages: vm.memory_pages,
                    attached: false,
                });
            }
            Start::Attach => {
                let p = backend.observe()?.ok_or(DriverError::NothingToAttach)?;
                if let Some(report) = p.report {
                    // Over already: its report is all there is to give, once a
                    // handover left in doubt is settled.
                    let migration = self.settle(backend, p.phase, report);
                    return Ok(DriverReport {
                        migration,
                        policy: policy_name,
                        policy_steps: None,
                        prediction: None,
                        probe_signals: Vec::new(),
                        probe_signals_error: None,
                    });
                }
                probes = load_probes(self.probes);
                if let Some(s) = steer.as_mut() {
                    s.applied = s
                        .policy
                        .decide(&s.observer.before_start(), &self.limits)
                        .settings;
                    adopt(&mut s.applied, &p);
                }
                self.emit(&Event::Started {
                    policy: policy_name.clone(),
                    memory_pages: vm.memory_pages,
                    attached: true,
                });
            }
        }
        let deadline = self.deadline.map(|d| Instant::now() + d);
        let mut cancelled = false;
        let mut misses = 0;
        let mut phase: Option<Phase> = None;
        let mut round = 0;
        let report = loop {
            std::thread::sleep(self.tick);
            let asked = self
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Acquire));
            let late = deadline.is_some_and(|d| Instant::now() > d)
                && !phase.is_some_and(Phase::is_postcopy);
            if (asked || late) && !cancelled {
                cancelled = true;
                // A migration that just ended refuses; its report follows.
                let _ = backend.cancel();
                self.emit(&Event::Cancelling {
                    why: if asked {
                        "cancelled by the operator".into()
                    } else {
                        "past the deadline".into()
                    },
                });
            }
            let p = match backend.observe() {
                Ok(p) => p.ok_or(DriverError::Vanished)?,
                Err(_) if misses < OBSERVE_MISSES => {
                    misses += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            misses = 0;
            if phase != Some(p.phase) {
                if let Some(old) = phase {
                    self.emit(&Event::PhaseEnded {
                        phase: old,
                        t_ms: p.elapsed_ms,
                    });
                }
                phase = Some(p.phase);
                self.emit(&Event::PhaseStarted {
                    phase: p.phase,
                    t_ms: p.elapsed_ms,
                });
            }
            if let Some(report) = p.report {
                break self.settle(backend, p.phase, report);
            }
            if p.round != round {
                round = p.round;
                self.emit(&Event::Round {
                    round,
                    remaining_pages: p.remaining_dirty_pages,
                    t_ms: p.elapsed_ms,
                });
            }
            let running = !matches!(
                p.phase,
                Phase::Completed
                    | Phase::Failed
                    | Phase::Cancelled
                    | Phase::Postcopy
                    | Phase::PostcopyPaused
            );
            // The latest sample, whether this tick took one or not.
            let sample = probes.as_mut().and_then(|f| {
                f.poll(if running {
                    Logging::On
                } else {
                    Logging::Unknown
                });
                f.timeline.last().cloned()
            });
            if let Some(s) = steer.as_mut()
                && p.phase != Phase::Setup
            {
                self.tick(s, backend, &p, sample.as_ref());
            }
            self.emit(&Event::Progress {
                progress: Box::new(p),
                sample,
            });
        };
        let (probe_signals, probe_signals_error) = match probes.as_mut() {
            Some(f) => (std::mem::take(&mut f.timeline), f.ended()),
            None => (Vec::new(), None),
        };
        // Detaching the probes waits on the kernel (an RCU grace period per
        // tracepoint, seconds in all on this kind of host): not the report's business.
        if let Some(f) = probes.take() {
            let _ = std::thread::Builder::new()
                .name("probes-detach".into())
                .spawn(move || drop(f));
        }
        let report = DriverReport {
            migration: report,
            policy: policy_name,
            prediction: steer.as_ref().and_then(Steer::prediction),
            policy_steps: steer.map(|s| s.steps),
            probe_signals,
            probe_signals_error,
        };
        self.emit(&Event::Outcome(Box::new(report.clone())));
        Ok(report)
    }

    /// The report of a migration that ended in `phase`: as it is, or, for a handover
    /// in doubt the driver is to settle, as it reads once the destination answered.
    fn settle(
        &mut self,
        backend: &mut dyn Backend,
        phase: Phase,
        report: MigrationReport,
    ) -> MigrationReport {
        let Some(mut wait) = self.resolve.filter(|_| phase == Phase::InDoubt) else {
            return report;
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match backend.resolve() {
                Ok(resolution) => {
                    self.emit(&Event::Resolved(resolution));
                    break;
                }
                // Nothing to settle, or a request the backend cannot take: asking
                // again changes nothing.
                Err(e) if !e.kind.is_transient() => {
                    self.emit(&Event::Resolving {
                        attempt,
                        error: e.message,
                        retry_ms: None,
                    });
                    return report;
                }
                Err(e) => {
                    self.emit(&Event::Resolving {
                        attempt,
                        error: e.message,
                        retry_ms: Some(wait.as_millis() as u64),
                    });
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(RESOLVE_BACKOFF_MAX);
                }
            }
        }
        // The backend rewrote its report with the outcome.
        match backend.observe() {
            Ok(Some(p)) => p.report.unwrap_or(report),
            _ => report,
        }
    }

    /// The settings to start with, from what is known before anything moves; the
    /// reasons go with the request.
    fn initial(&mut self, s: &mut Steer, req: &mut Migrate) {
        let d = s.policy.decide(&s.observer.before_start(), &self.limits);
        s.applied = d.settings;
        let set = &mut req.settings;
        set.codec = Some(d.settings.codec);
        set.throttle_pct = Some(d.settings.throttle_pct);
        set.bandwidth_bytes_per_sec = Some(d.settings.bandwidth_bytes_per_sec.unwrap_or(0));
        set.max_downtime_ms = Some(d.settings.max_downtime_ms);
        set.switchover = Some(d.settings.switchover);
        // Only disks that travel have a mirror to set.
        if req.copy_storage {
            set.disk_mirror = Some(d.settings.disk_mirror);
        }
        req.reasons = d
            .reasons
            .iter()
            .map(|r| {
                (
                    r.setting.to_string(),
                    format!("{}: {}", s.policy.name(), r.reason),
                )
            })
            .collect();
    }

    /// The settings `req` starts a migration with, as its first decisions: told once
    /// it started, as later changes are, and as the VMM records them.
    fn starting(&mut self, req: &Migrate) {
        let start = Settings::default().with(&req.settings);
        for (setting, value, reason) in start.starting_decisions(&req.reasons) {
            self.emit(&Event::Decision(Decision {
                t_ms: 0.0,
                setting: setting.into(),
                value,
                reason,
            }));
        }
    }

    /// One tick of the policy: observe, decide, apply what changed.
    fn tick(
        &mut self,
        s: &mut Steer,
        backend: &mut dyn Backend,
        p: &MigrationProgress,
        sample: Option<&ProbeSample>,
    ) {
        let obs = s.observer.observe(p, sample);
        let d = s.policy.decide(&obs, &self.limits);
        // The first prediction worth keeping has the guest measured and the link past
        // the burst that fills the socket buffers; a migration over sooner keeps its
        // last one. With disks travelling and a destination slower to write them than
        // the link carries, a prediction waits until both the link's rate and the
        // copy's are known, or the first pass is over.
        if obs.link_bytes_per_sec.is_some() && s.observer.measured(&obs) {
            if s.first_prediction.is_none() && obs.t_ms >= PREDICT_AFTER_MS {
                s.first_prediction = Some((obs.t_ms, d.prediction, obs.clone()));
                self.emit(&Event::Prediction {
                    t_ms: obs.t_ms,
                    prediction: d.prediction,
                });
            }
            s.last_prediction = Some((obs.t_ms, d.prediction));
            if s.first_prediction.is_none() {
                s.last_basis = Some(obs.clone());
            }
        }
        let why = |setting: &str| {
            d.reasons
                .iter()
                .find(|r| r.setting == setting || r.setting == "preset")
                .map_or(String::new(), |r| r.reason.clone())
        };
        // The switchover rule is the policy's from the start; the VMM keeps it.
        let new = Settings {
            switchover: s.applied.switchover,
            ..d.settings
        };
        let (change, changed) = s.applied.changes_to(&new);
        if !change.is_empty() {
            let mut reasons = Reasons::new();
            for (setting, value) in changed {
                let reason = why(setting);
                let step = Decision {
                    t_ms: obs.t_ms,
                    setting: setting.into(),
                    value,
                    reason: reason.clone(),
                };
                self.emit(&Event::Decision(step.clone()));
                s.steps.push(step);
                reasons.insert(setting.into(), reason);
            }
            // A migration that just ended refuses: nothing to do then.
            if backend.apply(&change, &reasons).is_ok() {
                s.applied = new;
            }
        }
        if d.postcopy && !s.postcopy {
            s.postcopy = true;
            let step = Decision {
                t_ms: obs.t_ms,
                setting: "postcopy".into(),
                value: "true".into(),
                reason: why("postcopy"),
            };
            self.emit(&Event::Decision(step.clone()));
            s.steps.push(step);
            let _ = backend.start_postcopy();
        }
        if let Some(abort) = &d.abort
            && !s.aborted
        {
            s.aborted = true;
            let step = Decision {
                t_ms: obs.t_ms,
                setting: "abort".into(),
                value: "true".into(),
                reason: abort.clone(),
            };
            self.emit(&Event::Decision(step.clone()));
            s.steps.push(step);
            let _ = backend.cancel();
        }
    }
}

impl Steer {
    /// The prediction to hold the migration to: the first made once the link was
    /// measured, else the last one made.
    fn prediction(&self) -> Option<PredictionRecord> {
        let (at_ms, p, basis) = match &self.first_prediction {
            Some((t, p, basis)) => (*t, *p, Some(basis.clone())),
            None => {
                let (t, p) = self.last_prediction?;
                (t, p, self.last_basis.clone())
            }
        };
        Some(PredictionRecord {
            prediction_at_ms: at_ms,
            predicted_total_ms: p.total_ms.is_finite().then_some(p.total_ms),
            predicted_downtime_ms: p.downtime_ms.is_finite().then_some(p.downtime_ms),
            // The basis is the policy's own record; the report keeps it as written.
            prediction_basis: basis.and_then(|o| match serde_json::to_value(o) {
                Ok(serde_json::Value::Object(m)) => Some(m),
                _ => None,
            }),
        })
    }
}

/// Attaching to a migration under way: what it runs with now is what is applied.
fn adopt(applied: &mut Settings, p: &MigrationProgress) {
    applied.codec = p.codec;
    applied.throttle_pct = p.throttle_pct.min(99);
    applied.bandwidth_bytes_per_sec = p.bandwidth_limit_bytes_per_sec;
    applied.max_downtime_ms = p.max_downtime_ms;
}

#[cfg(test)]
mod tests;
