//! The migration stream's security, end to end on real processes: TLS 1.3 with both
//! ends authenticated by default; every peer that cannot prove itself refused before
//! any page moves, the source VM running on untouched; plain TCP only when both ends
//! say `--insecure`; a one-time ticket proved over the session.

use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_api::{MigrationReport, Outcome, PortCounters, Status};
use ferry_tests::pki::{Ca, test_pki};
use ferry_tests::wire::{self, Peer};
use ferry_tests::{
    Printed, TempDir, Vmm, alongside, assert_running_and_intact, boot, check_arrived, ferry,
    free_port, report_of, require_kvm,
};

/// A small, paced guest that writes a little memory and its disk.
const GUEST: &str = "memory_mib = 64\nvcpus = 1\n[workload]\nworking_set_mib = 16\n\
                     dirty_pages_per_sec = 500\npattern = \"random\"\ncontent = \"mixed\"\n";

fn counters(dst: &Vmm) -> PortCounters {
    match &*dst.status() {
        Status::Incoming(i) => i.incoming.clone().unwrap_or_default(),
        Status::Vm(v) => panic!("a VM arrived: {v:?}"),
    }
}

/// Waits until the port has rejected `n` connections; returns its counters.
fn rejected(dst: &Vmm, n: u64) -> PortCounters {
    dst.wait_for_status("the port's counters", Duration::from_secs(30), |s| {
        matches!(s, Status::Incoming(i) if i.incoming.as_ref().is_some_and(|c| c.rejected_connections >= n))
    });
    let c = counters(dst);
    assert_eq!(c.rejected_connections, n, "{c:?}");
    assert_eq!(c.failed_migrations, 0, "{c:?}");
    c
}

