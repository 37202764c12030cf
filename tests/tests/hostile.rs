//! Hostile and careless input on every interface a VMM has: its incoming migration
//! port (a scripted peer speaking the wire protocol), its control socket, and the
//! workload knobs. Each test proves the process stays up and whole, and that a real
//! migration still succeeds afterwards.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_api::{
    Answer, Cancelling, DirtySample, MigrationReport, Outcome, Phase, PortCounters, RunState,
    Status, WorkloadSet,
};
use ferry_tests::wire::{self, Peer};
use ferry_tests::{
    TempDir, Vmm, alongside, assert_running_and_intact, boot, check_arrived, exclusive, ferry,
    incoming, incoming_insecure, migrate, require_kvm, rss_kib, state_of,
};
use serde_json::{Value, json};

/// A small, paced guest: a 50 Mbit/s link carries what it writes with room to spare.
fn guest(disk: bool) -> String {
    let mut c = "memory_mib = 64\nvcpus = 1\n[workload]\nworking_set_mib = 16\n\
                 dirty_pages_per_sec = 500\npattern = \"random\"\ncontent = \"mixed\"\n"
        .to_string();
    if disk {
        c += "[workload.disk]\nwrite_ops_per_sec = 50\n[[disks]]\nid = \"root\"\n\
              path = \"disks/{NAME}.img\"\nsize_mib = 16\n";
    }
    c
}

fn start(dir: &TempDir, name: &str, disk: bool) -> Vmm {
    boot(dir.path(), name, &guest(disk).replace("{NAME}", name))
}

fn wait_counted(dst: &Vmm, rejected: u64, failed: u64) -> PortCounters {
    let counters = |s: &Status| match s {
        Status::Incoming(i) => i.incoming.clone().unwrap_or_default(),
        Status::Vm(v) => panic!("a VM arrived: {v:?}"),
    };
    let s = dst.wait_for_status("the port's counters", Duration::from_secs(30), |s| {
        let c = counters(s);
        c.rejected_connections >= rejected && c.failed_migrations >= failed
    });
    let c = counters(&s);
    assert_eq!(c.rejected_connections, rejected, "{s}");
    assert_eq!(c.failed_migrations, failed, "{s}");
    c
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The process's descriptor count once it is `want` again, or after 10 s: a status
/// request's server thread may close its end a moment after the answer arrives.
fn fds_back_to(pid: u32, want: usize) -> usize {
    (0..200)
        .map(|_| open_fds(pid))
        .find(|&n| {
            n == want || {
                std::thread::sleep(Duration::from_millis(50));
                false
            }
        })
        .unwrap_or_else(|| open_fds(pid))
}

/// The process's own descriptors and what they are, without the connection of a
/// status request just answered (its server thread may close it a moment later):
/// the fewest over half a second, as connections only add to them.
fn settled_fds(pid: u32) -> (usize, String) {
    let mut least = (open_fds(pid), fd_list(pid));
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        let n = open_fds(pid);
        if n < least.0 {
            least = (n, fd_list(pid));
        }
    }
    least
}

