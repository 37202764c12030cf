//! `cargo xtask bench <area>`: measures the figures an area promises and prints them
//! (also saved as JSON under target/bench/).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ferry_api::{DirtySample, MigrationReport, Outcome, StorageReport, VmStatus};
use serde_json::{Value, json};

use crate::util::{
    Vmm, build_ferry, cpu_seconds, ctl, median, monotonic_ns, or_dash, snapshot, step, vm_of,
    vm_status, work_dir,
};

/// The storage migration's copy step in bytes: `RUN_BLOCKS * COPY_BLOCK` (8 blocks of
/// 64 KiB) in agent/src/migration/storage.rs, equal to `MAX_DISK_CHUNK` in
/// agent/src/migration/protocol.rs. The bulk copy reads and writes a run of adjacent
/// blocks this large at a time, so the `dd` it is compared with uses it as its block
/// size. (xtask does not link the agent: it has to build before `setup` installs the
/// eBPF toolchain the agent needs.)
const STORAGE_COPY_STEP: u64 = 512 << 10;

pub fn run(area: &str) -> Result<()> {
    match area {
        "vmm" => vmm(),
        "precopy" => precopy(),
        "postcopy" => postcopy(),
        "storage" => storage(),
        "probes" => crate::bench_probes::run(),
        "agent" => crate::bench_agent::run(),
        "telemetry" => crate::bench_telemetry::run(),
        "tls" => crate::bench_tls::run(),
        other => {
            bail!(
                "unknown bench area {other:?} (areas: vmm, precopy, postcopy, storage, probes, \
                 agent, telemetry, tls)"
            )
        }
    }
}

pub(crate) fn config(name: &str, memory_mib: u64, vcpus: u32, workload: &str) -> String {
    format!("name = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = {vcpus}\n[workload]\n{workload}")
}

pub(crate) fn start(ferry: &Path, dir: &Path, name: &str, body: &str) -> Result<Vmm> {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, body)?;
    Vmm::spawn(
        ferry,
        &["--config", cfg.to_str().unwrap_or_default()],
        &dir.join(format!("{name}.sock")),
        &dir.join(format!("{name}.log")),
    )
}

