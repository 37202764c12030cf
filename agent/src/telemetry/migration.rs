//! One migration's spans on its source, from the driver's events: a root span for
//! the whole migration, and under it `setup` (with the call to the destination's
//! agent), each phase (`precopy`, `switchover`, `postcopy`), each pre-copy round
//! (`first pass`, begun with pre-copy, then `round`), the first copy of disks that
//! travel (`disk copy`; later rounds carry the blocks written since) and, under `switchover`, the guest's `pause` and the
//! `verification` that follows it. Every policy decision and the prediction are
//! events on the root; the measured outcome is on it when it ends. What started it is
//! the root's `ferry.migration.trigger`; a destination the agent chose (an alert's
//! evacuation) is a `placement.decision` event with its reason.
//!
//! Times come from the VMM's own clock (each event's `t_ms` since the migration
//! began), mapped once onto the wall clock, so a span's edges are as exact as the
//! driver's tick sees them; the pause comes from the VMM's measure of it.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use ferry_api::agent::MigrationState;
use ferry_api::{MigrationProgress, Phase};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;

use super::Telemetry;
use crate::driver::Event;

pub struct MigrationTrace {
    tracer: SdkTracer,
    root: Context,
    setup: Option<Context>,
    /// The wall-clock time of the VMM's t_ms = 0.
    base: Option<SystemTime>,
    phase: Option<(Phase, Context)>,
    round: Option<Context>,
    /// The switchover span and where it began; its end, once it ended.
    switchover: Option<(Context, SystemTime, Option<SystemTime>)>,
    last: Option<Box<MigrationProgress>>,
    /// Disks that travel: their first copy, from when the VMM reports their size
    /// until it reports the copy's rate (done); None once ended, or without disks.
    disk_copy: Option<Context>,
    disk_copied: bool,
}

/// Who and what: the root span's attributes.
pub struct Subject<'a> {
    pub id: &'a str,
    pub vm: &'a str,
    pub source: &'a str,
    pub destination: &'a str,
    pub policy: &'a str,
}

fn kv(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

/// Milliseconds as a duration; nonsense (negative, not finite, huge) as none.
fn ms(t: f64) -> Duration {
    Duration::try_from_secs_f64(t / 1e3).unwrap_or_default()
}

fn phase_name(p: Phase) -> Option<&'static str> {
    match p {
        Phase::Precopy => Some("precopy"),
        Phase::Switchover => Some("switchover"),
        Phase::Postcopy => Some("postcopy"),
        Phase::PostcopyPaused => Some("postcopy paused"),
        Phase::InDoubt => Some("handover in doubt"),
        // Setup is the span of that name; the ends are the root's.
        Phase::Setup | Phase::Completed | Phase::Failed | Phase::Cancelled => None,
    }
}

impl MigrationTrace {
    /// The root span and `setup`, begun now; None when traces are off.
    pub fn start(t: &Telemetry, s: &Subject) -> Option<Self> {
        let tracer = t.tracer()?.clone();
        let root = tracer
            .span_builder("migration")
            .with_kind(SpanKind::Internal)
            .with_attributes([
                kv("ferry.migration.id", s.id.to_owned()),
                kv("ferry.vm", s.vm.to_owned()),
                kv("ferry.source", s.source.to_owned()),
                kv("ferry.destination", s.destination.to_owned()),
                kv("ferry.policy", s.policy.to_owned()),
            ])
            .start_with_context(&tracer, &Context::new());
        let root = Context::new().with_span(root);
        let setup = tracer
            .span_builder("setup")
            .start_with_context(&tracer, &root);
        let setup = Some(root.with_span(setup));
        Some(Self {
            tracer,
            root,
            setup,
            base: None,
            phase: None,
            round: None,
            switchover: None,
            last: None,
            disk_copy: None,
            disk_copied: false,
        })
    }

    /// What started it (`api`, `alert:<name>`) and, when the agent chose the
    /// destination, that choice as a `placement.decision` event with its reason.
    pub fn triggered(&self, trigger: &str, placement: Option<&ferry_api::Decision>) {
        let span = self.root.span();
        span.set_attribute(kv("ferry.migration.trigger", trigger.to_owned()));
        if let Some(d) = placement {
            span.add_event(
                "placement.decision",
                vec![
                    kv("ferry.setting", d.setting.clone()),
                    kv("ferry.value", d.value.clone()),
                    kv("ferry.reason", d.reason.clone()),
                ],
            );
        }
    }