/// Each descriptor and what it is, for a failure message.
fn fd_list(pid: u32) -> String {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| {
                    let t = std::fs::read_link(e.path()).unwrap_or_default();
                    format!("{}={}", e.file_name().to_string_lossy(), t.display())
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// A real migration to `addr` completes and the guest arrives whole.
fn a_real_migration_succeeds(dir: &TempDir, name: &str, disk: bool, dst: &Vmm, addr: &str) {
    let src = start(dir, name, disk);
    let (ok, report) = migrate(&src, addr, &["--insecure"]);
    assert!(ok, "{report}");
    assert!(!report.tls, "{report}");
    check_arrived(&src, dst, &report, true);
    src.quit();
}

#[test]
fn wire_disk_paths_are_names_the_destination_places_and_nothing_else_is_opened() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("hostile-disks");
    let (dst, addr) = incoming_insecure(dir.path(), "dst");
    // A host file of a whole number of MiB: before, the destination opened, locked
    // and wrote it as root.
    let victim = dir.join("victim.img");
    std::fs::write(&victim, vec![0xa5u8; 1 << 20]).unwrap();
    let outside = dir.join("disks/out.img");
    std::os::unix::fs::symlink(&victim, &outside).unwrap();
    let fifo = dir.join("disks/fifo.img");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let cases = [
        (victim.to_str().unwrap().to_owned(), "plain file names"),
        ("../victim.img".to_owned(), "plain file names"),
        ("out.img".to_owned(), "leads out of"),
        ("fifo.img".to_owned(), "not a regular file"),
        ("absent.img".to_owned(), "no image"),
    ];
    for (path, expected) in &cases {
        let config = format!(
            "name = \"hostile\"\nmemory_mib = 32\n[[disks]]\nid = \"root\"\n\
             path = \"{path}\"\nsize_mib = 1\n"
        );
        let mut peer = Peer::connect(&addr);
        let e = peer.handshake(32, &config).unwrap_err();
        assert!(e.contains(expected), "{path}: {e}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), vec![0xa5u8; 1 << 20]);
    for p in [&victim, &outside, &fifo] {
        let wlog = format!("{}.wlog", p.display());
        assert!(!Path::new(&wlog).exists(), "{wlog} was created");
    }
    wait_counted(&dst, 0, cases.len() as u64);
    // The same process then takes a real migration, its disk found by name.
    a_real_migration_succeeds(&dir, "real", true, &dst, &addr);
    dst.quit();
}

/// What a scripted peer does; returns the reason of the destination's `Abort`.
type Attack<'a> = Box<dyn Fn(&mut Peer) -> Option<String> + 'a>;

#[test]
fn bad_connections_never_end_the_destination_and_leave_nothing_behind() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("hostile-port");
    let (dst, addr) = incoming_insecure(dir.path(), "dst");
    let pid = dst.child.id();
    let (fds0, fds0_list) = settled_fds(pid);
    let ok_config = "name = \"hostile\"\nmemory_mib = 32\n";
    // Each attack, and the words its refusal must carry (None: the stranger is
    // closed on without an answer).
    let hello = wire::frame(wire::HELLO, &wire::hello(wire::VERSION, 32 << 20, 1, "x"));
    let attacks: Vec<(&str, Attack)> = vec![
        (
            "random bytes",
            Box::new(|p| {
                let junk: Vec<u8> = (0..4096u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect();
                let _ = p.0.write_all(&junk);
                p.abort_reason()
            }),
        ),
        (
            "a truncated frame",
            Box::new(|p| {
                let _ = p.0.write_all(&hello[..hello.len() - 5]);
                let _ = p.0.shutdown(std::net::Shutdown::Write);
                p.abort_reason()
            }),
        ),
        (
            "a bad checksum",
            Box::new(|p| {
                let mut bad = hello.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                let _ = p.0.write_all(&bad);
                p.abort_reason()
            }),
        ),
        (
            "a 2^31-byte frame",
            Box::new(|p| {
                let mut big = hello[..16].to_vec();
                big[8..12].copy_from_slice(&(1u32 << 31).to_le_bytes());
                let _ = p.0.write_all(&big);
                p.abort_reason()
            }),
        ),
        (
            "connect, then close",
            Box::new(|p| {
                let _ = p.0.shutdown(std::net::Shutdown::Write);
                p.abort_reason()
            }),
        ),
        (
            "another protocol version",
            Box::new(|p| {
                p.send(wire::HELLO, &wire::hello(99, 32 << 20, 1, "x"));
                p.abort_reason()
            }),
        ),
        (
            "a memory size the config does not have",
            Box::new(|p| {
                p.send(wire::HELLO, &wire::hello(wire::VERSION, 64 << 20, 1, "x"));
                let _ = p.recv();
                p.send(wire::CONFIG, &wire::string(ok_config));
                p.abort_reason()
            }),
        ),
        (
            "a page past the end of memory",
            Box::new(|p| {
                p.handshake(32, ok_config).unwrap();
                p.send(wire::PAGES, &wire::one_page(1 << 40));
                p.abort_reason()
            }),
        ),
        (
            "a zero run ending near 2^64",
            Box::new(|p| {
                p.handshake(32, ok_config).unwrap();
                let mut run = (u64::MAX - 3).to_le_bytes().to_vec();
                run.extend_from_slice(&10u64.to_le_bytes());
                p.send(wire::ZERO_PAGES, &run);
                p.abort_reason()
            }),
        ),
    ];
    let expect = [
        None,
        None,
        None,
        None,
        None,
        Some("version 99"),
        Some("memory"),
        Some("outside guest memory"),
        Some("outside guest memory"),
    ];
    for ((what, attack), expected) in attacks.iter().zip(expect) {
        let mut peer = Peer::connect(&addr);
        let reason = attack(&mut peer);
        match expected {
            None => assert!(reason.is_none(), "{what}: {reason:?}"),
            Some(words) => {
                let reason = reason.unwrap_or_default();
                assert!(reason.contains(words), "{what}: {reason:?}");
            }
        }
        assert!(
            dst.try_status().is_some(),
            "{what} ended the destination: {}",
            dst.log_text()
        );
    }
    // Five strangers never got past their first frame; four migrations began and
    // were refused.
    let c = wait_counted(&dst, 5, 4);
    assert!(
        c.last_rejection
            .as_deref()
            .unwrap_or("")
            .contains("outside guest memory"),
        "{c:?}"
    );
    // Nothing is left of them: no descriptor, no VM.
    let fds = fds_back_to(pid, fds0);
    assert_eq!(
        fds,
        fds0,
        "descriptors before ({fds0_list}) and after ({})",
        fd_list(pid)
    );
    a_real_migration_succeeds(&dir, "real", false, &dst, &addr);
    dst.quit();
}

#[test]
fn a_silent_stranger_does_not_hold_the_port() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("hostile-silent");
    let (dst, addr) = incoming_insecure(dir.path(), "dst");
    let mut idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    // Connected before it and saying nothing, they do not delay the real source.
    a_real_migration_succeeds(&dir, "real", false, &dst, &addr);
    // Each is closed once its time to say hello is up.
    for c in &mut idle {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            c.read(&mut b).unwrap_or(0),
            0,
            "a silent stranger was answered"
        );
    }
    // The VM runs there now; its status no longer shows the port, its log does
    // (each line is written just after its connection is closed).
    let log = dst.wait_log("said nothing within 5 s", 3, Duration::from_secs(30));
    assert_eq!(log.matches("said nothing within 5 s").count(), 3, "{log}");
    dst.quit();
}

#[test]
fn ten_thousand_rejected_connections_leave_memory_and_descriptors_as_they_were() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("hostile-flood");
    let (dst, addr) = incoming_insecure(dir.path(), "dst");
    let pid = dst.child.id();
    let fds_at_start = open_fds(pid);
    let flood = |n: u64| {
        for i in 0..n {
            let mut c = TcpStream::connect(&addr).unwrap();
            if i % 2 == 1 {
                let _ = c.write_all(b"GET / HTTP/1.0\r\n\r\n");
            }
        }
    };
    // Warm: the allocator's per-thread arenas exist after the first few hundred.
    flood(500);
    wait_counted(&dst, 500, 0);
    // The base: the process's own descriptors (listeners, log), as at its start.
    let fds0 = fds_back_to(pid, fds_at_start);
    let (rss0, fds0_list) = (rss_kib(pid), fd_list(pid));
    flood(10_000);
    wait_counted(&dst, 10_500, 0);
    let (rss1, fds1) = (rss_kib(pid), fds_back_to(pid, fds0));
    eprintln!(
        "after 10,000 rejected connections: RSS {rss0} -> {rss1} KiB, descriptors {fds0} -> {fds1}"
    );
    assert_eq!(
        fds1,
        fds0,
        "descriptors before ({fds0_list}) and after ({})",
        fd_list(pid)
    );
    // Bounded, not growing with the count: far less than a byte per connection
    // would add up to over ten thousand of them.
    assert!(rss1 < rss0 + 4096, "RSS grew from {rss0} to {rss1} KiB");
    a_real_migration_succeeds(&dir, "real", false, &dst, &addr);
    dst.quit();
}

