//! The agent's metrics, in Prometheus' text format: its API's requests, the VMs it
//! holds, the migrations it drives (counted as they end, followed while they run),
//! its datastores and its peers. Names follow Prometheus' conventions: base units,
//! `_total` for counters, few and bounded labels. A VM's or a migration's series go
//! when it does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use ferry_api::agent::{MigrationInfo, MigrationState, VmInfo, VmPresence};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::sync::lock;

/// API latency, seconds: the API answers from memory, so a millisecond to tens.
const API_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// A guest's pause, seconds: resolves 1 to 500 ms, where downtime limits are set.
const DOWNTIME_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
];
/// A migration's whole time, seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// |predicted − measured| / measured.
const ERROR_BUCKETS: &[f64] = &[0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    agent_info: IntGaugeVec,
    build_info: IntGaugeVec,
    vms: IntGaugeVec,
    heartbeat_gap: GaugeVec,
    migrations: IntCounterVec,
    in_progress: IntGaugeVec,
    duration: Histogram,
    downtime: Histogram,
    decisions: IntCounterVec,
    bytes: IntCounterVec,
    over_limit: IntCounter,
    prediction_error: HistogramVec,
    remaining: GaugeVec,
    bandwidth: GaugeVec,
    round: GaugeVec,
    throttle: GaugeVec,
    compression: GaugeVec,
    max_downtime: GaugeVec,
    dirty_rate: GaugeVec,
    decided: GaugeVec,
    datastore_free: GaugeVec,
    datastore_size: GaugeVec,
    peer_up: IntGaugeVec,
    spans: IntCounterVec,
    alerts: IntCounterVec,
    evacuating: IntGaugeVec,
    evacuation_queued: IntGaugeVec,
    /// Each peer's last answer to `/healthz`.
    peers: Mutex<BTreeMap<String, bool>>,
    /// One scrape at a time: each sets the per-VM gauges afresh, and two at once
    /// could each encode the other's half-set state.
    rendering: Mutex<()>,
}

