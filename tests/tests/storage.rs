//! Storage migration on one host: real image files, a real `ferry vmm` whose guest
//! keeps writing self-checking blocks while its disks move.

use std::time::Duration;

use ferry_api::{Outcome, RunState, StorageMode, StorageReport};
use ferry_tests::{
    Printed, TempDir, Vmm, alongside, ferry, missing, require_kvm, require_root, u64_of,
    write_config,
};
use serde_json::Value;

fn config(name: &str, disk_writes: u64) -> String {
    format!(
        r#"memory_mib = 64
vcpus = 2
[workload]
working_set_mib = 16
dirty_pages_per_sec = 2000
pattern = "random"
content = "mixed"
[workload.disk]
write_ops_per_sec = {disk_writes}
[[disks]]
id = "root"
path = "ds1/{name}-root.img"
size_mib = 32
cache = "none"
[[disks]]
id = "data"
path = "ds1/{name}-data.img"
size_mib = 16
"#
    )
}

fn storage_migrate(
    vm: &Vmm,
    to: &std::path::Path,
    extra: &[&str],
) -> (bool, Printed<StorageReport>) {
    let mut args = vec![
        "storage-migrate",
        "--control",
        vm.ctl(),
        "--to",
        to.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    ferry_tests::report_of(&args, || format!("VMM log: {}", vm.log_text()))
}

fn config_paths(cfg: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(cfg)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("path = "))
        .map(|p| p.trim_matches('"').to_owned())
        .collect()
}

/// `ferry disk-check` on a stopped VM's config: every block whole, none older than
/// acknowledged, and the guest had written some.
fn disk_check_passes(cfg: &std::path::Path) -> Value {
    let out = ferry(&["disk-check", "--config", cfg.to_str().unwrap(), "--json"]);
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no report: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{r}");
    assert_eq!(u64_of(&r, "errors"), 0, "{r}");
    assert!(u64_of(&r, "acknowledged_writes") > 0, "{r}");
    r
}

/// Starts the VM again from `cfg` (as `name`): it runs and its disks are intact.
fn starts_again_intact(dir: &TempDir, name: &str, cfg: &std::path::Path) {
    let again = Vmm::spawn(dir.path(), name, &["--config", cfg.to_str().unwrap()]);
    still_running_and_intact(&again);
    again.quit();
}

fn still_running_and_intact(vm: &Vmm) {
    let s0 = vm.vm_status();
    let s1 = vm.wait_for("the guest running on", Duration::from_secs(30), |s| {
        s.machine.heartbeats > s0.machine.heartbeats + 200
            && s.machine.disk_writes > s0.machine.disk_writes
    });
    assert_eq!(s1.machine.disk_integrity_errors, 0, "{s1}");
    let v = vm.verify();
    assert_eq!(v.memory_errors, 0, "{v}");
    assert_eq!(v.disk_errors, 0, "{v}");
    assert!(v.blocks_checked > 0, "{v}");
}