/// Sends raw bytes on a control socket and reads `answers` answer lines.
fn control_raw(vm: &Vmm, bytes: &[u8], answers: usize) -> Vec<Value> {
    let mut s = UnixStream::connect(vm.ctl()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(bytes).unwrap();
    let mut r = BufReader::new(s);
    (0..answers)
        .map(|_| {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
        })
        .collect()
}

fn control(vm: &Vmm, req: Value) -> Value {
    let mut text = req.to_string();
    text.push('\n');
    control_raw(vm, text.as_bytes(), 1).remove(0)
}

/// An answer line read as the API's envelope around `T`.
fn answer<T: serde::de::DeserializeOwned>(v: &Value) -> Answer<T> {
    ferry_tests::typed("an answer", v)
}

/// The refusal an answer carries; an answer that is not one fails the test.
fn error_of(v: &Value) -> String {
    let a = answer::<Value>(v);
    assert!(!a.ok, "{v}");
    a.error.unwrap_or_default()
}

/// What an answer that should have succeeded carries.
fn result_of<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    match answer::<T>(v).into_result() {
        Ok(Some(r)) => r,
        other => panic!("{v}: {:?}", other.err()),
    }
}

#[test]
fn the_control_socket_answers_each_line_once_and_bounds_every_number() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("hostile-control");
    let vm = start(&dir, "c", false);
    // An oversized line padded so that, cut at 64 KiB, its last piece is a request.
    let mut smuggled = br#"{"cmd":"status","x":""#.to_vec();
    smuggled.resize(128 << 10, b'A');
    smuggled.extend_from_slice(b"{\"cmd\":\"pause\"}\n{\"cmd\":\"status\"}\n");
    let answers = control_raw(&vm, &smuggled, 2);
    assert!(
        error_of(&answers[0]).contains("discarded whole"),
        "{}",
        answers[0]
    );
    let s: Status = result_of(&answers[1]);
    assert_eq!(state_of(&s), "running", "{}", answers[1]);
    // Not UTF-8: an answer, and the connection serves on.
    let answers = control_raw(&vm, b"\xff\xfe{}\n{\"cmd\":\"status\"}\n", 2);
    assert!(error_of(&answers[0]).contains("UTF-8"), "{}", answers[0]);
    result_of::<Status>(&answers[1]);
    // Numbers past what the guest can do are refused, named with their bound.
    let e = control(
        &vm,
        json!({"cmd": "set-workload", "dirty_pages_per_sec": u64::MAX}),
    );
    assert!(error_of(&e).contains("over the 100000000"), "{e}");
    let e = control(
        &vm,
        json!({"cmd": "dirty-sample", "duration_ms": 99_999_999_999u64}),
    );
    assert!(error_of(&e).contains("outside 10..=60000"), "{e}");
    let e = control(&vm, json!({"cmd": "snapshot", "out": ""}));
    assert!(error_of(&e).contains("empty"), "{e}");
    // A destination that cannot be reached is an answer, not a migration started.
    let e = control(
        &vm,
        json!({"cmd": "migrate", "to": "nonsense", "insecure": true}),
    );
    assert!(error_of(&e).contains("cannot resolve nonsense"), "{e}");
    // Nor is one without TLS that did not say --insecure.
    let e = control(&vm, json!({"cmd": "migrate", "to": "127.0.0.1:9"}));
    assert!(
        error_of(&e).contains("no TLS for the migration stream"),
        "{e}"
    );
    let e = control(
        &vm,
        json!({"cmd": "migrate", "to": "127.0.0.1:9", "insecure": true,
               "tls": {"cert": "/nonexistent/c.pem", "key": "/k", "ca": "/a"}}),
    );
    assert!(error_of(&e).contains("exclude each other"), "{e}");
    let e = control(
        &vm,
        json!({"cmd": "migrate", "to": "127.0.0.1:9",
               "tls": {"cert": "/nonexistent/c.pem", "key": "/k", "ca": "/a"}}),
    );
    assert!(error_of(&e).contains("/nonexistent/c.pem"), "{e}");
    assert!(vm.vm_status().migration.is_none(), "{}", vm.status());
    assert_running_and_intact(&vm);
    vm.quit();
}

