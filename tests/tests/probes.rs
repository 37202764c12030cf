//! The eBPF probes against ground truth: real programs on real tracepoints, real
//! guests whose own counters, and whose VMM's dirty log, say what really happened.

use std::process::Command;
use std::time::Duration;

use ferry_tests::{
    TempDir, Vmm, alongside, exclusive, f64_of, ferry, ferry_bin, require_ebpf, require_kvm,
};
use serde_json::Value;

fn ready() -> bool {
    require_kvm() && require_ebpf()
}

fn guest(tracking: &str, rate: u64, ws_mib: u64, pattern: &str, fill: bool) -> String {
    format!(
        "memory_mib = {}\nvcpus = 1\ndirty_tracking = \"{tracking}\"\n[workload]\n\
         working_set_mib = {ws_mib}\ndirty_pages_per_sec = {rate}\npattern = \"{pattern}\"\n\
         fill = {fill}\nhot_fraction = 0.1\n",
        ws_mib + 64
    )
}

/// Starts a VM and waits until its guest writes at its pace (`fill` done).
fn start(dir: &TempDir, name: &str, body: &str, rate: u64) -> Vmm {
    let cfg = ferry_tests::write_config(dir.path(), name, body);
    let vm = Vmm::spawn(dir.path(), name, &["--config", cfg.to_str().unwrap()]);
    vm.wait_for(
        "the guest writing at its pace",
        Duration::from_secs(30),
        |s| within(s.machine.pages_written_per_sec, rate as f64, 0.05),
    );
    vm
}

/// A lab VM writing at `rate` as [`guest`] describes, past its fill.
fn lab_vm(
    dir: &TempDir,
    name: &str,
    tracking: &str,
    rate: u64,
    ws_mib: u64,
    pattern: &str,
    fill: bool,
) -> Vmm {
    start(
        dir,
        name,
        &guest(tracking, rate, ws_mib, pattern, fill),
        rate,
    )
}

/// `ferry signals --json` for a while; its summary.
fn signals(args: &[&str]) -> Value {
    let out = ferry(&[&["signals", "--json"], args].concat());
    assert!(
        out.status.success(),
        "ferry signals {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
    })
}

fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= want * tolerance
}

#[test]
fn dirty_rate_matches_the_guest_and_the_vmm_dirty_log() {
    if !ready() {
        return;
    }
    // Its guests must keep their pace (up to 50k pages/s, first touches included).
    let _host = exclusive();
    let dir = TempDir::new("probes-rate");
    for tracking in ["bitmap", "ring"] {
        for fill in [true, false] {
            // The ends of the range (`cargo xtask bench probes` measures the steps
            // between): each case boots a VM and measures for 3 s, with the host to
            // itself.
            for rate in [1_000u64, 50_000] {
                // The guest's pages/s equal distinct pages/s only while a pass over
                // the working set outlasts a tick (1 s); without fill its first pass
                // maps each page as it writes it and must outlast boot and the
                // measurement too.
                let ws_mib = if fill {
                    (rate * 3 / 2).div_ceil(256).max(16)
                } else {
                    (rate * 6).div_ceil(256).max(16)
                };
                let name = format!("r-{tracking}-{fill}-{rate}");
                let vm = lab_vm(&dir, &name, tracking, rate, ws_mib, "sequential", fill);
                let s = signals(&["--control", vm.ctl(), "--duration-secs", "3"]);
                let what = format!("{tracking}, fill {fill}, {rate} pages/s: {s}");
                let probe = f64_of(&s, "dirty_pages_per_sec");
                let guest = f64_of(&s, "guest_pages_written_per_sec");
                let vmm = f64_of(&s, "vmm_dirty_pages_per_sec");
                // First touches under logging can slow a fast guest below its pace;
                // the probe is held to what the guest really wrote.
                assert!(guest > rate as f64 * 0.5, "the guest's pace: {what}");
                assert!(within(probe, guest, 0.1), "probe vs guest: {what}");
                assert!(within(probe, vmm, 0.1), "probe vs VMM dirty log: {what}");
                let source = s["dirty_source"].as_str().unwrap_or("");
                if tracking == "ring" {
                    assert_eq!(source, "kvm:kvm_dirty_ring_push", "{what}");
                } else {
                    assert_ne!(source, "kvm:kvm_dirty_ring_push", "{what}");
                    assert!(!source.is_empty(), "{what}");
                }
                let live = s["sources_live"].as_array().unwrap();
                assert!(live.iter().any(|l| l == source), "{what}");
                vm.quit();
            }
        }
    }
}

