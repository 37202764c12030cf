//! `cargo xtask bench probes`: what measuring costs the guest and the host, and how
//! fast a change in the guest's dirty rate shows in the signals.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::util::{Vmm, build_ferry, ctl, median, step, vm_status, work_dir};

/// `ferry signals`' default: logging for the whole 1000 ms tick.
const DEFAULT_SAMPLE_MS: u64 = 1000;

/// Length of each window of the cost measurement (off: nothing measuring; on: as many
/// whole ticks of `ferry signals`), in seconds.
const WINDOW_SECS: u64 = 4;

/// Host CPU time of a VMM's vCPU threads, in seconds (schedstat: nanoseconds on CPU).
fn vcpu_seconds(pid: u32) -> Result<f64> {
    let mut ns = 0u64;
    for task in crate::util::vcpu_tasks(pid)? {
        let s = std::fs::read_to_string(task.join("schedstat"))?;
        ns += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(ns as f64 / 1e9)
}

fn start(ferry: &Path, dir: &Path, name: &str, rate: u64, memory_mib: u64) -> Result<Vmm> {
    let workload = format!(
        "working_set_mib = {}\ndirty_pages_per_sec = {rate}\npattern = \"random\"\n",
        memory_mib * 3 / 4
    );
    let body = crate::bench::config(name, memory_mib, 1, &workload);
    let mut vm = crate::bench::start(ferry, dir, name, &body)?;
    vm.wait_ready(ferry)?;
    // Past the fill: writing at its pace.
    let t0 = Instant::now();
    loop {
        let s = vm_status(ferry, &vm.control)?;
        let r = s.machine.pages_written_per_sec;
        if (rate > 0 && (r - rate as f64).abs() < rate as f64 * 0.05)
            || (rate == 0 && t0.elapsed() > Duration::from_secs(3))
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the guest never reached {rate} pages/s: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(vm)
}

/// `ferry signals` on a VM for `secs` seconds after its probes are attached; with
/// `json`, one summary at the end, else a line per tick and a summary line.
fn signals(ferry: &Path, control: &Path, secs: u64, sample_ms: u64, json: bool) -> Command {
    let mut c = Command::new(ferry);
    c.arg("signals")
        .args(json.then_some("--json"))
        .args(["--duration-secs", &secs.to_string()])
        .args(["--sample-ms", &sample_ms.to_string()])
        .arg("--control")
        .arg(control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// What the guest had done by a moment: its vCPU threads' CPU time and its own count
/// of pages written.
struct Mark {
    at: Instant,
    vcpu_secs: f64,
    pages: f64,
}

impl Mark {
    fn take(ferry: &Path, vm: &Vmm) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            vcpu_secs: vcpu_seconds(vm.child.id())?,
            pages: vm_status(ferry, &vm.control)?.machine.guest_pages_written as f64,
        })
    }

    /// From `self` to `later`: the vCPUs' use in % of a core, and pages written per
    /// second.
    fn rates(&self, later: &Mark) -> (f64, f64) {
        let wall = (later.at - self.at).as_secs_f64().max(1e-9);
        (
            (later.vcpu_secs - self.vcpu_secs) / wall * 100.0,
            (later.pages - self.pages) / wall,
        )
    }
}

/// The guest with `ferry signals` measuring it: marks at its first tick and at its
/// summary, so the window holds `ticks` whole ticks with the eBPF programs attached
/// and none of their loading. Also the programs' and the reader's CPU, in % of a
/// core, and how long after its start the first tick showed, in ms.
struct Measured {
    start: Mark,
    end: Mark,
    probe_cpu_pct: f64,
    reader_cpu_pct: f64,
    first_tick_ms: f64,
}

fn measured(ferry: &Path, vm: &Vmm, ticks: u64, sample_ms: u64) -> Result<Measured> {
    use std::io::{BufRead, Read};
    // Without --json, `ferry signals` prints a line at the end of each tick: the first
    // once the programs are loaded and attached and one tick (logging on) has run; the
    // summary line right after the last tick, before the programs are detached. One
    // tick more than the window, as the first only opens it.
    let spawned = Instant::now();
    let mut child = signals(ferry, &vm.control, ticks + 1, sample_ms, false).spawn()?;
    let stdout = child.stdout.take().context("ferry signals' stdout")?;
    let mut stderr = child.stderr.take().context("ferry signals' stderr")?;
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (mut start, mut first_tick_ms, mut end) = (None, 0.0, None);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading ferry signals' output")?;
        if line.starts_with("averaged over") {
            end = Some((Mark::take(ferry, vm)?, line));
        } else if start.is_none() && !line.trim().is_empty() {
            first_tick_ms = spawned.elapsed().as_secs_f64() * 1e3;
            start = Some(Mark::take(ferry, vm)?);
        }
    }
    let exit = child.wait()?;
    let errors = errors.join().unwrap_or_default();
    let (Some(start), Some((end, line))) = (start, end) else {
        bail!(
            "ferry signals ({exit}) printed no tick or no summary: {}",
            errors.trim()
        );
    };
    let pct = |after: &str| -> Option<f64> {
        line.split(after)
            .nth(1)?
            .split('%')
            .next()?
            .trim()
            .parse()
            .ok()
    };
    let (Some(probe_cpu_pct), Some(reader_cpu_pct)) = (pct("probes used "), pct("(reader ")) else {
        bail!("ferry signals' summary gives no probe and reader CPU: {line}");
    };
    Ok(Measured {
        start,
        end,
        probe_cpu_pct,
        reader_cpu_pct,
        first_tick_ms,
    })
}