#[test]
fn the_guest_survives_the_highest_rate_it_can_be_given() {
    if !require_kvm() {
        return;
    }
    // The rate is as good as unpaced.
    let _host = exclusive();
    let dir = TempDir::new("hostile-rate");
    let vm = start(&dir, "r", false);
    let ok = control(
        &vm,
        json!({"cmd": "set-workload", "dirty_pages_per_sec": 100_000_000u64}),
    );
    let set: WorkloadSet = result_of(&ok);
    assert_eq!(set.dirty_pages_per_sec, 100_000_000, "{ok}");
    let s0 = vm.vm_status();
    // Long enough for the old pacing arithmetic to have faulted many times over.
    vm.wait_for("the guest writing", Duration::from_secs(30), |s| {
        s.machine.guest_pages_written > s0.machine.guest_pages_written + 100_000
    });
    assert!(vm.vm_status().machine.crash.is_none(), "{}", vm.status());
    assert_running_and_intact(&vm);
    vm.quit();
}

#[test]
fn a_dirty_sample_ends_with_its_client_with_cancel_and_with_a_migration() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("hostile-sample");
    let vm = start(&dir, "s", false);
    let sample = || {
        let mut c = UnixStream::connect(vm.ctl()).unwrap();
        c.write_all(b"{\"cmd\":\"dirty-sample\",\"duration_ms\":60000}\n")
            .unwrap();
        vm.wait_for("the sample running", Duration::from_secs(30), |s| {
            s.machine.dirty_sample_running
        });
        c
    };
    let answer_of = |c: UnixStream| {
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        result_of::<DirtySample>(&v)
    };
    // Cancel ends it; its client gets what was measured and why it ended.
    let c = sample();
    let cancelled = control(&vm, json!({"cmd": "cancel"}));
    let what = result_of::<Cancelling>(&cancelled).what;
    assert_eq!(what.as_deref(), Some("dirty-sample"), "{cancelled}");
    let a = answer_of(c);
    assert!(
        a.ended_early.as_deref().unwrap_or("").contains("cancelled"),
        "{a:?}"
    );
    // A client that goes away ends it: well before its minute, nothing holds the log
    // (the wait below would otherwise outlast its limit).
    let c = sample();
    drop(c);
    vm.wait_for("the sample ended", Duration::from_secs(30), |s| {
        !s.machine.dirty_sample_running
    });
    // A migration's start ends it, and the migration goes ahead.
    let c = sample();
    let (dst, addr) = incoming(dir.path(), "dst");
    let (ok, report) = migrate(&vm, &addr, &[]);
    assert!(ok, "{report}");
    let a = answer_of(c);
    assert!(
        a.ended_early.as_deref().unwrap_or("").contains("migration"),
        "{a:?}"
    );
    check_arrived(&vm, &dst, &report, true);
    vm.quit();
    dst.quit();
}

