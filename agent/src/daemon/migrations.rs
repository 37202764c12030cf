//! The migrations this agent drives: each asks the destination's agent to receive
//! (which answers with an address and a one-time ticket), then runs the driver
//! against the VM's VMM on a thread of its own, keeping a record the API reads.
//!
//! If the agent dies mid-way, the VMM carries its migration on to the end without
//! it (as it does when `ferry migrate` goes away): the VM ends on exactly one host,
//! never paused; only the policy's steering stops. The restarted agent finds the VM
//! where it ended: still here (failed, cancelled), or handed over and then adopted by
//! the destination's agent. Records are kept in `run_dir/migrations/` at each change
//! of state: the restarted agent reads them back, follows again what still runs and
//! tells under the same id how what ended meanwhile ended.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::agent::{
    ApiErrorKind, IncomingOffer, IncomingRequest, MigrationInfo, MigrationState, VmPresence,
};
use ferry_api::{Migrate, Mode, Outcome, SettingsChange};
use serde::Deserialize;

use super::config::{AgentConfig, Peer};
use super::inventory::{self, Inventory, View};
use super::metrics::Metrics;
use super::records;
use crate::driver::ferry_vmm::FerryVmm;
use crate::driver::observe::PROBE_WINDOW_MS;
use crate::driver::{Driver, Event, Start};
use crate::policy::{Limits, LimitsTable, Pins};
use crate::sync::lock;
use crate::telemetry::migration::Subject;
use crate::telemetry::{MigrationTrace, Telemetry};

/// A handover in doubt is first asked about again after this (then less often).
const RESOLVE_RETRY: Duration = Duration::from_secs(1);

/// `POST /v1/migrations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationRequest {
    pub vm: String,
    /// A peer's name, as the agent's config names it.
    pub destination: String,
    /// `adaptive` (the default), `static`, or a peer preset.
    #[serde(default)]
    pub policy: Option<String>,
    /// Put over the agent's `[limits]`: the same keys.
    #[serde(default)]
    pub limits: Option<LimitsTable>,
    /// Send the disks along (into the destination's first datastore); otherwise the
    /// destination finds them by name on storage both hosts share.
    #[serde(default)]
    pub copy_storage: bool,
    /// What asks for it (None: an operator through the API).
    #[serde(skip)]
    pub trigger: Option<String>,
    /// Why this destination, when the agent chose it.
    #[serde(skip)]
    pub placement: Option<ferry_api::Decision>,
}

/// Why a migration was not started: the kind fixes the HTTP status.
#[derive(Debug)]
pub struct Refusal(pub ApiErrorKind, pub String);

struct Record {
    info: Mutex<MigrationInfo>,
    cancel: AtomicBool,
    /// The mode it runs in, once known (asked for, or read from the VMM's report).
    mode: Mutex<Option<Mode>>,
    /// Where its end is counted.
    metrics: Arc<Metrics>,
    /// Where the record is kept across agent restarts.
    file: PathBuf,
}