#[test]
fn disks_move_in_every_mode_while_the_guest_writes_and_the_config_follows() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("storage");
    // A slow writer in background mode, fast writers in active and auto mode.
    for (i, (mode, writes)) in [("background", 200), ("active", 2000), ("auto", 2000)]
        .into_iter()
        .enumerate()
    {
        let name = format!("s{i}");
        let cfg = write_config(dir.path(), &name, &config(&name, writes));
        let vm = Vmm::spawn(dir.path(), &name, &["--config", cfg.to_str().unwrap()]);
        vm.wait_for("disk writes", Duration::from_secs(30), |s| {
            s.machine.disk_writes > 300
        });
        let ds2 = dir.join(format!("ds2-{name}"));
        std::fs::create_dir_all(&ds2).unwrap();
        let remove = i == 1;
        let mut extra = vec!["--mode", mode];
        if remove {
            extra.push("--remove-source");
        }
        // The fast writer in auto mode is also held back while its disks move.
        let throttled = mode == "auto";
        if throttled {
            extra.extend(["--throttle-writes-mbps", "1"]);
        }
        let (ok, report) = storage_migrate(&vm, &ds2, &extra);
        assert!(ok, "{mode}: {report}");
        assert_eq!(report.disk_verified, Some(true), "{report}");
        assert_eq!(report.disk_integrity_errors, 0, "{report}");
        assert!(report.disk_bytes_copied > 0, "{report}");
        if mode == "active" {
            assert!(
                report.guest_write_latency_added_us_p99.is_some(),
                "{report}"
            );
        }
        // Only the throttle delays a write, and under it the guest writes no faster
        // than its 1 MB/s (the disks move one after the other, each bucket starts
        // empty, and each of the two vCPUs may overdraw one by a 4 KiB write).
        // Unheld it asks for 8 MB/s; whether a copy this short sees many of those
        // writes is up to the host's scheduler, so no lower bound.
        let delayed = report.guest_writes_delayed_ms;
        if !throttled {
            assert_eq!(delayed, 0.0, "{report}");
        } else {
            let secs = report.core.total_ms / 1e3;
            let wrote = report.guest_bytes_written as f64;
            assert!(wrote <= 1e6 * secs + 4.0 * 4096.0, "{report}");
        }
        if mode == "auto" {
            // Held to 1 MB/s, the guest writes far slower than the copy: auto
            // measures that, stays in background mode and says why.
            assert_eq!(report.disk_mode, StorageMode::Background, "{report}");
            assert_eq!(report.disks.len(), 2, "{report}");
            for d in &report.disks {
                let why = d.mode_reason.as_deref().unwrap_or("");
                assert!(why.contains("MB/s") && why.contains("converge"), "{report}");
            }
        } else {
            assert_eq!(report.disk_mode.as_str(), mode, "{report}");
        }
        // The config names the new images, by absolute path.
        let paths = config_paths(&cfg);
        let ds2 = ds2.canonicalize().unwrap();
        assert_eq!(paths.len(), 2);
        for p in &paths {
            assert!(p.starts_with(ds2.to_str().unwrap()), "{p}");
            assert!(std::path::Path::new(p).exists(), "{p}");
        }
        let old = dir.join(format!("ds1/{name}-root.img"));
        assert_eq!(old.exists(), !remove, "{}", old.display());
        // The guest never stopped and finds every block it wrote.
        still_running_and_intact(&vm);
        // And the VM starts again from the rewritten config, disks intact.
        vm.quit();
        disk_check_passes(&cfg);
        starts_again_intact(&dir, &format!("{name}-again"), &cfg);
    }
}

#[test]
fn bad_destinations_are_refused_and_change_nothing() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("storage-bad");
    let cfg = write_config(dir.path(), "b", &config("b", 200));
    let vm = Vmm::spawn(dir.path(), "b", &["--config", cfg.to_str().unwrap()]);
    let before = std::fs::read_to_string(&cfg).unwrap();
    let refused = |args: &[&str], want: &str| {
        let mut all = vec!["storage-migrate", "--control", vm.ctl()];
        all.extend_from_slice(args);
        let out = ferry(&all);
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{args:?} was accepted: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
    };
    let missing = dir.join("nowhere");
    refused(&["--to", missing.to_str().unwrap()], "not a folder");
    let ds1 = dir.join("ds1");
    refused(&["--to", ds1.to_str().unwrap()], "already in");
    let ds2 = dir.join("ds2");
    std::fs::create_dir_all(&ds2).unwrap();
    refused(
        &["--to", ds2.to_str().unwrap(), "--disk", "nope"],
        "no disk \"nope\"",
    );
    refused(
        &["--to", ds2.to_str().unwrap(), "--mode", "fast"],
        "unknown storage migration mode",
    );
    // An image of the same name already there is never overwritten.
    std::fs::write(ds2.join("b-root.img"), b"keep me").unwrap();
    refused(&["--to", ds2.to_str().unwrap()], "never overwrites");
    assert_eq!(std::fs::read(ds2.join("b-root.img")).unwrap(), b"keep me");
    assert!(!ds2.join("b-data.img").exists());
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before);
    still_running_and_intact(&vm);
    vm.quit();
}

