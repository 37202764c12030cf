//! The adaptive engine: picks the codec the link and the CPU favour, the least
//! throttle that makes pre-copy converge within the limits, or post-copy where that
//! throttle would cost the guest more (and the operator allows it), and says why.

use std::collections::BTreeMap;

use super::disk::held_write_s;
use super::model::{
    PauseCosts, ROUND_OVERHEAD_PRIOR_MS, Stream, dirtied, pipeline_fill_s, postcopy, precopy,
    switchover_target_s, throughput,
};
use super::{
    Choice, Codec, CodecPerf, Decision, DiskMirror, Limits, Observation, PAGE, Pins, Policy,
    Prediction, Settings, Stage, Switchover, whole_ms,
};

/// No setting changes again sooner than this after it changed.
pub const HOLD_MS: f64 = 1000.0;
/// A codec must move this much more than the current one to replace it.
const CODEC_GAIN: f64 = 1.10;
const THROTTLE_STEP: u32 = 10;
/// Above this throttle the guest loses more than post-copy's faults cost it.
const THROTTLE_COMFORT: u32 = 50;
/// A lower throttle must be enough this long before the throttle drops: a guest that
/// slows for a moment is not a guest that slowed.
const LOWER_AFTER_MS: f64 = 3000.0;
/// Caps on a guest's disk writes the engine tries, as shares of the stream, mildest
/// first: each round then re-sends at most that share of itself in disk blocks (the
/// mildest is where background copy rounds still converge).
const DISK_SHARES: [f64; 3] = [super::disk::BACKGROUND_SHARE, 0.25, 0.1];
/// The share of the disks' path an active mirror may take of the guest's writes (see
/// where it is used): as [`super::disk::BACKGROUND_SHARE`], the line between a copy
/// that keeps up beside the memory and one that does not.
const MIRROR_SHARE: f64 = super::disk::BACKGROUND_SHARE;
/// How much sooner the model must finish with each disk write mirrored than with
/// rounds before the mirror is chosen (as [`CODEC_GAIN`] for a codec): a guest write
/// mirrored is one send of its own, a cost the model does not count.
const MIRROR_GAIN: f64 = 1.10;
/// And by at least this much, milliseconds: near the end, when a few tens of
/// milliseconds remain, turning the mirror on costs more than it saves (it flushes the
/// stream at every guest write from then on), and 10 % of so little is within the
/// model's error.
const MIRROR_SAVING_MS: f64 = 100.0;

pub struct Adaptive {
    pins: Pins,
    current: Settings,
    /// Switched to post-copy (once, for good).
    postcopy: bool,
    changed_at: BTreeMap<&'static str, f64>,
    /// Since when a lower throttle than the current one would do.
    lower_since: Option<f64>,
    /// How the guest answers the throttle, learnt as it runs.
    response: Response,
    /// When the current round began, and the one before it.
    round_start: (u32, f64, f64),
    /// Disks that travel: the most disk bytes per second the guest dirtied with no
    /// cap in force (under a cap, the cap is what shows).
    disk_demand: f64,
    /// The most disk bytes per second the guest wrote with neither a cap nor the
    /// mirror holding it back.
    write_demand: f64,
}

/// A guest's dirty rate under a throttle: what it wants to write (`demand`, bytes/s)
/// up to what its throttled vCPUs can (`capacity` × the share of time left). A guest
/// that writes at a steady pace with headroom (a server under a fixed load) shrugs
/// off a light throttle: its rate only falls once the throttle eats the headroom.
/// Until a throttled round shows otherwise, capacity is taken as the demand (the
/// rate falls in proportion).
#[derive(Debug, Clone, Copy, Default)]
struct Response {
    demand: f64,
    capacity: Option<f64>,
}

impl Response {
    fn rate(&self, throttle_pct: u32) -> f64 {
        let keep = 1.0 - f64::from(throttle_pct.min(99)) / 100.0;
        let capacity = self.capacity.unwrap_or(self.demand).max(self.demand);
        self.demand.min(capacity * keep)
    }

    /// A rate measured with `throttle_pct` in force for the whole measurement.
    fn learn(&mut self, measured: f64, throttle_pct: u32) {
        if throttle_pct == 0 {
            self.demand = measured;
        } else {
            let keep = 1.0 - f64::from(throttle_pct.min(99)) / 100.0;
            self.capacity = Some(self.capacity.unwrap_or(0.0).max(measured / keep));
            self.demand = self.demand.max(measured);
        }
    }
}

impl Adaptive {
    pub fn new(pins: Pins, limits: &Limits) -> Self {
        Self {
            current: Settings {
                codec: pins.codec.unwrap_or(Codec::None),
                bandwidth_bytes_per_sec: limits.bandwidth_bytes_per_sec(),
                throttle_pct: pins.throttle_pct.unwrap_or(0),
                max_downtime_ms: whole_ms(limits.max_downtime_ms),
                disk_write_limit_bytes_per_sec: pins
                    .disk_write_limit_bytes_per_sec
                    .filter(|&b| b > 0),
                disk_mirror: pins.disk_mirror.unwrap_or_default(),
                switchover: Switchover::Halving,
            },
            postcopy: false,
            pins,
            changed_at: BTreeMap::new(),
            lower_since: None,
            response: Response::default(),
            round_start: (0, 0.0, 0.0),
            disk_demand: 0.0,
            write_demand: 0.0,
        }
    }

    fn may_change(&self, setting: &'static str, t_ms: f64) -> bool {
        self.changed_at
            .get(setting)
            .is_none_or(|&at| t_ms - at >= HOLD_MS)
    }

    fn changed(&mut self, setting: &'static str, t_ms: f64) {
        self.changed_at.insert(setting, t_ms);
    }
}

fn mb(bytes_per_sec: f64) -> String {
    format!("{:.1} MB/s", bytes_per_sec / 1e6)
}

/// The region a guest dirties within, from its rate and the distinct pages it dirtied
/// in a second (None: they are the same, it dirties all over memory).
pub fn dirty_set_pages(rate: f64, distinct: f64, memory: f64) -> Option<f64> {
    dirty_set_pages_over(rate, distinct, 1.0, memory)
}

