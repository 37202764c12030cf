//! `cargo xtask lab`: the main job, run locally. Starts a lab VM with a visible
//! workload, shows its live status, snapshots it, restores the snapshot in a second
//! `ferry vmm` process and shows the guest carrying on from the snapshot's moment,
//! then live-migrates it to a third process over TCP and prints the report, moves its
//! disk to a second datastore while it runs, migrates it with its disks to a third,
//! moves it once more in post-copy over a link slower than the guest dirties memory,
//! and checks every disk block it was told was written.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use ferry_api::{Decision, DriverReport, VmStatus};

use crate::util::{Vmm, build_ferry, ctl, snapshot, step, vm_of, vm_status, work_dir};

const LAB_CONFIG: &str = r#"name = "lab1"
memory_mib = 256
vcpus = 2
dirty_tracking = "bitmap"

[workload]
working_set_mib = 128
dirty_pages_per_sec = 20000
pattern = "random"
hot_fraction = 0.1
content = "text"
verify_interval_ms = 100
fill = true

[workload.disk]
write_ops_per_sec = 200
block_kib = 4

[[disks]]
id = "root"
path = "disks/lab1-root.img"
size_mib = 64
cache = "none"
"#;

fn show(label: &str, s: &VmStatus) {
    let m = &s.machine;
    println!(
        "  {label:<10} state={:<8} heartbeats={:>8} pages={:>9} pages/s={:>7.0} disk w/r={:>5}/{:<5} integrity errors={}/{} max gap={:.2} ms",
        m.state.as_str(),
        m.heartbeats,
        m.guest_pages_written,
        m.pages_written_per_sec,
        m.disk_writes,
        m.disk_reads,
        m.guest_integrity_errors,
        m.disk_integrity_errors,
        m.max_heartbeat_gap_ms,
    );
}

fn watch(ferry: &std::path::Path, vm: &Vmm, label: &str, secs: f64) -> Result<VmStatus> {
    let t0 = Instant::now();
    let mut last = vm_status(ferry, &vm.control)?;
    while t0.elapsed().as_secs_f64() < secs {
        std::thread::sleep(Duration::from_millis(500));
        last = vm_status(ferry, &vm.control)?;
        show(
            &format!("{label} {:.1}s", t0.elapsed().as_secs_f64()),
            &last,
        );
    }
    Ok(last)
}

/// Migrates `src` to a new `ferry vmm --incoming` called `name`, showing progress and
/// the report; returns the destination.
fn migrate_to(
    ferry: &Path,
    dir: &Path,
    src: &Vmm,
    (name, dst_args): (&str, &[&str]),
    args: &[&str],
) -> Result<Vmm> {
    let (dst, addr) = crate::util::incoming(ferry, dir, name, dst_args)?;
    let report = dir.join(format!("{name}-report.json"));
    let migrated = std::process::Command::new(ferry)
        .args(["migrate", "--to", &addr])
        .args(args)
        .arg("--report")
        .arg(&report)
        .arg("--control")
        .arg(&src.control)
        .status()?;
    if !migrated.success() {
        anyhow::bail!("the migration failed; see {}", report.display());
    }
    show("source", &vm_status(ferry, &src.control)?);
    // The driver's report: the migration's, and beside it the policy, its steps, its
    // prediction and the probes' signals.
    let r: DriverReport = serde_json::from_slice(&std::fs::read(&report)?)?;
    let migration = &r.migration;
    // What the policy decided, and why; then what it predicted against what happened.
    println!("  decisions ({} policy):", r.policy);
    let step = |d: &Decision| {
        println!(
            "    {:>6.2}s  {:<23} {:<10} {}",
            d.t_ms / 1e3,
            d.setting,
            d.value,
            d.reason
        )
    };
    migration.decisions.iter().for_each(step);
    // The switch to post-copy (or a preset's abort) is a step of the policy's, not a
    // parameter the VMM records.
    r.policy_steps
        .iter()
        .flatten()
        .filter(|d| matches!(d.setting.as_str(), "postcopy" | "abort"))
        .for_each(step);
    if let Some(p) = &r.prediction
        && let Some(total) = p.predicted_total_ms
    {
        println!(
            "  predicted total {:.1} s, measured {:.1} s; predicted downtime {:.0} ms, measured {:.1} ms",
            total / 1e3,
            migration.core.total_ms / 1e3,
            p.predicted_downtime_ms.unwrap_or(f64::NAN),
            migration.downtime_ms.unwrap_or(f64::NAN)
        );
    }
    // What the probes saw of the guest while it moved (logging was on throughout).
    if let Some(e) = &r.probe_signals_error {
        println!("  no eBPF signals during the migration: {e}");
    }
    if !r.probe_signals.is_empty() {
        println!("  the guest during the migration, from the eBPF probes (every 250 ms):");
    }
    // Once the guest runs on the destination (post-copy), the source sees nothing.
    for s in r
        .probe_signals
        .iter()
        .take_while(|s| s.exits_per_sec > 0.0)
        .take(16)
    {
        println!(
            "    {:>6.2}s  dirty {:>7} pages/s [{}]  working set {:>6}  exits {:>5.0}/s  disk w {:>8.0} B/s",
            s.at_ms / 1e3,
            s.dirty_pages_per_sec
                .map_or("-".into(), |d| format!("{d:.0}")),
            s.dirty_source.as_deref().unwrap_or("-"),
            s.working_set_pages.map_or("-".into(), |n| n.to_string()),
            s.exits_per_sec,
            s.disk_write_bytes_per_sec,
        );
    }
    Ok(dst)
}

