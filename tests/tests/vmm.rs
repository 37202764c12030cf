//! `ferry vmm` end to end: lab guests on real KVM in real processes.

use std::time::Duration;

use ferry_api::{DirtySample, RunState, SnapshotReport};
use ferry_tests::{Printed, TempDir, Vmm, crc32, ferry, require_kvm, write_config};

const PATTERNS: [&str; 4] = ["sequential", "random", "hotcold", "idle"];
const CONTENTS: [&str; 4] = ["zero", "text", "random", "mixed"];

fn workload_config(vcpus: u32, pattern: &str, content: &str) -> String {
    format!(
        r#"memory_mib = 64
vcpus = {vcpus}
[workload]
working_set_mib = 16
dirty_pages_per_sec = 4000
pattern = "{pattern}"
content = "{content}"
verify_interval_ms = 50
fill = true
"#
    )
}

/// Runs a VM until it has written past its fill and verifies it from inside.
fn check_runs_and_verifies(dir: &TempDir, name: &str, body: &str) {
    let cfg = write_config(dir.path(), name, body);
    let vm = Vmm::spawn(dir.path(), name, &["--config", cfg.to_str().unwrap()]);
    let first = vm.wait_for("heartbeats", Duration::from_secs(30), |s| {
        s.machine.heartbeats > 200
    });
    let later = vm.wait_for("more heartbeats", Duration::from_secs(30), |s| {
        s.machine.heartbeats > first.machine.heartbeats + 200
    });
    assert_eq!(later.machine.state, RunState::Running, "{later}");
    assert_eq!(later.machine.guest_integrity_errors, 0, "{later}");
    // 16 MiB of fill is 4096 pages.
    assert!(later.machine.guest_pages_written >= 4096, "{later}");
    let report = vm.verify();
    assert_eq!(report.memory_errors, 0, "{name}: {report}");
    assert_eq!(report.pages_checked, 4096, "{name}: {report}");
    let after = vm.vm_status();
    assert!(after.machine.heartbeats > later.machine.heartbeats);
    assert!(after.machine.max_heartbeat_gap_ms > 0.0);
    vm.quit();
}

fn every_workload(vcpus: u32) {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("workloads");
    for pattern in PATTERNS {
        for content in CONTENTS {
            let name = format!("w{vcpus}-{pattern}-{content}");
            check_runs_and_verifies(&dir, &name, &workload_config(vcpus, pattern, content));
        }
    }
}

#[test]
fn every_pattern_and_content_runs_and_verifies_1_vcpu() {
    every_workload(1);
}

#[test]
fn every_pattern_and_content_runs_and_verifies_2_vcpus() {
    every_workload(2);
}