    /// The root's W3C `traceparent`: what the destination's agent and the VMMs are
    /// given, so their work joins this trace.
    pub fn traceparent(&self) -> Option<String> {
        super::traceparent(&self.root)
    }

    /// (trace id, span id) of the root, for log lines.
    pub fn ids(&self) -> (String, String) {
        let sc = self.root.span().span_context().clone();
        (sc.trace_id().to_string(), sc.span_id().to_string())
    }

    /// A client span for an HTTP call made during setup (`POST /v1/incoming` to the
    /// destination's agent): its context, to send as `traceparent`, and to end with
    /// [`MigrationTrace::call_ended`].
    pub fn call(&self, method: &'static str, route: &'static str, url: &str) -> Context {
        let parent = self.setup.as_ref().unwrap_or(&self.root);
        let span = self
            .tracer
            .span_builder(format!("{method} {route}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                kv("http.request.method", method),
                kv("url.full", url.to_owned()),
            ])
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }

    pub fn call_ended(call: &Context, status: Option<u16>, error: Option<&str>) {
        let span = call.span();
        if let Some(code) = status {
            span.set_attribute(kv("http.response.status_code", i64::from(code)));
        }
        if let Some(e) = error {
            span.set_status(Status::error(e.to_owned()));
        }
        span.end();
    }

    fn at(&self, t_ms: f64) -> SystemTime {
        self.base
            .and_then(|b| b.checked_add(ms(t_ms)))
            .unwrap_or_else(SystemTime::now)
    }

    fn child(
        &self,
        name: impl Into<Cow<'static, str>>,
        parent: &Context,
        at: SystemTime,
    ) -> Context {
        let span = self
            .tracer
            .span_builder(name)
            .with_start_time(at)
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }

    /// What the latest progress says of a round or phase, put on `cx`'s span.
    fn progress_attributes(&self, cx: &Context) {
        let Some(p) = &self.last else { return };
        cx.span().set_attributes([
            kv("ferry.dirty_pages_per_second", p.dirty_pages_per_sec),
            kv(
                "ferry.bandwidth_bytes_per_second",
                p.bandwidth_bytes_per_sec,
            ),
            kv("ferry.codec", p.codec.to_string()),
            kv("ferry.compression_ratio", p.compression_ratio),
            kv("ferry.throttle_ratio", f64::from(p.throttle_pct) / 100.0),
            kv("ferry.pages_sent", p.pages_sent as i64),
            kv("ferry.bytes_on_wire", p.bytes_on_wire as i64),
        ]);
        if let Some(d) = p.disk_bytes_pending {
            cx.span()
                .set_attribute(kv("ferry.disk.bytes_pending", d as i64));
        }
    }

    /// The disks' first copy, under pre-copy: the rounds after it re-send the
    /// blocks the guest wrote meanwhile (each round's `ferry.disk.bytes_pending`).
    fn disk(&mut self, p: &MigrationProgress) {
        let at = self.at(p.elapsed_ms as f64);
        if self.disk_copy.is_none() && !self.disk_copied && p.disk_bytes_total.is_some() {
            let parent = match &self.phase {
                Some((Phase::Precopy, cx)) => cx.clone(),
                _ => self.root.clone(),
            };
            let cx = self.child("disk copy", &parent, at);
            if let Some(total) = p.disk_bytes_total {
                cx.span()
                    .set_attribute(kv("ferry.disk.bytes", total as i64));
            }
            self.disk_copy = Some(cx);
        }
        if let Some(rate) = p.disk_copy_bytes_per_sec
            && let Some(cx) = self.disk_copy.take()
        {
            cx.span()
                .set_attribute(kv("ferry.disk.copy_bytes_per_second", rate));
            cx.span().end_with_timestamp(at);
            self.disk_copied = true;
        }
    }

    fn end_round(&mut self, at: SystemTime) {
        if let Some(r) = self.round.take() {
            self.progress_attributes(&r);
            r.span().end_with_timestamp(at);
        }
    }

