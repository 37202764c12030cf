//! `ferry signals`: a VM's live signals from the eBPF probes.
//!
//! For a Ferry VM (`--control`) the VMM is asked to log dirty pages each tick (a write
//! to a page already mapped writable faults nowhere, so without logging no tracepoint
//! sees it): by default for the whole tick, harvested at its end, which costs the guest
//! one write fault per page it dirties per tick. Logging for only part of each tick
//! (`sample_ms`) was measured to cost the same: the pages logging write-protected stay
//! so after it stops and fault on their next write anyway. While a migration runs,
//! logging is on already: no requests, and ticks of 250 ms. For any other KVM process
//! (`--pid`) the probes only listen.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_api::{DirtySample, ErrorKind, Request, Status};
use serde::Serialize;

use crate::client::{ClientError, call};
use crate::probes::signals::{self, DeviceIo, Logging, Reading, Signals};
use crate::probes::{Probes, check_kvm_process};

pub struct Options {
    pub control: Option<PathBuf>,
    pub pid: Option<u32>,
    pub duration_secs: Option<u64>,
    pub interval_ms: u64,
    pub sample_ms: u64,
    pub json: bool,
}

/// One tick: the probes' signals, and (Ferry VMs) what the VMM and the guest counted
/// over the same sample.
#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    pub at_ms: f64,
    /// Wall-clock time the tick's figures were ready, ms since the Unix epoch.
    pub unix_ms: u64,
    #[serde(flatten)]
    pub signals: Signals,
    pub host_devices: Vec<DeviceIo>,
    /// Dirty logging was on only for this long of the tick (a sample), in ms.
    pub logging_ms: Option<f64>,
    /// The VMM's own dirty log over the sample: distinct pages, and per second of
    /// logging.
    pub vmm_dirty_pages: Option<u64>,
    pub vmm_dirty_pages_per_sec: Option<f64>,
    /// The guest's own count of pages it wrote, per second of the sample.
    pub guest_pages_written_per_sec: Option<f64>,
    pub migrating: bool,
}

/// The whole run: rates averaged over it, and every tick.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub pid: u32,
    pub duration_secs: f64,
    pub dirty_pages_per_sec: Option<f64>,
    pub dirty_source: Option<&'static str>,
    pub dirty_note: Option<String>,
    pub working_set_pages: Option<f64>,
    pub exits_per_sec: f64,
    pub disk_read_bytes_per_sec: f64,
    pub disk_write_bytes_per_sec: f64,
    pub disk_latency_p99_us: Option<f64>,
    pub vmm_dirty_pages_per_sec: Option<f64>,
    pub guest_pages_written_per_sec: Option<f64>,
    pub sources_live: Vec<&'static str>,
    /// Tracepoints this kernel could not attach to, with the reason.
    pub sources_unavailable: Vec<(String, String)>,
    /// Host CPU the eBPF programs used over the run, in % of one core.
    pub probe_cpu_pct: f64,
    /// CPU this reader used after loading (maps, samples, output), in % of one core.
    pub reader_cpu_pct: f64,
    pub ticks: Vec<Tick>,
}

