//! `cargo xtask bench telemetry`: what Ferry's telemetry costs.
//!
//! * Migrations with full telemetry (a real Prometheus scraping both agents every
//!   second, every span exported over OTLP to a receiver, the VMs' dirty rates
//!   sampled) against none (no scrape, no export, no sampling), in interleaved runs:
//!   total time and downtime, medians and spread of each.
//! * `/metrics` for 1,000 VMs: render time and the memory their series take (the
//!   `metrics_render` bench of the agent crate).
//! * The guest's cost of the idle-period dirty-rate sampling at its default schedule
//!   (1 s of dirty logging every 60 s): an unpaced guest's write rate in 60 s windows
//!   with and without a sample, interleaved.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_api::DirtySample;
use ferry_tests::agent::Agent;
use ferry_tests::otlp::Receiver;
use ferry_tests::prometheus::Prometheus;
use serde_json::{Value, json};

use crate::bench::{config, start};
use crate::util::{build_ferry, cargo, ctl, median, root, step, vm_status, work_dir};

/// Runs per arm (each a migration there and back).
const RUNS: usize = 4;
/// Sampling-cost windows per arm, each one period of the default schedule.
const WINDOWS: usize = 2;
const WINDOW: Duration = Duration::from_secs(60);

fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn summary(v: &[f64]) -> Value {
    let (lo, hi) = spread(v);
    json!({"median": median(v.to_vec()), "min": lo, "max": hi, "runs": v})
}

pub fn run() -> Result<()> {
    let ferry = build_ferry()?;
    // SAFETY: no other thread runs yet; the harness reads it to find the binary.
    unsafe { std::env::set_var("FERRY_BIN", &ferry) };
    let dir = work_dir("bench-telemetry")?;
    let mut results = serde_json::Map::new();

    results.insert("metrics_render".into(), render()?);
    results.insert("sampling_guest_cost".into(), sampling_cost(&ferry, &dir)?);
    results.insert("migrations".into(), on_off(&dir)?);

    let out = root().join("target/bench/telemetry.json");
    std::fs::create_dir_all(out.parent().unwrap_or(&root()))?;
    std::fs::write(&out, serde_json::to_vec_pretty(&Value::Object(results))?)?;
    println!("saved {}", out.display());
    Ok(())
}