pub(crate) fn wait_for(
    ferry: &Path,
    vm: &Vmm,
    timeout: Duration,
    pred: impl Fn(&VmStatus) -> bool,
) -> Result<VmStatus> {
    let t0 = Instant::now();
    loop {
        let s = vm_status(ferry, &vm.control)?;
        if pred(&s) {
            return Ok(s);
        }
        if t0.elapsed() > timeout {
            bail!("timed out; last status {s:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vmm() -> Result<()> {
    let ferry = build_ferry()?;
    let dir = work_dir("bench-vmm")?;
    let mut results = serde_json::Map::new();

    step("process start to first heartbeat, 1 GiB guest (5 runs)");
    let mut boots = Vec::new();
    for i in 0..5 {
        let body = config(
            "boot",
            1024,
            1,
            "working_set_mib = 512\ndirty_pages_per_sec = 20000\npattern = \"random\"\n",
        );
        let cfg = dir.join("boot.toml");
        std::fs::write(&cfg, &body)?;
        let t0 = monotonic_ns();
        let mut vm = Vmm::spawn(
            &ferry,
            &["--config", cfg.to_str().unwrap_or_default()],
            &dir.join(format!("boot{i}.sock")),
            &dir.join(format!("boot{i}.log")),
        )?;
        vm.wait_ready(&ferry)?;
        let s = wait_for(&ferry, &vm, Duration::from_secs(30), |s| {
            s.machine.first_heartbeat_monotonic_ns.is_some()
        })?;
        let first = s.machine.first_heartbeat_monotonic_ns.unwrap_or_default();
        let ms = (first as f64 - t0 as f64) / 1e6;
        println!("  run {i}: {ms:.1} ms");
        boots.push(ms);
        vm.quit(&ferry)?;
    }
    let boot = median(boots.clone());
    println!("  median {boot:.1} ms (goal <= 100 ms)");
    results.insert(
        "start_to_first_heartbeat_ms".into(),
        json!({"median": boot, "runs": boots}),
    );

    // One vCPU, so one core stays free for the VMM: the figure is the harvest's cost,
    // not the two vCPUs' competition for the machine's two cores.
    step("harvesting the dirty set, 1 GiB guest, everything dirty (bitmap, manual protect)");
    let body = config(
        "harvest",
        1024,
        1,
        "working_set_mib = 1000\ndirty_pages_per_sec = 0\npattern = \"sequential\"\nfill = false\ncontent = \"zero\"\n",
    );
    let mut vm = start(&ferry, &dir, "harvest", &body)?;
    vm.wait_ready(&ferry)?;
    let mut per_gib = Vec::new();
    for i in 0..3 {
        let r: DirtySample = serde_json::from_str(&ctl(
            &ferry,
            &["dirty-rate", "--duration-ms", "3000", "--json"],
            &vm.control,
        )?)?;
        let gib = r.dirty_pages as f64 * 4096.0 / (1u64 << 30) as f64;
        let total = r.fetch_ms + r.clear_ms;
        println!(
            "  run {i}: {} dirty pages ({gib:.2} GiB): fetch {:.2} ms + clear {:.2} ms = {:.2} ms per GiB",
            r.dirty_pages,
            r.fetch_ms,
            r.clear_ms,
            total / gib
        );
        per_gib.push(total / gib);
    }
    vm.quit(&ferry)?;
    let harvest = median(per_gib.clone());
    println!("  median {harvest:.2} ms per GiB (goal <= 10 ms)");
    results.insert(
        "harvest_ms_per_gib".into(),
        json!({"median": harvest, "runs": per_gib}),
    );

    step("state save + restore into a fresh process (excluding guest memory), 1 GiB, 2 vCPUs");
    let body = config(
        "state",
        1024,
        2,
        "working_set_mib = 256\ndirty_pages_per_sec = 20000\npattern = \"random\"\n",
    );
    let mut sums = Vec::new();
    for i in 0..3 {
        let mut vm = start(&ferry, &dir, "state", &body)?;
        vm.wait_ready(&ferry)?;
        wait_for(&ferry, &vm, Duration::from_secs(30), |s| {
            s.machine.heartbeats > 100
        })?;
        let snap = dir.join(format!("state-snap{i}"));
        let r = snapshot(&ferry, &vm.control, &snap)?;
        vm.quit(&ferry)?;
        let mut restored = Vmm::spawn(
            &ferry,
            &["--restore", snap.to_str().unwrap_or_default()],
            &dir.join("restored.sock"),
            &dir.join("restored.log"),
        )?;
        let s = vm_of(restored.wait_ready(&ferry)?)?;
        let Some(rt) = s.machine.restore else {
            bail!("the restored VM's status has no restore timings: {s:?}");
        };
        let save = r.state_save_ms;
        let restore = rt.vm_create_ms + rt.state_restore_ms;
        println!(
            "  run {i}: save {save:.2} ms + restore {restore:.2} ms (create VM {:.2} + state {:.2}) = {:.2} ms; \
             {} bytes of state; snapshot pause {:.0} ms; memory load {:.0} ms",
            rt.vm_create_ms,
            rt.state_restore_ms,
            save + restore,
            r.state_bytes,
            r.pause_ms,
            rt.memory_load_ms,
        );
        sums.push(save + restore);
        restored.quit(&ferry)?;
        let _ = std::fs::remove_dir_all(&snap);
    }
    let state = median(sums.clone());
    println!("  median {state:.2} ms (goal <= 20 ms)");
    results.insert(
        "state_save_restore_ms".into(),
        json!({"median": state, "runs": sums}),
    );

    step("guest pages written per second, unpaced, 1 GiB guest");
    for vcpus in [1u32, 2] {
        let body = config(
            "unpaced",
            1024,
            vcpus,
            "working_set_mib = 512\ndirty_pages_per_sec = 0\npattern = \"random\"\ncontent = \"text\"\n",
        );
        let mut vm = start(&ferry, &dir, "unpaced", &body)?;
        vm.wait_ready(&ferry)?;
        // Past the fill (131072 pages) so only steady-state writes count.
        wait_for(&ferry, &vm, Duration::from_secs(60), |s| {
            s.machine.guest_pages_written > 140_000
        })?;
        let a = vm_status(&ferry, &vm.control)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(3));
        let b = vm_status(&ferry, &vm.control)?;
        let rate = b
            .machine
            .guest_pages_written
            .saturating_sub(a.machine.guest_pages_written) as f64
            / t0.elapsed().as_secs_f64();
        println!(
            "  {vcpus} vCPU: {rate:.0} pages/s ({:.2} GB/s)",
            rate * 4096.0 / 1e9
        );
        results.insert(format!("unpaced_pages_per_sec_{vcpus}vcpu"), json!(rate));
        vm.quit(&ferry)?;
    }

    step("host CPU used by an idle guest (1 GiB, fill then idle), 5 s");
    for vcpus in [1u32, 2] {
        let body = config(
            "idle",
            1024,
            vcpus,
            "working_set_mib = 512\npattern = \"idle\"\ncontent = \"mixed\"\n",
        );
        let mut vm = start(&ferry, &dir, "idle", &body)?;
        vm.wait_ready(&ferry)?;
        wait_for(&ferry, &vm, Duration::from_secs(60), |s| {
            s.machine.guest_pages_written >= 131_072
        })?;
        std::thread::sleep(Duration::from_millis(500));
        let pid = vm.child.id();
        let c0 = cpu_seconds(pid)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(5));
        let pct = (cpu_seconds(pid)? - c0) / t0.elapsed().as_secs_f64() * 100.0;
        let s = vm_status(&ferry, &vm.control)?;
        println!(
            "  {vcpus} vCPU: {pct:.1}% of a core (goal < 5%); max heartbeat gap {:.2} ms",
            s.machine.max_heartbeat_gap_ms
        );
        results.insert(format!("idle_cpu_pct_{vcpus}vcpu"), json!(pct));
        vm.quit(&ferry)?;
    }

    let out = crate::util::root().join("target/bench/vmm.json");
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(results))?)?;
    step(&format!("results saved to {}", out.display()));
    Ok(())
}