pub fn run(o: Options) -> anyhow::Result<ExitCode> {
    let pid = match (&o.control, o.pid) {
        (Some(c), _) => match call::<Status>(c, &Request::Status {})? {
            Status::Vm(s) => s.machine.pid,
            Status::Incoming(i) => i.pid,
        },
        (None, Some(p)) => p,
        (None, None) => anyhow::bail!("give --control SOCK (a Ferry VM) or --pid PID"),
    };
    crate::probes::check_prerequisites()?;
    check_kvm_process(pid)?;
    let mut probes = Probes::load()?;
    let unavailable: Vec<(String, String)> = probes
        .attachments
        .iter()
        .filter_map(|a| Some((a.tracepoint.clone(), a.error.clone()?)))
        .collect();
    let (cost0, _) = probes.cpu_cost();
    let t0 = Instant::now();
    let self0 = own_cpu_seconds();
    let mut prev = probes.watch(pid)?;
    let mut devices_prev = probes.devices()?;
    let mut ticks: Vec<Tick> = Vec::new();
    let tty = std::io::stdout().is_terminal() && !o.json;
    let stop = o.duration_secs.map(|s| t0 + Duration::from_secs(s));
    let control = o.control.as_deref();
    if let Some(c) = control
        && let Ok(Status::Vm(s)) = call::<Status>(c, &Request::Status {})
        && s.machine.dirty_tracking == "ring"
    {
        probes.feed_working_set(pid, ferry_ebpf::DirtySource::Ring)?;
    }
    loop {
        if stop.is_some_and(|s| Instant::now() >= s) {
            break;
        }
        let tick_start = Instant::now();
        let migrating = control.is_some_and(migration_running);
        let interval = if migrating || control.is_none() {
            Duration::from_millis(if migrating { 250 } else { o.interval_ms })
        } else {
            Duration::from_millis(o.interval_ms)
        };
        // A sample: logging on for sample_ms, the VMM's and the guest's counts beside.
        let mut sample: Option<(Reading, DirtySample)> = None;
        if let Some(c) = control
            && !migrating
        {
            let r = call::<DirtySample>(
                c,
                &Request::DirtySample {
                    duration_ms: Some(o.sample_ms),
                },
            );
            match r {
                Ok(v) => sample = Some((probes.read(pid)?, v)),
                // A migration started meanwhile and owns the dirty log.
                Err(ClientError::Refused {
                    kind: Some(ErrorKind::Busy),
                    ..
                }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(left) = interval.checked_sub(tick_start.elapsed()) {
            std::thread::sleep(left);
        }
        let now = probes.read(pid)?;
        let devices_now = probes.devices()?;
        let known = if migrating {
            Logging::On
        } else {
            Logging::Unknown
        };
        let mut s = signals::window(&prev, &now, known);
        let mut tick = Tick {
            at_ms: t0.elapsed().as_secs_f64() * 1e3,
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            host_devices: signals::devices(&devices_prev, &devices_now, s.window_secs),
            logging_ms: None,
            vmm_dirty_pages: None,
            vmm_dirty_pages_per_sec: None,
            guest_pages_written_per_sec: None,
            migrating,
            signals: s.clone(),
        };
        if let Some((at_sample_end, v)) = &sample {
            let secs = (v.elapsed_ms / 1e3).max(1e-3);
            let logging = v.logging_ms / 1e3;
            let d = signals::window(&prev, at_sample_end, Logging::OnFor(logging.max(1e-3)));
            s.dirty_pages_per_sec = d.dirty_pages_per_sec;
            s.dirty_source = d.dirty_source;
            s.dirty_note = d.dirty_note;
            s.working_set_pages = d.working_set_pages;
            s.dirty_events_per_sec = d.dirty_events_per_sec;
            tick.logging_ms = Some(logging * 1e3);
            tick.vmm_dirty_pages = Some(v.dirty_pages);
            tick.vmm_dirty_pages_per_sec = Some(v.dirty_pages as f64 / secs);
            tick.guest_pages_written_per_sec = Some(v.guest_pages_written as f64 / secs);
            tick.signals = s;
        }
        probes.follow_working_set(pid, &prev, &now)?;
        print_tick(&tick, tty, o.json);
        ticks.push(tick);
        prev = now;
        devices_prev = devices_now;
        if o.duration_secs.is_none() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
    }
    let (cost1, _) = probes.cpu_cost();
    let wall = t0.elapsed().as_secs_f64();
    let mut summary = summarize(
        pid,
        wall,
        ticks,
        unavailable,
        (cost1.saturating_sub(cost0)).as_secs_f64() / wall.max(1e-9) * 100.0,
    );
    summary.reader_cpu_pct = (own_cpu_seconds() - self0) / wall.max(1e-9) * 100.0;
    if o.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        if tty {
            println!();
        }
        println!(
            "averaged over {:.1} s: dirty {} pages/s [{}], working set {} pages, exits {:.0}/s, \
             disk read {}/s write {}/s, p99 {}; probes used {:.2}% of a core (reader {:.2}%)",
            summary.duration_secs,
            opt(summary.dirty_pages_per_sec, 0),
            summary.dirty_source.unwrap_or("-"),
            opt(summary.working_set_pages, 0),
            summary.exits_per_sec,
            bytes(summary.disk_read_bytes_per_sec),
            bytes(summary.disk_write_bytes_per_sec),
            summary
                .disk_latency_p99_us
                .map_or("-".into(), |u| format!("{u:.0} µs")),
            summary.probe_cpu_pct,
            summary.reader_cpu_pct,
        );
        if let Some(note) = &summary.dirty_note {
            println!("dirty rate: {note}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn migration_running(control: &Path) -> bool {
    match call::<Status>(control, &Request::Status {}) {
        Ok(Status::Vm(s)) => s
            .migration
            .is_some_and(|m| m.report.is_none() && !m.phase.is_terminal()),
        _ => false,
    }
}

fn mean(xs: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = xs.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn summarize(
    pid: u32,
    wall: f64,
    ticks: Vec<Tick>,
    sources_unavailable: Vec<(String, String)>,
    probe_cpu_pct: f64,
) -> Summary {
    let mut sources_live: Vec<&'static str> = Vec::new();
    for t in &ticks {
        for s in &t.signals.sources_live {
            if !sources_live.contains(s) {
                sources_live.push(s);
            }
        }
    }
    // The most frequent dirty source, and the note of the last tick without one.
    let mut by_source = std::collections::BTreeMap::new();
    for t in &ticks {
        if let Some(s) = t.signals.dirty_source {
            *by_source.entry(s).or_insert(0) += 1;
        }
    }
    let dirty_source = by_source
        .into_iter()
        .max_by_key(|&(_, n)| n)
        .map(|(s, _)| s);
    let dirty = mean(ticks.iter().map(|t| t.signals.dirty_pages_per_sec));
    Summary {
        pid,
        duration_secs: wall,
        dirty_pages_per_sec: dirty,
        dirty_source,
        dirty_note: if dirty.is_none() {
            ticks
                .iter()
                .rev()
                .find_map(|t| t.signals.dirty_note.clone())
        } else {
            None
        },
        working_set_pages: mean(
            ticks
                .iter()
                .map(|t| t.signals.working_set_pages.map(|n| n as f64)),
        ),
        exits_per_sec: mean(ticks.iter().map(|t| Some(t.signals.exits_per_sec))).unwrap_or(0.0),
        disk_read_bytes_per_sec: mean(
            ticks
                .iter()
                .map(|t| Some(t.signals.disk_read_bytes_per_sec)),
        )
        .unwrap_or(0.0),
        disk_write_bytes_per_sec: mean(
            ticks
                .iter()
                .map(|t| Some(t.signals.disk_write_bytes_per_sec)),
        )
        .unwrap_or(0.0),
        disk_latency_p99_us: ticks
            .iter()
            .filter_map(|t| t.signals.disk_latency_p99_us)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
        vmm_dirty_pages_per_sec: mean(ticks.iter().map(|t| t.vmm_dirty_pages_per_sec)),
        guest_pages_written_per_sec: mean(ticks.iter().map(|t| t.guest_pages_written_per_sec)),
        sources_live,
        sources_unavailable,
        probe_cpu_pct,
        reader_cpu_pct: 0.0,
        ticks,
    }
}

/// User + system CPU seconds this process has used.
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; all-zero is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn bytes(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

fn print_tick(t: &Tick, tty: bool, as_json: bool) {
    if as_json {
        return;
    }
    let s = &t.signals;
    let line = format!(
        "{:>7.1}s  dirty {:>8} /s [{}]  ws {:>7}  exits {:>7.0} /s  disk r {:>9}/s w {:>9}/s p99 {:>8}{}",
        t.at_ms / 1e3,
        opt(s.dirty_pages_per_sec, 0),
        s.dirty_source
            .map_or("-", |n| n.split(':').nth(1).unwrap_or(n)),
        s.working_set_pages.map_or("-".into(), |n| n.to_string()),
        s.exits_per_sec,
        bytes(s.disk_read_bytes_per_sec),
        bytes(s.disk_write_bytes_per_sec),
        s.disk_latency_p99_us
            .map_or("-".into(), |u| format!("{u:.0} µs")),
        if t.migrating { "  (migrating)" } else { "" },
    );
    if tty {
        use std::io::Write;
        print!("\r\x1b[2K{line}");
        let _ = std::io::stdout().flush();
    } else {
        println!("{line}");
    }
}
