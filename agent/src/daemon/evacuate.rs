//! Carries out what alerts ask: a queue of VMs to move off this host, worked by a
//! thread of its own so the webhook only books and answers (Alertmanager waits on
//! it, and a burst of posts must not wait on peers or VMMs).
//!
//! The queue is not kept: each look derives it from the alerts that fire now (every
//! VM here for an evacuation, the one VM for a VM's alert), less the VMs leaving and
//! those whose last try is under [`RETRY`] old. So a VM that arrived meanwhile, one
//! whose migration failed, or one a second alert also wants goes when its turn comes,
//! and a resolved alert's VMs simply stop being wanted.
//!
//! Order: the VM whose migration the policy predicts shortest leaves first. Each
//! finished migration frees a slot sooner, so the most VMs are off the host soonest
//! (shortest job first minimises the mean time a VM stays on a failing host); VMs
//! without a prediction follow, smallest memory first. Up to `max_outbound` leave at
//! once, each to the peer placement.rs chooses, peers asked afresh when a slot is
//! free (their `/healthz`: health, evacuation, capacity).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_api::Decision;
use ferry_api::agent::{AlertInfo, ApiErrorKind, Capacity, Health, MigrationInfo};

use super::alerts::{Act, BadPayload, Book, Payload, Rule};
use super::config::Peer;
use super::inventory::{Inventory, View};
use super::metrics::Metrics;
use super::migrations::{MigrationRequest, Migrations, Refusal};
use super::placement::{self, Candidate};
use super::sampler::{self, Shared as Observed};
use crate::policy::{Limits, Observation, Pins};
use crate::sync::lock;

/// A peer's `/healthz` within this, or it is not a destination now.
const PEER_ANSWER: Duration = Duration::from_secs(2);
/// Peers' answers are reused for this long within one evacuation.
const PEER_FRESH: Duration = Duration::from_secs(1);
/// The queue is looked at this often (and at once when an alert comes).
const PACE: Duration = Duration::from_millis(200);
/// A VM whose migration was started (or refused) is not tried again before this:
/// a failed one waits, so a destination that keeps failing is not hammered.
const RETRY: Duration = Duration::from_secs(10);

/// A peer's name and its `/healthz`, or why it did not answer.
type PeerAnswer = (String, Result<Health, String>);

/// A VM waiting to leave.
#[derive(Debug, Clone)]
struct Pending {
    vm: String,
    fingerprint: String,
    alertname: String,
    rule: Rule,
}

pub struct Evacuation {
    host: String,
    book: Mutex<Book>,
    /// How many wait, as the last look derived it (for the gauge).
    queued: AtomicUsize,
    /// What the loop sleeps on between looks; an alert wakes it.
    sleep: Mutex<()>,
    /// When each VM was last tried.
    tried: Mutex<std::collections::HashMap<String, Instant>>,
    /// The agent stops: no new migration starts.
    halted: AtomicBool,
    wake: Condvar,
    migrations: Arc<Migrations>,
    metrics: Arc<Metrics>,
    vms: View,
    observed: Observed,
    peers: Vec<Peer>,
    limits: Limits,
    max_outbound: u32,
    /// The last answers of the peers, and when they were asked.
    seen: Mutex<Option<(Instant, Vec<PeerAnswer>)>>,
}

/// What this host has room for, as `/healthz` tells the peers.
pub fn capacity(vms: &View, memory_mib: u64, max_inbound: u32) -> Capacity {
    let all = vms.all();
    Capacity {
        memory_mib,
        vms_memory_mib: all
            .iter()
            .filter(|v| v.presence != ferry_api::agent::VmPresence::Down)
            .filter_map(|v| v.memory_mib)
            .sum(),
        max_inbound,
        inbound: all.iter().filter(|v| v.arriving).count() as u32,
    }
}