/// Migrates `vm` to a fresh incoming VMM; returns the report and the new VMM.
fn migrate_once(
    ferry: &Path,
    dir: &Path,
    vm: &Vmm,
    name: &str,
    args: &[&str],
) -> Result<(Report<MigrationReport>, Vmm)> {
    let (dst, addr) = crate::util::incoming(ferry, dir, name, &[])?;
    let mut full = vec!["migrate", "--to", &addr, "--json"];
    full.extend_from_slice(args);
    full.extend(["--control", vm.control.to_str().unwrap_or_default()]);
    let out = std::process::Command::new(ferry)
        .args(ferry_tests::pki::secured(&full))
        .output()?;
    let report = Report::<MigrationReport>::parse(&out)?;
    if report.typed.core.outcome != Outcome::Completed {
        bail!("migration failed: {}", report.raw);
    }
    Ok((report, dst))
}

/// A report `ferry` printed: read through its ferry-api type, and as printed (what
/// the bench saves, with what the driver adds beyond the type).
pub(crate) struct Report<T> {
    pub(crate) typed: T,
    raw: Value,
}

impl<T: serde::de::DeserializeOwned> Report<T> {
    pub(crate) fn parse(out: &std::process::Output) -> Result<Self> {
        let raw: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow::anyhow!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr))
        })?;
        let typed = serde_json::from_value(raw.clone())
            .map_err(|e| anyhow::anyhow!("the report does not read as ferry-api's ({e}): {raw}"))?;
        Ok(Self { typed, raw })
    }
}