    pub fn on_event(&mut self, e: &Event) {
        match e {
            Event::Started {
                memory_pages,
                attached,
                ..
            } => {
                if !attached {
                    self.base = Some(SystemTime::now());
                }
                self.root.span().set_attributes([
                    kv("ferry.memory_pages", *memory_pages as i64),
                    kv("ferry.attached", *attached),
                ]);
                if let Some(s) = self.setup.take() {
                    s.span().end();
                }
            }
            Event::Progress { progress, .. } => {
                if self.base.is_none() {
                    self.base = SystemTime::now().checked_sub(ms(progress.elapsed_ms as f64));
                    // (None when the VMM's clock says nonsense: events are then timed
                    // as they arrive.)
                }
                self.disk(progress);
                self.last = Some(progress.clone());
            }
            Event::PhaseStarted { phase, t_ms } => {
                let at = self.at(*t_ms as f64);
                if let Some(name) = phase_name(*phase) {
                    let cx = self.child(name, &self.root, at);
                    match phase {
                        Phase::Switchover => self.switchover = Some((cx.clone(), at, None)),
                        // Pre-copy begins with its first pass, whether or not a tick
                        // sees round 1 before round 2.
                        Phase::Precopy => {
                            let first = self.child("first pass", &cx, at);
                            first.span().set_attribute(kv("ferry.round", 1));
                            self.round = Some(first);
                        }
                        _ => {}
                    }
                    self.phase = Some((*phase, cx));
                }
            }
            Event::PhaseEnded { phase, t_ms } => {
                let at = self.at(*t_ms as f64);
                if *phase == Phase::Precopy {
                    self.end_round(at);
                }
                if let Some((p, cx)) = self.phase.take_if(|(p, _)| p == phase) {
                    self.progress_attributes(&cx);
                    cx.span().end_with_timestamp(at);
                    if p == Phase::Switchover
                        && let Some(s) = self.switchover.as_mut()
                    {
                        s.2 = Some(at);
                    }
                }
            }
            Event::Round {
                round,
                remaining_pages,
                t_ms,
            } => {
                // Round 1 is the first pass, begun with the phase; a round seen only
                // once pre-copy is over (a tick that saw both) has no span of its own
                // (the root's `ferry.rounds` counts it).
                let Some((Phase::Precopy, precopy)) = &self.phase else {
                    return;
                };
                let at = self.at(*t_ms as f64);
                if *round <= 1 {
                    if let Some(r) = &self.round {
                        r.span().set_attribute(kv(
                            "ferry.round.remaining_pages",
                            *remaining_pages as i64,
                        ));
                    }
                    return;
                }
                let precopy = precopy.clone();
                self.end_round(at);
                let cx = self.child("round", &precopy, at);
                cx.span().set_attributes([
                    kv("ferry.round", i64::from(*round)),
                    kv("ferry.round.remaining_pages", *remaining_pages as i64),
                ]);
                self.round = Some(cx);
            }
            Event::Decision(d) => self.root.span().add_event_with_timestamp(
                "policy.decision",
                self.at(d.t_ms),
                vec![
                    kv("ferry.setting", d.setting.clone()),
                    kv("ferry.value", d.value.clone()),
                    kv("ferry.reason", d.reason.clone()),
                ],
            ),
            Event::Prediction { t_ms, prediction } => {
                self.root.span().add_event_with_timestamp(
                    "policy.prediction",
                    self.at(*t_ms),
                    vec![
                        kv("ferry.predicted.total_ms", prediction.total_ms),
                        kv("ferry.predicted.downtime_ms", prediction.downtime_ms),
                        kv("ferry.predicted.converges", prediction.converges),
                    ],
                );
                self.root.span().set_attributes([
                    kv("ferry.predicted.total_ms", prediction.total_ms),
                    kv("ferry.predicted.downtime_ms", prediction.downtime_ms),
                ]);
            }
            Event::Cancelling { why } => self
                .root
                .span()
                .add_event("cancelling", vec![kv("ferry.reason", why.clone())]),
            Event::Resolving { attempt, error, .. } => self.root.span().add_event(
                "handover in doubt",
                vec![
                    kv("ferry.attempt", i64::from(*attempt)),
                    kv("ferry.reason", error.clone()),
                ],
            ),
            Event::Resolved(r) => self.root.span().add_event(
                "handover settled",
                vec![kv("ferry.vm_runs_on", r.vm_runs_on.clone())],
            ),
            Event::Outcome(report) => self.outcome(report),
        }
    }