impl Record {
    /// Keeps the record as it is now (at each change of state, not of progress): a
    /// restarted agent reads it back, follows what still runs, and tells how what
    /// ended meanwhile ended. A record that cannot be kept is still served.
    fn save(&self) {
        let text = match serde_json::to_vec_pretty(&*lock(&self.info)) {
            Ok(t) => t,
            Err(e) => return tracing::warn!("cannot encode a migration record: {e}"),
        };
        let tmp = self.file.with_extension("json.tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.file))
        {
            tracing::warn!(
                "cannot keep the migration record {}: {e}",
                self.file.display()
            );
        }
    }
}

pub struct Migrations {
    host: String,
    metrics: Arc<Metrics>,
    telemetry: Arc<Telemetry>,
    /// The records' files: `run_dir/migrations/<id>.json`.
    dir: PathBuf,
    peers: Vec<Peer>,
    limits: Limits,
    /// The migration stream's TLS (None: plain TCP).
    tls: Option<ferry_api::TlsFiles>,
    max_outbound: u32,
    records: Mutex<BTreeMap<String, Arc<Record>>>,
    next: AtomicU64,
}

impl Migrations {
    pub fn new(cfg: &AgentConfig, metrics: Arc<Metrics>, telemetry: Arc<Telemetry>) -> Self {
        Self {
            host: cfg.name.clone(),
            metrics,
            telemetry,
            dir: cfg.run_dir.join("migrations"),
            peers: cfg.peers.clone(),
            limits: cfg.limits.clone(),
            tls: cfg.migration_tls.clone(),
            max_outbound: cfg.max_outbound,
            records: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// Migrations a stop waits for: not those settling a handover in doubt, which
    /// neither a cancel nor waiting ends (the restarted agent takes them up again).
    fn live(&self) -> usize {
        lock(&self.records)
            .values()
            .filter(|r| {
                let state = lock(&r.info).state;
                !state.ended() && state != MigrationState::Resolving
            })
            .count()
    }

    /// For a stop: lets the migrations under way finish within `finish`, then cancels
    /// what still runs (the VMs stay here) and waits up to `cancel` for that.
    pub fn wind_down(&self, finish: Duration, cancel: Duration) {
        let wait = |d: Duration| {
            let t0 = std::time::Instant::now();
            while self.live() > 0 && t0.elapsed() < d {
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        if self.live() == 0 {
            return;
        }
        tracing::info!(
            migrations = self.live(),
            "letting the migrations under way finish, for up to {} s",
            finish.as_secs()
        );
        wait(finish);
        if self.live() == 0 {
            return;
        }
        tracing::warn!(
            migrations = self.live(),
            "cancelling the migrations still under way; their VMs stay here"
        );
        for r in lock(&self.records).values() {
            r.cancel.store(true, Ordering::Release);
        }
        wait(cancel);
    }

    /// Migrations leaving now: what `max_outbound` counts.
    pub fn leaving(&self) -> usize {
        lock(&self.records)
            .values()
            .filter(|r| !lock(&r.info).state.ended())
            .count()
    }

    /// Per peer, the rate the latest completed migration to it moved guest memory at
    /// (bytes of pages per second, zero pages and compression included, setup and
    /// rounds too): what an evacuation predicts with, no new measurement. Not the
    /// link's raw rate, which compression and zero pages make look slower than a
    /// migration goes.
    pub fn links(&self) -> Vec<(String, f64)> {
        let mut latest: BTreeMap<String, (u64, f64)> = BTreeMap::new();
        for r in lock(&self.records).values() {
            let i = lock(&r.info);
            let Some(p) = i.progress.as_ref() else {
                continue;
            };
            if i.state != MigrationState::Completed || p.elapsed_ms == 0 {
                continue;
            }
            let moved = (p.pages_sent + p.zero_pages) * crate::migration::MECHANICS.page_bytes;
            let rate = moved as f64 / (p.elapsed_ms as f64 / 1e3);
            let e = latest.entry(i.destination.clone()).or_insert((0, rate));
            if i.started_unix_ms >= e.0 {
                *e = (i.started_unix_ms, rate);
            }
        }
        latest.into_iter().map(|(n, (_, r))| (n, r)).collect()
    }

    pub fn list(&self) -> Vec<MigrationInfo> {
        lock(&self.records)
            .values()
            .map(|r| lock(&r.info).clone())
            .collect()
    }

    /// The migration under way for `vm`, if any.
    pub fn moving(&self, vm: &str) -> Option<String> {
        lock(&self.records).values().find_map(|r| {
            let i = lock(&r.info);
            (i.vm == vm && !i.state.ended()).then(|| i.id.clone())
        })
    }

    pub fn get(&self, id: &str) -> Option<MigrationInfo> {
        lock(&self.records).get(id).map(|r| lock(&r.info).clone())
    }

    /// Asks the migration `id` to stop; the VM stays here.
    pub fn cancel(&self, id: &str) -> Result<MigrationInfo, Refusal> {
        let records = lock(&self.records);
        let r = records
            .get(id)
            .ok_or_else(|| Refusal(ApiErrorKind::NotFound, format!("no migration {id:?}")))?;
        let info = lock(&r.info).clone();
        if info.state.ended() {
            return Err(Refusal(
                ApiErrorKind::Conflict,
                format!("migration {id} has already ended ({})", info.state.as_str()),
            ));
        }
        if info.state == MigrationState::Resolving {
            return Err(Refusal(
                ApiErrorKind::Conflict,
                format!(
                    "migration {id} handed the VM over and is settling with the destination \
                     where it runs; past the handover there is nothing to cancel"
                ),
            ));
        }
        r.cancel.store(true, Ordering::Release);
        Ok(info)
    }

    /// Checks `req`, claims the VM (one migration per VM, `max_outbound` at once) and
    /// starts the migration on a thread of its own; returns its first record.
    pub fn start(
        self: &Arc<Self>,
        req: MigrationRequest,
        vms: &View,
        inventory: &Arc<Mutex<Inventory>>,
        run_dir: &std::path::Path,
    ) -> Result<MigrationInfo, Refusal> {
        let bad = |m: String| Refusal(ApiErrorKind::InvalidRequest, m);
        let peer = self
            .peers
            .iter()
            .find(|p| p.name == req.destination)
            .cloned()
            .ok_or_else(|| {
                Refusal(
                    ApiErrorKind::NotFound,
                    format!(
                        "no peer named {:?} (this agent's peers: {})",
                        req.destination,
                        self.peers
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        let running = |v: &ferry_api::agent::VmInfo| {
            v.presence == VmPresence::Running && v.state == Some(ferry_api::RunState::Running)
        };
        // The view is as of the last look at the VMMs: a VM that has just arrived
        // runs before a look says so. One fresh look before turning it away.
        if !vms.get(&req.vm).is_some_and(|v| running(&v)) {
            lock(inventory).refresh();
        }
        let vm = vms.get(&req.vm).ok_or_else(|| {
            Refusal(
                ApiErrorKind::NotFound,
                format!("no VM {:?} on this host", req.vm),
            )
        })?;
        if vm.migrating {
            return Err(Refusal(
                ApiErrorKind::Conflict,
                format!(
                    "VM {} is already being sent elsewhere by its VMM (a migration begun \
                     before this agent started, or by hand)",
                    req.vm
                ),
            ));
        }
        if vm.moving_disks {
            return Err(Refusal(
                ApiErrorKind::Conflict,
                format!("VM {} is moving its disks to another datastore", req.vm),
            ));
        }
        if !running(&vm) {
            return Err(Refusal(
                ApiErrorKind::Conflict,
                match vm.state {
                    Some(s) => format!("VM {} is not running here ({s:?})", req.vm),
                    None => format!(
                        "VM {} is not running here (its VMM has not said how it is yet)",
                        req.vm
                    ),
                },
            ));
        }
        let limits = match &req.limits {
            Some(t) => t
                .over(self.limits.clone())
                .map_err(|e| bad(format!("limits: {e}")))?,
            None => self.limits.clone(),
        };
        let policy_name = req.policy.clone().unwrap_or_else(|| "adaptive".into());
        // Checked now, so a bad name is a 400 rather than a failed migration.
        crate::policy::by_name(&policy_name, Pins::default(), &limits).map_err(bad)?;
        let config_text = std::fs::read_to_string(&vm.config)
            .map_err(|e| Refusal(ApiErrorKind::Failed, format!("reading {}: {e}", vm.config)))?;
        let record = {
            let mut records = lock(&self.records);
            let live: Vec<MigrationInfo> = records
                .values()
                .map(|r| lock(&r.info).clone())
                .filter(|i| !i.state.ended())
                .collect();
            if let Some(m) = live.iter().find(|m| m.vm == req.vm) {
                return Err(Refusal(
                    ApiErrorKind::Conflict,
                    format!("VM {} is already moving (migration {})", req.vm, m.id),
                ));
            }
            if live.len() >= self.max_outbound as usize {
                return Err(Refusal(
                    ApiErrorKind::Busy,
                    format!(
                        "{} migrations are already leaving this host (max_outbound); try again \
                         when one ends",
                        live.len()
                    ),
                ));
            }
            prune(&mut records);
            let record = self.record(
                &mut records,
                &req.vm,
                &peer.name,
                &policy_name,
                Some(&limits),
            );
            {
                let mut i = lock(&record.info);
                i.trigger = Some(req.trigger.clone().unwrap_or_else(|| "api".into()));
                i.decisions.extend(req.placement.clone());
            }
            record.save();
            record
        };
        let first = lock(&record.info).clone();
        let job = Job {
            host: self.host.clone(),
            telemetry: self.telemetry.clone(),
            peer: Some(peer),
            vm: req.vm,
            config_text,
            copy_storage: req.copy_storage,
            control: inventory::control_socket(run_dir, &vm.name),
            policy: policy_name,
            limits,
            tls: self.tls.clone(),
            trigger: Some(req.trigger.unwrap_or_else(|| "api".into())),
            placement: req.placement,
        };
        run_job(job, record, inventory);
        Ok(first)
    }

    fn record(
        &self,
        records: &mut BTreeMap<String, Arc<Record>>,
        vm: &str,
        destination: &str,
        policy: &str,
        limits: Option<&Limits>,
    ) -> Arc<Record> {
        let id = records::new_id('m', &self.next);
        let mut info = MigrationInfo::new(
            id.clone(),
            vm,
            &self.host,
            destination,
            policy,
            records::unix_ms(),
        );
        info.max_downtime_ms = limits.map(|l| l.max_downtime_ms);
        info.tls = limits.map(|_| self.tls.is_some());
        let record = Arc::new(Record {
            info: Mutex::new(info),
            cancel: AtomicBool::new(false),
            mode: Mutex::new(None),
            metrics: self.metrics.clone(),
            file: self.dir.join(format!("{id}.json")),
        });
        record.save();
        records.insert(id, record.clone());
        record
    }

    /// Reads back the records an earlier run of this agent kept, and settles each one
    /// that had not ended: its VMM carried the migration on, and either still runs
    /// it (followed again, under the same id) or tells how it ended. Call once at
    /// start, before anything else follows a VM's migration.
    pub fn recover(&self, inventory: &Arc<Mutex<Inventory>>, run_dir: &Path) {
        let mut unfinished = Vec::new();
        {
            let mut records = lock(&self.records);
            for (path, info) in records::read_back::<MigrationInfo>(&self.dir, "migration") {
                let id = info.id.clone();
                let ended = info.state.ended();
                let r = Arc::new(Record {
                    info: Mutex::new(info),
                    cancel: AtomicBool::new(false),
                    mode: Mutex::new(None),
                    metrics: self.metrics.clone(),
                    file: path,
                });
                if !ended {
                    unfinished.push(r.clone());
                }
                records.insert(id, r);
            }
            prune(&mut records);
        }
        for r in unfinished {
            let (id, vm, policy, address) = {
                let i = lock(&r.info);
                (
                    i.id.clone(),
                    i.vm.clone(),
                    i.policy.clone(),
                    i.destination_address.clone(),
                )
            };
            let control = inventory::control_socket(run_dir, &vm);
            let seen = crate::client::call_within::<ferry_api::Status>(
                &control,
                &ferry_api::Request::Status {},
                Duration::from_secs(5),
            );
            // The VMM's last migration is this record's if it went where the record
            // says it was sent; a record that never heard where (one that followed
            // a migration it did not start) owns the migration the VMM still runs
            // or holds in doubt, not one that ended before.
            let theirs = seen
                .as_ref()
                .ok()
                .and_then(|s| s.vm())
                .and_then(|v| v.migration.as_ref())
                .map(|m| {
                    (
                        m.to.clone(),
                        m.report.is_none() || m.phase == ferry_api::Phase::InDoubt,
                    )
                });
            let ours = match (&address, &theirs) {
                (Some(a), Some((to, _))) => a == to,
                (None, Some((_, unsettled))) => *unsettled,
                (_, None) => false,
            };
            match seen {
                Err(e) => end(
                    &r,
                    MigrationState::Failed,
                    Some(format!(
                        "the agent restarted, and the VM's VMM does not answer ({e}): how \
                         the migration ended is not known"
                    )),
                ),
                Ok(_) if ours => {
                    tracing::info!(vm, id, "following again a migration begun before a restart");
                    run_job(self.following(vm, control, policy), r, inventory);
                }
                Ok(_) => end(
                    &r,
                    MigrationState::Failed,
                    Some(
                        "the agent stopped before the VM's VMM began this migration; the VM \
                         stays here"
                            .into(),
                    ),
                ),
            }
        }
    }

    /// A job that follows (and steers again) the migration the VM's VMM already runs.
    fn following(&self, vm: String, control: std::path::PathBuf, policy: String) -> Job {
        Job {
            host: self.host.clone(),
            telemetry: self.telemetry.clone(),
            peer: None,
            vm,
            config_text: String::new(),
            copy_storage: false,
            control,
            policy,
            limits: self.limits.clone(),
            tls: self.tls.clone(),
            trigger: None,
            placement: None,
        }
    }

    /// Follows, and steers again, every migration a VMM here runs that no record of
    /// this agent drives: one begun before the agent restarted (or by hand). Its
    /// record is new; it ends as the migration does.
    pub fn follow_unowned(
        &self,
        vms: &View,
        inventory: &Arc<Mutex<Inventory>>,
        run_dir: &std::path::Path,
    ) {
        let all = vms.all();
        // Handed over while no agent here followed it: what happened is recorded.
        for vm in all.iter().filter(|v| {
            v.state == Some(ferry_api::RunState::Migrated) && !v.migrating && !v.in_doubt
        }) {
            let mut records = lock(&self.records);
            if records.values().any(|r| lock(&r.info).vm == vm.name) {
                continue;
            }
            let r = self.record(
                &mut records,
                &vm.name,
                "(handed over while this agent was away)",
                "(none)",
                None,
            );
            end(&r, MigrationState::Completed, None);
        }
        // Under way, or handed over in doubt (settled by the driver that follows it).
        for vm in all.into_iter().filter(|v| v.migrating || v.in_doubt) {
            let record = {
                let mut records = lock(&self.records);
                // A record that ended a moment ago may have been seen migrating by a
                // status taken just before it ended.
                let recent = records::unix_ms().saturating_sub(5_000);
                let followed = records.values().any(|r| {
                    let i = lock(&r.info);
                    i.vm == vm.name && (!i.state.ended() || i.ended_unix_ms > Some(recent))
                });
                if followed {
                    continue;
                }
                tracing::info!(
                    vm = vm.name,
                    "following a migration under way that this agent did not start"
                );
                self.record(
                    &mut records,
                    &vm.name,
                    "(begun before this agent started)",
                    "adaptive",
                    Some(&self.limits),
                )
            };
            let control = inventory::control_socket(run_dir, &vm.name);
            let job = self.following(vm.name.clone(), control, "adaptive".into());
            run_job(job, record, inventory);
        }
    }
}

fn run_job(job: Job, record: Arc<Record>, inventory: &Arc<Mutex<Inventory>>) {
    let vm = job.vm.clone();
    lock(inventory).set_driven(&vm, true);
    let spawned = std::thread::Builder::new().name("migration".into()).spawn({
        let record = record.clone();
        let inventory = inventory.clone();
        let vm = vm.clone();
        move || {
            job.run(&record, &inventory);
            lock(&inventory).set_driven(&vm, false);
        }
    });
    if let Err(e) = spawned {
        lock(inventory).set_driven(&vm, false);
        end(
            &record,
            MigrationState::Failed,
            Some(format!("no thread for it: {e}")),
        );
    }
}

fn prune(records: &mut BTreeMap<String, Arc<Record>>) {
    let ended = records
        .iter()
        .filter_map(|(id, r)| {
            let i = lock(&r.info);
            i.ended_unix_ms.map(|t| (t, id.clone()))
        })
        .collect();
    for id in records::beyond_keep(ended) {
        if let Some(r) = records.remove(&id) {
            let _ = std::fs::remove_file(&r.file);
        }
    }
}

fn end(record: &Record, state: MigrationState, error: Option<String>) {
    let ended = {
        let mut i = lock(&record.info);
        i.state = state;
        i.ended_unix_ms = Some(records::unix_ms());
        // The end's word replaces what was said on the way (a handover in doubt,
        // settled).
        i.error = error;
        i.clone()
    };
    record.save();
    let mode = lock(&record.mode).map_or("unknown", Mode::as_str);
    record.metrics.migration_ended(&ended, mode);
}

struct Job {
    host: String,
    telemetry: Arc<Telemetry>,
    /// None: follow the migration the VMM already runs.
    peer: Option<Peer>,
    vm: String,
    config_text: String,
    copy_storage: bool,
    control: std::path::PathBuf,
    policy: String,
    limits: Limits,
    tls: Option<ferry_api::TlsFiles>,
    /// What asked for it, and why its destination (for the trace).
    trigger: Option<String>,
    placement: Option<ferry_api::Decision>,
}

impl Job {
    /// Drives the migration to its end under its trace; every log line on the way
    /// names the migration and, with traces on, the trace and root span.
    fn run(self, record: &Record, inventory: &Mutex<Inventory>) {
        let (id, destination) = {
            let i = lock(&record.info);
            (i.id.clone(), i.destination.clone())
        };
        let trace = MigrationTrace::start(
            &self.telemetry,
            &Subject {
                id: &id,
                vm: &self.vm,
                source: &self.host,
                destination: &destination,
                policy: &self.policy,
            },
        );
        let log = tracing::info_span!(
            "migration",
            id,
            vm = self.vm,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty
        );
        if let Some(t) = &trace {
            let (trace_id, span_id) = t.ids();
            log.record("trace_id", tracing::field::display(trace_id));
            log.record("span_id", tracing::field::display(span_id));
        }
        let _in = log.enter();
        if let (Some(t), Some(trigger)) = (&trace, &self.trigger) {
            t.triggered(trigger, self.placement.as_ref());
        }
        let trace = Mutex::new(trace);
        self.drive(record, inventory, &trace);
        if let Some(t) = trace.into_inner().unwrap_or_else(|e| e.into_inner()) {
            let i = lock(&record.info);
            t.end(i.state, i.error.as_deref());
        }
    }

    fn drive(
        &self,
        record: &Record,
        inventory: &Mutex<Inventory>,
        trace: &Mutex<Option<MigrationTrace>>,
    ) {
        let start = match &self.peer {
            Some(peer) => match self.ask_peer(peer, trace) {
                Ok(offer) => {
                    lock(&record.info).destination_address = Some(offer.address.clone());
                    // Kept now: a restart before the VMM starts sending tells, by
                    // this address, whether the VMM's migration is this record's.
                    record.save();
                    let traceparent = lock(trace).as_ref().and_then(MigrationTrace::traceparent);
                    let request = self.request(offer, traceparent);
                    *lock(&record.mode) = request.mode;
                    Start::New(Box::new(request))
                }
                Err(why) => {
                    tracing::error!(vm = self.vm, peer = peer.name, "not started: {why}");
                    return end(record, MigrationState::Failed, Some(why));
                }
            },
            None => Start::Attach,
        };
        let chosen = match crate::policy::by_name(&self.policy, Pins::default(), &self.limits) {
            Ok(p) => p,
            Err(e) => return end(record, MigrationState::Failed, Some(e)),
        };
        let mut driver = Driver::new(chosen, self.limits.clone())
            .with_probes(Duration::from_millis(PROBE_WINDOW_MS as u64))
            .cancel_on(&record.cancel)
            .resolve_in_doubt(RESOLVE_RETRY);
        // Wire bytes counted so far, memory and disk: each progress adds what it
        // sent since the last under the codec in force now (a codec changed between
        // two progress reports is a few hundred milliseconds of bytes off).
        let mut counted = (0u64, 0u64);
        driver.subscribe(|e| {
            if let Some(t) = lock(trace).as_mut() {
                t.on_event(e);
            }
            // The last progress comes with the report: its totals, under the codec
            // of the end.
            let sent = match e {
                Event::Progress { progress, .. } => Some((
                    progress.codec,
                    progress.bytes_on_wire,
                    progress.disk_bytes_on_wire,
                )),
                Event::Outcome(r) => Some((
                    r.migration.codec,
                    r.migration.bytes_on_wire,
                    r.migration.disk_bytes_on_wire,
                )),
                _ => None,
            };
            if let Some((codec, total, disk)) = sent {
                let memory = total.saturating_sub(disk);
                record.metrics.bytes_sent(
                    codec,
                    memory.saturating_sub(counted.0),
                    disk.saturating_sub(counted.1),
                );
                counted = (counted.0.max(memory), counted.1.max(disk));
            }
            let mut i = lock(&record.info);
            let before = (i.state, i.destination_address.is_some());
            match e {
                Event::Started { .. } => i.state = MigrationState::Running,
                Event::Progress { progress, .. } => {
                    if i.destination_address.is_none() {
                        i.destination_address = Some(progress.to.clone());
                    }
                    i.progress = Some((**progress).clone());
                }
                Event::Decision(d) => {
                    record.metrics.decision(&d.setting, &i.policy);
                    i.decisions.push(d.clone());
                }
                Event::Resolving {
                    attempt,
                    error,
                    retry_ms,
                } => {
                    tracing::warn!(
                        vm = i.vm,
                        attempt,
                        "handover in doubt; the destination has not settled it yet: {error}"
                    );
                    i.state = MigrationState::Resolving;
                    i.error = Some(match retry_ms {
                        Some(ms) => format!(
                            "handover in doubt, both copies paused; asking the destination \
                             (try {attempt}: {error}; next in {:.1} s)",
                            *ms as f64 / 1000.0
                        ),
                        None => format!("handover in doubt, and it cannot be settled: {error}"),
                    });
                }
                Event::Resolved(r) => {
                    tracing::info!(
                        vm = i.vm,
                        runs_on = r.vm_runs_on,
                        "handover in doubt settled with the destination"
                    );
                    i.resolution = Some(r.clone());
                }
                Event::Prediction { prediction, .. } => {
                    i.predicted_total_ms = Some(prediction.total_ms);
                    i.predicted_downtime_ms = Some(prediction.downtime_ms);
                }
                _ => {}
            }
            let changed = (i.state, i.destination_address.is_some()) != before;
            drop(i);
            if changed {
                record.save();
            }
        });
        let result = driver.run(&mut FerryVmm::new(&self.control), start);
        self.ended(result, record, inventory);
    }

    /// The VMM's `migrate` request for the destination's offer, within the limits.
    fn request(&self, offer: IncomingOffer, traceparent: Option<String>) -> Migrate {
        let limits = &self.limits;
        let mode = if limits.allow_postcopy {
            Mode::Hybrid
        } else {
            Mode::Precopy
        };
        Migrate {
            to: offer.address,
            settings: SettingsChange {
                codec: Some(Default::default()),
                max_downtime_ms: Some(crate::policy::whole_ms(limits.max_downtime_ms)),
                bandwidth_bytes_per_sec: Some(limits.bandwidth_bytes_per_sec().unwrap_or(0)),
                throttle_pct: Some(0),
                disk_write_limit_bytes_per_sec: None,
                disk_mirror: None,
                switchover: None,
            },
            max_total_secs: limits.max_total_secs.map(|s| s.ceil() as u64),
            timeout_secs: None,
            report: None,
            no_verify: false,
            mode: Some(mode),
            recover_secs: None,
            precopy_pass: false,
            copy_storage: self.copy_storage,
            reasons: Default::default(),
            ticket: Some(offer.ticket),
            traceparent,
            tls: self.tls.clone(),
            insecure: self.tls.is_none(),
        }
    }

    fn ended(
        &self,
        result: Result<ferry_api::DriverReport, crate::driver::DriverError>,
        record: &Record,
        inventory: &Mutex<Inventory>,
    ) {
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                // The driver lost track; the VMM knows where the VM is.
                let handed = crate::client::call_within::<ferry_api::Status>(
                    &self.control,
                    &ferry_api::Request::Status {},
                    Duration::from_secs(5),
                )
                .is_ok_and(|s| match s {
                    ferry_api::Status::Vm(v) => v.machine.state == ferry_api::RunState::Migrated,
                    ferry_api::Status::Incoming(_) => false,
                });
                if handed {
                    tracing::warn!(
                        vm = self.vm,
                        "the driver failed ({e}), but the VM was handed over"
                    );
                    return end(
                        record,
                        MigrationState::Completed,
                        Some(format!("followed to the handover, then: {e}")),
                    );
                }
                tracing::error!(vm = self.vm, "migration failed: {e}");
                return end(record, MigrationState::Failed, Some(e.to_string()));
            }
        };
        let core = &report.migration.core;
        *lock(&record.mode) = Some(report.migration.mode);
        {
            let mut i = lock(&record.info);
            i.total_ms = Some(core.total_ms);
            i.tls = Some(report.migration.tls);
            // The pause as the guest saw it (its heartbeats), else as the VMM timed it.
            i.downtime_ms = report.migration.downtime_ms.or(core.switchover_ms);
            // The VMM's record is the whole one: the initial settings with their
            // reasons, and every change; a migration over before the policy's first
            // tick has no events to show them.
            // The agent's own choice of destination is not the VMM's to know: it stays
            // first.
            let placed = i
                .decisions
                .iter()
                .find(|d| d.setting == "destination")
                .cloned();
            if !report.migration.decisions.is_empty() {
                i.decisions.clone_from(&report.migration.decisions);
            } else if let Some(steps) = &report.policy_steps
                && i.decisions.iter().all(|d| d.setting == "destination")
            {
                i.decisions.clone_from(steps);
            }
            if let Some(d) = placed
                && i.decisions.first() != Some(&d)
            {
                i.decisions.insert(0, d);
            }
        }
        match core.outcome {
            Outcome::Completed => {
                tracing::info!(
                    vm = self.vm,
                    to = lock(&record.info).destination.clone(),
                    total_ms = core.total_ms,
                    downtime_ms = core.switchover_ms,
                    "migration completed"
                );
                // Kept first: an agent that dies while stopping the copy here
                // still knows, restarted, that the VM moved.
                end(record, MigrationState::Completed, None);
                lock(inventory).moved_away(&self.vm);
            }
            Outcome::Cancelled => {
                tracing::info!(vm = self.vm, "migration cancelled; the VM stays here");
                end(record, MigrationState::Cancelled, core.error.clone());
            }
            Outcome::Failed => {
                tracing::error!(vm = self.vm, "migration failed: {:?}", core.error);
                end(record, MigrationState::Failed, core.error.clone());
            }
        }
    }

    /// `POST {peer}/v1/incoming`: the destination's agent starts a VMM to receive.
    /// Asks the destination's agent to receive the VM: its offer (where to send,
    /// and the one-time ticket), or why not. The call is a client span of the
    /// migration's trace, whose context it carries (`traceparent`).
    fn ask_peer(
        &self,
        peer: &Peer,
        trace: &Mutex<Option<MigrationTrace>>,
    ) -> Result<IncomingOffer, String> {
        let url = format!("{}/v1/incoming", peer.url);
        let call = lock(trace)
            .as_ref()
            .map(|t| t.call("POST", "/v1/incoming", &url));
        let answer = self.call_peer(
            peer,
            &url,
            call.as_ref().and_then(crate::telemetry::traceparent),
        );
        if let Some(c) = &call {
            MigrationTrace::call_ended(
                c,
                answer.as_ref().map_or_else(|(s, _)| *s, |_| Some(201)),
                answer.as_ref().err().map(|(_, e)| e.as_str()),
            );
        }
        answer.map_err(|(_, e)| e)
    }

    /// `POST /v1/incoming`: the offer, or (the answer's status, if any; why not).
    fn call_peer(
        &self,
        peer: &Peer,
        url: &str,
        traceparent: Option<String>,
    ) -> Result<IncomingOffer, (Option<u16>, String)> {
        let body = serde_json::to_string(&IncomingRequest {
            vm: self.vm.clone(),
            config: self.config_text.clone(),
            source: self.host.clone(),
            copy_storage: self.copy_storage,
        })
        .map_err(|e| (None, e.to_string()))?;
        let mut req = peer
            .http
            .post(url)
            .header("Content-Type", "application/json");
        if let Some(t) = &traceparent {
            req = req.header("traceparent", t);
        }
        if let Some(t) = &peer.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.send(body.as_bytes()).map_err(|e| {
            (
                None,
                format!("cannot reach {}'s agent at {}: {e}", peer.name, url),
            )
        })?;
        let status = resp.status();
        let text = resp.body_mut().read_to_string().map_err(|e| {
            (
                Some(status.as_u16()),
                format!("reading {}'s answer: {e}", peer.name),
            )
        })?;
        if !status.is_success() {
            let why = serde_json::from_str::<ferry_api::agent::ApiError>(&text)
                .map(|e| e.message)
                .unwrap_or(text);
            return Err((
                Some(status.as_u16()),
                format!("{}'s agent refused ({status}): {why}", peer.name),
            ));
        }
        serde_json::from_str(&text).map_err(|e| {
            (
                Some(status.as_u16()),
                format!("{}'s agent answered what is not an offer: {e}", peer.name),
            )
        })
    }
}