fn precopy() -> Result<()> {
    let ferry = build_ferry()?;
    let dir = work_dir("bench-precopy")?;
    let mut results = serde_json::Map::new();

    step("raw loopback TCP stream (1 GiB, 1 MiB writes)");
    let raw = median(
        (0..3)
            .map(|_| crate::bench_line::loopback_bytes_per_sec(1 << 30))
            .collect::<Result<Vec<_>>>()?,
    );
    println!("  {:.2} GB/s", raw / 1e9);
    results.insert("loopback_bytes_per_sec".into(), json!(raw));

    step("idle 1 GiB guest (pattern idle, fill, content mixed, 768 MiB working set)");
    for codec in ["none", "lz4"] {
        let body = config(
            "idle",
            1024,
            2,
            "working_set_mib = 768\npattern = \"idle\"\ncontent = \"mixed\"\n",
        );
        let mut vm = start(&ferry, &dir, &format!("idle-{codec}"), &body)?;
        vm.wait_ready(&ferry)?;
        wait_for(&ferry, &vm, Duration::from_secs(120), |s| {
            s.machine.guest_pages_written >= 196_608
        })?;
        let cpu0 = cpu_seconds(vm.child.id())?;
        let (report, dst) = migrate_once(
            &ferry,
            &dir,
            &vm,
            &format!("idle-{codec}-dst"),
            &["--compression", codec],
        )?;
        let cpu = cpu_seconds(vm.child.id())? - cpu0;
        let r = &report.typed;
        let total_s = r.core.total_ms / 1e3;
        let logical = (r.pages_sent + r.zero_pages) as f64 * 4096.0;
        let wire_rate = r.bytes_on_wire as f64 / total_s;
        println!(
            "  {codec:<5} total {:.0} ms (goal <= 1000), downtime {:.1} ms, {:.2} GB/s on the wire ({:.0}% of loopback), \
             {:.2} GB/s of guest memory, ratio {:.2}, source CPU {:.2} cores, verified {}",
            r.core.total_ms,
            r.downtime_ms.unwrap_or(f64::NAN),
            wire_rate / 1e9,
            wire_rate / raw * 100.0,
            logical / total_s / 1e9,
            r.compression_ratio,
            cpu / total_s,
            or_dash(r.memory_verified),
        );
        results.insert(format!("idle_{codec}"), report.raw);
        vm.quit(&ferry)?;
        dst.quit(&ferry)?;
    }

    results.insert(
        "line_rate".into(),
        crate::bench_line::line_rate(&ferry, &dir)?,
    );
    results.insert(
        "line_rate_shaped_link".into(),
        crate::bench_line::shaped_link(&ferry, &dir)?,
    );

    step(
        "20k pages/s at random over 512 MiB of a 1 GiB guest, --max-downtime-ms 50, 10 migrations",
    );
    let body = config(
        "busy",
        1024,
        2,
        "working_set_mib = 512\ndirty_pages_per_sec = 20000\npattern = \"random\"\ncontent = \"text\"\n",
    );
    let mut vm = start(&ferry, &dir, "busy", &body)?;
    vm.wait_ready(&ferry)?;
    wait_for(&ferry, &vm, Duration::from_secs(120), |s| {
        s.machine.guest_pages_written >= 140_000
    })?;
    let mut downtimes = Vec::new();
    for i in 0..10 {
        let (report, dst) = migrate_once(
            &ferry,
            &dir,
            &vm,
            &format!("busy{i}"),
            &["--max-downtime-ms", "50"],
        )?;
        let r = &report.typed;
        let downtime = r.downtime_ms.unwrap_or(f64::NAN);
        println!(
            "  run {i}: downtime {downtime:.2} ms, switchover {:.2} ms, total {:.0} ms, {} rounds, verified {}",
            r.core.switchover_ms.unwrap_or(f64::NAN),
            r.core.total_ms,
            r.rounds,
            or_dash(r.memory_verified),
        );
        downtimes.push(downtime);
        vm.quit(&ferry)?;
        vm = dst;
    }
    let p50 = median(downtimes.clone());
    println!("  downtime p50 {p50:.2} ms (goal <= 10 ms)");
    results.insert(
        "downtime_ms_20k_random".into(),
        json!({"p50": p50, "runs": downtimes}),
    );
    vm.quit(&ferry)?;

    step("text pages with zstd:1: bytes on the wire against the pages' size");
    let body = config(
        "text",
        1024,
        1,
        "working_set_mib = 512\npattern = \"idle\"\ncontent = \"text\"\n",
    );
    let mut vm = start(&ferry, &dir, "text", &body)?;
    vm.wait_ready(&ferry)?;
    wait_for(&ferry, &vm, Duration::from_secs(120), |s| {
        s.machine.guest_pages_written >= 131_072
    })?;
    let (report, dst) = migrate_once(&ferry, &dir, &vm, "text-dst", &["--compression", "zstd:1"])?;
    let r = &report.typed;
    let share = r.bytes_on_wire as f64 / (r.pages_sent as f64 * 4096.0) * 100.0;
    println!(
        "  {share:.1}% of the uncompressed pages (goal <= 45%), ratio {:.2}",
        r.compression_ratio
    );
    results.insert("zstd1_text_wire_percent".into(), json!(share));
    vm.quit(&ferry)?;
    dst.quit(&ferry)?;

    let out = crate::util::root().join("target/bench/precopy.json");
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(results))?)?;
    step(&format!("results saved to {}", out.display()));
    Ok(())
}