#[test]
fn a_migration_outlives_its_client_can_be_attached_to_and_is_never_quit_away() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("hostile-client");
    let src = start(&dir, "m", false);
    let (dst, addr) = incoming(dir.path(), "dst");
    let mut client = Command::new(ferry_tests::ferry_bin())
        .args(["migrate", "--control", src.ctl(), "--to", &addr, "--json"])
        .args(["--policy", "static", "--bandwidth-mbit", "50"])
        .args(ferry_tests::pki::test_pki().args())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    src.wait_for("pre-copy under way", Duration::from_secs(30), |s| {
        s.migration
            .as_ref()
            .is_some_and(|m| m.phase == Phase::Precopy)
    });
    // Quitting now would leave the VM nowhere: refused, saying how to cancel.
    let out = ferry(&["quit", "--control", src.ctl()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancel it first"));
    assert_eq!(src.vm_status().machine.state, RunState::Running);
    // The client dies; the migration goes on with its last settings.
    client.kill().unwrap();
    client.wait().unwrap();
    let m = src
        .vm_status()
        .typed
        .migration
        .expect("the migration goes on");
    assert!(m.report.is_none(), "{m:?}");
    // And a new client picks it up to the end.
    let (ok, report) = ferry_tests::report_of::<MigrationReport>(
        &["migrate", "--control", src.ctl(), "--attach", "--json"],
        || src.log_text(),
    );
    assert!(ok, "{report}");
    check_arrived(&src, &dst, &report, true);
    // Attaching after the end shows how it ended.
    let again = ferry(&["migrate", "--control", src.ctl(), "--attach", "--json"]);
    assert!(again.status.success());
    let r: MigrationReport = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(r.core.outcome, Outcome::Completed, "{r:?}");
    src.quit();
    dst.quit();
}

fn signal(vm: &Vmm, sig: libc::c_int) {
    // SAFETY: a plain kill(2) on a child we own.
    assert_eq!(unsafe { libc::kill(vm.child.id() as libc::pid_t, sig) }, 0);
}

#[test]
fn a_stalled_destination_is_given_up_after_the_keepalive_and_a_short_stall_is_ridden_out() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("hostile-stall");
    let (dst, addr) = incoming(dir.path(), "dst");
    // `stall`: how long the destination stays stopped; None: until the source gives
    // up (however long the socket buffers take to fill first).
    let run = |src: &Vmm, timeout: &str, stall: Option<Duration>| {
        let ctl = src.ctl().to_owned();
        let to = addr.clone();
        let timeout = timeout.to_owned();
        let follower = std::thread::spawn(move || {
            ferry_tests::report_of::<MigrationReport>(
                &[
                    "migrate",
                    "--control",
                    &ctl,
                    "--to",
                    &to,
                    "--json",
                    "--policy",
                    "static",
                    "--bandwidth-mbit",
                    "50",
                    "--timeout-secs",
                    &timeout,
                ],
                String::new,
            )
        });
        src.wait_for("pre-copy under way", Duration::from_secs(30), |s| {
            s.migration
                .as_ref()
                .is_some_and(|m| m.phase == Phase::Precopy && m.pages_sent > 500)
        });
        signal(&dst, libc::SIGSTOP);
        let t0 = std::time::Instant::now();
        match stall {
            Some(d) => std::thread::sleep(d),
            None => {
                src.wait_for("the source giving up", Duration::from_secs(120), |s| {
                    s.migration
                        .as_ref()
                        .is_some_and(|m| m.phase == Phase::Failed)
                });
                eprintln!(
                    "the source gave up {:?} after the destination stopped",
                    t0.elapsed()
                );
            }
        }
        signal(&dst, libc::SIGCONT);
        follower.join().unwrap()
    };
    // Stopped for longer than the 2 s keepalive: the source gives up, says why, and
    // runs on whole.
    let src = start(&dir, "long", false);
    let (ok, report) = run(&src, "2", None);
    assert!(!ok, "{report}");
    let e = report.core.error.as_deref().unwrap_or("");
    assert!(e.contains("did not answer within"), "{report}");
    assert_running_and_intact(&src);
    src.quit();
    // The destination, woken, drops that migration and takes the next.
    wait_counted(&dst, 0, 1);
    // Stopped for well under the keepalive: the migration completes.
    let src = start(&dir, "short", false);
    let (ok, report) = run(&src, "5", Some(Duration::from_millis(500)));
    assert!(ok, "{report}");
    check_arrived(&src, &dst, &report, true);
    src.quit();
    dst.quit();
}