/// What the agent is: its name and version, and what is measured at each scrape.
pub struct Scrape<'a> {
    pub host: &'a str,
    pub vms: &'a [VmInfo],
    /// The migrations under way.
    pub live: &'a [MigrationInfo],
    /// VMs arriving here.
    pub arriving: usize,
    pub datastores: &'a [PathBuf],
    /// The VMs' signals and the probes' counters.
    pub observed: &'a super::sampler::Observed,
    /// Spans exported and dropped (traces).
    pub spans: (u64, u64),
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    // A name registered twice is a bug in this file, caught by its tests.
    r.register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help);
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(name, help).buckets(buckets.to_vec())
        };
        // Construction from constant names and labels cannot fail.
        let counter = |name, help, labels: &[&str]| {
            register(
                &r,
                IntCounterVec::new(opts(name, help), labels).expect("a valid counter"),
            )
        };
        let gauge = |name, help, labels: &[&str]| {
            register(
                &r,
                GaugeVec::new(opts(name, help), labels).expect("a valid gauge"),
            )
        };
        let int_gauge = |name, help, labels: &[&str]| {
            register(
                &r,
                IntGaugeVec::new(opts(name, help), labels).expect("a valid gauge"),
            )
        };
        let single = |name, help, buckets| {
            register(
                &r,
                Histogram::with_opts(hist(name, help, buckets)).expect("a valid histogram"),
            )
        };
        let histogram = |name, help, buckets, labels: &[&str]| {
            register(
                &r,
                HistogramVec::new(hist(name, help, buckets), labels).expect("a valid histogram"),
            )
        };
        let m = Self {
            requests: counter(
                "ferry_agent_http_requests_total",
                "API requests answered, by route template, method and status.",
                &["route", "method", "code"],
            ),
            latency: histogram(
                "ferry_agent_http_request_duration_seconds",
                "Time to answer an API request, by route template.",
                API_BUCKETS,
                &["route"],
            ),
            agent_info: int_gauge(
                "ferry_agent_info",
                "The agent: its host name and version.",
                &["host", "version"],
            ),
            build_info: int_gauge(
                "ferry_build_info",
                "The ferry build: its version.",
                &["version"],
            ),
            vms: int_gauge(
                "ferry_agent_vms",
                "VMs of this host's inventory, by presence.",
                &["presence"],
            ),
            heartbeat_gap: gauge(
                "ferry_vm_heartbeat_gap_seconds",
                "The longest gap between two heartbeats the lab guest saw since its VMM started (the guest's own view of its pauses).",
                &["vm"],
            ),
            migrations: counter(
                "ferry_migrations_total",
                "Migrations this agent drove that ended, by outcome, mode, policy and transport (tls, or tcp: plain, --insecure).",
                &["outcome", "mode", "policy", "transport"],
            ),
            in_progress: int_gauge(
                "ferry_migrations_in_progress",
                "Migrations under way: driven from here (outbound) or arriving (inbound).",
                &["direction"],
            ),
            duration: single(
                "ferry_migration_duration_seconds",
                "Completed migrations' total time.",
                DURATION_BUCKETS,
            ),
            downtime: single(
                "ferry_migration_downtime_seconds",
                "Completed migrations' downtime: the guest's pause for the handover.",
                DOWNTIME_BUCKETS,
            ),
            decisions: counter(
                "ferry_policy_decisions_total",
                "Settings the policy set or changed in this agent's migrations, by setting and policy.",
                &["setting", "policy"],
            ),
            bytes: counter(
                "ferry_migration_bytes_total",
                "Bytes this agent's migrations sent on the wire, by stream (memory or disk) and the codec they were encoded with.",
                &["stream", "codec"],
            ),
            over_limit: register(
                &r,
                IntCounter::with_opts(opts(
                    "ferry_migration_downtime_over_limit_total",
                    "Completed migrations whose downtime exceeded the operator's max_downtime_ms.",
                ))
                .expect("a valid counter"),
            ),
            prediction_error: histogram(
                "ferry_policy_prediction_error_ratio",
                "Completed migrations: |predicted - measured| / measured, of the total time and of the downtime.",
                ERROR_BUCKETS,
                &["what"],
            ),
            remaining: gauge(
                "ferry_migration_remaining_bytes",
                "A migration under way: guest memory still to send (the dirty set, or pages post-copy still owes).",
                &["vm"],
            ),
            bandwidth: gauge(
                "ferry_migration_bandwidth_bytes_per_second",
                "A migration under way: the stream's measured bandwidth.",
                &["vm"],
            ),
            round: gauge(
                "ferry_migration_round",
                "A migration under way: its pre-copy round.",
                &["vm"],
            ),
            throttle: gauge(
                "ferry_migration_throttle_ratio",
                "A migration under way: the share of the guest's vCPU time held back (0 to 1).",
                &["vm"],
            ),
            compression: gauge(
                "ferry_migration_compression_ratio",
                "A migration under way: page bytes sent per byte on the wire (1: no gain; 3: a third of the bytes).",
                &["vm"],
            ),
            max_downtime: gauge(
                "ferry_migration_max_downtime_seconds",
                "A migration under way: the downtime limit in force.",
                &["vm"],
            ),
            dirty_rate: gauge(
                "ferry_migration_dirty_pages_per_second",
                "A migration under way: pages the guest dirties per second, as the VMM's dirty log measures it.",
                &["vm"],
            ),
            decided: gauge(
                "ferry_migration_decisions",
                "A migration under way: settings the policy set or changed so far (a change marks a decision).",
                &["vm"],
            ),
            datastore_free: gauge(
                "ferry_datastore_free_bytes",
                "A datastore's space free for this agent's disks.",
                &["datastore"],
            ),
            datastore_size: gauge(
                "ferry_datastore_size_bytes",
                "A datastore's file system size.",
                &["datastore"],
            ),
            peer_up: int_gauge(
                "ferry_peer_up",
                "Whether a peer agent answered /healthz at the last look (1) or not (0).",
                &["peer"],
            ),
            spans: counter(
                "ferry_otel_spans_total",
                "Trace spans this agent ended, by what became of them: exported, or dropped (the export queue was full, or the collector failed or did not answer in time).",
                &["outcome"],
            ),
            alerts: counter(
                "ferry_alerts_total",
                "Alerts Alertmanager posted to this agent, by what it did with each: evacuate (this host), migrate (a VM here), repeat (already acted on), cancel (resolved: its queued VMs stay), ignored (no rule, or another host's).",
                &["action"],
            ),
            evacuating: int_gauge(
                "ferry_host_evacuating",
                "Whether a firing alert has this host evacuated (1): it takes no VM in.",
                &[],
            ),
            evacuation_queued: int_gauge(
                "ferry_evacuation_queued_vms",
                "VMs alerts asked to move that wait for an outbound slot or a destination.",
                &[],
            ),
            peers: Mutex::new(BTreeMap::new()),
            rendering: Mutex::new(()),
            registry: r,
        };
        // Present at zero from the start: a series born with its first observation
        // shows Prometheus no increase, and rate() over it stays empty.
        for what in ["total", "downtime"] {
            m.prediction_error.with_label_values(&[what]);
        }
        m
    }
}