fn postcopy() -> Result<()> {
    let ferry = build_ferry()?;
    let dir = work_dir("bench-postcopy")?;
    let mut results = serde_json::Map::new();
    for vcpus in [1u32, 2] {
        for (rate, pass) in [
            (20_000u64, false),
            (100_000, false),
            (20_000, true),
            (100_000, true),
        ] {
            let how = if pass {
                "after one pre-copy pass"
            } else {
                "from the start"
            };
            step(&format!(
                "post-copy {how}: 1 GiB guest, {vcpus} vCPU(s), {}k pages/s at random over 512 MiB, 5 migrations",
                rate / 1000
            ));
            let r = postcopy_series(&ferry, &dir, vcpus, rate, pass)?;
            results.insert(
                format!(
                    "vcpus_{vcpus}_{}k_{}",
                    rate / 1000,
                    if pass { "pass" } else { "pure" }
                ),
                r,
            );
        }
    }

    step(
        "100k pages/s over 768 MiB of a 1 GiB guest, post-copy over a 200 Mbit/s link \
         (two network namespaces, veth, tc tbf)",
    );
    let link = ferry_tests::netns::LinkPair::new("bench", Some(200))
        .map_err(|e| anyhow::anyhow!("a shaped link needs network namespaces: {e}"))?;
    let body = config(
        "fast",
        1024,
        1,
        "working_set_mib = 768\ndirty_pages_per_sec = 100000\npattern = \"random\"\ncontent = \"random\"\n",
    );
    let cfg = dir.join("fast.toml");
    std::fs::write(&cfg, &body)?;
    let in_ns = |ns: &str| ferry_tests::netns::LinkPair::command(ns, &ferry);
    let mut vm = Vmm::spawn_cmd(
        in_ns(&link.source_ns),
        &["--config", cfg.to_str().unwrap_or_default()],
        &dir.join("fast.sock"),
        &dir.join("fast.log"),
    )?;
    vm.wait_ready(&ferry)?;
    wait_for(&ferry, &vm, Duration::from_secs(120), |s| {
        s.machine.guest_pages_written >= 196_608
    })?;
    let addr = format!("{}:47999", ferry_tests::netns::DEST_ADDR);
    let mut dst = Vmm::spawn_cmd(
        in_ns(&link.dest_ns),
        &["--incoming", &addr],
        &dir.join("fast-dst.sock"),
        &dir.join("fast-dst.log"),
    )?;
    dst.wait_ready(&ferry)?;
    let out = std::process::Command::new(&ferry)
        .args([
            "migrate",
            "--to",
            &addr,
            "--json",
            "--mode",
            "postcopy",
            "--control",
        ])
        .arg(&vm.control)
        .args(ferry_tests::pki::test_pki().args())
        .output()?;
    let report = Report::<MigrationReport>::parse(&out)?;
    let r = &report.typed;
    if r.core.outcome != Outcome::Completed {
        bail!("post-copy over the shaped link failed: {}", report.raw);
    }
    let link_bytes = 200e6 / 8.0;
    let total_s = r.core.total_ms / 1e3;
    let memory_s = (1u64 << 30) as f64 / link_bytes;
    println!(
        "  total {total_s:.1} s = {:.2} x (memory / link) (goal <= 1.2); {:.0} MB on the wire, \
         {} faults (p99 {} us), downtime {:.1} ms, verified {}",
        total_s / memory_s,
        r.bytes_on_wire as f64 / 1e6,
        or_dash(r.postcopy_faults),
        or_dash(r.fault_latency_p99_us),
        r.downtime_ms.unwrap_or(f64::NAN),
        or_dash(r.memory_verified),
    );
    results.insert("shaped_200mbit_100k".into(), report.raw);
    vm.quit(&ferry)?;
    dst.quit(&ferry)?;
    drop(link);

    let out = crate::util::root().join("target/bench/postcopy.json");
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(results))?)?;
    step(&format!("results saved to {}", out.display()));
    Ok(())
}

