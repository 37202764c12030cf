//! The driver against a backend that only pretends: every request it gets is recorded,
//! and its migration moves a step per observation.

use std::cell::RefCell;
use std::rc::Rc;

use ferry_api::{Codec, MigrationReport, Outcome, ReportCore, SettingsChange};

use super::*;
use crate::policy::{Choice, Decision, Stage};

#[derive(Default)]
struct Log {
    started: Option<Migrate>,
    applied: Vec<(SettingsChange, Reasons)>,
    postcopy: bool,
    cancelled: bool,
}

/// A migration of 1000 pages that sends half of what is left each observation,
/// switching to post-copy when asked and ending when little is left.
struct Fake {
    log: Rc<RefCell<Log>>,
    progress: Option<MigrationProgress>,
}

impl Fake {
    fn new(log: Rc<RefCell<Log>>) -> Self {
        Self {
            log,
            progress: None,
        }
    }
}

fn report(outcome: Outcome, codec: Codec) -> MigrationReport {
    MigrationReport {
        core: ReportCore {
            outcome,
            error: None,
            total_ms: 1000.0,
            switchover_ms: Some(3.0),
        },
        mode: ferry_api::Mode::Precopy,
        to: "dst:1".into(),
        tls: true,
        downtime_ms: Some(5.0),
        max_heartbeat_gap_ms: 6.0,
        rounds: 3,
        bytes_on_wire: 4096 * 1000,
        disk_bytes_on_wire: 0,
        pages_sent: 1000,
        zero_pages: 0,
        codec,
        compression_ratio: 1.0,
        throttle_max_pct: 0,
        memory_verified: Some(true),
        guest_integrity_errors: 0,
        decisions: Vec::new(),
        postcopy_faults: None,
        fault_latency_p50_us: None,
        fault_latency_p99_us: None,
        vcpu_blocked_ms: None,
        recoveries: 0,
        disk_bytes_copied: None,
        disk_bytes_mirrored: None,
    }
}

impl Backend for Fake {
    fn mechanics(&mut self) -> Result<ferry_api::Mechanics, BackendError> {
        Ok(crate::policy::fixture::mechanics())
    }

    fn vm(&mut self) -> Result<VmFacts, BackendError> {
        Ok(VmFacts {
            memory_pages: 1000,
            dirty_pages_per_sec: 100.0,
            pid: None,
        })
    }

    fn start(&mut self, req: &Migrate) -> Result<(), BackendError> {
        let mut p = observe::tests::progress();
        p.phase = Phase::Setup;
        p.codec = req.settings.codec.unwrap_or_default();
        self.progress = Some(p);
        self.log.borrow_mut().started = Some(req.clone());
        Ok(())
    }

    fn observe(&mut self) -> Result<Option<MigrationProgress>, BackendError> {
        let log = self.log.borrow();
        let Some(p) = self.progress.as_mut() else {
            return Ok(None);
        };
        if p.report.is_some() {
            return Ok(Some(p.clone()));
        }
        p.elapsed_ms += 500;
        p.bytes_on_wire += 64 << 20;
        p.bandwidth_bytes_per_sec = 100e6;
        if log.cancelled {
            p.phase = Phase::Cancelled;
            p.report = Some(report(Outcome::Cancelled, p.codec));
        } else if p.phase == Phase::Setup {
            // The handshake takes a look of its own.
            if p.elapsed_ms > 500 {
                p.phase = Phase::Precopy;
                p.remaining_dirty_pages = 1000;
            }
        } else if log.postcopy && !p.phase.is_postcopy() {
            p.phase = Phase::Postcopy;
        } else if p.phase == Phase::Postcopy || p.remaining_dirty_pages < 10 {
            p.phase = Phase::Completed;
            p.report = Some(report(Outcome::Completed, p.codec));
        } else {
            p.round += 1;
            p.pages_sent += p.remaining_dirty_pages;
            p.remaining_dirty_pages /= 2;
            p.dirty_pages_last_round = p.remaining_dirty_pages;
        }
        Ok(Some(p.clone()))
    }

    fn apply(&mut self, change: &SettingsChange, reasons: &Reasons) -> Result<(), BackendError> {
        if let (Some(p), Some(c)) = (self.progress.as_mut(), change.codec) {
            p.codec = c;
        }
        self.log
            .borrow_mut()
            .applied
            .push((change.clone(), reasons.clone()));
        Ok(())
    }

    fn start_postcopy(&mut self) -> Result<(), BackendError> {
        self.log.borrow_mut().postcopy = true;
        Ok(())
    }

    fn cancel(&mut self) -> Result<(), BackendError> {
        self.log.borrow_mut().cancelled = true;
        Ok(())
    }

    fn resolve(&mut self) -> Result<ferry_api::Resolution, BackendError> {
        Err(BackendError::new(ErrorKind::NotFound, "nothing in doubt"))
    }
}

/// Starts with lz4, switches to zstd:1 in the second round and to post-copy in the
/// third; predicts the same all along.
struct Scripted;

impl Policy for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    fn decide(&mut self, obs: &Observation, _: &Limits) -> Choice {
        let settings = Settings {
            codec: if obs.round >= 2 {
                Codec::Zstd(1)
            } else {
                Codec::Lz4
            },
            ..Settings::default()
        };
        let postcopy = obs.round >= 3 && obs.stage == Stage::Rounds;
        let codec = settings.codec;
        Choice {
            settings,
            postcopy,
            abort: None,
            prediction: Prediction {
                total_ms: 1500.0,
                downtime_ms: 20.0,
                converges: true,
            },
            reasons: vec![
                Decision {
                    t_ms: obs.t_ms,
                    setting: "codec".into(),
                    value: codec.to_string(),
                    reason: format!("round {}", obs.round),
                },
                Decision {
                    t_ms: obs.t_ms,
                    setting: "postcopy".into(),
                    value: postcopy.to_string(),
                    reason: "the script says so".into(),
                },
            ],
        }
    }
}

