//! A VM's signals at a steady pace beside something else that runs (a migration):
//! the probes are optional there, so failing to load them is recorded, not fatal.

use std::time::{Duration, Instant};

use ferry_api::ProbeSample;

use super::signals::{self, Logging, Reading};
use super::{Probes, check_kvm_process};

type Loaded = Result<(Probes, u32, Reading), String>;

pub struct Follower {
    /// Loading takes a few hundred milliseconds (the verifier): it runs beside
    /// whatever is followed, which starts at once.
    loading: Option<std::thread::JoinHandle<Loaded>>,
    probes: Loaded,
    period: Duration,
    t0: Instant,
    last: Instant,
    pub timeline: Vec<ProbeSample>,
}

impl Follower {
    /// Loads the probes and watches `pid`; on failure every poll returns nothing and
    /// [`Follower::error`] says why.
    pub fn start(pid: u32, period: Duration) -> Self {
        let loading = std::thread::spawn(move || {
            (|| {
                super::check_prerequisites()?;
                check_kvm_process(pid)?;
                let mut p = Probes::load()?;
                let first = p.watch(pid)?;
                Ok::<_, super::ProbeError>((p, pid, first))
            })()
            .map_err(|e| e.to_string())
        });
        let now = Instant::now();
        Self {
            loading: Some(loading),
            probes: Err("still loading".into()),
            period,
            t0: now,
            last: now,
            timeline: Vec::new(),
        }
    }

    /// Takes the loader's result (waiting for it if it is still at work).
    fn finish_loading(&mut self) {
        if let Some(h) = self.loading.take() {
            self.probes = h
                .join()
                .unwrap_or_else(|_| Err("the probe loader panicked".into()));
            self.last = Instant::now();
        }
    }

    /// Why there are no signals, once loading has ended (it waits for it).
    pub fn error(&mut self) -> Option<&str> {
        self.finish_loading();
        self.probes.as_ref().err().map(String::as_str)
    }

    /// Why there are no (more) signals, once what they watched has ended: a loader
    /// still at work is left to finish on its own (it takes a second or two on this
    /// kind of host), so a short migration's report is not held up for samples it
    /// would not get.
    pub fn ended(&mut self) -> Option<String> {
        if self.loading.as_ref().is_some_and(|h| !h.is_finished()) {
            self.loading = None;
            self.probes = Err("the probes were still loading when the migration ended".into());
        }
        self.error().map(str::to_owned)
    }

    /// A new sample once `period` has passed since the last one.
    pub fn poll(&mut self, logging: Logging) -> Option<&ProbeSample> {
        if self.loading.as_ref().is_some_and(|h| h.is_finished()) {
            self.finish_loading();
        }
        if self.loading.is_some() || self.last.elapsed() < self.period {
            return None;
        }
        let (probes, pid, prev) = self.probes.as_mut().ok()?;
        let now = probes.read(*pid).ok()?;
        let s = signals::window(prev, &now, logging);
        let _ = probes.follow_working_set(*pid, prev, &now);
        *prev = now;
        self.last = Instant::now();
        self.timeline.push(ProbeSample {
            at_ms: self.t0.elapsed().as_secs_f64() * 1e3,
            dirty_pages_per_sec: s.dirty_pages_per_sec,
            dirty_source: s.dirty_source.map(str::to_owned),
            working_set_pages: s.working_set_pages,
            exits_per_sec: s.exits_per_sec,
            disk_read_bytes_per_sec: s.disk_read_bytes_per_sec,
            disk_write_bytes_per_sec: s.disk_write_bytes_per_sec,
        });
        self.timeline.last()
    }
}
