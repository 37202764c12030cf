//! Pre-copy migration end to end: two real `ferry vmm` processes, real TCP on
//! loopback, real KVM; the guest proves from inside that nothing was lost.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use ferry_api::{MigrationReport, Outcome, Phase, Resolution, RunState};
use ferry_tests::wire::{self, Peer};
use ferry_tests::{
    TempDir, Vmm, alongside, assert_outruns, assert_running_and_intact, boot, check_arrived,
    exclusive, ferry, guest_write_rate, incoming, migrate, port_counters, report_of, require_kvm,
    state_of, write_config,
};

/// Bytes in a guest page.
const PAGE: f64 = 4096.0;

fn config(name: &str, vcpus: u32, pattern: &str, content: &str, rate: u64) -> String {
    format!(
        r#"memory_mib = 96
vcpus = {vcpus}
[workload]
working_set_mib = 32
dirty_pages_per_sec = {rate}
pattern = "{pattern}"
content = "{content}"
[workload.disk]
write_ops_per_sec = 200
[[disks]]
id = "root"
path = "disks/{name}.img"
size_mib = 16
cache = "none"
"#
    )
}

#[test]
fn migrates_every_pattern_content_codec_and_vcpu_count_with_nothing_lost() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("mig");
    // Every pattern with every content kind; codecs and vCPU counts rotate through
    // the sixteen so each codec meets each pattern, each content kind and both counts.
    const PATTERNS: [&str; 4] = ["sequential", "random", "hotcold", "idle"];
    const CONTENTS: [&str; 4] = ["zero", "text", "random", "mixed"];
    const CODECS: [&str; 3] = ["none", "lz4", "zstd:1"];
    let cases = PATTERNS.iter().enumerate().flat_map(|(i, &p)| {
        CONTENTS
            .iter()
            .enumerate()
            .map(move |(j, &c)| (1 + ((i + j) % 2) as u32, CODECS[(i * 4 + j) % 3], p, c))
    });
    for (vcpus, codec, pattern, content) in cases {
        let name = format!("m{vcpus}-{}-{pattern}-{content}", codec.replace(':', ""));
        let cfg = write_config(
            dir.path(),
            &name,
            &config(&name, vcpus, pattern, content, 5000),
        );
        let src = Vmm::spawn(dir.path(), &name, &["--config", cfg.to_str().unwrap()]);
        src.wait_for("disk writes", Duration::from_secs(30), |s| {
            s.machine.disk_writes > 100
        });
        let (dst, addr) = incoming(dir.path(), &format!("{name}-dst"));
        assert_eq!(state_of(&dst.status()), "incoming");
        let (ok, report) = migrate(
            &src,
            &addr,
            &["--compression", codec, "--max-downtime-ms", "50"],
        );
        assert!(ok, "{report}");
        assert_eq!(report.codec.to_string(), codec);
        if codec != "none" && content == "text" {
            assert!(report.compression_ratio > 1.5, "{report}");
        }
        // Every codec was tried on a sample of this VM's own pages.
        let samples = src
            .vm_status()
            .typed
            .migration
            .expect("the migration's progress")
            .codec_samples;
        let names: Vec<String> = samples.iter().map(|s| s.codec.to_string()).collect();
        assert_eq!(names, ["none", "lz4", "zstd:1", "zstd:3"], "{samples:?}");
        if content == "text" {
            assert!(samples[1].ratio > 1.5, "{samples:?}");
        }
        check_arrived(&src, &dst, &report, pattern != "idle");
        src.quit();
        dst.quit();
    }
}

#[test]
fn migrates_back_and_forth_five_times_without_drift() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("hops");
    let mut here = boot(dir.path(), "h0", &config("h0", 2, "random", "mixed", 8000));
    let mut last_pages = 0;
    for hop in 1..=5 {
        let (there, addr) = incoming(dir.path(), &format!("h{hop}"));
        let (ok, report) = migrate(&here, &addr, &["--max-downtime-ms", "50"]);
        assert!(ok, "hop {hop}: {report}");
        check_arrived(&here, &there, &report, true);
        let pages = there.vm_status().machine.guest_pages_written;
        assert!(
            pages > last_pages,
            "hop {hop}: counters went back ({pages} <= {last_pages})"
        );
        last_pages = pages;
        here.quit();
        here = there;
    }
    here.quit();
}