/// Five post-copy migrations of one busy guest, hop to hop; prints and returns the
/// downtime and fault latency figures.
fn postcopy_series(ferry: &Path, dir: &Path, vcpus: u32, rate: u64, pass: bool) -> Result<Value> {
    let body = config(
        "pc",
        1024,
        vcpus,
        &format!(
            "working_set_mib = 512\ndirty_pages_per_sec = {rate}\npattern = \"random\"\ncontent = \"mixed\"\n"
        ),
    );
    let tag = format!("pc{vcpus}-{rate}-{pass}");
    let mut vm = start(ferry, dir, &tag, &body)?;
    vm.wait_ready(ferry)?;
    wait_for(ferry, &vm, Duration::from_secs(120), |s| {
        s.machine.guest_pages_written >= 140_000
    })?;
    let mut args = vec!["--mode", "postcopy"];
    if pass {
        args.push("--precopy-pass");
    }
    let (mut downtimes, mut p50s, mut p99s) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..5 {
        let (report, dst) = migrate_once(ferry, dir, &vm, &format!("{tag}-{i}"), &args)?;
        let r = &report.typed;
        let downtime = r.downtime_ms.unwrap_or(f64::NAN);
        println!(
            "  run {i}: downtime {downtime:.2} ms, switchover {:.2} ms, total {:.0} ms, {} faults \
             (p50 {} us, p99 {} us), vCPUs blocked {:.1} ms, verified {}",
            r.core.switchover_ms.unwrap_or(f64::NAN),
            r.core.total_ms,
            or_dash(r.postcopy_faults),
            or_dash(r.fault_latency_p50_us),
            or_dash(r.fault_latency_p99_us),
            r.vcpu_blocked_ms.unwrap_or(f64::NAN),
            or_dash(r.memory_verified),
        );
        if r.memory_verified != Some(true) {
            bail!("memory digests differ after post-copy: {}", report.raw);
        }
        let us = |v: Option<u64>| v.map_or(f64::NAN, |v| v as f64);
        downtimes.push(downtime);
        p50s.push(us(r.fault_latency_p50_us));
        p99s.push(us(r.fault_latency_p99_us));
        vm.quit(ferry)?;
        vm = dst;
    }
    vm.quit(ferry)?;
    let (d, l50, l99) = (median(downtimes.clone()), median(p50s), median(p99s));
    println!(
        "  downtime p50 {d:.2} ms (goal <= 5 ms); fault latency p50 {l50:.0} us, p99 {l99:.0} us \
         (median of runs; goal p99 <= 2000 us with 1 vCPU)"
    );
    Ok(json!({"downtime_p50_ms": d, "downtimes_ms": downtimes,
              "fault_latency_p50_us": l50, "fault_latency_p99_us": l99}))
}

/// `ferry storage-migrate --json` of a VM's disks into `to`; its report.
fn storage_migrate(
    ferry: &Path,
    control: &Path,
    to: &Path,
    mode: &str,
) -> Result<Report<StorageReport>> {
    let out = std::process::Command::new(ferry)
        .args(["storage-migrate", "--json", "--mode", mode, "--to"])
        .arg(to)
        .arg("--control")
        .arg(control)
        .output()?;
    Report::parse(&out)
}