#[test]
fn a_crash_at_any_step_leaves_a_config_naming_complete_images() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("storage-crash");
    for (i, point) in [
        "storage.copying",
        "storage.config-rewrite",
        "storage.after-config",
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("c{i}");
        let cfg = write_config(dir.path(), &name, &config(&name, 500));
        let vm = Vmm::spawn_with_env(
            dir.path(),
            &name,
            &["--config", cfg.to_str().unwrap()],
            &[("FERRY_FAILPOINTS", &format!("{point}=crash"))],
        );
        vm.wait_for("disk writes", Duration::from_secs(30), |s| {
            s.machine.disk_writes > 300
        });
        let ds2 = dir.join(format!("ds2-{name}"));
        std::fs::create_dir_all(&ds2).unwrap();
        let out = ferry(&[
            "storage-migrate",
            "--control",
            vm.ctl(),
            "--to",
            ds2.to_str().unwrap(),
            "--json",
        ]);
        assert!(!out.status.success(), "{point}: the VMM did not crash");
        let mut vm = vm;
        assert!(!vm.child.wait().unwrap().success(), "{point}");
        // The config parses and names whole images; where it names the new copy, the
        // copy equals the old image the VM had been using up to the (paused) crash.
        let paths = config_paths(&cfg);
        assert_eq!(paths.len(), 2, "{point}: {paths:?}");
        let moved = paths.iter().any(|p| p.contains("ds2-"));
        assert_eq!(moved, point == "storage.after-config", "{point}: {paths:?}");
        for p in &paths {
            // Relative paths are taken from the config's folder.
            let len = std::fs::metadata(dir.join(p)).unwrap().len();
            assert!(len == 32 << 20 || len == 16 << 20, "{p}: {len}");
        }
        if moved {
            let new = std::fs::read(&paths[0]).unwrap();
            let old = std::fs::read(dir.join(format!("ds1/{name}-root.img"))).unwrap();
            assert!(
                new == old,
                "{point}: the copy the config names is not the image"
            );
        }
        // Every acknowledged write is in the images it names.
        disk_check_passes(&cfg);
        // And the VM starts again from it.
        starts_again_intact(&dir, &format!("{name}-again"), &cfg);
    }
}

#[test]
fn a_full_datastore_is_a_clear_error_and_leaves_nothing_behind() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    if !require_root("mounting a small tmpfs as the full datastore needs it") {
        return;
    }
    let dir = TempDir::new("storage-full");
    let full = dir.join("full");
    std::fs::create_dir_all(&full).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&full)
        .output()
        .expect("mount (util-linux)");
    if !mounted.status.success() {
        let why = String::from_utf8_lossy(&mounted.stderr);
        missing(
            "tmpfs mounts",
            &format!(
                "mount -t tmpfs failed ({}); the kernel needs CONFIG_TMPFS",
                why.trim()
            ),
        );
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(full.clone());
    let cfg = write_config(dir.path(), "f", &config("f", 2000));
    let vm = Vmm::spawn(dir.path(), "f", &["--config", cfg.to_str().unwrap()]);
    vm.wait_for("disk writes", Duration::from_secs(30), |s| {
        s.machine.disk_writes > 2000
    });
    let before = std::fs::read_to_string(&cfg).unwrap();
    let (ok, report) = storage_migrate(&vm, &full, &[]);
    assert!(!ok, "{report}");
    assert_eq!(report.core.outcome, Outcome::Failed, "{report}");
    assert!(
        report
            .core
            .error
            .as_deref()
            .unwrap_or("")
            .contains("No space left"),
        "{report}"
    );
    // The partial copy is gone, the config untouched, the VM on its images.
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 0);
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before);
    still_running_and_intact(&vm);
    vm.quit();
}