#[test]
fn working_set_matches_the_distinct_pages_of_the_dirty_log() {
    if !ready() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("probes-ws");
    for tracking in ["bitmap", "ring"] {
        // A hot tenth of 128 MiB takes most writes: far fewer distinct pages than
        // writes in each sample.
        let name = format!("ws-{tracking}");
        let vm = lab_vm(&dir, &name, tracking, 20_000, 128, "hotcold", true);
        let s = signals(&["--control", vm.ctl(), "--duration-secs", "4"]);
        let mut compared = 0;
        for t in s["ticks"].as_array().unwrap() {
            let (Some(probe), Some(vmm)) = (
                t["working_set_pages"].as_u64(),
                t["vmm_dirty_pages"].as_u64(),
            ) else {
                continue;
            };
            // The first ticks pick the source that feeds the bitmap.
            if probe == 0 {
                continue;
            }
            let written = t["guest_pages_written_per_sec"].as_f64().unwrap()
                * t["logging_ms"].as_f64().unwrap()
                / 1e3;
            assert!(
                (vmm as f64) < written * 0.9,
                "not a hot/cold guest: {vmm} distinct of {written} written ({tracking})"
            );
            assert!(
                within(probe as f64, vmm as f64, 0.15),
                "{tracking}: probe {probe} vs VMM {vmm} distinct pages: {t}"
            );
            compared += 1;
        }
        assert!(
            compared >= 2,
            "{tracking}: too few ticks with a working set: {s}"
        );
        vm.quit();
    }
}

#[test]
fn disk_write_rate_matches_the_guests_writes() {
    if !ready() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("probes-disk");
    std::fs::create_dir_all(dir.join("ds")).unwrap();
    let body = "memory_mib = 64\nvcpus = 1\n[workload]\nworking_set_mib = 8\n\
                dirty_pages_per_sec = 1000\n[workload.disk]\nwrite_ops_per_sec = 300\n\
                block_kib = 16\n[[disks]]\nid = \"root\"\npath = \"ds/d.img\"\n\
                size_mib = 64\ncache = \"none\"\n";
    let vm = start(&dir, "disk", body, 1_000);
    let w0 = vm.vm_status().machine.disk_writes;
    let t = std::time::Instant::now();
    let s = signals(&["--control", vm.ctl(), "--duration-secs", "4"]);
    let secs = t.elapsed().as_secs_f64();
    let w1 = vm.vm_status().machine.disk_writes;
    let truth = (w1 - w0) as f64 * 16384.0 / secs;
    let probe = f64_of(&s, "disk_write_bytes_per_sec");
    assert!(truth > 1e6, "the guest barely wrote: {truth} B/s");
    assert!(
        within(probe, truth, 0.1),
        "probe {probe} B/s vs the guest's {truth} B/s: {s}"
    );
    assert!(f64_of(&s, "disk_latency_p99_us") > 0.0, "{s}");
    assert!(
        s["sources_live"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "syscalls:disk_io"),
        "{s}"
    );
    vm.quit();
}

#[test]
fn two_vms_at_once_each_get_their_own_signals() {
    if !ready() {
        return;
    }
    // Each guest is held to its own nominal rate.
    let _host = exclusive();
    let dir = TempDir::new("probes-two");
    let a = lab_vm(&dir, "a", "bitmap", 5_000, 64, "sequential", true);
    let b = lab_vm(&dir, "b", "ring", 30_000, 192, "sequential", true);
    let run = |vm: &Vmm| signals(&["--duration-secs", "3", "--control", vm.ctl()]);
    let (sa, sb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| run(&a));
        let hb = sc.spawn(|| run(&b));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    for (s, want, tracking) in [(sa, 5_000.0, "bitmap"), (sb, 30_000.0, "ring")] {
        let probe = f64_of(&s, "dirty_pages_per_sec");
        assert!(
            within(probe, want, 0.1),
            "{tracking}: {probe} vs {want}: {s}"
        );
        assert_eq!(
            s["dirty_source"] == "kvm:kvm_dirty_ring_push",
            tracking == "ring",
            "{s}"
        );
    }
    a.quit();
    b.quit();
}