/// Storage migration: the bulk copy against `dd` of the same image on the same file
/// system, and what active mode adds to guest writes.
fn storage() -> Result<()> {
    let ferry = build_ferry()?;
    let dir = work_dir("bench-storage")?;
    let mut results = serde_json::Map::new();
    for sub in ["ds1", "ds2", "ds3", "dd"] {
        let _ = std::fs::remove_dir_all(dir.join(sub));
        std::fs::create_dir_all(dir.join(sub))?;
    }
    step("a 512 MiB image full of data (no holes)");
    let image = dir.join("ds1/st-root.img");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&image)?);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..512 {
            for w in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&chunk)?;
        }
        f.into_inner()?.sync_all()?;
    }

    step(&format!(
        "dd of the image, {} KiB blocks (the copy's step), O_DIRECT both ways (3 runs)",
        STORAGE_COPY_STEP >> 10
    ));
    let mut dd = Vec::new();
    for i in 0..3 {
        let out = dir.join(format!("dd/copy{i}.img"));
        // Sized first, as the storage migration sizes its copy: both then write inside
        // the file rather than extending it.
        std::fs::File::create(&out)?.set_len(512 << 20)?;
        let t = std::time::Instant::now();
        let st = std::process::Command::new("dd")
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", out.display()))
            .arg(format!("bs={STORAGE_COPY_STEP}"))
            .args(["iflag=direct", "oflag=direct", "conv=fsync", "status=none"])
            .status()?;
        if !st.success() {
            bail!("dd failed");
        }
        dd.push((512u64 << 20) as f64 / t.elapsed().as_secs_f64());
        std::fs::remove_file(&out)?;
    }
    let dd = median(dd);
    println!("  {:.0} MB/s", dd / 1e6);
    results.insert("dd_bytes_per_sec".into(), json!(dd));
    results.insert("dd_block_bytes".into(), json!(STORAGE_COPY_STEP));

    let body = "name = \"st\"\nmemory_mib = 64\nvcpus = 1\n[workload]\nworking_set_mib = 8\n\
                dirty_pages_per_sec = 1000\npattern = \"random\"\n[workload.disk]\n\
                write_ops_per_sec = 0\n[[disks]]\nid = \"root\"\npath = \"ds1/st-root.img\"\n\
                size_mib = 512\ncache = \"none\"\n";
    let mut vm = start(&ferry, &dir, "st", body)?;
    vm.wait_ready(&ferry)?;
    step("storage migration of the same image (guest not writing to disk), background mode");
    let report = storage_migrate(&ferry, &vm.control, &dir.join("ds2"), "background")?;
    let r = &report.typed;
    if r.core.outcome != Outcome::Completed {
        bail!("storage migration failed: {}", report.raw);
    }
    let rate = r.disk_bytes_copied as f64 / (r.copy_ms / 1e3);
    println!(
        "  copy {:.0} MB/s = {:.0}% of dd (goal >= 80%); then the block-by-block check \
         took {:.0} ms more; switchover {:.1} ms, verified {}",
        rate / 1e6,
        rate / dd * 100.0,
        r.core.total_ms - r.copy_ms,
        r.core.switchover_ms.unwrap_or(f64::NAN),
        or_dash(r.disk_verified)
    );
    results.insert("bulk_background".into(), report.raw);
    vm.quit(&ferry)?;
    let copy_rate = rate;

    // Convergence: a guest writing 64 KiB blocks at about half, then about all, of
    // the copy speed just measured; and auto mode choosing at full speed.
    for (mode, share, ds) in [
        ("background", 0.5, "ds3"),
        ("active", 1.0, "ds2"),
        ("auto", 1.0, "ds3"),
    ] {
        let ops = (copy_rate * share / 65536.0).round().max(1.0) as u64;
        step(&format!(
            "{mode} mode with the guest writing 64 KiB blocks at {:.0}% of the copy speed ({ops} writes/s asked)",
            share * 100.0
        ));
        let name = format!("cv-{mode}");
        let image = dir.join(format!("{name}.img"));
        let body = format!(
            "name = \"{name}\"\nmemory_mib = 64\nvcpus = 2\n[workload]\nworking_set_mib = 8\n\
             dirty_pages_per_sec = 1000\npattern = \"random\"\n[workload.disk]\n\
             write_ops_per_sec = {ops}\nblock_kib = 64\n[[disks]]\nid = \"root\"\n\
             path = \"{}\"\nsize_mib = 256\ncache = \"none\"\n",
            image.display()
        );
        let mut vm = start(&ferry, &dir, &name, &body)?;
        vm.wait_ready(&ferry)?;
        std::thread::sleep(Duration::from_secs(2));
        let w0 = vm_status(&ferry, &vm.control)?.machine.disk_writes;
        std::thread::sleep(Duration::from_secs(1));
        let w1 = vm_status(&ferry, &vm.control)?.machine.disk_writes;
        let guest_rate = w1.saturating_sub(w0) as f64 * 65536.0;
        let report = storage_migrate(&ferry, &vm.control, &dir.join(ds), mode)?;
        let r = &report.typed;
        println!(
            "  guest wrote {:.0} MB/s ({:.0}% of the copy speed): {} in {} rounds, switchover {:.1} ms, \
             copy {:.0} ms, verified {}, added write latency p99 {} us",
            guest_rate / 1e6,
            guest_rate / copy_rate * 100.0,
            r.core.outcome,
            r.disk_rounds,
            r.core.switchover_ms.unwrap_or(f64::NAN),
            r.copy_ms,
            or_dash(r.disk_verified),
            or_dash(r.guest_write_latency_added_us_p99),
        );
        if mode == "auto" {
            for d in &r.disks {
                println!(
                    "  auto chose {}: {}",
                    d.mode,
                    or_dash(d.mode_reason.as_ref())
                );
            }
        }
        results.insert(
            format!("converge_{mode}"),
            json!({"guest_bytes_per_sec": guest_rate, "report": report.raw}),
        );
        vm.quit(&ferry)?;
    }
    let out = crate::util::root().join("target/bench/storage.json");
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(results))?)?;
    step(&format!("results saved to {}", out.display()));
    Ok(())
}