#[test]
fn a_destination_with_a_ticket_lets_in_only_its_source_and_only_once() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("hostile-ticket");
    let ticket = dir.join("ticket");
    std::fs::write(&ticket, "one-time-0123456789abcdef\n").unwrap();
    let addr = format!("127.0.0.1:{}", ferry_tests::free_port());
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    let dst = Vmm::spawn(
        dir.path(),
        "dst",
        &[
            "--incoming",
            &addr,
            "--shared-dir",
            dir.join("disks").to_str().unwrap(),
            "--ticket-file",
            ticket.to_str().unwrap(),
            "--insecure",
        ],
    );
    // No ticket, or the wrong one: refused at the hello, before the handshake is
    // even answered (so before any page could move).
    for (what, hello) in [
        ("no ticket", wire::hello(wire::VERSION, 32 << 20, 1, "x")),
        (
            "a wrong ticket",
            wire::hello_with_ticket(32 << 20, "x", "one-time-0123456789abcdeX"),
        ),
    ] {
        let mut p = Peer::connect(&addr);
        p.send(wire::HELLO, &hello);
        let first = p.recv();
        assert!(
            matches!(&first, Some((kind, _)) if *kind == wire::ABORT),
            "{what}: answered {first:?}"
        );
        let reason = String::from_utf8_lossy(&first.unwrap().1[4..]).into_owned();
        assert!(reason.contains("ticket"), "{what}: {reason}");
    }
    wait_counted(&dst, 2, 0);
    // The ticket is spent by the migration that presents it, even one that fails:
    // on a second destination, a handshake that goes wrong, then the same ticket.
    let addr2 = format!("127.0.0.1:{}", ferry_tests::free_port());
    let dst2 = Vmm::spawn(
        dir.path(),
        "dst2",
        &[
            "--incoming",
            &addr2,
            "--ticket-file",
            ticket.to_str().unwrap(),
            "--insecure",
        ],
    );
    let mut p = Peer::connect(&addr2);
    p.send(
        wire::HELLO,
        &wire::hello_with_ticket(64 << 20, "x", "one-time-0123456789abcdef"),
    );
    assert!(matches!(p.recv(), Some((wire::HELLO_ACK, _))));
    p.send(
        wire::CONFIG,
        &wire::string("name = \"x\"\nmemory_mib = 32\n"),
    );
    assert!(p.abort_reason().unwrap_or_default().contains("memory"));
    let mut p = Peer::connect(&addr2);
    p.send(
        wire::HELLO,
        &wire::hello_with_ticket(32 << 20, "x", "one-time-0123456789abcdef"),
    );
    let reason = p.abort_reason().unwrap_or_default();
    assert!(reason.contains("already used"), "{reason}");
    wait_counted(&dst2, 1, 1);
    dst2.quit();
    // The source that holds it migrates.
    let src = start(&dir, "real", false);
    let (ok, report) = migrate(
        &src,
        &addr,
        &["--ticket-file", ticket.to_str().unwrap(), "--insecure"],
    );
    assert!(ok, "{report}");
    check_arrived(&src, &dst, &report, true);
    src.quit();
    dst.quit();
}