/// `ferry migrate --control SRC --to TO --json ARGS` exactly as given (no TLS flags
/// added): its success, stdout and stderr.
fn migrate_raw(src: &Vmm, to: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(ferry_tests::ferry_bin())
        .args(["migrate", "--control", src.ctl(), "--to", to, "--json"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferry migrate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spawn_incoming(dir: &TempDir, name: &str, extra: &[&str]) -> (Vmm, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--incoming", addr.as_str()];
    args.extend_from_slice(extra);
    (Vmm::spawn(dir.path(), name, &args), addr)
}

#[test]
fn strangers_are_refused_before_any_page_and_an_authenticated_source_moves_the_vm() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("security-tls");
    let src = boot(dir.path(), "src", GUEST);
    let (dst, addr) = spawn_incoming(&dir, "dst", &[]);
    let ours = test_pki();
    let before = src.vm_status();

    // A source whose certificate another CA signed: the destination refuses it in the
    // handshake, and `migrate` says so before anything started.
    let stranger = Ca::new(&dir.join("stranger"), "stranger CA")
        .and_then(|ca| ca.issue("stranger", &["127.0.0.1"]))
        .unwrap();
    let (ok, out, err) = migrate_raw(
        &src,
        &addr,
        &stranger
            .args()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!ok, "{out}");
    assert!(err.contains("TLS handshake"), "{err}");
    let c = rejected(&dst, 1);
    assert!(
        c.last_rejection
            .as_deref()
            .is_some_and(|r| r.contains("TLS handshake")),
        "{c:?}"
    );

    // Neither certificates nor --insecure: refused by the source's VMM, by name.
    let (ok, out, err) = migrate_raw(&src, &addr, &[]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("--tls-cert") && err.contains("--insecure"),
        "{err}"
    );

    // A source on plain TCP: the destination answers in the clear why, and the
    // migration fails with that reason; the source VM runs on.
    let (ok, out, _) = migrate_raw(&src, &addr, &["--insecure"]);
    let report: MigrationReport = serde_json::from_str(&out).expect("a report");
    assert!(!ok && report.core.outcome == Outcome::Failed, "{out}");
    assert!(!report.tls, "{out}");
    assert!(
        report
            .core
            .error
            .as_deref()
            .is_some_and(|e| e.contains("TLS only")),
        "{out}"
    );
    rejected(&dst, 2);

    // A hand-made client speaking the wire protocol in the clear gets the same answer.
    let mut p = Peer::connect(&addr);
    p.send(wire::HELLO, &wire::hello(wire::VERSION, 64 << 20, 1, "x"));
    let reason = p.abort_reason().unwrap_or_default();
    assert!(reason.contains("TLS only"), "{reason}");
    rejected(&dst, 3);

    // A destination whose certificate names another host: the source refuses it.
    let ca = Ca::new(&dir.join("ours-too"), "second CA").unwrap();
    let elsewhere = ca.issue("elsewhere", &["elsewhere.example"]).unwrap();
    let client = ca.issue("client", &["127.0.0.1"]).unwrap();
    let elsewhere_args = elsewhere.args();
    let (dst2, addr2) = spawn_incoming(
        &dir,
        "dst2",
        &elsewhere_args
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let (ok, _, err) = migrate_raw(
        &src,
        &addr2,
        &client.args().iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!ok);
    assert!(
        err.contains("TLS handshake") && err.contains("not valid for name"),
        "{err}"
    );
    dst2.quit();

    // Nothing moved: the source ran throughout, whole.
    let after = src.vm_status();
    assert_eq!(after.machine.state, ferry_api::RunState::Running);
    assert!(after.machine.heartbeats > before.machine.heartbeats);
    assert_running_and_intact(&src);

    // Its own CA's source, with the destination's one-time ticket: the VM moves over
    // TLS, memory verified.
    let ticket = dir.join("ticket");
    std::fs::write(&ticket, "one-time-0123456789abcdef\n").unwrap();
    let (dst3, addr3) = spawn_incoming(&dir, "dst3", &["--ticket-file", ticket.to_str().unwrap()]);
    // The ticket itself on a plain connection is no use against a TLS port.
    let mut p = Peer::connect(&addr3);
    p.send(
        wire::HELLO,
        &wire::hello_with_ticket(64 << 20, "x", "one-time-0123456789abcdef"),
    );
    assert!(p.abort_reason().unwrap_or_default().contains("TLS only"));
    let (ok, report): (bool, Printed<MigrationReport>) = report_of(
        &[
            "migrate",
            "--control",
            src.ctl(),
            "--to",
            &addr3,
            "--json",
            "--ticket-file",
            ticket.to_str().unwrap(),
            "--tls-cert",
            ours.cert.to_str().unwrap(),
            "--tls-key",
            ours.key.to_str().unwrap(),
            "--tls-ca",
            ours.ca.to_str().unwrap(),
        ],
        || src.log_text(),
    );
    assert!(ok, "{report}");
    assert!(report.tls, "{report}");
    check_arrived(&src, &dst3, &report, true);
    // Neither VMM wrote the ticket or any key material to its log.
    for vm in [&src, &dst, &dst3] {
        let log = vm.log_text();
        assert!(!log.contains("one-time-0123456789abcdef"), "{log}");
        assert!(!log.contains("PRIVATE KEY"), "{log}");
    }
    src.quit();
    dst.quit();
    dst3.quit();
}

#[test]
fn plain_tcp_needs_both_ends_to_say_so() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("security-insecure");
    // A destination without certificates or --insecure does not start.
    let out = ferry(&[
        "vmm",
        "--incoming",
        &format!("127.0.0.1:{}", free_port()),
        "--control",
        dir.join("x.sock").to_str().unwrap(),
        "--insecure",
        "--tls-cert",
        "a.pem",
    ]);
    assert!(!out.status.success());
    let out = Command::new(ferry_tests::ferry_bin())
        .args([
            "vmm",
            "--incoming",
            &format!("127.0.0.1:{}", free_port()),
            "--control",
        ])
        .arg(dir.join("x.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs TLS") && err.contains("--insecure"),
        "{err}"
    );

    // A TLS source at a plain-TCP destination: the handshake fails, saying what the
    // destination may be; nothing starts.
    let src = boot(dir.path(), "src", GUEST);
    let (dst, addr) = spawn_incoming(&dir, "dst", &["--insecure"]);
    let ours = test_pki().args();
    let (ok, _, err) = migrate_raw(
        &src,
        &addr,
        &ours.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!ok);
    assert!(
        err.contains("TLS handshake") && err.contains("--insecure"),
        "{err}"
    );
    let c = rejected(&dst, 1);
    assert!(
        c.last_rejection
            .as_deref()
            .is_some_and(|r| r.contains("TLS handshake")),
        "{c:?}"
    );
    // Both ends saying so: plain TCP, and the report says which.
    let (ok, report): (bool, Printed<MigrationReport>) = report_of(
        &[
            "migrate",
            "--control",
            src.ctl(),
            "--to",
            &addr,
            "--json",
            "--insecure",
        ],
        || src.log_text(),
    );
    assert!(ok, "{report}");
    assert!(!report.tls, "{report}");
    check_arrived(&src, &dst, &report, true);
    src.quit();
    dst.quit();
}
