//! `ferry agent`: a real daemon over real HTTP, starting and adopting real VMMs.

use std::process::Command;
use std::time::Duration;

use ferry_tests::agent::{Agent, request};
use ferry_tests::{TempDir, alongside, ferry, ferry_bin, require_kvm, status_at, vm_of};
use serde_json::Value;

fn vm_config(name: &str) -> String {
    format!("name = \"{name}\"\nmemory_mib = 32\n")
}

fn named<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
    list.iter().find(|v| v["name"] == name)
}

fn running_with_heartbeats(list: &[Value], names: &[&str]) -> bool {
    names.iter().all(|n| {
        named(list, n).is_some_and(|v| {
            v["presence"] == "running"
                && v["state"] == "running"
                && v["heartbeats"].as_u64().unwrap_or(0) > 0
        })
    })
}

fn pid_alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn the_agent_starts_its_folders_vms_and_a_restarted_agent_adopts_them_unpaused() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("agent-adopt");
    let mut agent = Agent::configure(dir.path(), "host-a");
    for name in ["web-1", "db-1"] {
        std::fs::write(dir.join(format!("vms/{name}.toml")), vm_config(name)).unwrap();
    }
    // A config that does not read is named in the log and keeps nothing else out.
    std::fs::write(dir.join("vms/broken.toml"), "name = \n").unwrap();
    agent.start();
    let list = agent.wait_for_vms("both VMs running", Duration::from_secs(60), |l| {
        running_with_heartbeats(l, &["web-1", "db-1"])
    });
    assert_eq!(list.len(), 2, "{list:?}");
    let pid = |list: &[Value], n: &str| named(list, n).unwrap()["pid"].as_u64().unwrap();
    let pids = [pid(&list, "web-1"), pid(&list, "db-1")];
    assert!(named(&list, "web-1").unwrap()["adopted"] == false);
    assert!(
        agent.log_text().contains("broken.toml"),
        "{}",
        agent.log_text()
    );
    let one = agent.read("/v1/vms/db-1");
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.json()["name"], "db-1");
    let none = agent.read("/v1/vms/nope");
    assert_eq!(
        (none.status, none.kind().as_str()),
        (404, "not_found"),
        "{none:?}"
    );
    // An agent that crashes takes no VM with it: they keep running, unpaused.
    agent.signal(libc::SIGKILL);
    let before = vm_of(status_at(&agent.control("web-1")).expect("web-1 answers"))
        .machine
        .heartbeats;
    std::thread::sleep(Duration::from_millis(500));
    let after = vm_of(status_at(&agent.control("web-1")).expect("web-1 answers"));
    assert!(
        after.machine.heartbeats > before && after.machine.state.to_string() == "running",
        "web-1 stopped with its agent: {before} -> {}",
        after.machine.heartbeats
    );
    // Started again, the agent adopts the same processes.
    agent.start();
    let list = agent.wait_for_vms("both adopted", Duration::from_secs(30), |l| {
        running_with_heartbeats(l, &["web-1", "db-1"])
    });
    for (n, p) in ["web-1", "db-1"].iter().zip(pids) {
        let v = named(&list, n).unwrap();
        assert_eq!(v["adopted"], true, "{v}");
        assert_eq!(
            v["pid"].as_u64(),
            Some(p),
            "{n} was started again, not adopted"
        );
    }
    // SIGTERM stops the agent cleanly; the VMs stay.
    let exit = agent.signal(libc::SIGTERM);
    assert!(exit.success(), "{exit}: {}", agent.log_text());
    assert!(
        pids.iter().all(|&p| pid_alive(p)),
        "a VM ended with its agent"
    );
    let s = vm_of(status_at(&agent.control("db-1")).expect("db-1 answers"));
    assert_eq!(s.machine.state.to_string(), "running");
    assert_eq!(s.machine.guest_integrity_errors, 0);
}

#[test]
fn a_vmm_that_exits_is_reported_down_with_why() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("agent-down");
    let mut agent = Agent::configure(dir.path(), "host-a");
    std::fs::write(dir.join("vms/web-1.toml"), vm_config("web-1")).unwrap();
    agent.start();
    agent.wait_for_vms("web-1 running", Duration::from_secs(60), |l| {
        running_with_heartbeats(l, &["web-1"])
    });
    let out = ferry(&["quit", "--control", &agent.control("web-1")]);
    assert!(out.status.success(), "{out:?}");
    let list = agent.wait_for_vms("web-1 down", Duration::from_secs(30), |l| {
        named(l, "web-1").is_some_and(|v| v["presence"] == "down")
    });
    let v = named(&list, "web-1").unwrap();
    assert!(v["error"].as_str().unwrap_or("").contains("exited"), "{v}");
    assert_eq!(v["state"], Value::Null);
    let metrics = agent.get("/metrics", None).expect("metrics");
    assert!(
        metrics
            .body
            .contains("ferry_agent_vms{presence=\"down\"} 1"),
        "{}",
        metrics.body
    );
}

