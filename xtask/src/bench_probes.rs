//! `cargo xtask bench probes`: what measuring costs the guest and the host, and how
//! fast a change in the guest's dirty rate shows in the signals.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::util::{Vmm, build_ferry, ctl, median, num, status, step, work_dir};

/// `ferry signals`' default: logging for the whole 1000 ms tick.
const DEFAULT_SAMPLE_MS: u64 = 1000;

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
        let s = status(ferry, &vm.control)?;
        let r = num(&s, "pages_written_per_sec");
        if (rate > 0 && (r - rate as f64).abs() < rate as f64 * 0.05)
            || (rate == 0 && t0.elapsed() > Duration::from_secs(3))
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the guest never reached {rate} pages/s: {s}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(vm)
}

fn signals(ferry: &Path, control: &Path, secs: u64, sample_ms: u64) -> Command {
    let mut c = Command::new(ferry);
    c.args(["signals", "--json", "--duration-secs", &secs.to_string()])
        .args(["--sample-ms", &sample_ms.to_string()])
        .arg("--control")
        .arg(control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
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
            let pid = vm.child.id();
            let secs = 4u64;
            let (mut off, mut on, mut w_off, mut w_on, mut probe_pct, mut reader_pct) = (
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            );
            for _ in 0..2 {
                // Off: nothing measuring.
                let (c0, p0, t) = (
                    vcpu_seconds(pid)?,
                    num(&status(&ferry, &vm.control)?, "guest_pages_written"),
                    Instant::now(),
                );
                std::thread::sleep(Duration::from_secs(secs));
                let wall = t.elapsed().as_secs_f64();
                off.push((vcpu_seconds(pid)? - c0) / wall * 100.0);
                w_off.push((num(&status(&ferry, &vm.control)?, "guest_pages_written") - p0) / wall);
                // On: `ferry signals` for as long.
                let (c0, p0, t) = (
                    vcpu_seconds(pid)?,
                    num(&status(&ferry, &vm.control)?, "guest_pages_written"),
                    Instant::now(),
                );
                let s = summary(signals(&ferry, &vm.control, secs, sample_ms).output()?)?;
                let wall = t.elapsed().as_secs_f64();
                on.push((vcpu_seconds(pid)? - c0) / wall * 100.0);
                w_on.push((num(&status(&ferry, &vm.control)?, "guest_pages_written") - p0) / wall);
                // Kernel time in the programs, and the reader's own CPU once loaded.
                probe_pct.push(num(&s, "probe_cpu_pct"));
                reader_pct.push(num(&s, "reader_cpu_pct"));
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
    results.insert("cost".into(), Value::Array(cost));

    step("time for a step in the dirty rate (2k <-> 30k pages/s) to show, default mode");
    let vm = start(&ferry, &dir, "react", 2_000, 512)?;
    let child = signals(&ferry, &vm.control, 14, DEFAULT_SAMPLE_MS).spawn()?;
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
        .arg("--control")
        .arg(&vm.control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let child = signals(&ferry, &vm.control, 9, DEFAULT_SAMPLE_MS).spawn()?;
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