fn summary(out: std::process::Output) -> Result<Value> {
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "ferry signals gave no summary: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn set_rate(ferry: &Path, control: &Path, rate: u64) -> Result<u64> {
    ctl(
        ferry,
        &["set-workload", "--dirty-pages-per-sec", &rate.to_string()],
        control,
    )?;
    Ok(unix_ms())
}

/// For each step (time, from, to), the first tick after it whose dirty rate crossed
/// the midpoint: how long the signal took to show the change, in ms.
/// Steps the guest 2k -> 30k -> 2k -> 30k -> 2k pages/s, each step `every_ms` (plus
/// a little jitter below `jitter_ms`, so steps do not line up with ticks) after the
/// last; returns (when, from, to) of each.
fn step_rates(
    ferry: &Path,
    control: &Path,
    every_ms: u64,
    jitter_ms: u64,
) -> Result<Vec<(u64, u64, u64)>> {
    let mut steps = Vec::new();
    let mut rate = 2_000;
    for target in [30_000u64, 2_000, 30_000, 2_000] {
        std::thread::sleep(Duration::from_millis(
            every_ms + (steps.len() as u64 * 137) % jitter_ms,
        ));
        steps.push((set_rate(ferry, control, target)?, rate, target));
        rate = target;
    }
    Ok(steps)
}

fn reactions(ticks: &[Value], steps: &[(u64, u64, u64)]) -> Vec<f64> {
    steps
        .iter()
        .filter_map(|&(at, from, to)| {
            let mid = (from + to) as f64 / 2.0;
            ticks
                .iter()
                .filter(|t| t["unix_ms"].as_u64().unwrap_or(0) > at)
                .find(|t| {
                    let r = t["dirty_pages_per_sec"].as_f64().unwrap_or(f64::NAN);
                    if to > from { r > mid } else { r < mid }
                })
                .map(|t| t["unix_ms"].as_u64().unwrap_or(0).saturating_sub(at) as f64)
        })
        .collect()
}