#[test]
fn any_kvm_process_shows_a_dirty_rate_only_while_it_logs() {
    if !ready() {
        return;
    }
    // The guest is held to its nominal rate.
    let _host = exclusive();
    let dir = TempDir::new("probes-pid");
    let vm = lab_vm(&dir, "p", "bitmap", 10_000, 64, "sequential", true);
    let pid = vm.vm_status().machine.pid.to_string();
    // Nobody has logging on: the probes see exits but cannot see writes.
    let s = signals(&["--pid", &pid, "--duration-secs", "2"]);
    assert!(s["dirty_pages_per_sec"].is_null(), "{s}");
    assert!(
        s["dirty_note"]
            .as_str()
            .unwrap_or("")
            .contains("logging is off"),
        "{s}"
    );
    assert!(f64_of(&s, "exits_per_sec") > 0.0, "{s}");
    // Its VMM turns logging on for 2 s (a dirty-rate sample) half a second into the
    // watch: the probes see the memslot change, and the tick inside the sample has
    // the rate.
    let ctl = vm.ctl().to_owned();
    let sampler = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        ferry(&["dirty-rate", "--control", &ctl, "--duration-ms", "2000"])
    });
    let s = signals(&["--pid", &pid, "--duration-secs", "4"]);
    assert!(sampler.join().unwrap().status.success());
    let ticks = s["ticks"].as_array().unwrap();
    let inside = &ticks[1];
    let probe = f64_of(inside, "dirty_pages_per_sec");
    assert!(within(probe, 10_000.0, 0.1), "{inside}");
    // After the sample, logging is off again.
    assert!(ticks[3]["dirty_pages_per_sec"].is_null(), "{}", ticks[3]);
    vm.quit();
}

#[test]
fn what_is_missing_is_named_with_its_fix() {
    if !ready() {
        return;
    }
    let _host = alongside();
    let err = |args: &[&str]| {
        let out = ferry(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // Not a KVM process; no such process.
    let e = err(&["signals", "--pid", "1", "--duration-secs", "1"]);
    assert!(e.contains("not a KVM VMM"), "{e}");
    let e = err(&["signals", "--pid", "999999999", "--duration-secs", "1"]);
    assert!(e.contains("does not exist"), "{e}");

    let dir = TempDir::new("probes-missing");
    let vm = lab_vm(&dir, "m", "bitmap", 1_000, 16, "sequential", true);
    let pid = vm.vm_status().machine.pid.to_string();
    let bin = ferry_bin();
    let bin = bin.to_str().unwrap();
    // In a mount namespace of its own: tracefs unmounted, then BTF hidden. The host's
    // mounts are untouched.
    for (prepare, want) in [
        ("umount /sys/kernel/tracing", "tracefs is not mounted"),
        ("mount -t tmpfs none /sys/kernel/btf", "no BTF"),
    ] {
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "{prepare} && exec {bin} signals --pid {pid} --duration-secs 1"
            ))
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains(want), "{prepare}: {e}");
    }
    // Without root.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", bin])
        .args(["signals", "--pid", &pid, "--duration-secs", "1"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("needs root"), "{e}");
    vm.quit();
}

#[test]
fn a_migration_report_carries_the_guests_signals_as_they_changed() {
    if !ready() {
        return;
    }
    // The guest is held to its nominal rates beside a migration's compressors.
    let _host = exclusive();
    let dir = TempDir::new("probes-mig");
    let src = lab_vm(&dir, "src", "bitmap", 4_000, 256, "sequential", true);
    let (_dst, addr) = ferry_tests::incoming(dir.path(), "dst");
    // A capped link: the first pass takes a few seconds (the policy compresses), long
    // enough to step the guest's rate up and back down while it runs.
    let ctl = src.ctl().to_owned();
    let stepper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        ferry(&[
            "set-workload",
            "--control",
            &ctl,
            "--dirty-pages-per-sec",
            "20000",
        ]);
        std::thread::sleep(Duration::from_millis(1500));
        ferry(&[
            "set-workload",
            "--control",
            &ctl,
            "--dirty-pages-per-sec",
            "2000",
        ]);
    });
    let (ok, report) = ferry_tests::migrate(&src, &addr, &["--bandwidth-mbit", "400"]);
    stepper.join().unwrap();
    assert!(ok, "{report}");
    assert_eq!(report.memory_verified, Some(true), "{report}");
    let driven = report.driven();
    assert!(driven.probe_signals_error.is_none(), "{report}");
    let samples = &driven.probe_signals;
    assert!(samples.len() >= 8, "{report}");
    let rates: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.dirty_pages_per_sec)
        .collect();
    // Before the step the rate is the guest's; during it, several times that.
    assert!(
        rates.iter().take(3).any(|r| within(*r, 4_000.0, 0.2)),
        "{rates:?}"
    );
    assert!(rates.iter().any(|r| *r > 12_000.0), "{rates:?}");
    let gaps: Vec<f64> = samples
        .windows(2)
        .map(|w| w[1].at_ms - w[0].at_ms)
        .collect();
    assert!(!gaps.is_empty(), "{report}");
    assert!(gaps.iter().all(|g| *g < 600.0), "{gaps:?}");
}
