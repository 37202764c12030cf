//! From a backend's progress and the probes' latest sample to the policy's
//! [`Observation`], tick by tick: the estimates no single reading gives (the guest's
//! dirty rate through a harvest that only shows pages new to the log, the set it
//! dirties within, a round's fixed cost, the link's own rate while a slow datastore
//! holds the stream back).

use ferry_api::{CodecSample, Mechanics, MigrationProgress, ProbeSample};

use crate::policy::model::PauseBasis;
use crate::policy::{CodecPerf, Observation, Stage};

/// How long a probe sample's window is (the driver samples every 250 ms).
pub const PROBE_WINDOW_MS: f64 = 250.0;
/// Until then the stream's rate includes what filled the socket buffers.
pub const PREDICT_AFTER_MS: f64 = 1000.0;
/// Bytes on the wire before the stream's rate counts as the link's.
const LINK_MEASURED_BYTES: f64 = 16.0 * 1024.0 * 1024.0;

/// Each codec's ratio and speed as the backend measured them.
pub fn codec_perfs(samples: &[CodecSample]) -> Vec<CodecPerf> {
    samples
        .iter()
        .map(|c| CodecPerf {
            codec: c.codec,
            ratio: c.ratio,
            compress_bytes_per_sec: c.compress_bytes_per_sec,
        })
        .collect()
}

/// Share of the first pass's remaining pages that are zero: what the sample of all
/// memory expects, less the zero pages already met (memory is not uniform: a pass
/// that began in the busy part has met few); without a sample, the share so far.
fn remaining_zero_fraction(sampled: Option<f64>, memory: u64, sent: u64, zero: u64) -> f64 {
    let remaining = memory.saturating_sub(sent + zero);
    match sampled {
        Some(z) if remaining > 0 => {
            ((z * memory as f64 - zero as f64) / remaining as f64).clamp(0.0, 1.0)
        }
        _ if sent + zero > 0 => zero as f64 / (sent + zero) as f64,
        _ => 0.0,
    }
}

/// A round's fixed cost: as the rounds measured it, or, until one after the first
/// pass has (the first pass's own is lost in its length), what its parts cost in the
/// first pass: the link's round trip under load (the closing acknowledgement waits
/// for it) and a harvest of the dirty log. 0: unknown.
fn round_overhead_ms(p: &MigrationProgress) -> f64 {
    if p.round >= 2 {
        return p.round_overhead_ms;
    }
    match p.link_rtt_ms {
        Some(rtt) => rtt + p.dirty_windows.as_ref().map_or(0.0, |w| w.rearm_ms),
        None => p.round_overhead_ms,
    }
}

pub struct Observer {
    mechanics: Mechanics,
    memory_pages: u64,
    round: u32,
    pass_start_ms: f64,
    /// First pass: the probes' samples so far (time, pages/s of pages new since
    /// logging began).
    first_pass: Vec<(f64, f64)>,
    /// The backend's first-pass windows measured the guest.
    windows_seen: bool,
    /// The first pass's estimates of a round's fixed cost so far (sum, count): each
    /// is one reading of a jittery round trip.
    overhead_estimates: (f64, u32),
    /// The set the guest dirties within, in pages, once the first pass showed it.
    set_pages: Option<f64>,
    /// This round's highest probe rate from a window that began after the round's
    /// harvest (0: none yet).
    round_peak: f64,
    /// The rate last estimated, for rounds whose count says nothing new.
    rate: f64,
    /// The rate known before the migration started (the guest's, from the backend),
    /// until the probes or the rounds measure one.
    start_rate: f64,
    /// The first pass's latest link rate from a stream the destination did not hold
    /// back (the memory sent before the disks' first copy).
    unhindered_link: Option<f64>,
    /// The destination holds the disks' first copy back and the link's own rate or
    /// the copy's is not known yet: no prediction is worth keeping.
    held_unmeasured: bool,
}

impl Observer {
    /// A VM of `memory_pages` whose guest dirties `dirty_pages_per_sec` now, moved by
    /// a backend with `mechanics`.
    pub fn new(memory_pages: u64, dirty_pages_per_sec: f64, mechanics: Mechanics) -> Self {
        Self {
            mechanics,
            memory_pages,
            round: 0,
            pass_start_ms: 0.0,
            first_pass: Vec::new(),
            windows_seen: false,
            overhead_estimates: (0.0, 0),
            set_pages: None,
            round_peak: 0.0,
            rate: 0.0,
            start_rate: dirty_pages_per_sec,
            unhindered_link: None,
            held_unmeasured: false,
        }
    }

    /// Before anything moves: what the operator and the backend said.
    pub fn before_start(&self) -> Observation {
        Observation::before_start(self.memory_pages, self.start_rate, self.mechanics)
    }