pub fn run() -> Result<()> {
    let ferry = build_ferry()?;
    let dir = work_dir("bench-probes")?;
    let mut results = serde_json::Map::new();

    let mut cost = Vec::new();
    let mut first_ticks = Vec::new();
    for (mode, sample_ms) in [
        (
            "the default measurement (logging on, harvested every 1000 ms)",
            DEFAULT_SAMPLE_MS,
        ),
        (
            "sampled measurement (logging on for 250 ms of every 1000 ms)",
            250,
        ),
    ] {
        step(&format!("cost of {mode} to the guest"));
        println!(
            "  {:>10}  {:>12}  {:>12}  {:>12}  {:>14}  {:>10}",
            "pages/s", "vCPU off %", "vCPU on %", "added %", "unpaced loss", "programs %"
        );
        for rate in [1_000u64, 10_000, 50_000, 0] {
            let name = format!("cost-{rate}");
            let vm = start(&ferry, &dir, &name, rate, 512)?;
            let (mut off, mut on, mut w_off, mut w_on) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut probe_pct, mut reader_pct) = (Vec::new(), Vec::new());
            for _ in 0..2 {
                // Off: nothing measuring.
                let start = Mark::take(&ferry, &vm)?;
                std::thread::sleep(Duration::from_secs(WINDOW_SECS));
                let (cpu, pages) = start.rates(&Mark::take(&ferry, &vm)?);
                off.push(cpu);
                w_off.push(pages);
                // On: as many seconds of `ferry signals` ticks, its loading left out.
                let m = measured(&ferry, &vm, WINDOW_SECS, sample_ms)?;
                let (cpu, pages) = m.start.rates(&m.end);
                on.push(cpu);
                w_on.push(pages);
                first_ticks.push(m.first_tick_ms);
                // Kernel time in the programs, and the reader's own CPU once loaded.
                probe_pct.push(m.probe_cpu_pct);
                reader_pct.push(m.reader_cpu_pct);
            }
            let (off, on) = (median(off), median(on));
            let (w_off, w_on) = (median(w_off), median(w_on));
            let loss = (1.0 - w_on / w_off) * 100.0;
            let (probes, reader) = (median(probe_pct), median(reader_pct));
            println!(
                "  {:>10}  {off:>12.2}  {on:>12.2}  {:>12.2}  {:>13.1}%  {probes:>10.2}  (reader {reader:.2})",
                if rate == 0 {
                    format!("unpaced ({:.0})", w_off)
                } else {
                    rate.to_string()
                },
                on - off,
                if rate == 0 { loss } else { f64::NAN },
            );
            cost.push(json!({
            "sample_ms": sample_ms, "pages_per_sec": rate, "vcpu_pct_off": off, "vcpu_pct_on": on,
            "added_vcpu_pct": on - off, "pages_per_sec_off": w_off, "pages_per_sec_on": w_on,
            "throughput_loss_pct": loss, "probe_cpu_pct": probes, "reader_cpu_pct": reader,
        }));
            vm.quit(&ferry)?;
        }
    }
    println!(
        "  (goal: added cost <= 3% of a vCPU at <= 10k pages/s; probes <= 2% of a core at 50k)"
    );
    let first_tick = median(first_ticks.clone());
    println!(
        "  (\"on\": {WINDOW_SECS} whole ticks with the programs attached, from the first \
         tick, which ferry signals printed {first_tick:.0} ms after it started (median: \
         loading, attaching and one 1000 ms tick), to its summary)"
    );
    results.insert("cost".into(), Value::Array(cost));
    results.insert("first_tick_ms".into(), json!(first_ticks));

    step("time for a step in the dirty rate (2k <-> 30k pages/s) to show, default mode");
    let vm = start(&ferry, &dir, "react", 2_000, 512)?;
    let child = signals(&ferry, &vm.control, 14, DEFAULT_SAMPLE_MS, true).spawn()?;
    let steps = step_rates(&ferry, &vm.control, 3000, 500)?;
    let s = summary(child.wait_with_output()?)?;
    let ticks = s["ticks"].as_array().cloned().unwrap_or_default();
    let idle = reactions(&ticks, &steps);
    println!(
        "  reaction {:?} ms, median {:.0} ms (goal <= 2000 ms)",
        idle,
        median(idle.clone())
    );
    vm.quit(&ferry)?;

    step("the same step during a migration (logging on throughout, 250 ms ticks)");
    let vm = start(&ferry, &dir, "react-mig", 2_000, 1024)?;
    let (dst, addr) = crate::util::incoming(&ferry, &dir, "react-dst", &[])?;
    // A capped link keeps the migration going long enough to step the rate twice.
    let mut migrate = Command::new(&ferry)
        .args([
            "migrate",
            "--json",
            "--to",
            &addr,
            "--bandwidth-mbit",
            "400",
        ])
        .args(ferry_tests::pki::test_pki().args())
        .arg("--control")
        .arg(&vm.control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let child = signals(&ferry, &vm.control, 9, DEFAULT_SAMPLE_MS, true).spawn()?;
    let steps = step_rates(&ferry, &vm.control, 1800, 300)?;
    let s = summary(child.wait_with_output()?)?;
    let ticks = s["ticks"].as_array().cloned().unwrap_or_default();
    let migrating = ticks.iter().filter(|t| t["migrating"] == true).count();
    let during = reactions(&ticks, &steps);
    println!(
        "  {migrating} of {} ticks during the migration; reaction {:?} ms, median {:.0} ms \
         (goal <= 500 ms)",
        ticks.len(),
        during,
        median(during.clone())
    );
    let _ = ctl(&ferry, &["cancel"], &vm.control);
    let _ = migrate.wait();
    let _ = migrate.kill();
    drop(dst);
    vm.quit(&ferry)?;
    results.insert(
        "reaction_ms".into(),
        json!({"default_mode": idle, "during_migration": during}),
    );

    let out = crate::util::root().join("target/bench/probes.json");
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(results))?)?;
    step(&format!("results saved to {}", out.display()));
    Ok(())
}