    fn outcome(&mut self, report: &ferry_api::DriverReport) {
        let m = &report.migration;
        let now = SystemTime::now();
        self.end_round(now);
        if let Some(cx) = self.disk_copy.take() {
            cx.span().end_with_timestamp(now);
        }
        if let Some((_, cx)) = self.phase.take() {
            cx.span().end_with_timestamp(now);
        }
        // A switchover quicker than the driver's tick was never seen as a phase: its
        // span comes from the report, ending now.
        if self.switchover.is_none()
            && let Some(pause) = m.core.switchover_ms
        {
            let start = now.checked_sub(ms(pause)).unwrap_or(now);
            let cx = self.child("switchover", &self.root, start);
            cx.span().end_with_timestamp(now);
            self.switchover = Some((cx, start, Some(now)));
        }
        if let Some((cx, start, end)) = self.switchover.take() {
            let end = end.unwrap_or(now);
            if let Some(pause) = m.core.switchover_ms {
                let resumed = start.checked_add(ms(pause)).unwrap_or(end).min(end);
                let p = self.child("pause", &cx, start);
                p.span().set_attributes([
                    kv("ferry.switchover_ms", pause),
                    kv("ferry.downtime_ms", m.downtime_ms.unwrap_or(pause)),
                ]);
                p.span().end_with_timestamp(resumed);
                if let Some(ok) = m.memory_verified {
                    let v = self.child("verification", &cx, resumed);
                    v.span().set_attribute(kv("ferry.memory_verified", ok));
                    if !ok {
                        v.span()
                            .set_status(Status::error("the memory digests differ"));
                    }
                    v.span().end_with_timestamp(end);
                }
            }
        }
        let mut attrs = vec![
            kv("ferry.outcome", m.core.outcome.to_string()),
            kv("ferry.mode", m.mode.to_string()),
            kv("ferry.total_ms", m.core.total_ms),
            kv("ferry.rounds", i64::from(m.rounds)),
            kv("ferry.bytes_on_wire", m.bytes_on_wire as i64),
            kv("ferry.disk.bytes_on_wire", m.disk_bytes_on_wire as i64),
            kv("ferry.pages_sent", m.pages_sent as i64),
            kv("ferry.zero_pages", m.zero_pages as i64),
            kv("ferry.codec", m.codec.to_string()),
            kv("ferry.compression_ratio", m.compression_ratio),
            kv(
                "ferry.throttle_max_ratio",
                f64::from(m.throttle_max_pct) / 100.0,
            ),
        ];
        if let Some(d) = m.downtime_ms {
            attrs.push(kv("ferry.downtime_ms", d));
        }
        if let Some(s) = m.core.switchover_ms {
            attrs.push(kv("ferry.switchover_ms", s));
        }
        if let Some(v) = m.memory_verified {
            attrs.push(kv("ferry.memory_verified", v));
        }
        // The prediction the migration is held to (a short one's last).
        if let Some(p) = &report.prediction {
            if let Some(t) = p.predicted_total_ms {
                attrs.push(kv("ferry.predicted.total_ms", t));
            }
            if let Some(d) = p.predicted_downtime_ms {
                attrs.push(kv("ferry.predicted.downtime_ms", d));
            }
        }
        self.root.span().set_attributes(attrs);
    }

    /// Ends the root: `state` is how the migration ended, `error` why it failed.
    pub fn end(mut self, state: MigrationState, error: Option<&str>) {
        let now = SystemTime::now();
        if let Some(s) = self.setup.take() {
            s.span().end_with_timestamp(now);
        }
        if let Some(cx) = self.disk_copy.take() {
            cx.span().end_with_timestamp(now);
        }
        self.end_round(now);
        if let Some((_, cx)) = self.phase.take() {
            cx.span().end_with_timestamp(now);
        }
        let root = self.root.span();
        root.set_attribute(kv("ferry.state", state.as_str()));
        if state != MigrationState::Completed {
            root.set_status(Status::error(
                error.map_or_else(|| state.as_str().to_owned(), str::to_owned),
            ));
        } else {
            root.set_status(Status::Ok);
        }
        root.end_with_timestamp(now);
    }
}