fn migrate() -> Migrate {
    Migrate {
        to: "dst:1".into(),
        ..Migrate::default()
    }
}

#[test]
fn a_static_migration_runs_to_its_report_and_says_each_phase() {
    let log = Rc::new(RefCell::new(Log::default()));
    let events = RefCell::new(Vec::new());
    let mut driver = Driver::new(None, Limits::default()).every(Duration::from_millis(1));
    driver.subscribe(|e| events.borrow_mut().push(e.clone()));
    let r = driver
        .run(&mut Fake::new(log.clone()), Start::New(Box::new(migrate())))
        .unwrap();
    assert_eq!(r.migration.core.outcome, Outcome::Completed);
    assert_eq!(r.policy, "static");
    assert!(r.policy_steps.is_none() && r.prediction.is_none());
    // Nothing the operator did not ask for.
    assert_eq!(log.borrow().started.as_ref().unwrap(), &migrate());
    assert!(log.borrow().applied.is_empty());
    let phases: Vec<Phase> = events
        .borrow()
        .iter()
        .filter_map(|e| match e {
            Event::PhaseStarted { phase, .. } => Some(*phase),
            _ => None,
        })
        .collect();
    assert_eq!(phases, [Phase::Setup, Phase::Precopy, Phase::Completed]);
    assert!(matches!(
        events.borrow().first(),
        Some(Event::Started { .. })
    ));
    assert!(matches!(events.borrow().last(), Some(Event::Outcome(_))));
}

#[test]
fn the_policy_starts_the_migration_changes_it_with_reasons_and_switches_to_postcopy() {
    let log = Rc::new(RefCell::new(Log::default()));
    let decisions = RefCell::new(Vec::new());
    let mut driver =
        Driver::new(Some(Box::new(Scripted)), Limits::default()).every(Duration::from_millis(1));
    driver.subscribe(|e| {
        if let Event::Decision(d) = e {
            decisions.borrow_mut().push(d.clone());
        }
    });
    let r = driver
        .run(&mut Fake::new(log.clone()), Start::New(Box::new(migrate())))
        .unwrap();
    let log = log.borrow();
    // The first decision went with the request, its reasons named after the policy.
    let started = log.started.as_ref().unwrap();
    assert_eq!(started.settings.codec, Some(Codec::Lz4));
    assert_eq!(
        started.settings.switchover,
        Some(ferry_api::Switchover::Halving)
    );
    assert_eq!(started.reasons["codec"], "scripted: round 0");
    // Round 2 changed the codec, with its reason.
    let (change, reasons) = &log.applied[0];
    assert_eq!(change.codec, Some(Codec::Zstd(1)));
    assert_eq!(reasons["codec"], "round 2");
    assert!(log.postcopy, "the policy's post-copy was not started");
    assert_eq!(r.migration.core.outcome, Outcome::Completed);
    assert_eq!(r.migration.codec, Codec::Zstd(1));
    let steps = r.policy_steps.unwrap();
    let settings: Vec<&str> = steps.iter().map(|d| d.setting.as_str()).collect();
    assert_eq!(settings, ["codec", "postcopy"]);
    // Subscribers are told the starting settings first (as the VMM records them),
    // then each change.
    let told = decisions.borrow();
    let (first, changes) = told.split_at(told.len() - steps.len());
    assert_eq!(changes, &steps[..]);
    assert!(
        first
            .iter()
            .any(|d| d.setting == "codec" && d.value == "lz4" && d.reason == "scripted: round 0"),
        "{first:?}"
    );
    assert!(first.iter().all(|d| d.t_ms == 0.0), "{first:?}");
    let p = r
        .prediction
        .expect("a prediction once the link was measured");
    assert_eq!(p.predicted_total_ms, Some(1500.0));
}

#[test]
fn a_cancel_reaches_the_backend_and_the_report_says_so() {
    let log = Rc::new(RefCell::new(Log::default()));
    let flag = AtomicBool::new(true);
    let r = Driver::new(None, Limits::default())
        .every(Duration::from_millis(1))
        .cancel_on(&flag)
        .run(&mut Fake::new(log.clone()), Start::New(Box::new(migrate())))
        .unwrap();
    assert!(log.borrow().cancelled);
    assert_eq!(r.migration.core.outcome, Outcome::Cancelled);
}

#[test]
fn attaching_needs_a_migration_and_one_that_ended_gives_its_report() {
    let log = Rc::new(RefCell::new(Log::default()));
    let mut fake = Fake::new(log);
    let e = Driver::new(None, Limits::default())
        .every(Duration::from_millis(1))
        .run(&mut fake, Start::Attach)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    Driver::new(None, Limits::default())
        .every(Duration::from_millis(1))
        .run(&mut fake, Start::New(Box::new(migrate())))
        .unwrap();
    let again = Driver::new(None, Limits::default())
        .every(Duration::from_millis(1))
        .run(&mut fake, Start::Attach)
        .unwrap();
    assert_eq!(again.migration.core.outcome, Outcome::Completed);
}

#[test]
fn a_backend_past_the_drivers_deadline_is_told_to_stop() {
    let log = Rc::new(RefCell::new(Log::default()));
    let r = Driver::new(None, Limits::default())
        .every(Duration::from_millis(1))
        .with_deadline(Duration::ZERO)
        .run(&mut Fake::new(log.clone()), Start::New(Box::new(migrate())))
        .unwrap();
    assert!(log.borrow().cancelled);
    assert_eq!(r.migration.core.outcome, Outcome::Cancelled);
}