#[test]
fn a_failed_migration_leaves_the_vm_running_on_the_source() {
    if !require_kvm() {
        return;
    }
    // Its busy guest runs unpaced and must out-run a capped link.
    let _host = exclusive();
    let dir = TempDir::new("migfail");
    let src = boot(dir.path(), "f", &config("f", 1, "random", "text", 5000));

    // Nobody listening: the answer says so before anything starts.
    let addr = format!("127.0.0.1:{}", ferry_tests::free_port());
    let out = ferry(&["migrate", "--control", src.ctl(), "--to", &addr, "--json"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect"), "{err}");
    assert!(src.vm_status().migration.is_none(), "{}", src.status());

    // A peer that speaks another protocol version (in the clear: Ferry's own check,
    // not TLS's).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut header = [0u8; 16];
        conn.read_exact(&mut header).unwrap();
        let len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).unwrap();
        conn.write_all(&wire::frame(2, &99u16.to_le_bytes()))
            .unwrap();
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
    });
    let (ok, report) = migrate(&src, &addr, &["--insecure"]);
    assert!(!ok);
    assert!(
        report
            .core
            .error
            .as_deref()
            .unwrap_or("")
            .contains("version 99"),
        "{report}"
    );
    fake.join().unwrap();

    // A destination killed in the middle of pre-copy, a connection cut, and a cancelled
    // migration: a guest dirtying pages as fast as it can behind a 100 Mbit/s cap
    // (every round takes seconds and finds everything dirty again) keeps pre-copy
    // going until then.
    let cfg = write_config(
        dir.path(),
        "busy",
        &config("busy", 2, "random", "random", 0),
    );
    let busy = Vmm::spawn(dir.path(), "busy", &["--config", cfg.to_str().unwrap()]);
    busy.wait_for("running", Duration::from_secs(30), |s| {
        s.machine.heartbeats > 200
    });
    for (name, expected_outcome, expected_error) in [
        ("killed", Outcome::Failed, "connection"),
        ("cut", Outcome::Failed, "connection"),
        ("cancelled", Outcome::Cancelled, "cancelled"),
    ] {
        let (dst, addr) = incoming(dir.path(), &format!("busy-{name}"));
        let dst_port = addr.rsplit(':').next().unwrap_or_default().to_owned();
        let ctl = busy.ctl().to_owned();
        let before = busy.vm_status();
        let follower = std::thread::spawn(move || {
            report_of::<MigrationReport>(
                &[
                    "migrate",
                    "--control",
                    &ctl,
                    "--to",
                    &addr,
                    "--policy",
                    "static",
                    "--max-downtime-ms",
                    "1",
                    "--bandwidth-mbit",
                    "100",
                    "--json",
                ],
                String::new,
            )
            .1
        });
        // This migration's progress, not the last one's (which stays in the status).
        let under_way = busy.wait_for("pre-copy under way", Duration::from_secs(30), |s| {
            s.migration
                .as_ref()
                .is_some_and(|m| m.phase == Phase::Precopy && m.pages_sent > 2000)
        });
        // Pre-copy goes on until the fault only while the guest out-runs the link.
        assert_outruns(
            "the busy guest dirtied memory",
            &format!("in pre-copy before the {name} destination"),
            guest_write_rate(&before, &under_way) * PAGE,
            100.0,
        );
        // While it runs, the migration alone pauses and resumes the VM.
        for cmd in ["pause", "resume"] {
            let out = ferry(&[cmd, "--control", busy.ctl()]);
            assert!(!out.status.success(), "{cmd} during a migration");
            assert!(String::from_utf8_lossy(&out.stderr).contains("a migration is running"));
        }
        if name == "killed" {
            dst.kill();
        } else if name == "cut" {
            // Break the TCP connection itself, as a failing network path would.
            ferry_tests::kill_connections_to(&dst_port);
            // The destination sees the stream end, drops what it had and waits for
            // another migration.
            let s = dst.wait_for_status("the failure noted", Duration::from_secs(30), |s| {
                port_counters(s).is_some_and(|c| c.failed_migrations == 1)
            });
            assert_eq!(state_of(&s), "incoming", "{s}");
        } else {
            let out = ferry(&["cancel", "--control", busy.ctl()]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // The destination learns of it; no VM is left there, and it waits on.
            let s = dst.wait_for_status("the abort noted", Duration::from_secs(30), |s| {
                port_counters(s).is_some_and(|c| c.failed_migrations == 1)
            });
            assert_eq!(state_of(&s), "incoming", "{s}");
            assert!(dst.log_text().contains("aborted"), "{}", dst.log_text());
        }
        let report = follower.join().unwrap();
        assert_eq!(report.core.outcome, expected_outcome, "{report}");
        assert!(
            report
                .core
                .error
                .as_deref()
                .unwrap_or("")
                .contains(expected_error),
            "{report}"
        );
    }
    for vm in [&src, &busy] {
        assert_running_and_intact(vm);
    }
    src.quit();
    busy.quit();
}