#[test]
fn each_role_reaches_only_its_endpoints_and_bad_requests_are_told_why() {
    let dir = TempDir::new("agent-auth");
    let mut agent = Agent::configure(dir.path(), "host-a");
    agent.start();
    let addr = agent.addr.clone();
    let get = |path: &str, token: Option<&str>| request(&addr, "GET", path, token, None).unwrap();
    // No token, a wrong one, a malformed header: 401, and the challenge.
    let a = get("/v1/vms", None);
    assert_eq!(
        (a.status, a.kind().as_str()),
        (401, "unauthenticated"),
        "{a:?}"
    );
    assert!(
        a.headers
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{a:?}"
    );
    let a = get("/v1/vms", Some("operator-host-a-0123456789abcdeX"));
    assert_eq!(a.status, 401, "{a:?}");
    // The webhook's token is for alerts only.
    let a = get("/v1/vms", Some(&agent.webhook_token));
    assert_eq!((a.status, a.kind().as_str()), (403, "forbidden"), "{a:?}");
    // A peer reads.
    let a = get("/v1/vms", Some(&agent.peer_token));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json(), serde_json::json!([]));
    // Unknown endpoints are 404 with the error shape; health and metrics need no token.
    let a = get("/v2/everything", Some(&agent.token));
    assert_eq!((a.status, a.kind().as_str()), (404, "not_found"), "{a:?}");
    let h = get("/healthz", None);
    assert_eq!(h.status, 200, "{h:?}");
    assert_eq!(h.json()["name"], "host-a");
    let m = get("/metrics", None);
    assert_eq!(m.status, 200);
    for line in [
        r#"ferry_agent_http_requests_total{route="/v1/vms",method="GET",code="401"} 2"#,
        r#"ferry_agent_http_requests_total{route="/v1/vms",method="GET",code="403"} 1"#,
        r#"ferry_agent_http_requests_total{route="other",method="GET",code="404"} 1"#,
        r#"ferry_agent_info{host="host-a""#,
    ] {
        assert!(m.body.contains(line), "{line} not in:\n{}", m.body);
    }
    // The CLI speaks to it too, and says why when it is refused.
    let out = Command::new(ferry_bin())
        .args(["vms", "--agent", &format!("http://{addr}"), "--token-file"])
        .arg(dir.join("token"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("NAME"));
    let out = ferry(&["vms", "--agent", &format!("http://{addr}")]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_bad_agent_config_is_refused_at_start_by_name() {
    let dir = TempDir::new("agent-config");
    let agent = Agent::configure(dir.path(), "host-a");
    let path = dir.join("agent.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    for (change, words) in [
        (("vm_dir", "vm_folder"), "vm_folder"),
        (
            ("token_file = \"token\"", "token_file = \"nothing\""),
            "operator token file",
        ),
        (("listen = \"", "listen = \"x"), "listen"),
    ] {
        std::fs::write(&path, good.replacen(change.0, change.1, 1)).unwrap();
        let out = Command::new(ferry_bin())
            .args(["agent", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{change:?} was accepted");
        assert!(err.contains(words), "{change:?}: {err}");
    }
    drop(agent);
}

#[test]
fn the_systemd_unit_verifies_and_never_kills_a_vm_with_the_agent() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/ferry-agent.service");
    let text = std::fs::read_to_string(unit).expect("deploy/ferry-agent.service");
    assert!(text.contains("\nKillMode=process\n"), "{text}");
    assert!(text.contains("DeviceAllow=/dev/kvm rw"), "{text}");
    let Ok(which) = Command::new("systemd-analyze").arg("--version").output() else {
        ferry_tests::missing("systemd-analyze", "apt-get install systemd");
        return;
    };
    assert!(which.status.success());
    // Verified as installed: the binary where the unit says, here the one under test.
    let dir = TempDir::new("agent-unit");
    let copy = dir.join("ferry-agent.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/ferry", &ferry_bin().display().to_string()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    let about_it: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("ferry-agent.service"))
        .collect();
    assert!(about_it.is_empty(), "systemd-analyze: {about_it:?}");
}
