//! The adaptive policy steering real migrations: it reacts to what the guest does and
//! explains itself; what the operator pinned stays.

use std::time::Duration;

use ferry_api::{Codec, MigrationReport, Phase, VmStatus};
use ferry_tests::{
    Printed, TempDir, Vmm, alongside, assert_outruns, exclusive, f64_of, ferry, guest_write_rate,
    incoming, migrate, require_kvm, vm_of,
};
use serde_json::Value;

/// Bytes in a guest page.
const PAGE: f64 = 4096.0;

/// `ferry migrate`'s downtime limit when none is given.
const DEFAULT_MAX_DOWNTIME_MS: f64 = 300.0;

fn guest(rate: u64, ws_mib: u64) -> String {
    format!(
        "memory_mib = {}\nvcpus = 1\n[workload]\nworking_set_mib = {ws_mib}\n\
         dirty_pages_per_sec = {rate}\npattern = \"random\"\ncontent = \"random\"\n",
        ws_mib + 64
    )
}

fn start(dir: &TempDir, name: &str, rate: u64, ws_mib: u64) -> Vmm {
    let cfg = ferry_tests::write_config(dir.path(), name, &guest(rate, ws_mib));
    let vm = Vmm::spawn(dir.path(), name, &["--config", cfg.to_str().unwrap()]);
    // Past its fill (unpaced, a million pages a second): writing at its pace.
    vm.wait_for(
        "the guest writing at its pace",
        Duration::from_secs(30),
        |s| (s.machine.pages_written_per_sec - rate as f64).abs() < rate as f64 * 0.1,
    );
    vm
}

/// What the guest did after [`step_later`] stepped its rate.
struct Stepped {
    /// The migration's clock when the new rate was set.
    at_ms: u64,
    /// The guest's page writes per second at the new rate, before any throttle.
    pages_per_sec: f64,
    /// Over how long that was measured.
    over_ms: u64,
}