/// The host's memory (MemTotal), the default capacity for VMs.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// A peer's `/healthz`, or why not.
pub fn ask_health(peer: &Peer, within: Duration) -> Result<Health, String> {
    let mut answer = peer
        .http
        .get(&format!("{}/healthz", peer.url))
        .config()
        .timeout_global(Some(within))
        .build()
        .call()
        .map_err(|e| e.to_string())?;
    let text = answer
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("its /healthz did not arrive: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("its /healthz does not read: {e}"))
}

/// The link to `peer`: as this agent's last migration to it measured it, else as
/// the peer's last migration here did (links are as fast both ways, near enough).
fn link_to(
    host: &str,
    peer: &str,
    ours: &[(String, f64)],
    health: &Result<Health, String>,
) -> Option<f64> {
    ours.iter()
        .find(|(n, _)| n == peer)
        .map(|(_, l)| *l)
        .or_else(|| {
            health
                .as_ref()
                .ok()?
                .links
                .iter()
                .find(|l| l.peer == host)
                .map(|l| l.bytes_per_sec)
        })
}

impl Evacuation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host: &str,
        rules: Vec<Rule>,
        migrations: Arc<Migrations>,
        metrics: Arc<Metrics>,
        vms: View,
        observed: Observed,
        peers: Vec<Peer>,
        limits: Limits,
        max_outbound: u32,
    ) -> Self {
        metrics.evacuation(false, 0);
        Self {
            host: host.to_owned(),
            book: Mutex::new(Book::new(host, rules)),
            queued: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            tried: Mutex::new(std::collections::HashMap::new()),
            halted: AtomicBool::new(false),
            wake: Condvar::new(),
            migrations,
            metrics,
            vms,
            observed,
            peers,
            limits,
            max_outbound,
            seen: Mutex::new(None),
        }
    }

    /// A webhook post: booked at once, acted on by the evacuation's thread.
    pub fn receive(
        &self,
        payload: &Payload,
    ) -> Result<Vec<ferry_api::agent::AlertOutcome>, BadPayload> {
        let now = super::records::unix_ms();
        let verdict = {
            let mut book = lock(&self.book);
            book.receive(payload, |vm| self.vms.get(vm).is_some(), now)?
        };
        for o in &verdict.outcomes {
            self.metrics.alert(&o.action);
        }
        for order in &verdict.orders {
            tracing::warn!(
                alert = order.alertname,
                fingerprint = order.fingerprint,
                "{}",
                match &order.act {
                    Act::Evacuate => format!("evacuating {}", self.host),
                    Act::Migrate(vm) => format!("moving {vm} away"),
                }
            );
        }
        if !verdict.resolved.is_empty() {
            tracing::info!(
                alerts = verdict.resolved.len(),
                "resolved: the VMs they wanted moved and that have not left stay here"
            );
        }
        self.publish();
        self.wake.notify_all();
        Ok(verdict.outcomes)
    }

    /// The agent stops: what runs finishes or is cancelled, nothing new starts.
    pub fn halt(&self) {
        self.halted.store(true, Ordering::Release);
    }

    /// The VMs the alerts firing now want moved, less those leaving or tried lately;
    /// the book's `queued` lists follow.
    fn wanted(&self) -> Vec<Pending> {
        let mut book = lock(&self.book);
        let orders = book.firing_orders();
        let tried = lock(&self.tried);
        let all = self.vms.all();
        let mut out: Vec<Pending> = Vec::new();
        for order in &orders {
            let Some(rule) = book.rule(order.rule).cloned() else {
                continue;
            };
            let here = all.iter().filter(|v| {
                !v.arriving
                    && !v.migrating
                    && v.presence == ferry_api::agent::VmPresence::Running
                    && v.state == Some(ferry_api::RunState::Running)
                    && match &order.act {
                        Act::Evacuate => true,
                        Act::Migrate(vm) => v.name == *vm,
                    }
            });
            for v in here {
                let recent = tried.get(&v.name).is_some_and(|t| t.elapsed() < RETRY);
                if recent
                    || out.iter().any(|p| p.vm == v.name)
                    || self.migrations.moving(&v.name).is_some()
                {
                    continue;
                }
                out.push(Pending {
                    vm: v.name.clone(),
                    fingerprint: order.fingerprint.clone(),
                    alertname: order.alertname.clone(),
                    rule: rule.clone(),
                });
            }
        }
        book.set_queued(|fingerprint| {
            out.iter()
                .filter(|p| p.fingerprint == fingerprint)
                .map(|p| p.vm.clone())
                .collect()
        });
        out
    }

    /// The gauges, after each change.
    fn publish(&self) {
        let queued = self.queued.load(Ordering::Relaxed);
        let evacuating = self.evacuating().is_some();
        self.metrics.evacuation(evacuating, queued);
    }

    /// Why this host takes no VM in now, if it does not.
    pub fn evacuating(&self) -> Option<String> {
        let book = lock(&self.book);
        book.evacuating().map(|a| {
            format!(
                "{} is being evacuated (alert {}, fingerprint {})",
                self.host, a.alertname, a.fingerprint
            )
        })
    }

    pub fn alerts(&self) -> Vec<AlertInfo> {
        lock(&self.book).list()
    }

    /// The evacuation's loop, until `stop`.
    pub fn run(
        &self,
        stop: &AtomicBool,
        inventory: &Arc<Mutex<Inventory>>,
        run_dir: &std::path::Path,
    ) {
        while !stop.load(Ordering::Acquire) {
            {
                let asleep = lock(&self.sleep);
                let _ = self.wake.wait_timeout(asleep, PACE);
            }
            if stop.load(Ordering::Acquire) {
                break;
            }
            self.step(inventory, run_dir);
        }
    }

    /// Starts what the free outbound slots allow.
    fn step(&self, inventory: &Arc<Mutex<Inventory>>, run_dir: &std::path::Path) {
        let pending = self.wanted();
        self.queued.store(pending.len(), Ordering::Relaxed);
        self.publish();
        if pending.is_empty() || self.halted.load(Ordering::Acquire) {
            return;
        }
        let leaving = self.migrations.leaving();
        let free = (self.max_outbound as usize).saturating_sub(leaving);
        if free == 0 {
            return;
        }
        let mut peers = self.peer_health();
        let alerting = lock(&self.book).alerting_hosts();
        let links = self.migrations.links();
        // Each waiting VM's candidates, with the policy's prediction to each.
        let mut ranked: Vec<(Pending, Vec<Candidate>, Option<f64>, u64)> = pending
            .into_iter()
            .map(|p| {
                let memory_mib = self.vms.get(&p.vm).and_then(|v| v.memory_mib).unwrap_or(0);
                let candidates: Vec<Candidate> = peers
                    .iter()
                    .map(|(name, health)| Candidate {
                        name: name.clone(),
                        health: health.clone(),
                        alerting: alerting
                            .iter()
                            .find(|(h, _)| h == name)
                            .map(|(_, a)| a.clone()),
                        predicted_total_ms: self.predict(
                            &p,
                            memory_mib,
                            link_to(&self.host, name, &links, health),
                        ),
                    })
                    .collect();
                let best = candidates
                    .iter()
                    .filter_map(|c| c.predicted_total_ms)
                    .min_by(f64::total_cmp);
                (p, candidates, best, memory_mib)
            })
            .collect();
        ranked.sort_by(|a, b| {
            let t = |x: Option<f64>| x.unwrap_or(f64::INFINITY);
            t(a.2).total_cmp(&t(b.2)).then(a.3.cmp(&b.3))
        });
        let mut started = 0;
        for (p, mut candidates, _, memory_mib) in ranked {
            if started == free || self.halted.load(Ordering::Acquire) {
                break;
            }
            // The peers as this step left them: a VM sent to one counts against its
            // room and its inbound slots for the next.
            for c in candidates.iter_mut() {
                if let Some((_, h)) = peers.iter().find(|(n, _)| *n == c.name) {
                    c.health = h.clone();
                }
            }
            // Asking the peers took a while: an alert resolved meanwhile moves nothing.
            if !lock(&self.book).is_firing(&p.fingerprint) {
                continue;
            }
            let placed = match placement::choose(memory_mib, &candidates) {
                Ok(placed) => placed,
                Err(why) => {
                    self.note(&p.fingerprint, &format!("{} waits: {why}", p.vm));
                    continue;
                }
            };
            let trigger = format!("alert:{}", p.alertname);
            let decision = Decision {
                t_ms: 0.0,
                setting: "destination".into(),
                value: placed.peer.clone(),
                reason: format!("{trigger}: {}", placed.reason),
            };
            let req = MigrationRequest {
                vm: p.vm.clone(),
                destination: placed.peer.clone(),
                policy: p.rule.policy.clone(),
                limits: None,
                copy_storage: p.rule.copy_storage,
                trigger: Some(trigger),
                placement: Some(decision),
            };
            match self.migrations.start(req, &self.vms, inventory, run_dir) {
                Ok(info) => {
                    started += 1;
                    lock(&self.tried).insert(p.vm.clone(), Instant::now());
                    if let Some((
                        _,
                        Ok(Health {
                            capacity: Some(cap),
                            ..
                        }),
                    )) = peers.iter_mut().find(|(n, _)| *n == placed.peer)
                    {
                        cap.vms_memory_mib += memory_mib;
                        cap.inbound += 1;
                    }
                    self.started(&p, &info);
                }
                // Full after all (a migration begun by hand meanwhile): next time.
                Err(Refusal(ApiErrorKind::Busy, _)) => break,
                Err(Refusal(_, why)) => {
                    tracing::warn!(vm = p.vm, alert = p.alertname, "not moved now: {why}");
                    lock(&self.tried).insert(p.vm.clone(), Instant::now());
                    self.note(
                        &p.fingerprint,
                        &format!(
                            "{} not moved now (tried again in {} s): {why}",
                            p.vm,
                            RETRY.as_secs()
                        ),
                    );
                }
            }
        }
        // The seen answers are stale now that VMs are on their way to some peers.
        if started > 0 {
            *lock(&self.seen) = None;
        }
        self.queued.store(self.wanted().len(), Ordering::Relaxed);
        self.publish();
    }

    fn started(&self, p: &Pending, info: &MigrationInfo) {
        tracing::info!(
            vm = p.vm,
            alert = p.alertname,
            destination = info.destination,
            migration = info.id,
            "moving the VM away"
        );
        if let Some(a) = lock(&self.book).get_mut(&p.fingerprint) {
            a.migrations.push(info.id.clone());
        }
    }

    fn note(&self, fingerprint: &str, note: &str) {
        if let Some(a) = lock(&self.book).get_mut(fingerprint) {
            a.note = Some(note.to_owned());
        }
    }

    /// Every peer's `/healthz`, asked at most once per `PEER_FRESH`, all at once.
    fn peer_health(&self) -> Vec<PeerAnswer> {
        if let Some((at, seen)) = &*lock(&self.seen)
            && at.elapsed() < PEER_FRESH
        {
            return seen.clone();
        }
        let answers: Vec<PeerAnswer> = std::thread::scope(|s| {
            let asks: Vec<_> = self
                .peers
                .iter()
                .map(|p| s.spawn(move || (p.name.clone(), ask_health(p, PEER_ANSWER))))
                .collect();
            asks.into_iter()
                .zip(&self.peers)
                .map(|(h, p)| {
                    h.join()
                        .unwrap_or_else(|_| (p.name.clone(), Err("the ask failed".into())))
                })
                .collect()
        });
        *lock(&self.seen) = Some((Instant::now(), answers.clone()));
        answers
    }

    /// The policy's predicted total for `p` over a link of `link` bytes per second
    /// (the last migration to that peer measured it; None: the limits' bandwidth, if
    /// any), from the dirty rate the sampler last measured: no new measurement.
    fn predict(&self, p: &Pending, memory_mib: u64, link: Option<f64>) -> Option<f64> {
        let rate = lock(&self.observed)
            .vms
            .get(&p.vm)
            .and_then(|s| {
                s.dirty_pages_per_sec
                    .iter()
                    .find(|(src, _)| src == sampler::VMM_LOG)
                    .map(|(_, r)| *r)
            })
            .unwrap_or(0.0);
        let policy = p.rule.policy.as_deref().unwrap_or("adaptive");
        let mut chosen = crate::policy::by_name(policy, Pins::default(), &self.limits).ok()??;
        if link.is_none() && self.limits.bandwidth_mbit.is_none() {
            return None;
        }
        let obs = Observation {
            link_bytes_per_sec: link,
            ..Observation::before_start(memory_mib * 256, rate, crate::migration::MECHANICS)
        };
        let d = chosen.decide(&obs, &self.limits);
        d.prediction
            .total_ms
            .is_finite()
            .then_some(d.prediction.total_ms)
    }
}