#[test]
fn a_guest_outrunning_a_capped_link_converges_only_when_throttled() {
    if !require_kvm() {
        return;
    }
    // An unpaced guest whose premise is out-running the link.
    let _host = exclusive();
    let dir = TempDir::new("throttle");
    // One vCPU writing random pages as fast as it can (about a million a second, 4 GB/s,
    // while its pages are logged: some 40x the link) over 64 MiB: every round dirties
    // all of it, more than an 800 Mbit/s link moves within the 300 ms downtime limit.
    let body = r#"memory_mib = 128
vcpus = 1
[workload]
working_set_mib = 64
dirty_pages_per_sec = 0
pattern = "random"
content = "random"
"#;
    let cfg = write_config(dir.path(), "t", body);
    let src = Vmm::spawn(dir.path(), "t", &["--config", cfg.to_str().unwrap()]);
    src.wait_for("running", Duration::from_secs(30), |s| {
        s.machine.heartbeats > 200
    });

    let (dst, addr) = incoming(dir.path(), "t-dst1");
    // The static policy: what the flags say, nothing adjusted (the adaptive one
    // would throttle on its own).
    let before = src.vm_status();
    let (ok, report) = migrate(
        &src,
        &addr,
        &[
            "--policy",
            "static",
            "--bandwidth-mbit",
            "800",
            "--max-total-secs",
            "4",
        ],
    );
    assert_outruns(
        "the guest dirtied memory",
        "during the unthrottled migration",
        guest_write_rate(&before, &src.vm_status()) * PAGE,
        800.0,
    );
    assert!(
        !ok,
        "converged although the guest out-ran the link: {report}"
    );
    assert!(
        report
            .core
            .error
            .as_deref()
            .unwrap_or("")
            .contains("did not converge"),
        "{report}"
    );
    assert!(report.rounds >= 2, "{report}");
    // The cap holds: never more than 5% over it on average.
    let rate = report.bytes_on_wire as f64 / (report.core.total_ms / 1e3);
    assert!(
        rate <= 800e6 / 8.0 * 1.05,
        "{rate} bytes/s over an 800 Mbit/s cap: {report}"
    );
    assert_eq!(src.vm_status().machine.state, RunState::Running);
    drop(dst);

    // The same with the vCPU throttled from the start converges.
    let (dst, addr) = incoming(dir.path(), "t-dst2");
    let (ok, report) = migrate(
        &src,
        &addr,
        &[
            "--bandwidth-mbit",
            "800",
            "--throttle-pct",
            "99",
            "--max-total-secs",
            "120",
        ],
    );
    assert!(ok, "{report}");
    assert_eq!(report.throttle_max_pct, 99, "{report}");
    // Throttling shows as heartbeat stalls.
    assert!(report.max_heartbeat_gap_ms > 20.0, "{report}");
    let v = dst.verify();
    assert_eq!(v.memory_errors, 0, "{v}");
    src.quit();

    // Migrate on, raising the throttle live once pre-copy is seen not to converge.
    let src = dst;
    let (dst, addr) = incoming(dir.path(), "t-dst3");
    let ctl = src.ctl().to_owned();
    let before = src.vm_status();
    let follower = std::thread::spawn(move || {
        report_of::<MigrationReport>(
            &[
                "migrate",
                "--control",
                &ctl,
                "--to",
                &addr,
                "--policy",
                "static",
                "--bandwidth-mbit",
                "800",
                "--max-total-secs",
                "120",
                "--json",
            ],
            String::new,
        )
        .1
    });
    let rounds = src.wait_for("pre-copy rounds", Duration::from_secs(60), |s| {
        // (This VMM has not migrated before: no earlier migration's phase shows.)
        s.migration.as_ref().is_some_and(|m| {
            m.phase == Phase::Precopy && m.round >= 3
                || matches!(m.phase, Phase::Completed | Phase::Failed)
        })
    });
    // Three rounds without converging mean something only while the guest out-runs
    // the link.
    assert_outruns(
        "the guest dirtied memory",
        "in its first three rounds",
        guest_write_rate(&before, &rounds) * PAGE,
        800.0,
    );
    assert_eq!(
        rounds.migration.as_ref().map(|m| m.phase),
        Some(Phase::Precopy),
        "{rounds}"
    );
    let out = ferry(&["set-params", "--control", src.ctl(), "--throttle-pct", "99"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = follower.join().unwrap();
    assert_eq!(report.core.outcome, Outcome::Completed, "{report}");
    let raised = report
        .decisions_on("throttle_pct")
        .iter()
        .any(|d| d.value == "99" && d.reason.contains("set-params"));
    assert!(raised, "{report}");
    let v = dst.verify();
    assert_eq!(v.memory_errors, 0, "{v}");
    src.quit();
    dst.quit();
}

/// A proxy from a fresh port to `to` that flips one bit 3 MiB into the source's
/// stream; returns its address and the thread relaying.
fn flipping_proxy(to: String) -> (String, std::thread::JoinHandle<()>) {
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = proxy.local_addr().unwrap().to_string();
    let relay = std::thread::spawn(move || {
        let (from_src, _) = proxy.accept().unwrap();
        let to_dst = std::net::TcpStream::connect(&to).unwrap();
        let (mut src_r, mut dst_w) = (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let (mut dst_r, mut src_w) = (to_dst, from_src);
            let _ = std::io::copy(&mut dst_r, &mut src_w);
            let _ = src_w.shutdown(std::net::Shutdown::Both);
        });
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = 0usize;
        let flip_at = 3 << 20;
        loop {
            let n = match src_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n).contains(&flip_at) {
                buf[flip_at - seen] ^= 0x04;
            }
            seen += n;
            if dst_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = dst_w.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    });
    (addr, relay)
}

#[test]
fn a_corrupted_frame_aborts_the_migration_and_the_vm_stays() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("corrupt");
    let src = boot(dir.path(), "c", &config("c", 1, "random", "text", 5000));
    // In the clear, Ferry's own frame checksums catch the flipped bit; over TLS, the
    // record's authentication does, before any frame is read.
    for (transport, found) in [("plain", "checksum"), ("tls", "BadRecordMac")] {
        let name = format!("c-dst-{transport}");
        let (dst, dst_addr) = if transport == "plain" {
            ferry_tests::incoming_insecure(dir.path(), &name)
        } else {
            incoming(dir.path(), &name)
        };
        let (proxy_addr, relay) = flipping_proxy(dst_addr);
        let insecure: &[&str] = if transport == "plain" {
            &["--insecure"]
        } else {
            &[]
        };
        let (ok, report) = migrate(&src, &proxy_addr, insecure);
        assert!(!ok);
        assert_eq!(report.core.outcome, Outcome::Failed, "{report}");
        assert_eq!(report.tls, transport == "tls", "{report}");
        assert!(
            report.core.error.as_deref().unwrap_or("").contains(found),
            "{transport}: {report}"
        );
        // The destination gives that migration up, drops what it built and waits on.
        let s = dst.wait_for_status("the failure noted", Duration::from_secs(30), |s| {
            port_counters(s).is_some_and(|c| c.failed_migrations == 1)
        });
        assert_eq!(state_of(&s), "incoming", "{s}");
        let said = if transport == "plain" {
            "checksum"
        } else {
            "decrypt"
        };
        assert!(
            dst.log_text().contains(said),
            "{transport}: {}",
            dst.log_text()
        );
        relay.join().unwrap();
        assert_running_and_intact(&src);
        dst.quit();
    }
    src.quit();
}

