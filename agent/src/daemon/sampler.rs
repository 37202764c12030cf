//! The VMs' signals between migrations, for `/metrics` and for the plans the agent
//! makes before a migration starts.
//!
//! A write to a page already mapped writable faults nowhere, so no probe sees a guest
//! dirty memory unless dirty logging is on; between migrations it is off. So every
//! `every_secs` each running VM's VMM logs dirty pages for `sample_ms`
//! (`dirty-sample`): the VMM counts the distinct pages written, and the eBPF probes
//! see the same writes fault. The cost to the guest is one write fault per page it
//! writes during the sample and one more on its next write after it (logging
//! write-protects the pages, and they stay so until written): for a guest that keeps
//! rewriting a working set, about two faults per page of it per period (README,
//! "Metrics", has the measured cost). Exits and disk I/O need no logging: the probes
//! count them all the time, as cumulative counters.
//!
//! The probes are loaded once; where they cannot be (not root, no BTF), the VMM's own
//! dirty count still gives the rate, and the failure is counted and retried.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::agent::{VmInfo, VmPresence};
use ferry_api::{DirtySample, Request, RunState};
use ferry_ebpf::IoStats;

use super::inventory::{View, control_socket};
use crate::client::call_within;
use crate::probes::signals::{self, Logging, Reading};
use crate::probes::{ProbeError, Probes};
use crate::sync::lock;

/// The dirty rate's source when it is the VMM's own dirty log.
pub const VMM_LOG: &str = "kvm_dirty_log";

/// How often each VM is sampled, and for how long. A VM is sampled as soon as it
/// runs (its first rate is on `/metrics` about two seconds after the agent starts),
/// then once a minute: measured on an unpaced guest rewriting 256 MiB at random
/// (cargo xtask bench telemetry), a sample every 10 s took 21% of its write rate here
/// (software-virtualised KVM, where each write fault is dear); once a minute, 7 %
/// over three runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// None: no sampling (no dirty rate between migrations).
    pub every: Option<Duration>,
    pub sample: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            every: Some(Duration::from_secs(60)),
            sample: Duration::from_secs(1),
        }
    }
}

/// What is known of one VM.
#[derive(Debug, Clone, Default)]
pub struct VmSignals {
    /// Pages dirtied per second of logging in the last sample, by source: the VMM's
    /// own log ([`VMM_LOG`]) and the tracepoint the probes saw the writes on.
    pub dirty_pages_per_sec: Vec<(String, f64)>,
    /// Distinct pages written during the last sample.
    pub working_set_pages: Option<u64>,
    /// Tracepoints that delivered events for it during the last sample.
    pub sources_live: Vec<&'static str>,
    /// The probes' cumulative counters since they began watching it.
    pub reading: Option<Reading>,
}

/// The probes' state, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ProbeHealth {
    pub loaded: bool,
    /// Tracepoints a program is attached to.
    pub attached: usize,
    /// Tracepoints that delivered events for some VM in its last sample.
    pub live: usize,
    /// Failed attempts to load the probes since the agent started.
    pub load_errors: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub vms: BTreeMap<String, VmSignals>,
    /// Block-layer stats of each device (all submitters), cumulative: dev → stats.
    pub devices: BTreeMap<u32, IoStats>,
    pub probes: ProbeHealth,
}

/// Shared between the sampler's thread and whoever reads it.
pub type Shared = Arc<Mutex<Observed>>;

/// A failed load is tried again after this.
const RELOAD: Duration = Duration::from_secs(60);
/// The loop's pace: counters are read, and due samples taken, once per tick.
const TICK: Duration = Duration::from_secs(1);
/// Samples taken at once (each holds one thread for `sample`).
const AT_ONCE: usize = 16;

pub struct Sampler {
    schedule: Schedule,
    view: View,
    run_dir: PathBuf,
    observed: Shared,
    probes: Option<Mutex<Probes>>,
    next_load: Instant,
    /// VM → the pid the probes watch for it.
    watched: HashMap<String, u32>,
    /// VM → when its last sample began.
    sampled: HashMap<String, Instant>,
    /// Why the probes did not load, the last time (logged when it changes).
    load_error: Option<String>,
}

impl Sampler {
    pub fn new(schedule: Schedule, view: View, run_dir: PathBuf, observed: Shared) -> Self {
        Self {
            schedule,
            view,
            run_dir,
            observed,
            probes: None,
            next_load: Instant::now(),
            watched: HashMap::new(),
            sampled: HashMap::new(),
            load_error: None,
        }
    }