    /// The guest and the link have been measured enough for a prediction to count.
    pub fn measured(&self, obs: &Observation) -> bool {
        (!self.first_pass.is_empty() || self.windows_seen || obs.round > 0) && !self.held_unmeasured
    }

    pub fn observe(&mut self, p: &MigrationProgress, sample: Option<&ProbeSample>) -> Observation {
        let t_ms = p.elapsed_ms as f64;
        let round = p.round;
        if round != self.round {
            self.round = round;
            self.pass_start_ms = t_ms;
            self.round_peak = 0.0;
        }
        let (sent, zero) = (p.pages_sent, p.zero_pages);
        let stage = if p.phase.is_postcopy() {
            Stage::Postcopy
        } else if round == 0 {
            Stage::FirstPass
        } else {
            Stage::Rounds
        };
        let remaining = if round == 0 {
            self.memory_pages.saturating_sub(sent + zero)
        } else {
            p.remaining_dirty_pages
        };
        // The stream's rate means little until it has carried more than the socket
        // buffers swallow at once (or run a second).
        let bw = if p.bytes_on_wire as f64 >= LINK_MEASURED_BYTES || t_ms >= PREDICT_AFTER_MS {
            p.bandwidth_bytes_per_sec
        } else {
            0.0
        };
        let peer_limited = p.peer_limited;
        let disk_copy = p.disk_copy_bytes_per_sec;
        let disks_travel = p.disk_dirty_bytes_per_sec.is_some();
        // A destination slower to write the disks than the link carries them holds the
        // stream back during their first copy (and while it drains what its socket
        // buffers took): the stream's rate is then the datastore's, not the one the
        // memory moves at. The link is then the rate the memory showed before the
        // copy began, and the copy goes at its own measured rate.
        let held = round == 0 && peer_limited && disks_travel;
        let link = if held {
            self.unhindered_link
        } else {
            if round == 0 && !peer_limited && bw > 0.0 {
                self.unhindered_link = Some(bw);
            }
            (bw > 0.0).then_some(bw)
        };
        // The copy's rate: measured as it goes, or until then what the destination
        // timed its datastore at (the engine takes that).
        let datastore = p.dst_write_bytes_per_sec;
        self.held_unmeasured = held && (link.is_none() || disk_copy.or(datastore).is_none());
        let (dirty, working_set) = self.dirty_rate(p, sample);
        Observation {
            t_ms,
            stage,
            memory_pages: self.memory_pages,
            remaining_pages: remaining,
            pass_elapsed_ms: t_ms - self.pass_start_ms,
            round,
            dirty_pages_per_sec: dirty,
            working_set_pages: working_set,
            link_bytes_per_sec: link,
            peer_limited,
            zero_fraction: remaining_zero_fraction(
                p.sampled_zero_fraction,
                self.memory_pages,
                sent,
                zero,
            ),
            round_overhead_ms: self.round_overhead_ms(p),
            codecs: codec_perfs(&p.codec_samples),
            disk_dirty_bytes_per_sec: p.disk_dirty_bytes_per_sec,
            disk_pending_bytes: p.disk_bytes_pending.unwrap_or(0) as f64,
            disk_bytes: p.disk_bytes_total.unwrap_or(0) as f64,
            disk_compression_ratio: p.disk_compression_ratio,
            disk_written_compression_ratio: p.disk_written_compression_ratio,
            disk_copy_bytes_per_sec: disk_copy,
            disk_write_bytes_per_sec: p.disk_write_bytes_per_sec,
            pause_basis: PauseBasis {
                mechanics: self.mechanics,
                idle_rtt_ms: p.idle_rtt_ms,
                dst_flush_ms: p.dst_flush_ms,
                dst_write_bytes_per_sec: p.dst_write_bytes_per_sec,
            },
        }
    }

    /// A round's fixed cost, the first pass's readings averaged.
    fn round_overhead_ms(&mut self, p: &MigrationProgress) -> f64 {
        let v = round_overhead_ms(p);
        if p.round >= 2 || v <= 0.0 {
            return v;
        }
        let (sum, n) = &mut self.overhead_estimates;
        *sum += v;
        *n += 1;
        *sum / f64::from(*n)
    }