#[test]
fn copy_storage_moves_memory_and_disks_to_a_host_without_shared_storage() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("copy-storage");
    let cfg = write_config(dir.path(), "cs", &config("cs", 1000));
    let src = Vmm::spawn(dir.path(), "cs", &["--config", cfg.to_str().unwrap()]);
    src.wait_for("disk writes", Duration::from_secs(30), |s| {
        s.machine.disk_writes > 500
    });
    // A destination without a datastore cannot take disks: refused, nothing moves.
    let (plain, addr) = ferry_tests::incoming(dir.path(), "cs-plain");
    let (ok, report) = ferry_tests::migrate(&src, &addr, &["--copy-storage"]);
    assert!(!ok, "{report}");
    assert!(
        report
            .core
            .error
            .as_deref()
            .unwrap_or("")
            .contains("--datastore"),
        "{report}"
    );
    drop(plain);
    assert_eq!(src.vm_status().machine.state, RunState::Running);

    let store = dir.join("dsB");
    std::fs::create_dir_all(&store).unwrap();
    let addr = format!("127.0.0.1:{}", ferry_tests::free_port());
    let dst = Vmm::spawn(
        dir.path(),
        "cs-dst",
        &["--incoming", &addr, "--datastore", store.to_str().unwrap()],
    );
    // Disk blocks travel compressed like pages, zero runs as their length.
    let (ok, report) =
        ferry_tests::migrate(&src, &addr, &["--copy-storage", "--compression", "zstd:1"]);
    assert!(ok, "{report}");
    assert!(report.disk_bytes_copied.is_some_and(|b| b > 0), "{report}");
    // Memory verified, the guest runs there and finds every page and block it wrote
    // (its disks are the copies now).
    ferry_tests::check_arrived(&src, &dst, &report, true);
    let cfg_b = store.join("cs/cs.toml");
    let paths = config_paths(&cfg_b);
    assert_eq!(paths.len(), 2, "{paths:?}");
    for p in &paths {
        assert!(p.starts_with(store.to_str().unwrap()), "{p}");
    }
    // The source's images stay where they were.
    assert!(dir.join("ds1/cs-root.img").exists());
    src.quit();
    // The destination's VM starts again from the config it wrote, and its copies
    // hold every write acknowledged on either host (the log came along).
    dst.quit();
    let r = disk_check_passes(&cfg_b);
    assert!(u64_of(&r, "blocks_written") > 0, "{r}");
    let offsets = |log: std::path::PathBuf| -> std::collections::BTreeSet<u64> {
        std::fs::read(&log)
            .unwrap()
            .chunks_exact(16)
            .map(|r| u64::from_le_bytes(r[..8].try_into().unwrap()))
            .collect()
    };
    let at_source = offsets(dir.join("ds1/cs-root.img.wlog"));
    let here = offsets(store.join("cs/cs-root.img.wlog"));
    assert!(!at_source.is_empty());
    assert!(
        at_source.is_subset(&here),
        "the source's acknowledged writes did not come along"
    );
    starts_again_intact(&dir, "cs-again", &cfg_b);
}

#[test]
fn disk_check_finds_a_lost_write_and_a_torn_block() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("disk-check");
    let cfg = write_config(dir.path(), "k", &config("k", 1000));
    let vm = Vmm::spawn(dir.path(), "k", &["--config", cfg.to_str().unwrap()]);
    vm.wait_for("disk writes", Duration::from_secs(30), |s| {
        s.machine.disk_writes > 500
    });
    vm.quit();
    disk_check_passes(&cfg);
    // The log says which blocks were acknowledged; damage two of them.
    let image = dir.join("ds1/k-root.img");
    let log = std::fs::read(dir.join("ds1/k-root.img.wlog")).unwrap();
    let offsets: Vec<u64> = log
        .chunks_exact(16)
        .map(|r| u64::from_le_bytes(r[..8].try_into().unwrap()))
        .collect();
    let lost = offsets[0];
    let torn = *offsets.iter().find(|&&o| o != lost).unwrap();
    let mut data = std::fs::read(&image).unwrap();
    data[lost as usize..lost as usize + 4096].fill(0);
    data[torn as usize + 100] ^= 0xff;
    std::fs::write(&image, &data).unwrap();
    let out = ferry(&["disk-check", "--config", cfg.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u64_of(&r, "errors"), 2, "{r}");
    let text = r["problems"].to_string();
    assert!(
        text.contains("never written") && text.contains("checksum"),
        "{r}"
    );
}