impl Metrics {
    pub fn request(&self, route: &'static str, method: &'static str, code: u16, secs: f64) {
        self.requests
            .with_label_values(&[route, method, &code.to_string()])
            .inc();
        self.latency.with_label_values(&[route]).observe(secs);
    }

    /// A migration this agent drove ended: counted once, as its record says.
    pub fn migration_ended(&self, m: &MigrationInfo, mode: &str) {
        self.migrations
            .with_label_values(&[m.state.as_str(), mode, &m.policy, transport(m.tls)])
            .inc();
        if m.state != MigrationState::Completed {
            return;
        }
        if let Some(t) = m.total_ms {
            self.duration.observe(t / 1e3);
        }
        if let Some(d) = m.downtime_ms {
            self.downtime.observe(d / 1e3);
        }
        if let (Some(d), Some(limit)) = (m.downtime_ms, m.max_downtime_ms)
            && d > limit
        {
            self.over_limit.inc();
        }
        for (what, predicted, measured) in [
            ("total", m.predicted_total_ms, m.total_ms),
            ("downtime", m.predicted_downtime_ms, m.downtime_ms),
        ] {
            if let (Some(p), Some(x)) = (predicted, measured)
                && x > 0.0
            {
                self.prediction_error
                    .with_label_values(&[what])
                    .observe((p - x).abs() / x);
            }
        }
    }

    /// The policy set or changed a setting of a migration under way.
    pub fn decision(&self, setting: &str, policy: &str) {
        self.decisions.with_label_values(&[setting, policy]).inc();
    }

    /// A migration sent `memory` and `disk` more bytes on the wire, under `codec`.
    pub fn bytes_sent(&self, codec: ferry_api::Codec, memory: u64, disk: u64) {
        let codec = codec.to_string();
        for (stream, n) in [("memory", memory), ("disk", disk)] {
            // A stream that has sent nothing yet has no series: a migration without
            // disks adds no disk series.
            if n > 0 {
                self.bytes.with_label_values(&[stream, &codec]).inc_by(n);
            }
        }
    }

    /// An alert was booked, and what it led to.
    pub fn alert(&self, action: &str) {
        self.alerts.with_label_values(&[action]).inc();
    }

    /// The evacuation's state, after each change.
    pub fn evacuation(&self, evacuating: bool, queued: usize) {
        self.evacuating
            .with_label_values(&[] as &[&str])
            .set(evacuating.into());
        self.evacuation_queued
            .with_label_values(&[] as &[&str])
            .set(queued as i64);
    }

    /// A peer answered (or not) its `/healthz`.
    pub fn peer_seen(&self, peer: &str, up: bool) {
        lock(&self.peers).insert(peer.to_owned(), up);
    }