fn dirty_rate_matches_guest(mode: &str) {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("dirty");
    let cfg = write_config(
        dir.path(),
        "d",
        &format!(
            r#"memory_mib = 128
vcpus = 1
dirty_tracking = "{mode}"
[workload]
working_set_mib = 64
dirty_pages_per_sec = 5000
pattern = "sequential"
fill = false
"#
        ),
    );
    let vm = Vmm::spawn(dir.path(), "d", &["--config", cfg.to_str().unwrap()]);
    vm.wait_for("pages written", Duration::from_secs(30), |s| {
        s.machine.guest_pages_written > 2000
    });
    for _ in 0..2 {
        let out = ferry(&[
            "dirty-rate",
            "--control",
            vm.ctl(),
            "--duration-ms",
            "1000",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = Printed::<DirtySample>::new(
            "the dirty sample",
            serde_json::from_slice(&out.stdout).unwrap(),
        );
        let harvested = r.dirty_pages_in_working_set as f64;
        let written = r.guest_pages_written as f64;
        assert!(written > 4000.0, "{r}");
        let err = (harvested - written).abs() / written;
        assert!(
            err <= 0.05,
            "{mode}: harvested {harvested} vs guest {written} ({r})"
        );
    }
    vm.quit();
}

#[test]
fn dirty_bitmap_matches_guest_writes() {
    dirty_rate_matches_guest("bitmap");
}

#[test]
fn dirty_ring_matches_guest_writes() {
    dirty_rate_matches_guest("ring");
}

#[test]
fn snapshot_restore_continues_with_memory_and_disks_intact() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("snap");
    let cfg = write_config(
        dir.path(),
        "s",
        r#"memory_mib = 96
vcpus = 2
[workload]
working_set_mib = 32
dirty_pages_per_sec = 5000
pattern = "random"
content = "mixed"
[workload.disk]
write_ops_per_sec = 400
block_kib = 4
[[disks]]
id = "root"
path = "disks/s-root.img"
size_mib = 16
cache = "none"
"#,
    );
    let vm = Vmm::spawn(dir.path(), "s", &["--config", cfg.to_str().unwrap()]);
    vm.wait_for("disk writes", Duration::from_secs(30), |s| {
        s.machine.disk_writes > 200 && s.machine.disk_reads > 20
    });
    let snap = dir.join("snap1");
    let out = ferry(&[
        "snapshot",
        "--control",
        vm.ctl(),
        "--out",
        snap.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: SnapshotReport = serde_json::from_slice(&out.stdout).unwrap();
    let snap_hb = report.heartbeats;
    let snap_pages = report.guest_pages_written;
    let snap_disk = report.disk_writes;
    // The VM keeps running and writing after the snapshot...
    let moved_on = vm.wait_for("progress after snapshot", Duration::from_secs(30), |s| {
        s.machine.disk_writes > snap_disk + 200 && s.machine.heartbeats > snap_hb + 500
    });
    assert_eq!(moved_on.machine.disk_integrity_errors, 0);
    // ...then dies without warning.
    vm.kill();

    let restored = Vmm::spawn(dir.path(), "r", &["--restore", snap.to_str().unwrap()]);
    let s0 = restored.vm_status();
    // Counters continue from the snapshot's values, not from the later ones.
    assert!(s0.machine.heartbeats >= snap_hb, "{s0}");
    assert!(s0.machine.heartbeats < moved_on.machine.heartbeats, "{s0}");
    assert!(s0.machine.guest_pages_written >= snap_pages, "{s0}");
    let s1 = restored.wait_for("guest continuing", Duration::from_secs(30), |s| {
        s.machine.heartbeats > s0.machine.heartbeats + 500
            && s.machine.disk_writes > s0.machine.disk_writes + 100
    });
    assert!(s1.machine.guest_pages_written > s0.machine.guest_pages_written);
    let v = restored.verify();
    assert_eq!(v.memory_errors, 0, "{v}");
    assert_eq!(v.disk_errors, 0, "{v}");
    assert!(v.blocks_checked > 100, "{v}");
    assert_eq!(restored.vm_status().machine.disk_integrity_errors, 0);

    // The restored VM holds its images: restoring the same snapshot over them again is
    // refused; into another folder it works, and the snapshot is unchanged by both.
    let e = vmm_error(&dir, &["--restore", snap.to_str().unwrap()]);
    assert!(e.contains("in use by another VM"), "{e}");
    let elsewhere = dir.join("second");
    let second = Vmm::spawn(
        dir.path(),
        "r2",
        &[
            "--restore",
            snap.to_str().unwrap(),
            "--disk-dir",
            elsewhere.to_str().unwrap(),
        ],
    );
    assert!(elsewhere.join("root.img").exists());
    let s2 = second.vm_status();
    assert!(
        s2.machine.heartbeats >= snap_hb && s2.machine.heartbeats < snap_hb + 500,
        "{s2}"
    );
    second.wait_for("second copy running", Duration::from_secs(30), |s| {
        s.machine.disk_writes > snap_disk + 100
    });
    let v2 = second.verify();
    assert_eq!(v2.disk_errors, 0, "{v2}");
    second.quit();
    restored.quit();
}

/// A small running VM and a snapshot of it (in `dir/snap`).
fn small_vm_with_snapshot(dir: &TempDir, name: &str) -> (Vmm, std::path::PathBuf) {
    let cfg = write_config(
        dir.path(),
        name,
        "memory_mib = 32\n[workload]\nworking_set_mib = 8\ndirty_pages_per_sec = 1000\n",
    );
    let vm = Vmm::spawn(dir.path(), name, &["--config", cfg.to_str().unwrap()]);
    vm.wait_for("heartbeats", Duration::from_secs(30), |s| {
        s.machine.heartbeats > 50
    });
    let snap = dir.join("snap");
    let out = ferry(&[
        "snapshot",
        "--control",
        vm.ctl(),
        "--out",
        snap.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (vm, snap)
}

/// Runs `ferry vmm` expecting it to fail at once; returns its one-line error.
fn vmm_error(dir: &TempDir, args: &[&str]) -> String {
    let ctl = dir.join("bad.sock");
    let mut full = vec!["vmm"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--control", ctl.to_str().unwrap()]);
    let out = ferry(&full);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!ctl.exists(), "control socket left behind");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let last = err.lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("ferry: "), "{err}");
    last
}

#[test]
fn bad_configs_get_one_line_errors_and_leave_nothing() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("bad");
    let missing = dir.join("nope.toml");
    let e = vmm_error(&dir, &["--config", missing.to_str().unwrap()]);
    assert!(e.contains("nope.toml") && e.contains("No such file"), "{e}");

    let cases = [
        (
            "malformed",
            "memory_mib = [\n",
            "expected `]` (line 3, column 1)",
        ),
        (
            "unknown",
            "memory_mib = 64\nmemroy_mib = 3\n",
            "unknown field `memroy_mib`",
        ),
        ("huge", "memory_mib = 100000000\n", "memory_mib = 100000000"),
        (
            "toosmall",
            "memory_mib = 64\n[workload]\nworking_set_mib = 63\n",
            "does not fit",
        ),
        (
            "unwritable",
            "memory_mib = 64\n[[disks]]\nid = \"a\"\npath = \"a.img\"\nsize_mib = 1\n[[disks]]\nid = \"b\"\npath = \"/etc/hostname/b.img\"\nsize_mib = 1\n",
            "disk \"b\"",
        ),
    ];
    for (name, body, needle) in cases {
        let cfg = write_config(dir.path(), name, body);
        let e = vmm_error(&dir, &["--config", cfg.to_str().unwrap()]);
        assert!(e.contains(needle), "{name}: {e}");
    }
    // The first disk of the failed VM was created and removed again.
    assert!(!dir.join("a.img").exists());
}

#[test]
fn corrupt_or_foreign_snapshots_are_refused() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("badsnap");
    let (vm, snap) = small_vm_with_snapshot(&dir, "c");
    // A second snapshot into the same folder is refused and changes nothing.
    let out = ferry(&[
        "snapshot",
        "--control",
        vm.ctl(),
        "--out",
        snap.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    vm.quit();

    let copy = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(d.join("disks")).unwrap();
        for f in ["manifest.json", "config.toml", "state.bin", "memory.bin"] {
            std::fs::copy(snap.join(f), d.join(f)).unwrap();
        }
        d
    };
    let flip = |path: std::path::PathBuf, at: usize| {
        let mut b = std::fs::read(&path).unwrap();
        let i = at.min(b.len() - 1);
        b[i] ^= 0x40;
        std::fs::write(&path, b).unwrap();
    };

    let d = copy("mem");
    // A byte inside the guest's code page, which is never zero.
    flip(d.join("memory.bin"), 0x10010);
    let e = vmm_error(&dir, &["--restore", d.to_str().unwrap()]);
    assert!(e.contains("memory.bin is corrupted"), "{e}");

    let d = copy("state");
    flip(d.join("state.bin"), 40);
    let e = vmm_error(&dir, &["--restore", d.to_str().unwrap()]);
    assert!(e.contains("state.bin") && e.contains("checksum"), "{e}");

    let d = copy("version");
    let m = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    std::fs::write(
        d.join("manifest.json"),
        m.replace("\"version\": 1", "\"version\": 99"),
    )
    .unwrap();
    let e = vmm_error(&dir, &["--restore", d.to_str().unwrap()]);
    assert!(e.contains("version 99 is not supported"), "{e}");

    let e = vmm_error(&dir, &["--restore", dir.path().to_str().unwrap()]);
    assert!(e.contains("is not a Ferry snapshot"), "{e}");
}

#[test]
fn guest_crash_is_reported_not_hung() {
    if !require_kvm() {
        return;
    }
    // A snapshot whose guest program was overwritten with invalid opcodes faults at
    // once on restore; with no IDT that is a triple fault.
    let dir = TempDir::new("crash");
    let (vm, snap) = small_vm_with_snapshot(&dir, "k");
    vm.quit();
    // Fill the guest program with 0xff (an invalid opcode) in memory.bin.
    let mem = snap.join("memory.bin");
    let mut b = std::fs::read(&mem).unwrap();
    b[0x10000..0x20000].fill(0xff);
    std::fs::write(&mem, &b).unwrap();
    let manifest = snap.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["memory_crc32"] = serde_json::json!(crc32(&b));
    std::fs::write(&manifest, m.to_string()).unwrap();
    let vm = Vmm::spawn(dir.path(), "k2", &["--restore", snap.to_str().unwrap()]);
    let s = vm.wait_for("crash", Duration::from_secs(30), |s| {
        s.machine.state == RunState::Crashed
    });
    let why = s.machine.crash.as_deref().unwrap_or_default();
    assert!(why.contains("triple fault"), "{s}");
    let out = ferry(&["verify", "--control", vm.ctl()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("crashed"));
    vm.quit();
}

#[test]
fn guest_enters_long_mode_by_itself_through_its_32_bit_stub() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("stub");
    let cfg = write_config(
        dir.path(),
        "stub",
        "memory_mib = 64\nentry = \"stub32\"\n[workload]\nworking_set_mib = 16\ndirty_pages_per_sec = 4000\ncontent = \"mixed\"\n",
    );
    let vm = Vmm::spawn(dir.path(), "stub", &["--config", cfg.to_str().unwrap()]);
    let s = vm.wait_for("heartbeats", Duration::from_secs(30), |s| {
        s.machine.heartbeats > 300 && s.machine.guest_pages_written > 4096
    });
    assert_eq!(s.machine.state, RunState::Running, "{s}");
    let v = vm.verify();
    assert_eq!(v.memory_errors, 0, "{v}");
    assert_eq!(v.pages_checked, 4096, "{v}");
    vm.quit();

    // The stub starts only the bootstrap processor.
    let cfg = write_config(
        dir.path(),
        "stub2",
        "memory_mib = 64\nvcpus = 2\nentry = \"stub32\"\n",
    );
    let e = vmm_error(&dir, &["--config", cfg.to_str().unwrap()]);
    assert!(e.contains("set vcpus = 1"), "{e}");
}

#[test]
fn a_stopping_vmm_never_removes_a_newer_vmms_control_socket() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("sock");
    let body = "memory_mib = 32\nvcpus = 1\n[workload]\npattern = \"idle\"\n";
    let cfg = write_config(dir.path(), "a", body);
    let old = Vmm::spawn(dir.path(), "a", &["--config", cfg.to_str().unwrap()]);
    // The operator clears the path and starts another VMM on it while the first runs.
    std::fs::remove_file(old.ctl()).unwrap();
    let cfg_b = write_config(dir.path(), "b", body);
    // Same name: the same control socket path.
    let new = Vmm::spawn(dir.path(), "a", &["--config", cfg_b.to_str().unwrap()]);
    let pid = old.child.id();
    // SAFETY: signals our own child process.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let mut old = old;
    old.child.wait().unwrap();
    let s = new.vm_status();
    assert_eq!(s.machine.name, "b", "{s}");
    new.quit();
}