#[test]
fn an_active_disk_mirror_paces_a_guest_the_link_cannot_keep_up_with_and_the_disks_arrive_whole() {
    if !require_kvm() {
        return;
    }
    let link_mbit = 100;
    let Some(link) = ferry_tests::require_link("mir", Some(link_mbit)) else {
        return;
    };
    // Its premise, disk writes out-running the link, needs the host to keep up.
    let _host = ferry_tests::exclusive();
    let dir = TempDir::new("mirror");
    // 197 MB/s of incompressible disk writes (3000 a second, 64 KiB each, at random
    // over 64 MiB) against a 100 Mbit/s link, 16x what it carries: rounds of written
    // blocks could never shrink, and nothing caps the writes here but the mirror.
    let block = 64.0 * 1024.0;
    let cfg = write_config(
        dir.path(),
        "mi",
        "memory_mib = 128\nvcpus = 1\n[workload]\nworking_set_mib = 16\n\
         dirty_pages_per_sec = 200\npattern = \"random\"\ncontent = \"random\"\n\
         [workload.disk]\nwrite_ops_per_sec = 3000\nblock_kib = 64\n\
         [[disks]]\nid = \"data\"\npath = \"ds1/mi-data.img\"\nsize_mib = 64\n",
    );
    let src = Vmm::spawn_in(
        &link.source_ns,
        dir.path(),
        "mi",
        &["--config", cfg.to_str().unwrap()],
    );
    src.wait_for("disk writes", Duration::from_secs(30), |s| {
        s.machine.disk_writes > 1000
    });
    let before = src.vm_status().typed.machine;
    std::thread::sleep(Duration::from_secs(2));
    let after = src.vm_status().typed.machine;
    let writes_per_sec = (after.disk_writes - before.disk_writes) as f64 * 1e3
        / (after.uptime_ms - before.uptime_ms) as f64;
    let store = dir.join("dsB");
    std::fs::create_dir_all(&store).unwrap();
    let addr = format!(
        "{}:{}",
        ferry_tests::netns::DEST_ADDR,
        ferry_tests::free_port()
    );
    let dst = Vmm::spawn_in(
        &link.dest_ns,
        dir.path(),
        "mi-dst",
        &["--incoming", &addr, "--datastore", store.to_str().unwrap()],
    );
    let (ok, report) = ferry_tests::migrate(
        &src,
        &addr,
        &[
            "--copy-storage",
            "--policy",
            "static",
            "--disk-mirror",
            "active",
            "--max-total-secs",
            "120",
        ],
    );
    ferry_tests::assert_outruns(
        "the guest wrote its disk",
        &format!("({writes_per_sec:.0} writes/s of 64 KiB) before the migration"),
        writes_per_sec * block,
        link_mbit as f64,
    );
    assert!(ok, "{report}");
    let mirror = report.decisions_on("disk_mirror");
    assert!(
        mirror.len() == 1 && mirror[0].value == "active",
        "the mirror was not on from the start: {report}"
    );
    let mirrored = report
        .disk_bytes_mirrored
        .unwrap_or_else(|| panic!("no disk_bytes_mirrored: {report}"));
    assert!(mirrored > 0, "no guest write was mirrored: {report}");
    // The link paced the guest: what it wrote while its disks travelled is what the
    // link carried (the socket buffers' worth beyond it), not the 16x it wanted.
    let secs = report.core.total_ms / 1e3;
    let link_bytes = f64::from(link_mbit) * 1e6 / 8.0;
    assert!(
        (mirrored as f64) < link_bytes * secs + (8 << 20) as f64,
        "{mirrored} bytes mirrored in {secs:.1} s, more than a {link_mbit} Mbit/s link \
         carries: {report}"
    );
    eprintln!(
        "{:.1} MB mirrored in {secs:.1} s ({:.1} MB/s on a {:.1} MB/s link); downtime {:.1} ms",
        mirrored as f64 / 1e6,
        mirrored as f64 / 1e6 / secs,
        link_bytes / 1e6,
        report
            .downtime_ms
            .unwrap_or_else(|| panic!("no downtime_ms: {report}"))
    );
    // Every block the guest acknowledged is on the destination's copy, whichever of the
    // first copy and a mirrored write reached it last.
    ferry_tests::check_arrived(&src, &dst, &report, true);
    src.quit();
    dst.quit();
}
