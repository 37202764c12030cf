//! `cargo xtask bench tls`: what TLS costs the migration stream on loopback, the same
//! migrations run in turns over TLS and over plain TCP (`--insecure`), so that the
//! machine's drift hits both alike.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use crate::bench::{config, start, wait_for};
use crate::bench_line::{Destination, bulk_guest, migrate, wait_filled};
use crate::util::{build_ferry, median, step, work_dir};

/// Runs of each kind.
const RUNS: usize = 7;

fn kind(tls: bool) -> &'static str {
    if tls { "tls" } else { "tcp" }
}

pub fn run() -> Result<()> {
    let ferry = build_ferry()?;
    let dir = work_dir("bench-tls")?;
    let mut results = serde_json::Map::new();

    step(&format!(
        "throughput: an idle 1 GiB guest, 768 MiB of random (incompressible) pages, no \
         codec; {RUNS} migrations each way, TLS and plain TCP in turns"
    ));
    let mut vm = start(&ferry, &dir, "bulk", &bulk_guest("bulk"))?;
    vm.wait_ready(&ferry)?;
    wait_filled(&ferry, &vm)?;
    let mut rate: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    // CPU seconds per GB on the wire, each end: what TLS costs where the two ends
    // do not share two cores, as they do here.
    let mut src_cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut dst_cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..2 * RUNS {
        let tls = i % 2 == 0;
        let (r, dst, cpu) = migrate(
            &ferry,
            &dir,
            &vm,
            &format!("bulk{i}"),
            &Destination {
                tls,
                prealloc_mib: Some(1024),
                args: &["--compression", "none", "--policy", "static"],
            },
        )?;
        let bytes_per_sec = r.bytes_on_wire as f64 / (r.core.total_ms / 1e3);
        let gb = r.bytes_on_wire as f64 / 1e9;
        println!(
            "  {:<3} total {:.0} ms, {:.2} GB/s on the wire, downtime {:.2} ms, CPU per GB: \
             source {:.2} s, destination {:.2} s",
            kind(tls),
            r.core.total_ms,
            bytes_per_sec / 1e9,
            r.downtime_ms.unwrap_or(f64::NAN),
            cpu.source / gb,
            cpu.destination / gb
        );
        rate[usize::from(tls)].push(bytes_per_sec);
        src_cpu[usize::from(tls)].push(cpu.source / gb);
        dst_cpu[usize::from(tls)].push(cpu.destination / gb);
        vm.quit(&ferry)?;
        vm = dst;
    }
    vm.quit(&ferry)?;
    let (tcp, tls) = (median(rate[0].clone()), median(rate[1].clone()));
    let cost = (1.0 - tls / tcp) * 100.0;
    println!(
        "  median: plain TCP {:.2} GB/s, TLS {:.2} GB/s: TLS costs {cost:.1}% of throughput \
         (goal <= 15%)",
        tcp / 1e9,
        tls / 1e9
    );
    let med = |v: &[Vec<f64>; 2]| (median(v[0].clone()), median(v[1].clone()));
    let (src, dst) = (med(&src_cpu), med(&dst_cpu));
    println!(
        "  median CPU per GB: source {:.2} s plain, {:.2} s TLS; destination {:.2} s plain, \
         {:.2} s TLS (both ends share this host's cores)",
        src.0, src.1, dst.0, dst.1
    );
    results.insert(
        "throughput".into(),
        json!({"tcp_bytes_per_sec": rate[0], "tls_bytes_per_sec": rate[1],
               "tcp_median": tcp, "tls_median": tls, "cost_percent": cost,
               "source_cpu_secs_per_gb": {"tcp": src_cpu[0], "tls": src_cpu[1]},
               "destination_cpu_secs_per_gb": {"tcp": dst_cpu[0], "tls": dst_cpu[1]}}),
    );

    step(&format!(
        "downtime: 20k pages/s at random over 512 MiB of a 1 GiB guest, --max-downtime-ms \
         50; {RUNS} migrations each way, in turns"
    ));
    let body = config(
        "busy",
        1024,
        2,
        "working_set_mib = 512\ndirty_pages_per_sec = 20000\npattern = \"random\"\n\
         content = \"text\"\n",
    );
    let mut vm = start(&ferry, &dir, "busy", &body)?;
    vm.wait_ready(&ferry)?;
    wait_for(&ferry, &vm, Duration::from_secs(120), |s| {
        s.machine.guest_pages_written >= 140_000
    })?;
    let mut down: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..2 * RUNS {
        let tls = i % 2 == 0;
        let (r, dst, _) = migrate(
            &ferry,
            &dir,
            &vm,
            &format!("busy{i}"),
            &Destination {
                tls,
                prealloc_mib: Some(1024),
                args: &["--max-downtime-ms", "50"],
            },
        )?;
        let d = r.downtime_ms.unwrap_or(f64::NAN);
        println!(
            "  {:<3} downtime {d:.2} ms, switchover {:.2} ms, total {:.0} ms, {} rounds",
            kind(tls),
            r.core.switchover_ms.unwrap_or(f64::NAN),
            r.core.total_ms,
            r.rounds
        );
        down[usize::from(tls)].push(d);
        vm.quit(&ferry)?;
        vm = dst;
    }
    vm.quit(&ferry)?;
    let (tcp, tls) = (median(down[0].clone()), median(down[1].clone()));
    println!(
        "  median downtime: plain TCP {tcp:.2} ms, TLS {tls:.2} ms: TLS adds {:.2} ms \
         (goal <= 1 ms)",
        tls - tcp
    );
    results.insert(
        "downtime_ms".into(),
        json!({"tcp": down[0], "tls": down[1], "tcp_median": tcp, "tls_median": tls,
               "added_ms": tls - tcp}),
    );

    let out = crate::util::root().join("target/bench/tls.json");
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(results))?)?;
    step(&format!("results saved to {}", out.display()));
    Ok(())
}
