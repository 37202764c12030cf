//! Post-copy and hybrid migration end to end: real userfaultfd, real KVM, two real
//! `ferry vmm` processes on loopback TCP; the guest proves from inside that nothing
//! was lost, also across a broken link.

use std::time::{Duration, Instant};

use ferry_api::{MigrationProgress, MigrationReport, Phase, PostcopyPhase, RunState};
use ferry_tests::netns::DEST_ADDR;
use ferry_tests::{
    Printed, TempDir, Vmm, alongside, assert_outruns, check_arrived, exclusive, ferry, free_port,
    guest_write_rate, incoming, kill_connections_to, migrate, report_of, require_kvm, require_link,
    status_at, write_config,
};

fn config(vcpus: u32, pattern: &str, content: &str, rate: u64, ws_mib: u64) -> String {
    format!(
        r#"memory_mib = 96
vcpus = {vcpus}
[workload]
working_set_mib = {ws_mib}
dirty_pages_per_sec = {rate}
pattern = "{pattern}"
content = "{content}"
"#
    )
}

fn start(dir: &TempDir, name: &str, body: &str) -> Vmm {
    let cfg = write_config(dir.path(), name, body);
    let vm = Vmm::spawn(dir.path(), name, &["--config", cfg.to_str().unwrap()]);
    vm.wait_for("the guest running", Duration::from_secs(30), |s| {
        s.machine.heartbeats > 200
    });
    vm
}

/// The source's migration progress, straight from its control socket (None: no
/// migration, or no answer).
fn progress(ctl: &str) -> Option<MigrationProgress> {
    status_at(ctl)?.typed.vm()?.migration.clone()
}

/// Runs a migration on a thread (it blocks until the report) while the caller acts.
fn migrate_in_background(
    src: &Vmm,
    to: &str,
    extra: &[&str],
) -> std::thread::JoinHandle<(bool, Printed<MigrationReport>)> {
    let ctl = src.ctl().to_owned();
    let to = to.to_owned();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        let mut args = vec!["migrate", "--control", &ctl, "--to", &to, "--json"];
        args.extend(extra.iter().map(String::as_str));
        report_of(&args, String::new)
    })
}