    /// Runs until `stop`.
    pub fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Acquire) {
            let t0 = Instant::now();
            self.tick();
            while t0.elapsed() < TICK && !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn load(&mut self) {
        if self.probes.is_some() || Instant::now() < self.next_load {
            return;
        }
        match Probes::load() {
            Ok(p) => {
                let attached = p.attachments.iter().filter(|a| a.error.is_none()).count();
                tracing::info!(attached, "eBPF probes loaded");
                let mut o = lock(&self.observed);
                o.probes.loaded = true;
                o.probes.attached = attached;
                self.probes = Some(Mutex::new(p));
                self.load_error = None;
            }
            Err(e) => {
                let why = e.to_string();
                if self.load_error.as_ref() != Some(&why) {
                    tracing::warn!(
                        "the eBPF probes did not load ({why}); dirty rates come from the \
                         VMMs' own logs, and exits and disk I/O are not measured; trying \
                         again every {}s",
                        RELOAD.as_secs()
                    );
                }
                self.load_error = Some(why);
                lock(&self.observed).probes.load_errors += 1;
                self.next_load = Instant::now() + RELOAD;
            }
        }
    }

    fn tick(&mut self) {
        self.load();
        let running: Vec<VmInfo> = self
            .view
            .all()
            .into_iter()
            .filter(|v| v.presence == VmPresence::Running && v.pid.is_some())
            .collect();
        self.follow(&running);
        let due: Vec<&VmInfo> = match self.schedule.every {
            None => Vec::new(),
            Some(every) => running
                .iter()
                .filter(|v| {
                    // A migration owns the dirty log while it runs; a paused guest
                    // writes nothing.
                    v.state == Some(RunState::Running)
                        && !v.migrating
                        && !v.moving_disks
                        && !v.in_doubt
                        && self
                            .sampled
                            .get(&v.name)
                            .is_none_or(|t| t.elapsed() >= every)
                })
                .collect(),
        };
        let mut sampled: Vec<(String, VmSignals)> = Vec::new();
        for batch in due.chunks(AT_ONCE) {
            let now = Instant::now();
            for v in batch {
                self.sampled.insert(v.name.clone(), now);
            }
            let this: &Self = self;
            std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|&v| s.spawn(move || (v.name.clone(), this.sample(v))))
                    .collect();
                for h in handles {
                    if let Ok((name, Some(sig))) = h.join() {
                        sampled.push((name, sig));
                    }
                }
            });
        }
        let readings: BTreeMap<String, Reading> = match &self.probes {
            Some(p) => {
                let mut p = lock(p);
                self.watched
                    .iter()
                    .filter_map(|(vm, &pid)| Some((vm.clone(), p.read(pid).ok()?)))
                    .collect()
            }
            None => BTreeMap::new(),
        };
        let devices = self.probes.as_ref().and_then(|p| lock(p).devices().ok());
        let mut o = lock(&self.observed);
        o.vms
            .retain(|name, _| running.iter().any(|v| &v.name == name));
        for (name, sig) in sampled {
            let e = o.vms.entry(name).or_default();
            e.dirty_pages_per_sec = sig.dirty_pages_per_sec;
            e.working_set_pages = sig.working_set_pages;
            e.sources_live = sig.sources_live;
        }
        let mut live: Vec<&str> = o
            .vms
            .values()
            .flat_map(|v| v.sources_live.clone())
            .collect();
        live.sort_unstable();
        live.dedup();
        o.probes.live = live.len();
        for (name, r) in readings {
            o.vms.entry(name).or_default().reading = Some(r);
        }
        if let Some(d) = devices {
            o.devices = d;
        }
    }

    /// Watches the running VMs' VMMs and lets go of the others'.
    fn follow(&mut self, running: &[VmInfo]) {
        self.sampled
            .retain(|name, _| running.iter().any(|v| &v.name == name));
        let Some(probes) = &self.probes else { return };
        let mut probes = lock(probes);
        self.watched.retain(|name, pid| {
            let same = running
                .iter()
                .any(|v| &v.name == name && v.pid == Some(*pid));
            if !same {
                probes.unwatch(*pid);
            }
            same
        });
        for v in running {
            let Some(pid) = v.pid else { continue };
            if self.watched.contains_key(&v.name) {
                continue;
            }
            match probes.watch(pid) {
                Ok(_) => {
                    self.watched.insert(v.name.clone(), pid);
                }
                // More VMs than the probes' slots: the VMM's own count still serves.
                Err(ProbeError::Full) => {}
                Err(e) => tracing::debug!(vm = v.name, "the probes cannot watch it: {e}"),
            }
        }
    }

    /// One sample of `v`: the VMM logs for `sample`, the probes watch the same span.
    fn sample(&self, v: &VmInfo) -> Option<VmSignals> {
        let pid = self.watched.get(&v.name).copied();
        let read = |pid: Option<u32>| {
            let probes = self.probes.as_ref()?;
            lock(probes).read(pid?).ok()
        };
        let before = read(pid);
        let control = control_socket(&self.run_dir, &v.name);
        let ms = self.schedule.sample.as_millis() as u64;
        let d: DirtySample = match call_within(
            &control,
            &Request::DirtySample {
                duration_ms: Some(ms),
            },
            self.schedule.sample + Duration::from_secs(10),
        ) {
            Ok(d) => d,
            // A migration began meanwhile (busy), or the VMM went: the next tick sees.
            Err(e) => {
                tracing::debug!(vm = v.name, "no dirty sample: {e}");
                return None;
            }
        };
        let after = read(pid);
        let logging = (d.logging_ms / 1e3).max(1e-3);
        let mut out = VmSignals {
            dirty_pages_per_sec: vec![(VMM_LOG.to_owned(), d.dirty_pages as f64 / logging)],
            working_set_pages: Some(d.dirty_pages),
            sources_live: Vec::new(),
            reading: None,
        };
        if let (Some(a), Some(b)) = (before, after) {
            let s = signals::window(&a, &b, Logging::OnFor(logging));
            if let (Some(rate), Some(source)) = (s.dirty_pages_per_sec, s.dirty_source) {
                out.dirty_pages_per_sec.push((source.to_owned(), rate));
            }
            out.sources_live = s.sources_live;
        }
        Some(out)
    }
}