#[test]
fn a_handover_in_doubt_never_runs_two_copies_and_resolves() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("doubt");
    for (fault, runs_on) in [
        ("source.after-ready", "source"),
        ("source.after-commit", "destination"),
    ] {
        let name = fault.replace(['-', '.'], "");
        let cfg = write_config(
            dir.path(),
            &name,
            &config(&name, 2, "random", "mixed", 5000),
        );
        let src = Vmm::spawn_with_env(
            dir.path(),
            &name,
            &["--config", cfg.to_str().unwrap()],
            &[("FERRY_FAILPOINTS", &format!("{fault}=drop"))],
        );
        src.wait_for("running", Duration::from_secs(30), |s| {
            s.machine.heartbeats > 200
        });
        let (dst, addr) = incoming(dir.path(), &format!("{name}-dst"));
        let (ok, report) = migrate(&src, &addr, &["--max-downtime-ms", "50"]);
        assert!(!ok, "{report}");
        let (s, d) = (src.status(), dst.status());
        let running = [&s, &d].iter().filter(|v| state_of(v) == "running").count();
        assert!(running <= 1, "two running copies: {s} {d}");
        if fault == "source.after-ready" {
            // Not committed: the source took the VM back; the destination holds its
            // copy paused and refuses to run it.
            assert_eq!(state_of(&s), "running", "{s}");
            assert_eq!(state_of(&d), "paused", "{d}");
            let out = ferry(&["resume", "--control", dst.ctl()]);
            assert!(!out.status.success(), "the destination resumed on its own");
        } else {
            // Committed: the source never runs again; the destination got Commit.
            assert!(
                report
                    .core
                    .error
                    .as_deref()
                    .unwrap_or("")
                    .contains("in doubt"),
                "{report}"
            );
            assert_eq!(state_of(&s), "migrated", "{s}");
            assert!(!ferry(&["resume", "--control", src.ctl()]).status.success());
        }
        // A stranger's word settles nothing: without the session's secret from the
        // handshake, a Resolve is refused and the copy stays as it is (before, its
        // "committed" resumed a second copy, its "not committed" threw the only one
        // away).
        for committed in [true, false] {
            // It holds a certificate of the fleet's CA: TLS lets it in, the session
            // does not.
            let mut stranger = Peer::connect_tls(&addr, ferry_tests::pki::test_pki());
            stranger.send(wire::RESOLVE, &wire::resolve(1, 0, committed));
            let reason = stranger.abort_reason().unwrap_or_default();
            assert!(reason.contains("no handover of that migration"), "{reason}");
            assert_eq!(state_of(&dst.status()), state_of(&d), "{}", dst.status());
        }
        let out = ferry(&["migrate", "--control", src.ctl(), "--resolve"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let resolved: Resolution = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(resolved.vm_runs_on, runs_on, "{resolved:?}");
        if runs_on == "source" {
            // The destination dropped its copy and waits for another migration.
            let s = dst.wait_for_status("the copy discarded", Duration::from_secs(30), |s| {
                state_of(s) == "incoming"
            });
            assert!(port_counters(&s).is_some(), "{s}");
            assert!(dst.log_text().contains("discard"), "{}", dst.log_text());
            assert_running_and_intact(&src);
        } else {
            let s = src.vm_status();
            let report = s.migration.as_ref().and_then(|m| m.report.as_ref());
            assert_eq!(
                report.map(|r| r.core.outcome),
                Some(Outcome::Completed),
                "{s}"
            );
            assert_running_and_intact(&dst);
        }
        src.quit();
        dst.quit();
    }
}
