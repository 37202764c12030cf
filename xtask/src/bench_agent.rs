//! `cargo xtask bench agent`: the host agent's figures. Its API's latency (p50, p99,
//! max of `GET /v1/vms` at 200 requests/s) while a VM migrates back and forth between
//! two agents, switchovers included, against the same migrations' downtime without
//! that load; and the agent's CPU and memory while it idles with 10 VMs.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ferry_tests::agent::{Agent, request};
use ferry_tests::rss_kib;
use serde_json::{Value, json};

use crate::util::{build_ferry, cpu_seconds, median, root, step, work_dir};

/// A small paced guest: the agent's cost, not the guests', is what is measured.
fn vm(name: &str) -> String {
    format!(
        "name = \"{name}\"\nmemory_mib = 32\n[workload]\nworking_set_mib = 8\n\
         dirty_pages_per_sec = 100\n"
    )
}

const VMS: usize = 10;
const RATE_PER_SEC: u64 = 200;
const ROUND_TRIPS: usize = 4;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Moves web-0 from `from` to `to` through the API, `limits` (a JSON object, or
/// empty) put over the agent's, waiting up to `within` for it to end; its record
/// once it runs at the other end.
pub(crate) fn move_web0(from: &Agent, to: &Agent, limits: &str, within: Duration) -> Result<Value> {
    let limits = if limits.is_empty() {
        String::new()
    } else {
        format!(r#", "limits": {limits}"#)
    };
    let id = from.migrate(&format!(
        r#"{{"vm": "web-0", "destination": "{}"{limits}}}"#,
        to.name
    ));
    let m = from.wait_ended(&id, within);
    if m["state"] != "completed" {
        bail!("a migration did not complete: {m}");
    }
    // Ready to move again once it runs at the other end.
    to.wait_for_vms("web-0 running", Duration::from_secs(60), |l| {
        l.iter()
            .any(|v| v["name"] == "web-0" && v["state"] == "running")
    });
    Ok(m)
}

/// Moves web-0 from `from` to `to`; its downtime (ms).
fn migrate(from: &Agent, to: &Agent) -> Result<f64> {
    Ok(
        move_web0(from, to, "", Duration::from_secs(120))?["downtime_ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
    )
}

fn there_and_back(a: &Agent, b: &Agent) -> Result<Vec<f64>> {
    let mut downtimes = Vec::new();
    for _ in 0..ROUND_TRIPS {
        downtimes.push(migrate(a, b)?);
        downtimes.push(migrate(b, a)?);
    }
    Ok(downtimes)
}

pub fn run() -> Result<()> {
    let ferry = build_ferry()?;
    // SAFETY: no other thread runs yet; the harness reads it to find the binary.
    unsafe { std::env::set_var("FERRY_BIN", &ferry) };
    let dir = work_dir("bench-agent")?;
    std::fs::create_dir_all(dir.join("a"))?;
    std::fs::create_dir_all(dir.join("b"))?;
    let mut a = Agent::configure(&dir.join("a"), "host-a");
    let mut b = Agent::configure(&dir.join("b"), "host-b");
    a.peer_with(&b);
    b.peer_with(&a);
    for i in 0..VMS {
        let name = format!("web-{i}");
        std::fs::write(dir.join(format!("a/vms/{name}.toml")), vm(&name))?;
    }
    step(&format!("two agents; {VMS} paced VMs on host-a"));
    a.start();
    b.start();
    a.wait_for_vms("every VM running", Duration::from_secs(120), |l| {
        l.len() == VMS && l.iter().all(|v| v["state"] == "running")
    });
    let pid = a.child.as_ref().map(|c| c.id()).unwrap_or(0);

    step("the agent idle with 10 VMs (20 s)");
    std::thread::sleep(Duration::from_secs(2));
    let (cpu0, t0) = (cpu_seconds(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(20));
    let idle_cpu_pct = (cpu_seconds(pid)? - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let idle_rss = rss_kib(pid);
    println!("  CPU {idle_cpu_pct:.2}% of a core, RSS {idle_rss} KiB");

    step(&format!(
        "web-0 back and forth {ROUND_TRIPS} times, no API load"
    ));
    let quiet = there_and_back(&a, &b)?;
    println!("  downtime ms: {quiet:.1?}");

    step(&format!(
        "the same under {RATE_PER_SEC} GET /v1/vms per second (a new connection each)"
    ));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (loaded, latencies) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            // The load stands for clients on other hosts: at the lowest priority,
            // this process's own requests take no CPU from the guests that would
            // not be taken on a real host; the agent's work for them still does.
            // SAFETY: setpriority on this thread's own id (0: the caller).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let period = Duration::from_micros(1_000_000 / RATE_PER_SEC);
            let mut next = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let t = Instant::now();
                match request(&a.addr, "GET", "/v1/vms", Some(&a.token), None) {
                    Some(r) if r.status == 200 => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    _ => errors += 1,
                }
                next += period;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            (lat, errors)
        });
        let loaded = there_and_back(&a, &b);
        stop.store(true, std::sync::atomic::Ordering::Release);
        (loaded, load.join().unwrap_or_default())
    });
    let loaded = loaded?;
    let (mut lat, errors) = latencies;
    lat.sort_by(|x, y| x.total_cmp(y));
    let (p50, p99, max) = (
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "  {} requests, {errors} failed: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
        lat.len()
    );
    println!("  downtime ms: {loaded:.1?}");
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let (q_lo, q_hi) = spread(&quiet);
    let (l_lo, l_hi) = spread(&loaded);
    println!(
        "  downtime median {:.1} ms quiet ({q_lo:.1}-{q_hi:.1}), {:.1} ms under load ({l_lo:.1}-{l_hi:.1})",
        median(quiet.clone()),
        median(loaded.clone())
    );
    let agent_rss_after = rss_kib(pid);
    let result: Value = json!({
        "vms": VMS,
        "idle_cpu_pct": idle_cpu_pct,
        "idle_rss_kib": idle_rss,
        "rss_kib_after_load": agent_rss_after,
        "api_rate_per_sec": RATE_PER_SEC,
        "api_requests": lat.len(),
        "api_errors": errors,
        "api_latency_ms": {"p50": p50, "p99": p99, "max": max},
        "downtime_ms_quiet": quiet,
        "downtime_ms_loaded": loaded,
    });
    let out = root().join("target/bench/agent.json");
    std::fs::create_dir_all(out.parent().unwrap_or(&root()))?;
    std::fs::write(&out, serde_json::to_vec_pretty(&result)?)?;
    println!("saved {}", out.display());
    Ok(())
}