/// The agent crate's `metrics_render` bench: its JSON line.
fn render() -> Result<Value> {
    step(
        "/metrics for 1000 VMs: render time and memory (cargo bench -p ferry --bench metrics_render)",
    );
    let out = cargo()
        .args([
            "bench",
            "-p",
            "ferry",
            "--bench",
            "metrics_render",
            "--",
            "1000",
        ])
        .output()
        .context("running cargo bench")?;
    if !out.status.success() {
        bail!(
            "the metrics_render bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the bench printed no result")?;
    let v: Value = serde_json::from_str(line)?;
    println!(
        "  {} series, {} bytes: render median {:.2} ms (max {:.2}); memory {:.1} MiB",
        v["series"],
        v["bytes"],
        v["render_ms"]["median"].as_f64().unwrap_or(f64::NAN),
        v["render_ms"]["max"].as_f64().unwrap_or(f64::NAN),
        v["memory_mib"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(v)
}

/// An unpaced guest's pages written per second over `WINDOW`, with the agent's
/// default sampling (1 s of logging at its start) or none.
fn window(ferry: &std::path::Path, control: &std::path::Path, sampled: bool) -> Result<f64> {
    let a = vm_status(ferry, control)?.machine.guest_pages_written;
    let t0 = Instant::now();
    while t0.elapsed() < WINDOW {
        let tick = Instant::now();
        if sampled {
            let _: DirtySample = serde_json::from_str(&ctl(
                ferry,
                &["dirty-rate", "--duration-ms", "1000", "--json"],
                control,
            )?)?;
        }
        let left = WINDOW.saturating_sub(tick.elapsed());
        std::thread::sleep(left.min(WINDOW.saturating_sub(t0.elapsed())));
    }
    let b = vm_status(ferry, control)?.machine.guest_pages_written;
    Ok(b.saturating_sub(a) as f64 / t0.elapsed().as_secs_f64())
}

fn sampling_cost(ferry: &std::path::Path, dir: &std::path::Path) -> Result<Value> {
    step(&format!(
        "the guest's cost of sampling: an unpaced guest's write rate, {WINDOWS} x 60 s with \
         the default schedule (1 s every 60 s) and {WINDOWS} x 60 s without, interleaved"
    ));
    let body = config(
        "sampled",
        512,
        1,
        "working_set_mib = 256\ndirty_pages_per_sec = 0\npattern = \"random\"\ncontent = \"text\"\n",
    );
    let mut vm = start(ferry, dir, "sampled", &body)?;
    vm.wait_ready(ferry)?;
    // Past the fill (65536 pages) so only steady-state writes count.
    let t0 = Instant::now();
    while vm_status(ferry, &vm.control)?.machine.guest_pages_written < 80_000 {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the guest did not get past its fill");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..WINDOWS {
        for sampled in if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let rate = window(ferry, &vm.control, sampled)?;
            println!(
                "  {}: {rate:.0} pages/s",
                if sampled { "sampled" } else { "quiet  " }
            );
            if sampled { &mut with } else { &mut without }.push(rate);
        }
    }
    vm.quit(ferry)?;
    let cost = 1.0 - median(with.clone()) / median(without.clone());
    println!(
        "  median {:.0} pages/s sampled, {:.0} quiet: {:.1}% of the guest's write rate",
        median(with.clone()),
        median(without.clone()),
        cost * 100.0
    );
    Ok(json!({
        "schedule": "1 s of dirty logging every 60 s",
        "sampled_pages_per_sec": summary(&with),
        "quiet_pages_per_sec": summary(&without),
        "cost_ratio": cost,
    }))
}

/// The agents' config without sampling (telemetry off) or with its default.
fn sampling(agent: &Agent, on: bool) -> Result<()> {
    let path = agent.dir.join("agent.toml");
    let text = std::fs::read_to_string(&path)?;
    let base = text
        .split("\n[sampling]\n")
        .next()
        .unwrap_or(&text)
        .to_owned();
    let text = if on {
        base
    } else {
        format!("{base}\n[sampling]\nevery_secs = 0\n")
    };
    std::fs::write(&path, text)?;
    Ok(())
}

/// Moves web-0 from `from` to `to`: (total ms, downtime ms). Capped, so each
/// migration lasts seconds: scrapes, samples and exports happen while it runs.
fn migrate(from: &Agent, to: &Agent) -> Result<(f64, f64)> {
    let m = crate::bench_agent::move_web0(
        from,
        to,
        r#"{"bandwidth_mbit": 400}"#,
        Duration::from_secs(180),
    )?;
    Ok((
        m["total_ms"].as_f64().unwrap_or(f64::NAN),
        m["downtime_ms"].as_f64().unwrap_or(f64::NAN),
    ))
}

fn on_off(dir: &std::path::Path) -> Result<Value> {
    step(&format!(
        "migrations with full telemetry and without, {RUNS} runs each (there and back), interleaved"
    ));
    std::fs::create_dir_all(dir.join("a"))?;
    std::fs::create_dir_all(dir.join("b"))?;
    let mut a = Agent::configure(&dir.join("a"), "host-a");
    let mut b = Agent::configure(&dir.join("b"), "host-b");
    a.peer_with(&b);
    b.peer_with(&a);
    std::fs::write(
        dir.join("a/vms/web-0.toml"),
        "name = \"web-0\"\nmemory_mib = 256\n[workload]\nworking_set_mib = 64\n\
         dirty_pages_per_sec = 2000\n",
    )?;
    let receiver = Receiver::start();
    let (mut on_total, mut on_down, mut off_total, mut off_down) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let order = if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for on in order {
            for agent in [&mut a, &mut b] {
                sampling(agent, on)?;
                agent.env = if on {
                    vec![
                        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.grpc.clone()),
                        ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "grpc".into()),
                    ]
                } else {
                    Vec::new()
                };
                agent.start();
            }
            let prometheus = on.then(|| {
                Prometheus::start(
                    &dir.join(format!("prometheus-{i}")),
                    &[a.addr.as_str(), b.addr.as_str()],
                    &[],
                )
            });
            if let Some(p) = &prometheus {
                p.wait_for(
                    "both agents scraped",
                    r#"count(up{job="ferry"} == 1) == 2"#,
                    Duration::from_secs(60),
                );
            }
            // Each run goes there and back: web-0 starts every run on host-a.
            let (from, to) = (&a, &b);
            from.wait_for_vms("web-0 running", Duration::from_secs(60), |l| {
                l.iter()
                    .any(|v| v["name"] == "web-0" && v["state"] == "running")
            });
            let there = migrate(from, to)?;
            let back = migrate(to, from)?;
            println!(
                "  run {i}, telemetry {}: total {:.0} / {:.0} ms, downtime {:.1} / {:.1} ms",
                if on { "on " } else { "off" },
                there.0,
                back.0,
                there.1,
                back.1
            );
            let (total, down) = if on {
                (&mut on_total, &mut on_down)
            } else {
                (&mut off_total, &mut off_down)
            };
            total.extend([there.0, back.0]);
            down.extend([there.1, back.1]);
            drop(prometheus);
            for agent in [&mut a, &mut b] {
                agent.signal(libc::SIGTERM);
            }
        }
    }
    let spans = receiver.spans().len();
    let diff_total = median(on_total.clone()) - median(off_total.clone());
    let diff_down = median(on_down.clone()) - median(off_down.clone());
    let (t_lo, t_hi) = spread(&off_total);
    let (d_lo, d_hi) = spread(&off_down);
    println!(
        "  total time: median {:.0} ms on, {:.0} ms off ({t_lo:.0}-{t_hi:.0}): {diff_total:+.0} ms",
        median(on_total.clone()),
        median(off_total.clone())
    );
    println!(
        "  downtime: median {:.1} ms on, {:.1} ms off ({d_lo:.1}-{d_hi:.1}): {diff_down:+.1} ms",
        median(on_down.clone()),
        median(off_down.clone())
    );
    println!("  {spans} spans received from the runs with telemetry on");
    Ok(json!({
        "on": {"total_ms": summary(&on_total), "downtime_ms": summary(&on_down)},
        "off": {"total_ms": summary(&off_total), "downtime_ms": summary(&off_down)},
        "median_difference_ms": {"total": diff_total, "downtime": diff_down},
        "spans_received": spans,
    }))
}