/// As [`dirty_set_pages`], from the distinct pages dirtied over `secs`.
pub fn dirty_set_pages_over(rate: f64, distinct: f64, secs: f64, memory: f64) -> Option<f64> {
    if rate <= 0.0 || secs <= 0.0 || distinct >= rate * secs * 0.95 {
        return None;
    }
    let (mut lo, mut hi) = (distinct.max(1.0), memory.max(distinct + 1.0));
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if dirtied(rate, mid, secs) < distinct {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// The guest's dirty rate (pages/s) and the set it dirties within (pages), from the
/// distinct pages it dirtied in a short span (`short`: seconds, pages) and in a longer
/// one (`long`), both counted from a fresh log: the [`dirtied`] curve through both
/// points. A guest rewriting a hot set shows a short span's rate close to its own and a
/// longer span that bends; one writing all over memory (or spans too close to tell)
/// gets no set.
pub fn fit_dirtying(short: (f64, f64), long: (f64, f64), memory: f64) -> (f64, Option<f64>) {
    let ((ts, ds), (tl, dl)) = (short, long);
    if ts <= 0.0 || ds <= 0.0 {
        return (0.0, None);
    }
    let linear = ds / ts;
    if tl <= ts * 1.2 || dl >= linear * tl * 0.95 {
        return (linear, None);
    }
    // Through the short point, a set of `s` pages means a rate of `rate(s)`; the
    // longer span then grows with `s`, from `ds` (a set no larger than the short
    // span's pages) towards the straight line.
    let rate = |s: f64| -s / ts * (1.0 - ds / s).ln();
    let long_at = |s: f64| s * (1.0 - (1.0 - ds / s).powf(tl / ts));
    let (mut lo, mut hi) = (ds * (1.0 + 1e-9), memory.max(ds * 2.0));
    if long_at(hi) <= dl {
        return (rate(hi), Some(hi));
    }
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if long_at(mid) < dl {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (rate(hi), Some(hi))
}

impl Adaptive {
    /// Updates the guest's throttle response from an observation. The first pass's
    /// rate comes from its earliest samples, before any throttle bit; a round's counts
    /// as the guest's answer to the throttle only if that held since the round before
    /// began (the rate is read from both).
    fn learn(&mut self, obs: &Observation) {
        let measured = obs.dirty_pages_per_sec * PAGE;
        let start = obs.t_ms - obs.pass_elapsed_ms;
        if obs.round != self.round_start.0 {
            self.round_start = (obs.round, start, self.round_start.1);
        }
        match obs.stage {
            Stage::Starting => self.response.learn(measured, 0),
            // A throttle set before the pass began (the first decision) is in every
            // sample of it: the rate is the guest's answer to it, not its demand. The
            // latest sample speaks for the pass (the earliest may still catch the
            // guest before the throttle bit, and at 99 % a sample's error counts a
            // hundredfold in what the guest could do).
            Stage::FirstPass => {
                let since = self.changed_at.get("throttle_pct").copied();
                let pct = self.current.throttle_pct;
                if since.is_none_or(|at| at <= 0.0) {
                    if pct > 0 {
                        self.response.capacity = None;
                    }
                    self.response.learn(measured, pct);
                } else {
                    self.response.demand = self.response.demand.max(measured);
                }
            }
            Stage::Rounds => {
                let since = self.changed_at.get("throttle_pct").copied();
                if since.is_none_or(|at| at <= self.round_start.2) {
                    self.response.learn(measured, self.current.throttle_pct);
                } else {
                    self.response.demand = self.response.demand.max(measured);
                }
            }
            Stage::Postcopy => {}
        }
    }
}

impl Policy for Adaptive {
    fn name(&self) -> &str {
        "adaptive"
    }

    fn decide(&mut self, obs: &Observation, limits: &Limits) -> Choice {
        let t = obs.t_ms;
        let mut reasons = Vec::new();
        let cores = limits.cpu_budget_cores;
        let cap = limits.bandwidth_mbit.map(|m| m * 1e6 / 8.0);
        let link = match (obs.link_bytes_per_sec, cap) {
            (Some(l), Some(c)) => Some(l.min(c)),
            (l, c) => l.or(c),
        };
        self.current.bandwidth_bytes_per_sec = limits.bandwidth_bytes_per_sec();

        // The codec: whichever moves the most page bytes over this link within the
        // CPU budget, measured on this VM's pages.
        let none = CodecPerf {
            codec: Codec::None,
            ratio: 1.0,
            compress_bytes_per_sec: f64::INFINITY,
        };
        let candidates: Vec<CodecPerf> = std::iter::once(none)
            .chain(
                obs.codecs
                    .iter()
                    .copied()
                    .filter(|c| c.codec != Codec::None),
            )
            .collect();
        let perf = |codec: Codec| {
            candidates
                .iter()
                .copied()
                .find(|c| c.codec == codec)
                .unwrap_or(none)
        };
        if let Some(pinned) = self.pins.codec {
            self.current.codec = pinned;
            reasons.push(Decision {
                t_ms: obs.t_ms,
                setting: "codec".into(),
                value: pinned.to_string(),
                reason: "pinned on the command line".into(),
            });
        } else if obs.peer_limited && link.is_some() {
            // The destination, not the link, sets the pace (a datastore slower than
            // the link, say): it writes as many raw bytes whatever the codec.
            if self.current.codec != Codec::None && self.may_change("codec", t) {
                self.current.codec = Codec::None;
                self.changed("codec", t);
            }
            reasons.push(Decision {
                t_ms: obs.t_ms,
                setting: "codec".into(),
                value: self.current.codec.to_string(),
                reason: "the destination takes the stream in slower than the link carries it \
                      (TCP: its receive window held the data back most of the time): \
                      compressing would move no more"
                    .into(),
            });
        } else if let Some(link) = link {
            let rated: Vec<(CodecPerf, f64)> = candidates
                .iter()
                .map(|c| (*c, throughput(link, c, cores)))
                .collect();
            let (best, best_t) = rated
                .iter()
                .copied()
                .fold((none, 0.0), |a, b| if b.1 > a.1 { b } else { a });
            let cur_t = throughput(link, &perf(self.current.codec), cores);
            let listing = rated
                .iter()
                .map(|(c, v)| format!("{} {}", c.codec, mb(*v)))
                .collect::<Vec<_>>()
                .join(", ");
            if best.codec != self.current.codec
                && best_t > cur_t * CODEC_GAIN
                && self.may_change("codec", t)
            {
                self.current.codec = best.codec;
                self.changed("codec", t);
            }
            let chosen = perf(self.current.codec);
            let why = if chosen.codec == Codec::None {
                format!(
                    "link {} with {cores} core(s) to compress: pages move fastest raw ({listing})",
                    mb(link)
                )
            } else {
                format!(
                    "link {} is the bottleneck: {} (ratio {:.2}, {} per core) moves the most \
                     pages ({listing})",
                    mb(link),
                    chosen.codec,
                    chosen.ratio,
                    mb(chosen.compress_bytes_per_sec)
                )
            };
            reasons.push(Decision {
                t_ms: obs.t_ms,
                setting: "codec".into(),
                value: self.current.codec.to_string(),
                reason: why,
            });
        } else {
            reasons.push(Decision {
                t_ms: obs.t_ms,
                setting: "codec".into(),
                value: self.current.codec.to_string(),
                reason: "the link is not measured yet".into(),
            });
        }
        let pages_per_sec = link.map(|l| throughput(l, &perf(self.current.codec), cores));

        // What the guest would dirty unthrottled, and within how much memory.
        let memory = obs.memory_pages as f64 * PAGE;
        self.learn(obs);
        let natural = self.response.demand;
        let set = obs
            .working_set_pages
            .and_then(|w| {
                dirty_set_pages(obs.dirty_pages_per_sec, w as f64, obs.memory_pages as f64)
            })
            .map_or(memory, |p| p * PAGE);
        // Disk bytes as the page bytes that take as long on the wire: they compress
        // unlike pages, and the blocks the guest writes (what the rounds and the
        // pause carry) unlike the first copy's long runs.
        let page_ratio = perf(self.current.codec).ratio.max(1.0);
        let scale = |r: Option<f64>| r.map_or(1.0, |r| page_ratio / r.max(1e-3));
        // Where the disks' first copy went slower than the stream moves pages (the
        // destination's datastore writes slower than the link carries, and holds the
        // stream back meanwhile), disk bytes cost their time at that rate.
        // Until the copy's own rate is measured, a destination holding the first
        // pass back writes at the rate it timed its datastore at, less what the
        // mirror writes there meanwhile.
        let copy_rate = obs.disk_copy_bytes_per_sec.or_else(|| {
            let held = obs.peer_limited && matches!(obs.stage, Stage::FirstPass);
            let mirror = if self.current.disk_mirror == DiskMirror::Active {
                obs.disk_write_bytes_per_sec.unwrap_or(0.0)
            } else {
                0.0
            };
            obs.pause_basis
                .dst_write_bytes_per_sec
                .filter(|_| held)
                .map(|w| (w - mirror).max(w * 0.1))
        });
        let copy_scale = match (pages_per_sec, copy_rate) {
            (Some(tput), Some(r)) if r > 0.0 => tput / r,
            _ => 0.0,
        };
        let disk_scale = scale(obs.disk_written_compression_ratio).max(copy_scale);
        let first_pass = matches!(obs.stage, Stage::FirstPass | Stage::Starting);
        // The disk bytes this pass still sends, as page bytes on the wire.
        let disk_pending = obs.disk_pending_bytes
            * if first_pass {
                scale(obs.disk_compression_ratio).max(copy_scale)
            } else {
                disk_scale
            };
        let remaining = obs.remaining_pages as f64
            * PAGE
            * if first_pass {
                1.0 - obs.zero_fraction.clamp(0.0, 1.0)
            } else {
                1.0
            }
            + disk_pending;

        let Some(tput) = pages_per_sec else {
            return Choice {
                settings: self.current,
                postcopy: self.postcopy,
                abort: None,
                prediction: Prediction {
                    total_ms: f64::INFINITY,
                    downtime_ms: f64::INFINITY,
                    converges: false,
                },
                reasons,
            };
        };
        if obs.stage == Stage::Postcopy {
            return Choice {
                settings: self.current,
                postcopy: self.postcopy,
                abort: None,
                prediction: shift(postcopy(remaining, tput, &obs.pause_basis), t),
                reasons,
            };
        }
        let limit_s = limits.max_downtime_ms / 1e3;
        let budget_ms = limits.max_total_secs.map(|s| s * 1e3 - t);
        let fits = |p: &Prediction| p.converges && budget_ms.is_none_or(|b| p.total_ms <= b);
        let elapsed = obs.pass_elapsed_ms / 1e3;
        // A cost the rounds measured includes the codec's; one built from the first
        // pass does not.
        let mechanics = obs.pause_basis.mechanics;
        let fill_s = pipeline_fill_s(&perf(self.current.codec), &mechanics);
        let round_overhead_s = if obs.round_overhead_ms > 0.0 {
            obs.round_overhead_ms / 1e3
        } else {
            ROUND_OVERHEAD_PRIOR_MS / 1e3
        } + if matches!(obs.stage, Stage::Starting | Stage::FirstPass) {
            fill_s
        } else {
            0.0
        };
        // Disks that travel: what the guest would dirty of them uncapped.
        let disk_demand = obs.disk_dirty_bytes_per_sec.map(|r| {
            if self.current.disk_write_limit_bytes_per_sec.is_none() {
                self.disk_demand = self.disk_demand.max(r);
            }
            self.disk_demand.max(r)
        });
        // What the guest would write unhindered: a cap or the mirror itself holds the
        // measured rate down, so the most seen without either, and never less than
        // the distinct bytes it dirties (every one of them is a write).
        let free = self.current.disk_write_limit_bytes_per_sec.is_none()
            && self.current.disk_mirror == DiskMirror::Background;
        let writes = obs.disk_write_bytes_per_sec.map(|w| {
            if free {
                self.write_demand = self.write_demand.max(w);
            }
            self.write_demand.max(w).max(disk_demand.unwrap_or(0.0))
        });
        let (response, pinned_throttle) = (self.response, self.pins.throttle_pct);
        // A guest writing at random dirties ever more blocks it already dirtied: what
        // a round carries of the disks saturates at their size.
        let disk_set = if obs.disk_bytes > 0.0 {
            obs.disk_bytes * disk_scale
        } else {
            f64::INFINITY
        };
        // In the first pass the disks' first copy takes along the writes that land
        // ahead of it: over the time it still runs, on average half the share of the
        // disks it has yet to reach.
        let disk_absorbed_s = if first_pass && obs.disk_bytes > 0.0 {
            disk_pending / tput * (obs.disk_pending_bytes / obs.disk_bytes).min(1.0) / 2.0
        } else {
            0.0
        };
        let stream = |disk_cap: Option<f64>, mirroring: bool| {
            // The mirror's writes share the link with the pages. (A datastore slower
            // than the link takes them beside the disks' first copy, whose measured
            // rate already counts them; the pages never wait on it.)
            let mirrored = if mirroring {
                writes.unwrap_or(0.0) * scale(obs.disk_written_compression_ratio)
            } else {
                0.0
            };
            Stream {
                basis: obs.pause_basis,
                bytes_per_sec: (tput - mirrored).max(tput * 0.1),
                round_overhead_s,
                pause_fill_s: fill_s,
                // Mirrored, nothing of the disks waits for a round; the destination's
                // sync in the pause stays.
                disk_bytes_per_sec: if mirroring {
                    Some(0.0)
                } else {
                    disk_demand.map(|d| disk_cap.map_or(d, |c| d.min(c)) * disk_scale)
                },
                held_write_s: match (disk_cap, disk_demand) {
                    (Some(c), Some(d)) if !mirroring => {
                        held_write_s(mechanics.disk_block_bytes as f64, c, d)
                    }
                    _ => 0.0,
                },
                disk_set,
                disk_absorbed_s,
            }
        };
        // The VMM switches over by its own test, against the target handed to it.
        let precopy_with = |pct: u32, s: Stream| {
            precopy(
                remaining,
                elapsed,
                response.rate(pct),
                set,
                s,
                switchover_target_s(limit_s, &s),
                first_pass.then_some(memory),
            )
        };
        // Disks that travel: re-send the blocks the guest wrote in rounds
        // (background), or mirror each write (active) where the rounds would not fit
        // the limits or the mirror finishes clearly sooner (by enough to pay for the
        // switch), both unthrottled and uncapped. The mirror sends every write at
        // once, rewrites included, from the guest's own vCPU thread, one write a send:
        // on a CPU-bound host that costs more than the model sees, so a near tie goes
        // to the rounds, which coalesce rewrites and batch what they send. Writes past
        // MIRROR_SHARE of what the disks' path carries (the link, or a destination
        // datastore slower than it) are never mirrored: the guest would be paced to
        // the link.
        let disk_path = tput / disk_scale;
        let mut against = None;
        let wanted = match (self.pins.disk_mirror, writes) {
            (Some(m), _) => m,
            (None, Some(w)) if disk_demand.is_some() => {
                if w <= MIRROR_SHARE * disk_path {
                    let mirror = precopy_with(0, stream(None, true));
                    let rounds = precopy_with(0, stream(None, false));
                    against = Some((mirror.total_ms, rounds.total_ms, fits(&rounds)));
                    if fits(&mirror)
                        && (!fits(&rounds)
                            || (mirror.total_ms * MIRROR_GAIN < rounds.total_ms
                                && rounds.total_ms - mirror.total_ms >= MIRROR_SAVING_MS))
                    {
                        DiskMirror::Active
                    } else {
                        DiskMirror::Background
                    }
                } else {
                    DiskMirror::Background
                }
            }
            _ => self.current.disk_mirror,
        };
        if wanted != self.current.disk_mirror && self.may_change("disk_mirror", t) {
            self.current.disk_mirror = wanted;
            self.changed("disk_mirror", t);
        }
        let mirroring = disk_demand.is_some() && self.current.disk_mirror == DiskMirror::Active;
        let with_disk =
            |pct: u32, disk_cap: Option<f64>| precopy_with(pct, stream(disk_cap, mirroring));
        let max_throttle = limits.max_throttle_pct.min(99);
        let least_throttle = |disk_cap: Option<f64>| match pinned_throttle {
            Some(p) => Some(p),
            // In steps, and the most allowed last (99 % is not a step of 10).
            None => std::iter::once(0)
                .chain((THROTTLE_STEP..=max_throttle).step_by(THROTTLE_STEP as usize))
                .chain(std::iter::once(max_throttle))
                .find(|&p| fits(&with_disk(p, disk_cap))),
        };
        // The disks' cap: none if pre-copy converges unthrottled beside them, else the
        // mildest that lets it (a held-back disk write costs the guest less than a
        // throttled vCPU), else the mildest that needs only a comfortable throttle;
        // never looser than one in force.
        let held = self
            .current
            .disk_write_limit_bytes_per_sec
            .map(|b| b as f64);
        let pinned_disk = self.pins.disk_write_limit_bytes_per_sec;
        let disk_cap = match (disk_demand, pinned_disk) {
            (_, Some(b)) => (b > 0).then_some(b as f64),
            (None, None) => None,
            (Some(_), None) if mirroring => None,
            (Some(demand), None) => {
                // Uncapped, disk writes past the background share of the stream leave
                // rounds that barely shrink: pre-copy may still converge on paper, but
                // slowly, and a small error in any estimate turns it into one that
                // does not (a background storage copy shows the same line). Judged on
                // the rate now, not the most seen: a burst must not cap the guest for
                // the rest of the migration (a cap, once set, is never loosened).
                let now = obs.disk_dirty_bytes_per_sec.unwrap_or(demand);
                let share = now * disk_scale / tput;
                // The backend's tightest cap: below it a guest write would stall its
                // vCPU for long.
                let floor = mechanics.min_disk_write_limit_bytes_per_sec as f64;
                let candidates: Vec<Option<f64>> = std::iter::once(held)
                    .filter(|h| h.is_some() || share <= super::disk::BACKGROUND_SHARE)
                    .chain(
                        DISK_SHARES
                            .iter()
                            .map(|s| Some((s * tput / disk_scale).max(floor)))
                            .filter(|c| {
                                c.is_some_and(|c| c < demand && held.is_none_or(|h| c < h))
                            }),
                    )
                    .collect();
                // With the throttle pinned, a cap must make pre-copy fit under it.
                let within = |most: u32| {
                    move |cap: &Option<f64>| match pinned_throttle {
                        Some(p) => fits(&with_disk(p, *cap)),
                        None => least_throttle(*cap).is_some_and(|p| p <= most),
                    }
                };
                [0, THROTTLE_COMFORT]
                    .into_iter()
                    .find_map(|most| candidates.iter().copied().find(within(most)))
                    .or_else(|| candidates.last().copied())
                    .flatten()
            }
        };
        let whole = |c: f64| c.round().max(1.0) as u64;
        let disk_cap = if disk_cap.map(whole) != self.current.disk_write_limit_bytes_per_sec
            && self.may_change("disk_write_limit", t)
        {
            self.current.disk_write_limit_bytes_per_sec = disk_cap.map(whole);
            self.changed("disk_write_limit", t);
            disk_cap
        } else {
            held
        };
        let with = |pct: u32| with_disk(pct, disk_cap);
        // The switchover moment: once the VMM estimates the pause's bytes under a target
        // that leaves room in the limit for what else the pause costs (a peer compares
        // its estimate with the limit itself, and overruns it by those costs).
        let chosen = stream(disk_cap, mirroring);
        let target_ms = (switchover_target_s(limit_s, &chosen) * 1e3)
            .floor()
            .max(1.0);
        self.current.max_downtime_ms = whole_ms(target_ms);
        let costs = PauseCosts::of(limit_s, &chosen);
        let how = |measured: bool| if measured { "measured" } else { "prior" };
        let mut besides = vec![format!(
            "{:.0} ms for the handover ({} round trip)",
            costs.handover_s * 1e3,
            how(obs.pause_basis.idle_rtt_ms.is_some())
        )];
        if costs.disk_sync_s > 0.0 {
            besides.push(format!(
                "{:.0} ms for the destination to sync its disks ({})",
                costs.disk_sync_s * 1e3,
                how(obs.pause_basis.disk_sync_measured())
            ));
        }
        if costs.held_write_s > 0.0 {
            besides.push(format!(
                "{:.0} ms a capped disk write holds the guest before it, on average",
                costs.held_write_s * 1e3
            ));
        }
        if costs.fill_s * 1e3 >= 0.5 {
            besides.push(format!(
                "{:.0} ms to compress the first batch of the last pages",
                costs.fill_s * 1e3
            ));
        }
        reasons.push(Decision {
            t_ms: obs.t_ms,
            setting: "max_downtime_ms".into(),
            value: format!("{target_ms:.0}"),
            reason: format!(
                "switch over once the last bytes take {target_ms:.0} ms on the wire: the {:.0} \
                 ms limit less {}",
                limits.max_downtime_ms,
                besides.join(", ")
            ),
        });
        let (want, pinned) = (least_throttle(disk_cap), pinned_throttle.is_some());
        // Post-copy: the rest follows after the first pass (or now, if that is over).
        let post = {
            let first = if obs.stage == Stage::Rounds {
                0.0
            } else {
                remaining / tput
            };
            let behind = if obs.stage == Stage::Rounds {
                remaining + dirtied(natural, set, elapsed)
            } else {
                dirtied(natural, set, elapsed + first)
            };
            let p = postcopy(behind, tput, &obs.pause_basis);
            Prediction {
                total_ms: first * 1e3 + p.total_ms,
                ..p
            }
        };
        let rate = format!(
            "the guest dirties {} (in {:.0} MiB) against {} of pages",
            mb(natural),
            set / (1 << 20) as f64,
            mb(tput)
        );
        // Post-copy where pre-copy needs a heavy throttle, or any throttle and
        // post-copy is done sooner: the guest then runs at full speed throughout.
        let use_postcopy = !pinned
            && limits.allow_postcopy
            && budget_ms.is_none_or(|b| post.total_ms <= b)
            && match want {
                None => true,
                Some(0) => false,
                Some(p) => p > THROTTLE_COMFORT || post.total_ms < with(p).total_ms,
            };
        let (throttle, prediction, why) = if use_postcopy {
            let why = match want {
                Some(p) if p > THROTTLE_COMFORT => format!(
                    "{rate}: pre-copy would need a {p}% throttle; post-copy after the first \
                     pass costs the guest less"
                ),
                Some(p) => format!(
                    "{rate}: pre-copy would need a {p}% throttle and {:.1} s; post-copy after \
                     the first pass is done in {:.1} s without one",
                    with(p).total_ms / 1e3,
                    post.total_ms / 1e3
                ),
                None => format!(
                    "{rate}: pre-copy cannot converge within the limits even at {max_throttle}% \
                     throttle; post-copy after the first pass"
                ),
            };
            (0, post, why)
        } else {
            match want {
                Some(0) => (
                    0,
                    with(0),
                    format!("{rate}: pre-copy converges unthrottled"),
                ),
                Some(p) if pinned => (p, with(p), "pinned on the command line".into()),
                Some(p) => (
                    p,
                    with(p),
                    format!("{rate}: the least throttle that converges within the limits"),
                ),
                None => (
                    max_throttle,
                    with(max_throttle),
                    format!(
                        "{rate}: no throttle up to {max_throttle}% converges within the limits \
                         (and post-copy is {}); throttling as far as allowed",
                        if limits.allow_postcopy {
                            "too slow"
                        } else {
                            "not allowed"
                        }
                    ),
                ),
            }
        };
        // Raise at once when needed; lower only by a clear margin that held for a
        // while; never faster than once a second.
        let cur = self.current.throttle_pct;
        let lower = throttle + THROTTLE_STEP <= cur;
        if lower {
            self.lower_since.get_or_insert(t);
        } else {
            self.lower_since = None;
        }
        let held = self
            .lower_since
            .is_some_and(|since| t - since >= LOWER_AFTER_MS);
        let change = throttle > cur || (lower && held);
        if throttle != cur && change && self.may_change("throttle_pct", t) {
            self.lower_since = None;
            self.current.throttle_pct = throttle;
            self.changed("throttle_pct", t);
        }
        reasons.push(Decision {
            t_ms: obs.t_ms,
            setting: "throttle_pct".into(),
            value: self.current.throttle_pct.to_string(),
            reason: format!(
                "{why}; predicted total {:.1} s, downtime {:.0} ms",
                (t + prediction.total_ms) / 1e3,
                prediction.downtime_ms
            ),
        });
        if let Some(demand) = disk_demand {
            let (value, why) = match self.current.disk_write_limit_bytes_per_sec {
                _ if pinned_disk.is_some() => (
                    self.current
                        .disk_write_limit_bytes_per_sec
                        .map_or("unlimited".into(), |c| c.to_string()),
                    "pinned on the command line".to_string(),
                ),
                None => (
                    "unlimited".to_string(),
                    format!(
                        "the guest dirties {} of its disks beside {} of pages: the rounds carry \
                         its disk writes with the memory",
                        mb(demand),
                        mb(tput)
                    ),
                ),
                Some(bytes) => {
                    let share = demand * disk_scale / tput;
                    let held_share = bytes as f64 * disk_scale / tput * 100.0;
                    let cap = bytes as f64 / 1e6;
                    (
                        bytes.to_string(),
                        if share > super::disk::BACKGROUND_SHARE {
                            format!(
                                "the guest dirties {} of its disks, which would take {:.0}% of \
                                 the stream: rounds would shrink slowly or not at all under \
                                 them; holding its disk writes to {cap:.1} MB/s ({held_share:.0}% \
                                 of the stream) lets pre-copy converge",
                                mb(demand),
                                share * 100.0,
                            )
                        } else {
                            format!(
                                "the guest dirties {} of its disks, {:.0}% of the stream: \
                                 holding its disk writes to {cap:.1} MB/s ({held_share:.0}% of \
                                 the stream) lets pre-copy converge without throttling its \
                                 vCPUs (a held-back disk write costs the guest less)",
                                mb(demand),
                                share * 100.0,
                            )
                        },
                    )
                }
            };
            reasons.push(Decision {
                t_ms: obs.t_ms,
                setting: "disk_write_limit_bytes_per_sec".into(),
                value,
                reason: why,
            });
            let why = match (self.pins.disk_mirror, writes) {
                (Some(_), _) => "pinned on the command line".to_string(),
                (None, Some(w)) => format!(
                    "the guest writes {} of its disks, rewrites included, against {} its disks' \
                     path carries (the link{}): {}",
                    mb(w),
                    mb(disk_path),
                    if obs
                        .disk_copy_bytes_per_sec
                        .is_some_and(|r| r <= disk_path * 1.001)
                    {
                        " or the destination's datastore, as their first copy measured"
                    } else {
                        ""
                    },
                    match (against, self.current.disk_mirror) {
                        (Some((m, _, false)), DiskMirror::Active) => format!(
                            "rounds would not switch over within the limits; mirroring each \
                             write leaves no disk blocks for them or the pause, done in {:.2} s",
                            m / 1e3
                        ),
                        (Some((m, r, true)), DiskMirror::Active) => format!(
                            "mirroring each write leaves no disk blocks for the rounds or the \
                             pause, done in {:.2} s against {:.2} s with rounds",
                            m / 1e3,
                            r / 1e3
                        ),
                        (Some((m, r, _)), DiskMirror::Background) => format!(
                            "rounds carry its writes, done in {:.2} s against {:.2} s with \
                             each write mirrored",
                            r / 1e3,
                            m / 1e3
                        ),
                        (None, _) => "mirroring would pace the guest to the link; rounds \
                                      carry its writes"
                            .to_string(),
                    }
                ),
                (None, None) => "the guest's disk writes are not measured yet".to_string(),
            };
            reasons.push(Decision {
                t_ms: obs.t_ms,
                setting: "disk_mirror".into(),
                value: self.current.disk_mirror.to_string(),
                reason: why,
            });
        }
        if use_postcopy && obs.stage == Stage::Rounds && !self.postcopy {
            self.postcopy = true;
            self.changed("postcopy", t);
        }
        reasons.push(Decision {
            t_ms: obs.t_ms,
            setting: "postcopy".into(),
            value: self.postcopy.to_string(),
            reason: if self.postcopy {
                format!("switched: {why}")
            } else if use_postcopy {
                format!("planned once the first pass is done: {why}")
            } else if limits.allow_postcopy {
                "pre-copy fits the limits".to_string()
            } else {
                "not allowed".to_string()
            },
        });
        Choice {
            settings: self.current,
            postcopy: self.postcopy,
            abort: None,
            prediction: shift(prediction, t),
            reasons,
        }
    }
}

fn shift(p: Prediction, t_ms: f64) -> Prediction {
    Prediction {
        total_ms: p.total_ms + t_ms,
        ..p
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::SWITCH_MS;
    use super::*;

    #[test]
    fn two_spans_recover_a_hot_sets_short_rounds() {
        // 90 % of 20k writes/s in a hot 38 MiB, the rest over 384 MiB.
        let truth = |t: f64| dirtied(18_000.0, 9_830.0, t) + dirtied(2_000.0, 98_000.0, t);
        let (rate, set) = fit_dirtying((0.25, truth(0.25)), (1.0, truth(1.0)), 131_072.0);
        let set = set.expect("a hot set bends the curve");
        for (t, within) in [(0.025, 0.1), (0.1, 0.1), (0.3, 0.1), (2.2, 0.2)] {
            let fit = dirtied(rate, set, t);
            assert!(
                (fit / truth(t) - 1.0).abs() <= within,
                "over {t} s: fit {fit:.0} pages, truth {:.0} (rate {rate:.0}, set {set:.0})",
                truth(t)
            );
        }
        // The short span alone would have said 16k pages/s.
        assert!(rate > 18_000.0, "{rate}");
    }

    fn rounds(disk: Option<f64>) -> Observation {
        Observation {
            t_ms: 5_000.0,
            stage: Stage::Rounds,
            remaining_pages: 2_000,
            pass_elapsed_ms: 20.0,
            round: 3,
            link_bytes_per_sec: Some(100e6),
            round_overhead_ms: 2.0,
            disk_dirty_bytes_per_sec: disk,
            ..Observation::before_start(65_536, 2_000.0, crate::policy::fixture::mechanics())
        }
    }

    /// The limits the `rounds` observations are judged against.
    fn rounds_limits() -> Limits {
        Limits {
            max_downtime_ms: 100.0,
            max_total_secs: Some(60.0),
            ..Limits::default()
        }
    }

    fn disk_reason(d: &Choice) -> Option<&Decision> {
        d.reasons
            .iter()
            .find(|r| r.setting == "disk_write_limit_bytes_per_sec")
    }

    #[test]
    fn a_first_pass_under_a_throttle_measures_the_answer_to_it_not_the_demand() {
        // A guest writing 160 MB/s within 16 MiB over a 100 Mbit/s cap, post-copy not
        // allowed: throttled from the start, its first pass shows 1.7 MB/s.
        let limits = Limits {
            max_downtime_ms: 300.0,
            max_total_secs: Some(60.0),
            bandwidth_mbit: Some(100.0),
            ..Limits::default()
        };
        let mut e = Adaptive::new(Pins::default(), &limits);
        let mut o = rounds(None);
        o.stage = Stage::Starting;
        o.t_ms = 0.0;
        o.memory_pages = 24_576;
        o.remaining_pages = 24_576;
        o.dirty_pages_per_sec = 40_000.0;
        o.link_bytes_per_sec = None;
        let start = e.decide(&o, &limits);
        assert_eq!(start.settings.throttle_pct, 99, "{start:?}");
        o.stage = Stage::FirstPass;
        o.t_ms = 1_000.0;
        o.pass_elapsed_ms = 1_000.0;
        o.round = 0;
        o.remaining_pages = 20_480;
        o.zero_fraction = 0.95;
        o.dirty_pages_per_sec = 410.0;
        o.working_set_pages = Some(374);
        o.link_bytes_per_sec = Some(12.5e6);
        let d = e.decide(&o, &limits);
        // It keeps the throttle, and says what the guest would dirty without it.
        assert_eq!(d.settings.throttle_pct, 99, "{d:?}");
        let why = &d
            .reasons
            .iter()
            .find(|r| r.setting == "throttle_pct")
            .unwrap()
            .reason;
        assert!(why.contains("163.8 MB/s"), "{why}");
        assert!(!why.contains("unthrottled"), "{why}");
        assert!(
            d.prediction.converges && d.prediction.downtime_ms < 50.0,
            "{d:?}"
        );
    }

    #[test]
    fn a_destination_slower_than_the_link_gets_no_codec() {
        let limits = rounds_limits();
        let text = |mut o: Observation| {
            o.link_bytes_per_sec = Some(20e6);
            o.codecs = vec![CodecPerf {
                codec: Codec::Zstd(1),
                ratio: 2.7,
                compress_bytes_per_sec: 200e6,
            }];
            o
        };
        // A slow link and compressible pages: zstd.
        let mut e = Adaptive::new(Pins::default(), &limits);
        let d = e.decide(&text(rounds(Some(5e6))), &limits);
        assert_eq!(d.settings.codec, Codec::Zstd(1), "{d:?}");
        // The same stream held back by the destination's window: no codec, and why.
        let mut slow_peer = text(rounds(Some(5e6)));
        slow_peer.peer_limited = true;
        slow_peer.t_ms += HOLD_MS;
        let d = e.decide(&slow_peer, &limits);
        assert_eq!(d.settings.codec, Codec::None, "{d:?}");
        let why = &d
            .reasons
            .iter()
            .find(|r| r.setting == "codec")
            .unwrap()
            .reason;
        assert!(why.contains("receive window"), "{why}");
    }

    #[test]
    fn disk_writes_the_link_carries_are_left_alone() {
        let limits = rounds_limits();
        let mut e = Adaptive::new(Pins::default(), &limits);
        let d = e.decide(&rounds(Some(10e6)), &limits);
        assert_eq!(d.settings.disk_write_limit_bytes_per_sec, None);
        assert!(d.prediction.converges, "{d:?}");
        let r = disk_reason(&d).expect("a reason for the disks");
        assert!(r.reason.contains("carry"), "{r:?}");
        // No disks travel: nothing said about them.
        let d = Adaptive::new(Pins::default(), &limits).decide(&rounds(None), &limits);
        assert!(disk_reason(&d).is_none(), "{d:?}");
    }

    #[test]
    fn disk_writes_beyond_the_link_are_held_back_until_pre_copy_converges() {
        let limits = Limits {
            max_throttle_pct: 30,
            ..rounds_limits()
        };
        let mut e = Adaptive::new(Pins::default(), &limits);
        let d = e.decide(&rounds(Some(150e6)), &limits);
        let cap = d
            .settings
            .disk_write_limit_bytes_per_sec
            .expect("a cap on disk writes");
        assert!(cap < 100_000_000, "{cap} B/s against a 100 MB/s link");
        assert!(d.prediction.converges, "{d:?}");
        let r = disk_reason(&d).unwrap();
        assert!(r.reason.contains("holding"), "{r:?}");
        // Under the cap the measured rate is the cap: the engine does not take that as
        // the guest slowing down and keeps it.
        let mut later = rounds(Some(cap as f64));
        later.t_ms += 2_000.0;
        let d = e.decide(&later, &limits);
        assert_eq!(d.settings.disk_write_limit_bytes_per_sec, Some(cap));
    }

    #[test]
    fn the_switchover_target_leaves_the_limit_room_for_the_rest_of_the_pause() {
        let limits = rounds_limits();
        let target = |d: &Choice| {
            let r = d.reasons.iter().find(|r| r.setting == "max_downtime_ms");
            (d.settings.max_downtime_ms, r.map(|r| r.reason.clone()))
        };
        // Memory only: the handover comes off the 100 ms.
        let d = Adaptive::new(Pins::default(), &limits).decide(&rounds(None), &limits);
        let (ms, why) = target(&d);
        assert_eq!(ms as f64, 100.0 - SWITCH_MS, "{why:?}");
        assert!(
            why.as_deref().is_some_and(|w| w.contains("handover")),
            "{why:?}"
        );
        // Disks travel: their sync too; held back, a held write as well.
        let d = Adaptive::new(Pins::default(), &limits).decide(&rounds(Some(10e6)), &limits);
        let (carried, why) = target(&d);
        assert!(carried < ms, "{carried} {why:?}");
        assert!(
            why.as_deref().is_some_and(|w| w.contains("sync")),
            "{why:?}"
        );
        let d = Adaptive::new(Pins::default(), &limits).decide(&rounds(Some(150e6)), &limits);
        let (held, why) = target(&d);
        assert!(d.settings.disk_write_limit_bytes_per_sec.is_some(), "{d:?}");
        assert!(held < carried && held >= 50, "{held} {why:?}");
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("holds the guest")),
            "{why:?}"
        );
        // The prediction is of the whole downtime, within the limit.
        assert!(d.prediction.downtime_ms <= limits.max_downtime_ms, "{d:?}");
    }

    #[test]
    fn with_the_throttle_pinned_the_disk_cap_still_makes_pre_copy_fit() {
        let limits = rounds_limits();
        let pins = Pins {
            throttle_pct: Some(0),
            ..Pins::default()
        };
        let d = Adaptive::new(pins, &limits).decide(&rounds(Some(150e6)), &limits);
        assert!(d.settings.disk_write_limit_bytes_per_sec.is_some(), "{d:?}");
        assert_eq!(d.settings.throttle_pct, 0, "{d:?}");
        assert!(d.prediction.converges, "{d:?}");
    }

    #[test]
    fn a_pinned_disk_write_limit_is_kept_and_said_so() {
        let limits = rounds_limits();
        for (pin, expect) in [(0, None), (40_000_000, Some(40_000_000))] {
            let pins = Pins {
                disk_write_limit_bytes_per_sec: Some(pin),
                ..Pins::default()
            };
            let mut e = Adaptive::new(pins, &limits);
            let d = e.decide(&rounds(Some(150e6)), &limits);
            assert_eq!(d.settings.disk_write_limit_bytes_per_sec, expect, "{d:?}");
            assert!(disk_reason(&d).unwrap().reason.contains("pinned"), "{d:?}");
        }
    }

    #[test]
    fn a_guest_writing_all_over_memory_has_no_set() {
        let (rate, set) = fit_dirtying((0.25, 5_000.0), (1.0, 19_900.0), 1e6);
        assert_eq!((rate, set), (20_000.0, None));
        // Idle, or spans too close to tell apart.
        assert_eq!(fit_dirtying((0.25, 0.0), (1.0, 0.0), 1e6), (0.0, None));
        assert_eq!(
            fit_dirtying((0.25, 100.0), (0.26, 100.0), 1e6),
            (400.0, None)
        );
        // A set larger than memory is memory.
        let (_, set) = fit_dirtying((0.25, 5_000.0), (1.0, 18_000.0), 30_000.0);
        assert_eq!(set, Some(30_000.0));
    }

    #[test]
    fn disk_writes_are_mirrored_where_rounds_would_not_fit_and_never_past_half_the_path() {
        let limits = rounds_limits();
        let mirror = |d: &Choice| {
            let r = d.reasons.iter().find(|r| r.setting == "disk_mirror");
            (d.settings.disk_mirror, r.map(|r| r.reason.clone()))
        };
        let says = |why: &Option<String>, what: &str| {
            assert!(why.as_deref().is_some_and(|w| w.contains(what)), "{why:?}");
        };
        // 20 MB/s of writes (10 distinct) beside a 100 MB/s link: the rounds converge
        // within the limits as soon as the mirror would, and coalesce the rewrites.
        let mut o = rounds(Some(10e6));
        o.disk_write_bytes_per_sec = Some(20e6);
        let d = Adaptive::new(Pins::default(), &limits).decide(&o, &limits);
        let (m, why) = mirror(&d);
        assert_eq!(m, DiskMirror::Background, "{why:?}");
        says(&why, "20.0 MB/s");
        says(&why, "rounds carry its writes, done in");
        assert_eq!(d.settings.disk_write_limit_bytes_per_sec, None, "{d:?}");
        // 45 MB/s of distinct writes under a 20 ms downtime limit, 210 ms before the
        // migration must end: rounds would take 230 ms (more of them, the last one's
        // disk blocks in the pause), the mirror 200.
        let tight = Limits {
            max_downtime_ms: 20.0,
            max_total_secs: Some(5.21),
            ..rounds_limits()
        };
        let mut o = rounds(Some(45e6));
        o.disk_write_bytes_per_sec = Some(45e6);
        let d = Adaptive::new(Pins::default(), &tight).decide(&o, &tight);
        let (m, why) = mirror(&d);
        assert_eq!(m, DiskMirror::Active, "{why:?}");
        says(&why, "rounds would not switch over within the limits");
        assert!(d.prediction.converges, "{d:?}");
        assert!(d.prediction.downtime_ms <= tight.max_downtime_ms, "{d:?}");
        // The same writes into a datastore whose first copy went at 30 MB/s: they
        // would take most of it, so the rounds carry them.
        o.disk_copy_bytes_per_sec = Some(30e6);
        let d = Adaptive::new(Pins::default(), &tight).decide(&o, &tight);
        let (m, why) = mirror(&d);
        assert_eq!(m, DiskMirror::Background, "{why:?}");
        says(&why, "datastore");
        // Distinct writes alone beyond half the link: never mirrored, whatever the
        // measured write rate (a cap may be holding it down).
        let mut o = rounds(Some(150e6));
        o.disk_write_bytes_per_sec = Some(5e6);
        let d = Adaptive::new(Pins::default(), &limits).decide(&o, &limits);
        assert_eq!(mirror(&d).0, DiskMirror::Background, "{d:?}");
        // Pinned stays pinned.
        let pins = Pins {
            disk_mirror: Some(DiskMirror::Background),
            ..Pins::default()
        };
        let mut o = rounds(Some(1e6));
        o.disk_write_bytes_per_sec = Some(1e6);
        let d = Adaptive::new(pins, &limits).decide(&o, &limits);
        let (m, why) = mirror(&d);
        assert_eq!(m, DiskMirror::Background);
        says(&why, "pinned");
    }

    #[test]
    fn disk_writes_past_half_the_stream_are_capped_even_where_rounds_would_converge() {
        let limits = rounds_limits();
        let pins = Pins {
            disk_mirror: Some(DiskMirror::Background),
            ..Pins::default()
        };
        // 70 MB/s of distinct writes beside a 100 MB/s link: on paper the rounds
        // shrink (by about a fifth each), but slowly. The engine holds the writes to
        // half the stream.
        let o = rounds(Some(70e6));
        let d = Adaptive::new(pins.clone(), &limits).decide(&o, &limits);
        let cap = d.settings.disk_write_limit_bytes_per_sec;
        assert!(
            cap.is_some_and(|c| (49_000_000..51_000_000).contains(&c)),
            "{d:?}"
        );
        let why = &disk_reason(&d).unwrap().reason;
        assert!(why.contains("70% of the stream"), "{why}");
        // 40 MB/s fit within the half: no cap.
        let o = rounds(Some(40e6));
        let d = Adaptive::new(pins, &limits).decide(&o, &limits);
        assert_eq!(d.settings.disk_write_limit_bytes_per_sec, None, "{d:?}");
    }

    #[test]
    fn a_slow_datastore_makes_disk_bytes_cost_their_time_at_its_rate() {
        let limits = rounds_limits();
        let pins = Pins {
            disk_mirror: Some(DiskMirror::Background),
            disk_write_limit_bytes_per_sec: Some(0),
            ..Pins::default()
        };
        let mut o = rounds(Some(10e6));
        o.disk_pending_bytes = 200e6;
        let fast = Adaptive::new(pins.clone(), &limits).decide(&o, &limits);
        o.disk_copy_bytes_per_sec = Some(20e6);
        let slow = Adaptive::new(pins, &limits).decide(&o, &limits);
        // The guest rewrites 10 MB/s of that disk while it copies, so into a
        // 20 MB/s datastore the copy gains only 10 MB/s net: 200 MB take about
        // 20 s rather than the 2 s the link alone would need.
        let longer = slow.prediction.total_ms - fast.prediction.total_ms;
        assert!((15_000.0..25_000.0).contains(&longer), "{fast:?} {slow:?}");
        assert!(slow.prediction.converges, "{slow:?}");
    }

    #[test]
    fn a_datastore_holding_the_first_pass_back_costs_the_disks_at_its_timed_rate() {
        let limits = rounds_limits();
        let pins = Pins {
            disk_mirror: Some(DiskMirror::Background),
            ..Pins::default()
        };
        // The first pass: memory sent, 200 MB of disks to go over a 100 MB/s link.
        let mut o = rounds(Some(1e6));
        o.stage = Stage::FirstPass;
        o.round = 0;
        o.t_ms = 1_000.0;
        o.pass_elapsed_ms = 1_000.0;
        o.remaining_pages = 0;
        o.disk_pending_bytes = 200e6;
        let unheld = Adaptive::new(pins.clone(), &limits).decide(&o, &limits);
        // The destination timed its datastore at 20 MB/s and holds the stream back:
        // the copy takes about 10 s rather than 2.
        o.peer_limited = true;
        o.pause_basis.dst_write_bytes_per_sec = Some(20e6);
        let held = Adaptive::new(pins.clone(), &limits).decide(&o, &limits);
        let longer = held.prediction.total_ms - unheld.prediction.total_ms;
        assert!((6_000.0..10_000.0).contains(&longer), "{unheld:?} {held:?}");
        // Not held back, the timed rate says nothing of the copy (the page cache takes
        // the writes).
        o.peer_limited = false;
        let fast_path = Adaptive::new(pins, &limits).decide(&o, &limits);
        assert!(
            (fast_path.prediction.total_ms - unheld.prediction.total_ms).abs() < 1.0,
            "{unheld:?} {fast_path:?}"
        );
    }
}
