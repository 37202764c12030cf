//! The adaptive policy steering real migrations: it reacts to what the guest does and
//! explains itself; what the operator pinned stays.

use std::time::Duration;

use ferry_tests::{TempDir, Vmm, f64_of, ferry, incoming, migrate, require_kvm, u64_of};
use serde_json::Value;

fn guest(rate: u64) -> String {
    format!(
        "memory_mib = 320\nvcpus = 1\n[workload]\nworking_set_mib = 256\n\
         dirty_pages_per_sec = {rate}\npattern = \"random\"\ncontent = \"random\"\n"
    )
}

fn start(dir: &TempDir, name: &str, rate: u64) -> Vmm {
    let cfg = ferry_tests::write_config(dir.path(), name, &guest(rate));
    let vm = Vmm::spawn(dir.path(), name, &["--config", cfg.to_str().unwrap()]);
    // Past its fill (unpaced, a million pages a second): writing at its pace.
    vm.wait_for(
        "the guest writing at its pace",
        Duration::from_secs(30),
        |s| (f64_of(s, "pages_written_per_sec") - rate as f64).abs() < rate as f64 * 0.1,
    );
    vm
}

/// Steps the guest's rate to `rate` once the migration has run `after`.
fn step_later(vm: &Vmm, after: Duration, rate: u64) -> std::thread::JoinHandle<()> {
    let ctl = vm.ctl().to_owned();
    std::thread::spawn(move || {
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
    })
}

fn decisions<'a>(report: &'a Value, setting: &str) -> Vec<&'a Value> {
    report["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["setting"] == setting)
        .collect()
}

#[test]
fn the_engine_throttles_when_the_guest_jumps_past_the_link_and_says_why() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("policy-jump");
    let src = start(&dir, "src", 2_000);
    let (dst, addr) = incoming(dir.path(), "dst");
    // 400 Mbit/s moves 12k pages/s; a second in, the guest dirties 40k/s at random
    // over 256 MiB: pre-copy cannot converge unless the engine acts.
    let stepper = step_later(&src, Duration::from_millis(1500), 40_000);
    let (ok, report) = migrate(
        &src,
        &addr,
        &[
            "--bandwidth-mbit",
            "400",
            "--max-downtime-ms",
            "100",
            "--max-total-secs",
            "120",
        ],
    );
    stepper.join().unwrap();
    assert!(ok, "{report}");
    assert_eq!(report["policy"], "adaptive", "{report}");
    let raised: Vec<&Value> = decisions(&report, "throttle_pct")
        .into_iter()
        .filter(|d| d["value"].as_str().unwrap_or("0") != "0")
        .collect();
    assert!(!raised.is_empty(), "no throttle decision: {report}");
    let why = raised[0]["reason"].as_str().unwrap();
    assert!(
        why.contains("dirties") && why.contains("predicted"),
        "{why}"
    );
    // Its first decision came after the jump, not before.
    assert!(u64_of(raised[0], "t_ms") >= 1000, "{report}");
    assert!(report["predicted_total_ms"].is_number(), "{report}");
    let v = dst.verify();
    assert_eq!(u64_of(&v, "memory_errors"), 0, "{v}");
    src.quit();
    dst.quit();
}

#[test]
fn disk_writes_the_link_cannot_carry_are_held_back_and_the_disks_arrive_whole() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("policy-disk");
    // 64 MB/s of incompressible disk writes (1000 a second, 64 KiB each, at random
    // over 512 MiB) against a 200 Mbit/s cap: the disks' rounds cannot shrink unless
    // the engine holds the writes back.
    let cfg = ferry_tests::write_config(
        dir.path(),
        "dh",
        "memory_mib = 128\nvcpus = 1\n[workload]\nworking_set_mib = 32\n\
         dirty_pages_per_sec = 1000\npattern = \"random\"\ncontent = \"random\"\n\
         [workload.disk]\nwrite_ops_per_sec = 1000\nblock_kib = 64\n\
         [[disks]]\nid = \"data\"\npath = \"ds1/dh-data.img\"\nsize_mib = 512\n",
    );
    let src = Vmm::spawn(dir.path(), "dh", &["--config", cfg.to_str().unwrap()]);
    src.wait_for("disk writes", Duration::from_secs(30), |s| {
        u64_of(s, "disk_writes") > 1000
    });
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
            "200",
            "--max-total-secs",
            "60",
        ],
    );
    assert!(ok, "{report}");
    let held: Vec<&Value> = decisions(&report, "disk_write_limit_mbps")
        .into_iter()
        .filter(|d| d["value"] != "unlimited")
        .collect();
    assert!(
        !held.is_empty(),
        "the disk writes were never held back: {report}"
    );
    let why = held[0]["reason"].as_str().unwrap();
    assert!(why.contains("holding"), "{why}");
    ferry_tests::check_arrived(&src, &dst, &report, true);
    src.quit();
    dst.quit();
}

#[test]
fn a_pinned_setting_is_kept_and_the_report_says_so() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("policy-pin");
    let src = start(&dir, "src", 2_000);
    let (dst, addr) = incoming(dir.path(), "dst");
    let (ok, report) = migrate(
        &src,
        &addr,
        &["--compression", "lz4", "--bandwidth-mbit", "200"],
    );
    assert!(ok, "{report}");
    assert_eq!(report["codec"], "lz4", "{report}");
    let codec = decisions(&report, "codec");
    assert_eq!(codec.len(), 1, "the codec changed: {report}");
    assert!(
        codec[0]["reason"].as_str().unwrap().contains("pinned"),
        "{report}"
    );
    // Unpinned on the same slow link, random pages: the engine leaves them raw and
    // says why.
    src.quit();
    let src = dst;
    let (dst, addr) = incoming(dir.path(), "dst2");
    let (ok, report) = migrate(&src, &addr, &["--bandwidth-mbit", "200"]);
    assert!(ok, "{report}");
    assert_eq!(report["codec"], "none", "{report}");
    let codec = decisions(&report, "codec");
    assert!(
        codec
            .iter()
            .all(|d| d["reason"].as_str().unwrap().contains("adaptive")),
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
    let dir = TempDir::new("policy-bad");
    let src = start(&dir, "src", 1_000);
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
    assert!(src.status()["migration"].is_null());
    src.quit();
}

#[test]
fn plan_predicts_and_explains_without_moving_anything() {
    if !require_kvm() {
        return;
    }
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
        |s| (f64_of(s, "pages_written_per_sec") - 2000.0).abs() < 200.0,
    );
    let p = plan(&text, &["--link-mbit", "200"]);
    assert_ne!(p["settings"]["codec"], "none", "{p}");
    assert!(p["predicted_total_ms"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["converges"] == true, "{p}");
    let reasons = p["reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r["setting"] == "codec" && r["why"].as_str().unwrap().contains("bottleneck")),
        "{p}"
    );
    // The guest's own rate was measured.
    let rate = f64_of(&p["observation"], "dirty_pages_per_sec");
    assert!((rate - 2000.0).abs() < 400.0, "{p}");
    // Nothing moved, nothing changed.
    assert!(text.status()["migration"].is_null());
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
    let random = start(&dir, "random", 2_000);
    let p = plan(&random, &["--link-mbit", "200"]);
    assert_eq!(p["settings"]["codec"], "none", "{p}");
    random.quit();
}