/// Polls the source until its migration is in `phase`.
fn wait_phase(ctl: &str, phase: Phase, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        let p = progress(ctl);
        if p.as_ref().is_some_and(|p| p.phase == phase) {
            return;
        }
        assert!(
            t0.elapsed() < timeout,
            "migration never reached {phase}: {p:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn postcopy_and_hybrid_move_every_pattern_and_content_with_nothing_lost() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("postcopy");
    const PATTERNS: [&str; 4] = ["sequential", "random", "hotcold", "idle"];
    const CONTENTS: [&str; 4] = ["zero", "text", "random", "mixed"];
    const CODECS: [&str; 3] = ["none", "lz4", "zstd:1"];
    for (i, pattern) in PATTERNS.iter().enumerate() {
        for (j, content) in CONTENTS.iter().enumerate() {
            let hybrid = (i + j) % 2 == 1;
            let vcpus = 1 + ((i + j / 2) % 2) as u32;
            let codec = CODECS[(i * 4 + j) % 3];
            let mode = if hybrid { "hybrid" } else { "postcopy" };
            let name = format!("p{vcpus}-{mode}-{pattern}-{content}");
            let src = start(&dir, &name, &config(vcpus, pattern, content, 5000, 32));
            let (dst, addr) = incoming(dir.path(), &format!("{name}-dst"));
            // A capped link and a downtime limit no round can meet keep hybrid in
            // pre-copy until told; it is told in the middle of the first pass or
            // after it.
            let run = migrate_in_background(
                &src,
                &addr,
                &[
                    "--policy",
                    "static",
                    "--mode",
                    mode,
                    "--compression",
                    codec,
                    "--max-downtime-ms",
                    "1",
                    "--bandwidth-mbit",
                    if hybrid { "200" } else { "0" },
                ],
            );
            let mut switched = !hybrid;
            if hybrid {
                let ctl = src.ctl().to_owned();
                let mid_pass = i % 2 == 0;
                let t0 = Instant::now();
                loop {
                    let p = progress(&ctl);
                    let ready = p.as_ref().is_some_and(|p| {
                        if mid_pass {
                            p.pages_sent > 1000
                        } else {
                            p.round >= 1
                        }
                    });
                    let past_precopy = p
                        .as_ref()
                        .is_some_and(|p| !matches!(p.phase, Phase::Precopy | Phase::Setup));
                    if ready || past_precopy {
                        break;
                    }
                    assert!(t0.elapsed() < Duration::from_secs(30), "{p:?}");
                    std::thread::sleep(Duration::from_millis(5));
                }
                let out = ferry(&["start-postcopy", "--control", &ctl]);
                switched = out.status.success();
                // Only a guest that dirties nothing, or only zeroes (sent as runs, not
                // data), can converge before being told.
                assert!(
                    switched || *pattern == "idle" || *content == "zero",
                    "{name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let (ok, report) = run.join().unwrap();
            assert!(ok, "{name}: {report}");
            assert_eq!(report.mode.as_str(), mode);
            if switched {
                assert!(report.postcopy_faults.is_some(), "{name}: {report}");
            }
            check_arrived(&src, &dst, &report, *pattern != "idle");
            assert!(
                dst.vm_status()
                    .incoming_postcopy
                    .as_ref()
                    .is_some_and(|p| p.phase == PostcopyPhase::Completed)
                    || report.postcopy_faults.is_none(),
                "{}",
                dst.status()
            );
            src.quit();
            dst.quit();
        }
    }
}

#[test]
fn a_broken_postcopy_link_recovers_and_the_migration_completes() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("pc-break");
    let src = start(&dir, "b", &config(2, "random", "mixed", 20_000, 48));
    let (dst, addr) = incoming(dir.path(), "b-dst");
    let port = addr.rsplit(':').next().unwrap().to_owned();
    // A capped link keeps post-copy busy long enough to break it twice.
    let run = migrate_in_background(
        &src,
        &addr,
        &["--mode", "postcopy", "--bandwidth-mbit", "100"],
    );
    for _ in 0..2 {
        wait_phase(src.ctl(), Phase::Postcopy, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(300));
        kill_connections_to(&port);
        // Wait until the source has reconnected before breaking it again.
        let t0 = Instant::now();
        while progress(src.ctl()).map_or(0, |p| p.recoveries) == 0
            && t0.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let (ok, report) = run.join().unwrap();
    assert!(ok, "{report}");
    assert!(report.recoveries >= 1, "{report}");
    check_arrived(&src, &dst, &report, true);
    src.quit();
    dst.quit();
}

#[test]
fn killing_the_source_in_postcopy_stops_the_guest_instead_of_running_on_missing_memory() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("pc-kill");
    let src = start(&dir, "k", &config(2, "random", "mixed", 20_000, 48));
    let (dst, addr) = incoming(dir.path(), "k-dst");
    let _run = migrate_in_background(
        &src,
        &addr,
        &[
            "--mode",
            "postcopy",
            "--bandwidth-mbit",
            "50",
            "--recover-secs",
            "2",
        ],
    );
    wait_phase(src.ctl(), Phase::Postcopy, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    src.kill();
    let s = dst.wait_for("the loss reported", Duration::from_secs(30), |s| {
        s.incoming_postcopy
            .as_ref()
            .is_some_and(|p| p.phase == PostcopyPhase::Lost)
    });
    let pc = s.incoming_postcopy.as_ref().expect("post-copy's status");
    assert!(pc.missing_pages > 0, "{s}");
    assert!(
        pc.error
            .as_deref()
            .unwrap_or("")
            .contains("did not come back"),
        "{s}"
    );
    assert_eq!(s.machine.state, RunState::Paused, "{s}");
    // Stopped means stopped: no heartbeat moves any more.
    let h0 = dst.vm_status().machine.heartbeats;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(dst.vm_status().machine.heartbeats, h0);
    // Nothing may resume it behind post-copy's back.
    let out = ferry(&["resume", "--control", dst.ctl()]);
    assert!(!out.status.success());
    // And it can still be stopped, although its vCPUs wait for pages.
    dst.quit();
}

#[test]
fn a_guest_outrunning_a_capped_link_finishes_in_postcopy_but_not_in_precopy() {
    if !require_kvm() {
        return;
    }
    // Its premise, a guest out-running the link, needs the host's CPUs.
    let _host = exclusive();
    let dir = TempDir::new("pc-outrun");
    // 100k pages/s is 410 MB/s of dirt against a 100 Mbit/s link (33x what it carries).
    let body = config(1, "random", "random", 100_000, 16);
    // The static policy: the adaptive one would throttle pre-copy into converging.
    let limits = [
        "--policy",
        "static",
        "--bandwidth-mbit",
        "100",
        "--max-total-secs",
        "6",
    ];

    let src = start(&dir, "o", &body);
    let (dst, addr) = incoming(dir.path(), "o-dst1");
    let mut args = vec!["--mode", "precopy"];
    args.extend_from_slice(&limits);
    let before = src.vm_status();
    let (ok, report) = migrate(&src, &addr, &args);
    assert_outruns(
        "the guest dirtied memory",
        "during the pre-copy migration",
        guest_write_rate(&before, &src.vm_status()) * 4096.0,
        100.0,
    );
    assert!(!ok, "{report}");
    assert!(
        report
            .core
            .error
            .as_deref()
            .unwrap_or("")
            .contains("did not converge"),
        "{report}"
    );
    assert_eq!(src.vm_status().machine.state, RunState::Running);
    drop(dst);

    let (dst, addr) = incoming(dir.path(), "o-dst2");
    let mut args = vec!["--mode", "postcopy"];
    args.extend_from_slice(&limits);
    let (ok, report) = migrate(&src, &addr, &args);
    assert!(ok, "{report}");
    assert!(report.postcopy_faults.is_some_and(|f| f > 0), "{report}");
    check_arrived(&src, &dst, &report, true);
    src.quit();
    dst.quit();
}

#[test]
fn a_link_down_past_the_timeout_pauses_postcopy_and_it_completes_when_back() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let Some(link) = require_link("pcl", None) else {
        return;
    };
    let dir = TempDir::new("pc-link");
    let cfg = write_config(dir.path(), "l", &config(2, "random", "mixed", 20_000, 48));
    let src = Vmm::spawn_in(
        &link.source_ns,
        dir.path(),
        "l",
        &["--config", cfg.to_str().unwrap()],
    );
    src.wait_for("the guest running", Duration::from_secs(30), |s| {
        s.machine.heartbeats > 200
    });
    let addr = format!("{DEST_ADDR}:{}", free_port());
    let dst = Vmm::spawn_in(&link.dest_ns, dir.path(), "l-dst", &["--incoming", &addr]);
    let run = migrate_in_background(
        &src,
        &addr,
        &[
            "--mode",
            "postcopy",
            "--bandwidth-mbit",
            "100",
            "--timeout-secs",
            "1",
        ],
    );
    wait_phase(src.ctl(), Phase::Postcopy, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    link.set_up(false).unwrap();
    // Well past the 1 s timeout: both sides notice and wait for the link.
    let t0 = Instant::now();
    while dst
        .vm_status()
        .incoming_postcopy
        .as_ref()
        .is_none_or(|p| p.phase != PostcopyPhase::Recovering)
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", dst.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    link.set_up(true).unwrap();
    let (ok, report) = run.join().unwrap();
    assert!(ok, "{report}");
    assert!(report.recoveries >= 1, "{report}");
    check_arrived(&src, &dst, &report, true);
    src.quit();
    dst.quit();
}

#[test]
fn after_postcopy_with_a_first_pass_the_vm_moves_on_again() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("pc-chain");
    // Mostly zero memory: pages announced as zero in the first pass stay untouched on
    // the destination, and the next migration reads every page.
    let src = start(&dir, "c", &config(2, "random", "mixed", 5000, 16));
    let (mid, addr) = incoming(dir.path(), "c-mid");
    let (ok, report) = migrate(&src, &addr, &["--mode", "postcopy", "--precopy-pass"]);
    assert!(ok, "{report}");
    assert!(report.postcopy_faults.is_some(), "{report}");
    check_arrived(&src, &mid, &report, true);
    let (dst, addr) = incoming(dir.path(), "c-dst");
    let (ok, report) = migrate(&mid, &addr, &["--timeout-secs", "5"]);
    assert!(ok, "{report}");
    check_arrived(&mid, &dst, &report, true);
    src.quit();
    mid.quit();
    dst.quit();
}