pub fn run() -> Result<()> {
    let ferry = build_ferry()?;
    let dir = work_dir("lab")?;
    let config = dir.join("lab1.toml");
    std::fs::write(&config, LAB_CONFIG)?;

    step(&format!("starting lab VM lab1 ({})", config.display()));
    println!("{LAB_CONFIG}");
    let mut vm = Vmm::spawn(
        &ferry,
        &["--config", config.to_str().unwrap_or_default()],
        &dir.join("lab1.sock"),
        &dir.join("lab1.log"),
    )?;
    vm.wait_ready(&ferry)?;
    watch(&ferry, &vm, "lab1", 4.0)?;

    step("snapshot (pause, copy memory, state, config and disks, resume)");
    let snap = dir.join("snapshot");
    let report = snapshot(&ferry, &vm.control, &snap)?;
    println!(
        "  written to {}: VM paused {:.1} ms (state saved in {:.2} ms), {:.0} MiB memory written sparse, {:.0} KiB disk data",
        snap.display(),
        report.pause_ms,
        report.state_save_ms,
        report.memory_bytes_written as f64 / 1048576.0,
        report.disk_bytes_copied as f64 / 1024.0
    );
    println!(
        "  guest counters at the snapshot: heartbeats={} pages={} disk writes={}",
        report.heartbeats, report.guest_pages_written, report.disk_writes
    );
    watch(&ferry, &vm, "lab1", 1.5)?;

    step("stopping lab1 and restoring the snapshot in a new ferry vmm process");
    vm.quit(&ferry)?;
    let mut restored = Vmm::spawn(
        &ferry,
        &["--restore", snap.to_str().unwrap_or_default()],
        &dir.join("lab1-restored.sock"),
        &dir.join("lab1-restored.log"),
    )?;
    let first = vm_of(restored.wait_ready(&ferry)?)?;
    show("restored", &first);
    watch(&ferry, &restored, "restored", 3.0)?;

    step("the guest's live signals from the eBPF probes (ferry signals), beside its own figures");
    let out = std::process::Command::new(&ferry)
        .args(["signals", "--duration-secs", "3", "--control"])
        .arg(&restored.control)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        println!(
            "  the probes could not run: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    show("restored", &vm_status(&ferry, &restored.control)?);

    step("live migration (pre-copy, lz4) to a third ferry vmm over loopback TCP");
    // Shared storage: the destination finds the disk by name in the folder it is given.
    let disks = dir.join("disks").to_string_lossy().into_owned();
    let dst = migrate_to(
        &ferry,
        &dir,
        &restored,
        ("lab1-dst", &["--shared-dir", &disks]),
        &["--compression", "lz4", "--max-downtime-ms", "50"],
    )?;
    watch(&ferry, &dst, "dest", 2.0)?;

    step("verify on the destination: the guest re-checks every page and disk block it wrote");
    print!("{}", ctl(&ferry, &["verify"], &dst.control)?);
    restored.quit(&ferry)?;

    step("storage migration: the lab VM's disk moves to a second datastore while the guest writes");
    let ds2 = dir.join("datastore2");
    let _ = std::fs::remove_dir_all(&ds2);
    std::fs::create_dir_all(&ds2)?;
    let moved = std::process::Command::new(&ferry)
        .args(["storage-migrate", "--control"])
        .arg(&dst.control)
        .arg("--to")
        .arg(&ds2)
        .status()?;
    if !moved.success() {
        anyhow::bail!("the storage migration failed");
    }
    watch(&ferry, &dst, "dest", 1.0)?;

    step(
        "migration with --copy-storage: memory and disks to a datastore the source does not share",
    );
    let ds3 = dir.join("datastore3");
    let _ = std::fs::remove_dir_all(&ds3);
    std::fs::create_dir_all(&ds3)?;
    let ds3_arg = ds3.to_string_lossy().into_owned();
    let copied = migrate_to(
        &ferry,
        &dir,
        &dst,
        ("lab1-copied", &["--datastore", &ds3_arg]),
        &["--copy-storage", "--max-downtime-ms", "50"],
    )?;
    watch(&ferry, &copied, "dest", 1.0)?;
    dst.quit(&ferry)?;
    let dst = copied;

    // The copies and their config are in DATASTORE/<vm name>/.
    let copies = ds3.join("lab1").to_string_lossy().into_owned();
    step("the adaptive policy's plan for a 200 Mbit/s link, post-copy allowed (ferry plan)");
    print!(
        "{}",
        ctl(
            &ferry,
            &["plan", "--bandwidth-mbit", "200", "--allow-postcopy"],
            &dst.control
        )?
    );

    step(
        "the same migration, adaptive: the guest dirties 80 MB/s, more than the link carries; \
         the policy decides between throttling and post-copy while it runs",
    );
    let last = migrate_to(
        &ferry,
        &dir,
        &dst,
        ("lab1-adaptive", &["--shared-dir", &copies]),
        &["--bandwidth-mbit", "200", "--allow-postcopy"],
    )?;
    watch(&ferry, &last, "dest", 2.0)?;
    print!("{}", ctl(&ferry, &["verify"], &last.control)?);
    dst.quit(&ferry)?;
    last.quit(&ferry)?;

    step(
        "disk-check: every block the guest was told was written is in the images its config names",
    );
    let checked = std::process::Command::new(&ferry)
        .arg("disk-check")
        .arg("--config")
        .arg(ds3.join("lab1/lab1.toml"))
        .status()?;
    if !checked.success() {
        anyhow::bail!("disk-check found errors");
    }
    step(&format!("lab done; logs and files in {}", dir.display()));
    Ok(())
}