    /// The guest's dirty rate and distinct pages per second, as the engine wants them.
    ///
    /// The log is harvested once a round, so both the probes and the backend see
    /// pages new since the last harvest, a figure that sinks as a round goes on when
    /// the guest re-dirties what it already touched. In the first pass the earliest
    /// samples are closest to the guest's real rate, and how the count of new pages
    /// bends shows the set it dirties within; from then on the backend's count per
    /// round is read back through that set to a rate.
    fn dirty_rate(
        &mut self,
        p: &MigrationProgress,
        sample: Option<&ProbeSample>,
    ) -> (f64, Option<u64>) {
        use crate::policy::engine::{dirty_set_pages_over, fit_dirtying};
        use crate::policy::model::dirtied;
        let round = p.round;
        let memory = self.memory_pages as f64;
        let backend_rate = p.dirty_pages_per_sec;
        // The backend's windows, each from a freshly armed log, see what the probes
        // (whose windows start anywhere in the pass) cannot: the rate over a short span.
        if round == 0
            && let Some(w) = p.dirty_windows.as_ref().filter(|w| w.windows > 0)
        {
            let short = (w.window_ms / 1e3, w.pages_per_window);
            let (rate, set) = if w.windows >= 2 {
                fit_dirtying(short, (w.since_ms / 1e3, w.distinct_pages as f64), memory)
            } else {
                (short.1 / short.0.max(1e-3), None)
            };
            self.set_pages = set;
            self.rate = rate;
            self.windows_seen = true;
            return (rate, set.map(|s| dirtied(rate, s, 1.0) as u64));
        }
        if round == 0 {
            if let Some(s) = sample
                && let Some(r) = s.dirty_pages_per_sec
                && self.first_pass.last().is_none_or(|&(t, _)| t < s.at_ms)
            {
                self.first_pass.push((s.at_ms, r));
            }
            let Some(&(t0, _)) = self.first_pass.first() else {
                return (self.start_rate.max(backend_rate), None);
            };
            let peak = self.first_pass.iter().map(|&(_, r)| r).fold(0.0, f64::max);
            let mut distinct = 0.0;
            let mut prev = t0 - PROBE_WINDOW_MS;
            for &(t, r) in &self.first_pass {
                distinct += r * (t - prev) / 1e3;
                prev = t;
            }
            let secs = (prev - (t0 - PROBE_WINDOW_MS)) / 1e3;
            self.set_pages = dirty_set_pages_over(peak, distinct, secs, memory);
            let ws = self.set_pages.map(|s| dirtied(peak, s, 1.0) as u64);
            self.rate = peak;
            return (peak, ws);
        }
        // Right after a round's harvest every page the guest writes is new to the
        // log, so a probe window that began then sees the guest's own rate.
        if let Some(s) = sample
            && let Some(r) = s.dirty_pages_per_sec
            && s.at_ms - PROBE_WINDOW_MS >= self.pass_start_ms
        {
            self.round_peak = self.round_peak.max(r);
        }
        let count = p.dirty_pages_last_round as f64;
        let rate = if self.round_peak > 0.0 {
            self.round_peak
        } else {
            match self.set_pages {
                Some(set) if backend_rate > 0.0 && count < set * 0.95 => {
                    let took = count / backend_rate;
                    -(set / took) * (1.0 - count / set).ln()
                }
                // The whole set was dirtied: the count only bounds the rate from
                // below, and the last estimate knows better.
                Some(_) => backend_rate.max(self.rate),
                None => backend_rate,
            }
        };
        self.rate = rate;
        let ws = self.set_pages.map(|s| dirtied(rate, s, 1.0) as u64);
        (rate, ws)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn progress() -> MigrationProgress {
        MigrationProgress {
            phase: ferry_api::Phase::Precopy,
            ..MigrationProgress::setup("h:1")
        }
    }

    #[test]
    fn a_rounds_cost_is_measured_or_built_from_the_first_pass() {
        let first = MigrationProgress {
            link_rtt_ms: Some(2.5),
            dirty_windows: Some(ferry_api::DirtyWindows {
                rearm_ms: 1.0,
                ..Default::default()
            }),
            ..progress()
        };
        assert_eq!(round_overhead_ms(&first), 3.5);
        let after_pass = MigrationProgress {
            round: 1,
            round_overhead_ms: 0.03,
            link_rtt_ms: Some(2.5),
            ..progress()
        };
        assert_eq!(round_overhead_ms(&after_pass), 2.5);
        let measured = MigrationProgress {
            round: 2,
            round_overhead_ms: 6.0,
            link_rtt_ms: Some(2.5),
            ..progress()
        };
        assert_eq!(round_overhead_ms(&measured), 6.0);
        assert_eq!(round_overhead_ms(&progress()), 0.0);
    }

    #[test]
    fn zero_pages_still_ahead_come_from_the_sample_less_those_met() {
        // Half of 1000 pages are zero; the pass met 400 busy pages and 100 zero ones:
        // 400 of the 500 left are zero.
        assert!((remaining_zero_fraction(Some(0.5), 1000, 400, 100) - 0.8).abs() < 1e-9);
        // More zero pages met than the sample expected: none assumed ahead.
        assert_eq!(remaining_zero_fraction(Some(0.1), 1000, 0, 500), 0.0);
        // No sample: the share so far.
        assert!((remaining_zero_fraction(None, 1000, 300, 100) - 0.25).abs() < 1e-9);
        assert_eq!(remaining_zero_fraction(None, 1000, 0, 0), 0.0);
    }
}