    pub fn render(&self, s: &Scrape) -> String {
        let _one = lock(&self.rendering);
        self.agent_info.reset();
        self.agent_info
            .with_label_values(&[s.host, env!("CARGO_PKG_VERSION")])
            .set(1);
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for &p in VmPresence::ALL {
            let n = s.vms.iter().filter(|v| v.presence == p).count();
            self.vms.with_label_values(&[p.as_str()]).set(n as i64);
        }
        // Per-VM and per-migration series are set afresh: those of a VM that left,
        // or a migration that ended, go.
        self.heartbeat_gap.reset();
        for v in s.vms {
            if let Some(gap) = v.max_heartbeat_gap_ms {
                self.heartbeat_gap
                    .with_label_values(&[&v.name])
                    .set(gap / 1e3);
            }
        }
        self.in_progress
            .with_label_values(&["outbound"])
            .set(s.live.len() as i64);
        self.in_progress
            .with_label_values(&["inbound"])
            .set(s.arriving as i64);
        for g in [
            &self.remaining,
            &self.bandwidth,
            &self.round,
            &self.throttle,
            &self.compression,
            &self.max_downtime,
            &self.dirty_rate,
            &self.decided,
        ] {
            g.reset();
        }
        for m in s.live {
            let Some(p) = &m.progress else { continue };
            let vm = [m.vm.as_str()];
            let remaining_pages = p.postcopy_pages_left.unwrap_or(p.remaining_dirty_pages);
            self.remaining
                .with_label_values(&vm)
                .set(remaining_pages as f64 * crate::policy::PAGE);
            self.bandwidth
                .with_label_values(&vm)
                .set(p.bandwidth_bytes_per_sec);
            self.round.with_label_values(&vm).set(f64::from(p.round));
            self.throttle
                .with_label_values(&vm)
                .set(f64::from(p.throttle_pct) / 100.0);
            self.max_downtime
                .with_label_values(&vm)
                .set(p.max_downtime_ms as f64 / 1e3);
            self.compression
                .with_label_values(&vm)
                .set(p.compression_ratio);
            self.dirty_rate
                .with_label_values(&vm)
                .set(p.dirty_pages_per_sec);
            self.decided
                .with_label_values(&vm)
                .set(m.decisions.len() as f64);
        }
        self.datastore_free.reset();
        self.datastore_size.reset();
        for d in s.datastores {
            if let Some((free, size)) = space(d) {
                let label = [d.to_str().unwrap_or("?")];
                self.datastore_free.with_label_values(&label).set(free);
                self.datastore_size.with_label_values(&label).set(size);
            }
        }
        // Counters kept by the exporter: brought up to its totals.
        for (outcome, total) in [("exported", s.spans.0), ("dropped", s.spans.1)] {
            let c = self.spans.with_label_values(&[outcome]);
            c.inc_by(total.saturating_sub(c.get()));
        }
        for (peer, up) in lock(&self.peers).iter() {
            self.peer_up.with_label_values(&[peer]).set(i64::from(*up));
        }
        let mut families = self.registry.gather();
        families.extend(super::families::observed(s.observed, s.vms));
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        // Encoding gathered families (none empty) into a buffer cannot fail.
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A folder's file system: bytes free to an unprivileged writer, and its size.
fn space(path: &std::path::Path) -> Option<(f64, f64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs(3) to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs to fill, both live for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let block = st.f_frsize as f64;
    Some((st.f_bavail as f64 * block, st.f_blocks as f64 * block))
}

/// The `transport` label: what the stream was, or `unknown` (a migration followed,
/// not started, that ended before its VMM said).
fn transport(tls: Option<bool>) -> &'static str {
    match tls {
        Some(true) => "tls",
        Some(false) => "tcp",
        None => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static OBSERVED: crate::daemon::sampler::Observed = crate::daemon::sampler::Observed {
        vms: BTreeMap::new(),
        devices: BTreeMap::new(),
        probes: crate::daemon::sampler::ProbeHealth {
            loaded: false,
            attached: 0,
            live: 0,
            load_errors: 0,
        },
    };

    fn scrape<'a>(vms: &'a [VmInfo], live: &'a [MigrationInfo]) -> Scrape<'a> {
        Scrape {
            host: "host \"a\"",
            vms,
            live,
            arriving: 0,
            datastores: &[],
            observed: &OBSERVED,
            spans: (0, 0),
        }
    }

    #[test]
    fn buckets_are_cumulative_and_labels_bounded() {
        let m = Metrics::default();
        m.request("/v1/vms", "GET", 200, 0.0007);
        m.request("/v1/vms", "GET", 200, 0.02);
        m.request("/v1/vms/{name}", "GET", 404, 0.0001);
        let text = m.render(&scrape(&[], &[]));
        assert!(
            text.contains(r#"ferry_agent_info{host="host \"a\"","#),
            "{text}"
        );
        assert!(text.contains(
            r#"ferry_agent_http_requests_total{code="200",method="GET",route="/v1/vms"} 2"#
        ));
        assert!(text.contains(
            r#"ferry_agent_http_request_duration_seconds_bucket{route="/v1/vms",le="0.0005"} 0"#
        ));
        assert!(text.contains(
            r#"ferry_agent_http_request_duration_seconds_bucket{route="/v1/vms",le="0.001"} 1"#
        ));
        assert!(
            text.contains(
                r#"ferry_agent_http_request_duration_seconds_bucket{route="/v1/vms",le="0.025"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"ferry_agent_vms{presence="running"} 0"#));
    }

    #[test]
    fn an_ended_migration_is_counted_once_and_a_gone_vm_leaves_no_series() {
        let m = Metrics::default();
        let mut info = MigrationInfo::new("m1".into(), "web-1", "a", "b", "adaptive", 0);
        info.state = MigrationState::Completed;
        info.total_ms = Some(2000.0);
        info.downtime_ms = Some(4.0);
        info.predicted_total_ms = Some(2200.0);
        info.max_downtime_ms = Some(3.0);
        info.tls = Some(true);
        info.decisions.push(ferry_api::Decision {
            t_ms: 0.0,
            setting: "codec".into(),
            value: "lz4".into(),
            reason: "r".into(),
        });
        m.decision("codec", "adaptive");
        m.migration_ended(&info, "precopy");
        let mut vm = VmInfo::new("web-1", "web-1.toml".into());
        vm.max_heartbeat_gap_ms = Some(12.0);
        let text = m.render(&scrape(std::slice::from_ref(&vm), &[]));
        for line in [
            r#"ferry_migrations_total{mode="precopy",outcome="completed",policy="adaptive",transport="tls"} 1"#,
            r#"ferry_migration_downtime_seconds_bucket{le="0.005"} 1"#,
            r#"ferry_migration_downtime_seconds_bucket{le="0.002"} 0"#,
            r#"ferry_policy_decisions_total{policy="adaptive",setting="codec"} 1"#,
            r#"ferry_policy_prediction_error_ratio_bucket{what="total",le="0.1"} 1"#,
            r#"ferry_vm_heartbeat_gap_seconds{vm="web-1"} 0.012"#,
            "ferry_migration_downtime_over_limit_total 1",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        let text = m.render(&scrape(&[], &[]));
        assert!(!text.contains(r#"vm="web-1""#), "{text}");
    }

    #[test]
    fn every_metric_served_is_listed_in_the_readme() {
        let readme = include_str!("../../../README.md");
        let m = Metrics::default();
        m.request("/v1/vms", "GET", 200, 0.001);
        let mut done = MigrationInfo::new("m1".into(), "web-1", "a", "b", "adaptive", 0);
        done.state = MigrationState::Completed;
        (done.total_ms, done.downtime_ms) = (Some(1000.0), Some(3.0));
        (done.predicted_total_ms, done.predicted_downtime_ms) = (Some(900.0), Some(2.0));
        m.migration_ended(&done, "precopy");
        m.decision("codec", "adaptive");
        m.bytes_sent(ferry_api::Codec::Lz4, 4096, 4096);
        m.peer_seen("host-b", true);
        let mut live = MigrationInfo::new("m2".into(), "web-2", "a", "b", "adaptive", 0);
        live.progress = Some(ferry_api::MigrationProgress::setup("b:1"));
        let mut vm = VmInfo::new("web-2", "web-2.toml".into());
        vm.presence = VmPresence::Running;
        vm.max_heartbeat_gap_ms = Some(3.0);
        let mut observed = crate::daemon::sampler::Observed::default();
        let mut reading = crate::probes::signals::Reading::default();
        reading.exits.insert((1, 2), 1);
        observed.vms.insert(
            "web-2".into(),
            crate::daemon::sampler::VmSignals {
                dirty_pages_per_sec: vec![("kvm_dirty_log".into(), 1.0)],
                working_set_pages: Some(1),
                sources_live: vec![],
                reading: Some(reading),
            },
        );
        observed
            .devices
            .insert(8 << 20, ferry_ebpf::IoStats::default());
        let text = m.render(&Scrape {
            host: "a",
            vms: std::slice::from_ref(&vm),
            live: std::slice::from_ref(&live),
            arriving: 0,
            datastores: &[PathBuf::from("/")],
            observed: &observed,
            spans: (1, 0),
        });
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .collect();
        assert!(names.len() > 30, "{text}");
        for name in names {
            assert!(
                readme.contains(&format!("`{name}`")),
                "{name} is served but not in the README's metrics table"
            );
        }
    }
}
