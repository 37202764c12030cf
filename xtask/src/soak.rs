//! `cargo xtask soak`: one VM migrated back and forth between two VMMs for as long as
//! asked, every hop checked, and the downtimes' distribution.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_api::{MigrationReport, Outcome};
use serde_json::json;

use crate::bench::{Report, config, start, wait_for};
use crate::util::{Vmm, build_ferry, root, step, vm_status, work_dir};

pub const USAGE: &str = "usage: cargo xtask soak [--minutes N] [--insecure]

Migrates one VM (256 MiB, 2 vCPUs, writing 5,000 pages/s at random over 128 MiB) back
and forth between two ferry VMMs on this host for N minutes (default 15), over TLS (or
plain TCP with --insecure), under the adaptive policy with --max-downtime-ms 50. Each
hop must complete with its memory verified, no integrity error in the guest, and the
guest's heartbeats carrying on from where they stopped; the first hop that does not
ends the run with its report. Prints the hops, their downtime (p50, p90, p99, max) and
total time, and writes target/soak/summary.json.";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(args: &[&str]) -> Result<()> {
    let mut minutes = 15u64;
    let mut insecure = false;
    let mut it = args.iter();
    while let Some(&a) = it.next() {
        match a {
            "--minutes" => {
                let v = it.next().context("--minutes needs a number")?;
                minutes = v.parse().ok().filter(|&m| m > 0).with_context(|| {
                    format!("--minutes {v:?}: a whole number of minutes, at least 1")
                })?;
            }
            "--insecure" => insecure = true,
            other => bail!("unexpected argument {other:?}\n\n{USAGE}"),
        }
    }
    let ferry = build_ferry()?;
    let dir = work_dir("soak")?;
    step(&format!(
        "booting the guest (256 MiB, 2 vCPUs, 5,000 pages/s at random over 128 MiB); \
         migrating it back and forth for {minutes} min over {}",
        if insecure { "plain TCP" } else { "TLS" }
    ));
    let body = config(
        "soak",
        256,
        2,
        "working_set_mib = 128\ndirty_pages_per_sec = 5000\npattern = \"random\"\n\
         content = \"mixed\"\n",
    );
    let mut vm = start(&ferry, &dir, "soak", &body)?;
    vm.wait_ready(&ferry)?;
    wait_for(&ferry, &vm, Duration::from_secs(120), |s| {
        s.machine.heartbeats > 100
    })?;
    let deadline = Instant::now() + Duration::from_secs(minutes * 60);
    let mut downtimes = Vec::new();
    let mut totals = Vec::new();
    let mut hop = 0u32;
    let failure = loop {
        if Instant::now() >= deadline {
            break None;
        }
        hop += 1;
        match one_hop(&ferry, &dir, &vm, hop, insecure) {
            Ok((r, dst)) => {
                let d = r.downtime_ms.unwrap_or(f64::NAN);
                downtimes.push(d);
                totals.push(r.core.total_ms);
                if hop.is_multiple_of(10) || hop == 1 {
                    println!(
                        "  hop {hop}: downtime {d:.2} ms, total {:.0} ms, {} rounds",
                        r.core.total_ms, r.rounds
                    );
                }
                vm.quit(&ferry)?;
                vm = dst;
            }
            Err(e) => break Some(format!("hop {hop}: {e:#}")),
        }
    };
    let _ = vm.quit(&ferry);
    let mut sorted = downtimes.clone();
    sorted.sort_by(f64::total_cmp);
    let mut sorted_totals = totals.clone();
    sorted_totals.sort_by(f64::total_cmp);
    let hops = downtimes.len();
    println!(
        "  {hops} hops in {minutes} min; downtime p50 {:.2} ms, p90 {:.2}, p99 {:.2}, max \
         {:.2}; total p50 {:.0} ms, max {:.0}",
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.9),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(f64::NAN),
        percentile(&sorted_totals, 0.5),
        sorted_totals.last().copied().unwrap_or(f64::NAN),
    );
    let out = root().join("target/soak/summary.json");
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&json!({
            "minutes": minutes, "tls": !insecure, "hops": hops, "failure": failure,
            "downtime_ms": {"p50": percentile(&sorted, 0.5), "p90": percentile(&sorted, 0.9),
                            "p99": percentile(&sorted, 0.99), "max": sorted.last(),
                            "all": downtimes},
            "total_ms": {"p50": percentile(&sorted_totals, 0.5), "all": totals},
        }))?,
    )?;
    step(&format!("results saved to {}", out.display()));
    match failure {
        Some(f) => bail!("{f}"),
        None => Ok(()),
    }
}

/// One migration of `vm` to a fresh VMM, checked: completed, memory verified, no
/// integrity error, the guest's heartbeats going on there.
fn one_hop(
    ferry: &Path,
    dir: &Path,
    vm: &Vmm,
    hop: u32,
    insecure: bool,
) -> Result<(MigrationReport, Vmm)> {
    let side = if hop.is_multiple_of(2) { "a" } else { "b" };
    let extra: &[&str] = if insecure { &["--insecure"] } else { &[] };
    let (dst, addr) = crate::util::incoming(ferry, dir, &format!("soak-{side}"), extra)?;
    let before = vm_status(ferry, &vm.control)?.machine.heartbeats;
    let mut args = vec![
        "migrate",
        "--to",
        &addr,
        "--json",
        "--max-downtime-ms",
        "50",
        "--control",
    ];
    let control = vm.control.to_string_lossy().into_owned();
    args.push(&control);
    args.extend_from_slice(extra);
    let out = std::process::Command::new(ferry)
        .args(ferry_tests::pki::secured(&args))
        .output()?;
    let r = Report::<MigrationReport>::parse(&out)?.typed;
    if r.core.outcome != Outcome::Completed {
        bail!("not completed: {r:?}");
    }
    if r.memory_verified != Some(true) || r.guest_integrity_errors != 0 {
        bail!("memory or guest integrity: {r:?}");
    }
    if r.tls == insecure {
        bail!("the report says tls = {}", r.tls);
    }
    let there = wait_for(ferry, &dst, Duration::from_secs(30), |s| {
        s.machine.heartbeats > before
    })?;
    if there.machine.guest_integrity_errors != 0 {
        bail!("the guest found errors after the hop: {there:?}");
    }
    Ok((r, dst))
}