/// Steps the guest's rate to `rate` once the migration has run `after`, and measures
/// the rate the guest then writes at for up to 1.5 s, until a throttle is first set.
fn step_later(vm: &Vmm, after: Duration, rate: u64) -> std::thread::JoinHandle<Stepped> {
    let ctl = vm.ctl().to_owned();
    std::thread::spawn(move || {
        let status = || -> Printed<VmStatus> {
            let out = ferry(&["status", "--control", &ctl, "--json"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            vm_of(Printed::new(
                "status",
                serde_json::from_slice(&out.stdout).unwrap(),
            ))
        };
        std::thread::sleep(after);
        let out = ferry(&[
            "set-workload",
            "--control",
            &ctl,
            "--dirty-pages-per-sec",
            &rate.to_string(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let at_ms = status()
            .typed
            .migration
            .expect("the migration's progress")
            .elapsed_ms;
        // The guest takes up its new pace within a few heartbeats.
        std::thread::sleep(Duration::from_millis(200));
        let first = status();
        let mut last = first.clone();
        for _ in 0..15 {
            std::thread::sleep(Duration::from_millis(100));
            let s = status();
            if s.migration
                .as_ref()
                .is_none_or(|m| m.phase != Phase::Precopy || m.throttle_pct != 0)
            {
                break;
            }
            last = s;
        }
        let over_ms = last.machine.uptime_ms - first.machine.uptime_ms;
        assert!(
            over_ms >= 300,
            "the guest was throttled within {over_ms} ms of taking up its new rate: too soon \
             to measure it ({last})"
        );
        Stepped {
            at_ms,
            pages_per_sec: guest_write_rate(&first, &last),
            over_ms,
        }
    })
}

#[test]
fn the_engine_throttles_when_the_guest_jumps_past_the_link_and_says_why() {
    if !require_kvm() {
        return;
    }
    // Its premise, a guest out-running the link, needs the host's CPUs.
    let _host = exclusive();
    let dir = TempDir::new("policy-jump");
    let src = start(&dir, "src", 1_000, 64);
    let (dst, addr) = incoming(dir.path(), "dst");
    // 100 Mbit/s moves 3k pages/s; 1.5 s in, during the first pass, the guest goes
    // from 1k to 60k pages/s (246 MB/s, 20x the link) at random over 64 MiB: pre-copy
    // cannot converge unless the engine acts.
    let (link_mbit, max_downtime_ms) = (100.0, 100.0);
    let stepper = step_later(&src, Duration::from_millis(1500), 60_000);
    let (ok, report) = migrate(
        &src,
        &addr,
        &[
            "--bandwidth-mbit",
            &link_mbit.to_string(),
            "--max-downtime-ms",
            &max_downtime_ms.to_string(),
            "--max-total-secs",
            "120",
        ],
    );
    let stepped = stepper.join().unwrap();
    assert_outruns(
        "the guest dirtied memory",
        &format!(
            "after its jump ({:.0} pages/s over {} ms, unthrottled)",
            stepped.pages_per_sec, stepped.over_ms
        ),
        stepped.pages_per_sec * PAGE,
        link_mbit,
    );
    assert!(ok, "{report}");
    let driven = report.driven();
    assert_eq!(driven.policy, "adaptive", "{report}");
    let raised: Vec<_> = report
        .decisions_on("throttle_pct")
        .into_iter()
        .filter(|d| d.value != "0")
        .collect();
    assert!(!raised.is_empty(), "no throttle decision: {report}");
    let why = &raised[0].reason;
    assert!(
        why.contains("dirties") && why.contains("predicted"),
        "{why}"
    );
    // Its first decision came after the jump, not before.
    assert!(
        raised[0].t_ms >= stepped.at_ms as f64,
        "throttled before the jump at {} ms: {report}",
        stepped.at_ms
    );
    // The pause kept to the limit, and so did what the engine predicted of it.
    let downtime = downtime_of(&report);
    assert!(
        downtime > 0.0 && downtime <= max_downtime_ms,
        "downtime {downtime} ms against a {max_downtime_ms} ms limit: {report}"
    );
    let prediction = driven
        .prediction
        .unwrap_or_else(|| panic!("no prediction: {report}"));
    let predicted_total = prediction.predicted_total_ms.unwrap_or(f64::NAN);
    assert!(
        predicted_total.is_finite() && predicted_total > 0.0,
        "{report}"
    );
    let predicted_downtime = prediction.predicted_downtime_ms.unwrap_or(f64::NAN);
    assert!(
        predicted_downtime > 0.0 && predicted_downtime <= max_downtime_ms,
        "predicted downtime {predicted_downtime} ms against a {max_downtime_ms} ms limit: \
         {report}"
    );
    eprintln!(
        "throttled to {}% at {} ms (jump at {} ms); downtime {downtime:.1} ms, predicted \
         {predicted_downtime:.1} ms; total {:.1} s, predicted {:.1} s",
        raised[0].value,
        raised[0].t_ms,
        stepped.at_ms,
        report.core.total_ms / 1e3,
        predicted_total / 1e3
    );
    let v = dst.verify();
    assert_eq!(v.memory_errors, 0, "{v}");
    src.quit();
    dst.quit();
}

#[test]
fn disk_writes_the_link_cannot_carry_are_held_back_and_the_disks_arrive_whole() {
    if !require_kvm() {
        return;
    }
    // Its premise, disk writes out-running the link, needs the host to keep up.
    let _host = exclusive();
    let dir = TempDir::new("policy-disk");
    // 197 MB/s of incompressible disk writes (3000 a second, 64 KiB each, at random
    // over 64 MiB) against a 100 Mbit/s cap, 16x what it carries: the disks' rounds
    // cannot shrink unless the engine holds the writes back.
    let (link_mbit, block) = (100.0, 64.0 * 1024.0);
    let cfg = ferry_tests::write_config(
        dir.path(),
        "dh",
        "memory_mib = 128\nvcpus = 1\n[workload]\nworking_set_mib = 32\n\
         dirty_pages_per_sec = 1000\npattern = \"random\"\ncontent = \"random\"\n\
         [workload.disk]\nwrite_ops_per_sec = 3000\nblock_kib = 64\n\
         [[disks]]\nid = \"data\"\npath = \"ds1/dh-data.img\"\nsize_mib = 64\n",
    );
    let src = Vmm::spawn(dir.path(), "dh", &["--config", cfg.to_str().unwrap()]);
    src.wait_for("disk writes", Duration::from_secs(30), |s| {
        s.machine.disk_writes > 1000
    });
    // The guest's own write rate just before the migration: the engine holds it back
    // once the migration runs, so it is measured here.
    let before = src.vm_status().typed.machine;
    std::thread::sleep(Duration::from_secs(2));
    let after = src.vm_status().typed.machine;
    let writes_per_sec = (after.disk_writes - before.disk_writes) as f64 * 1e3
        / (after.uptime_ms - before.uptime_ms) as f64;
    let store = dir.join("dsB");
    std::fs::create_dir_all(&store).unwrap();
    let addr = format!("127.0.0.1:{}", ferry_tests::free_port());
    let dst = Vmm::spawn(
        dir.path(),
        "dh-dst",
        &["--incoming", &addr, "--datastore", store.to_str().unwrap()],
    );
    let (ok, report) = migrate(
        &src,
        &addr,
        &[
            "--copy-storage",
            "--bandwidth-mbit",
            &link_mbit.to_string(),
            "--max-total-secs",
            "90",
        ],
    );
    assert_outruns(
        "the guest wrote its disk",
        &format!("({writes_per_sec:.0} writes/s of 64 KiB) before the migration"),
        writes_per_sec * block,
        link_mbit,
    );
    assert!(ok, "{report}");
    let held: Vec<_> = report
        .decisions_on("disk_write_limit_bytes_per_sec")
        .into_iter()
        .filter(|d| d.value != "unlimited")
        .collect();
    assert!(
        !held.is_empty(),
        "the disk writes were never held back: {report}"
    );
    let why = &held[0].reason;
    assert!(why.contains("holding"), "{why}");
    // Held to a share of the link, below what the guest wrote.
    let cap: f64 = held[0].value.parse().unwrap();
    assert!(
        cap > 0.0 && cap < link_mbit * 1e6 / 8.0,
        "held to {cap} bytes/s on a {link_mbit} Mbit/s link: {report}"
    );
    let downtime = downtime_of(&report);
    assert!(
        downtime <= DEFAULT_MAX_DOWNTIME_MS,
        "downtime {downtime} ms against the {DEFAULT_MAX_DOWNTIME_MS} ms limit: {report}"
    );
    ferry_tests::check_arrived(&src, &dst, &report, true);
    src.quit();
    dst.quit();
}

/// The downtime a report measured; a report without one fails the test.
fn downtime_of(report: &Printed<MigrationReport>) -> f64 {
    report
        .downtime_ms
        .unwrap_or_else(|| panic!("no downtime measured: {report}"))
}

/// The measured downtime kept to the limit `ferry migrate` has when none is given.
fn assert_within_default_downtime(report: &Printed<MigrationReport>) {
    let downtime = downtime_of(report);
    assert!(
        downtime > 0.0 && downtime <= DEFAULT_MAX_DOWNTIME_MS,
        "downtime {downtime} ms against the {DEFAULT_MAX_DOWNTIME_MS} ms limit: {report}"
    );
}

#[test]
fn a_pinned_setting_is_kept_and_the_report_says_so() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("policy-pin");
    let src = start(&dir, "src", 2_000, 256);
    let (dst, addr) = incoming(dir.path(), "dst");
    let (ok, report) = migrate(
        &src,
        &addr,
        &["--compression", "lz4", "--bandwidth-mbit", "200"],
    );
    assert!(ok, "{report}");
    assert_within_default_downtime(&report);
    assert_eq!(report.codec, Codec::Lz4, "{report}");
    let codec = report.decisions_on("codec");
    assert_eq!(codec.len(), 1, "the codec changed: {report}");
    assert!(codec[0].reason.contains("pinned"), "{report}");
    // Unpinned on the same slow link, random pages: the engine leaves them raw and
    // says why.
    src.quit();
    let src = dst;
    let (dst, addr) = incoming(dir.path(), "dst2");
    let (ok, report) = migrate(&src, &addr, &["--bandwidth-mbit", "200"]);
    assert!(ok, "{report}");
    assert_within_default_downtime(&report);
    assert_eq!(report.codec, Codec::None, "{report}");
    let codec = report.decisions_on("codec");
    assert!(!codec.is_empty(), "no codec decision: {report}");
    assert!(
        codec.iter().all(|d| d.reason.contains("adaptive")),
        "{report}"
    );
    src.quit();
    dst.quit();
}

#[test]
fn an_unknown_policy_is_refused_before_anything_moves() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("policy-bad");
    let src = start(&dir, "src", 1_000, 256);
    let out = ferry(&[
        "migrate",
        "--control",
        src.ctl(),
        "--to",
        "127.0.0.1:9",
        "--policy",
        "fastest",
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("unknown policy") && e.contains("qemu-default"),
        "{e}"
    );
    assert!(src.vm_status().migration.is_none());
    src.quit();
}

#[test]
fn plan_predicts_and_explains_without_moving_anything() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("policy-plan");
    let plan = |vm: &Vmm, args: &[&str]| -> Value {
        let out = ferry(&[&["plan", "--json", "--control", vm.ctl()], args].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Text pages over a slow link: compression pays.
    let body = "memory_mib = 256\nvcpus = 1\n[workload]\nworking_set_mib = 128\n\
                dirty_pages_per_sec = 2000\npattern = \"random\"\ncontent = \"text\"\n";
    let cfg = ferry_tests::write_config(dir.path(), "text", body);
    let text = Vmm::spawn(dir.path(), "text", &["--config", cfg.to_str().unwrap()]);
    text.wait_for(
        "the guest writing at its pace",
        Duration::from_secs(30),
        |s| (s.machine.pages_written_per_sec - 2000.0).abs() < 200.0,
    );
    let p = plan(&text, &["--link-mbit", "200"]);
    assert_ne!(p["settings"]["codec"], "none", "{p}");
    assert!(p["converges"] == true, "{p}");
    let total = f64_of(&p, "predicted_total_ms");
    assert!(total.is_finite() && total > 0.0, "{p}");
    // It converges: within the default downtime limit.
    let downtime = f64_of(&p, "predicted_downtime_ms");
    assert!(downtime > 0.0 && downtime <= DEFAULT_MAX_DOWNTIME_MS, "{p}");
    assert_eq!(
        p["limits"]["max_downtime_ms"], DEFAULT_MAX_DOWNTIME_MS,
        "{p}"
    );
    let reasons = p["reasons"].as_array().unwrap();
    assert!(
        reasons.iter().any(
            |r| r["setting"] == "codec" && r["reason"].as_str().unwrap().contains("bottleneck")
        ),
        "{p}"
    );
    // The guest's own rate was measured.
    let rate = f64_of(&p["observation"], "dirty_pages_per_sec");
    assert!((rate - 2000.0).abs() < 400.0, "{p}");
    // Nothing moved, nothing changed.
    assert!(text.vm_status().migration.is_none());
    // Without a link speed the plan says what it needs.
    let out = ferry(&["plan", "--control", text.ctl()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--link-mbit"));
    // The limits can come from a file's [limits] table; a flag given as well wins.
    let limits = dir.join("limits.toml");
    std::fs::write(
        &limits,
        "[limits]\nbandwidth_mbit = 200\nmax_downtime_ms = 40\nmax_throttle_pct = 30\n",
    )
    .unwrap();
    let lim = limits.to_str().unwrap();
    let p = plan(&text, &["--limits", lim, "--max-downtime-ms", "25"]);
    assert_eq!(p["limits"]["bandwidth_mbit"], 200.0, "{p}");
    assert_eq!(p["limits"]["max_throttle_pct"], 30, "{p}");
    assert_eq!(p["limits"]["max_downtime_ms"], 25.0, "{p}");
    // A key that is not a limit, or a value out of range, is named.
    for (body, named) in [
        ("[limits]\nmax_throttle = 30\n", "max_throttle"),
        (
            "[limits]\nmax_throttle_pct = 150\n",
            "max_throttle_pct = 150",
        ),
    ] {
        std::fs::write(&limits, body).unwrap();
        let out = ferry(&["plan", "--control", text.ctl(), "--limits", lim]);
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(named) && e.contains("limits.toml"), "{e}");
    }
    text.quit();

    // Random pages on the same link: nothing to gain from a codec.
    let random = start(&dir, "random", 2_000, 256);
    let p = plan(&random, &["--link-mbit", "200"]);
    assert_eq!(p["settings"]["codec"], "none", "{p}");
    random.quit();
}
