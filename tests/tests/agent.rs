//! `ferry agent`: a real daemon over real HTTP, starting and adopting real VMMs.

use std::process::Command;
use std::time::Duration;

use ferry_tests::agent::{Agent, request, request_tls, write_test_pki};
use ferry_tests::{
    TempDir, alongside, exclusive, ferry, ferry_bin, require_command, require_ebpf, require_kvm,
    status_at, vm_of, wait_disk_writes,
};
use serde_json::Value;

fn vm_config(name: &str) -> String {
    format!("name = \"{name}\"\nmemory_mib = 32\n")
}

/// A VM whose guest writes to a disk image at `image` while it runs.
fn disk_vm_config(name: &str, image: &std::path::Path) -> String {
    format!(
        "name = \"{name}\"\nmemory_mib = 32\n[workload]\nworking_set_mib = 8\n\
         dirty_pages_per_sec = 500\n[workload.disk]\nwrite_ops_per_sec = 500\n\
         [[disks]]\nid = \"data\"\npath = \"{}\"\nsize_mib = 16\n",
        image.display()
    )
}

/// `promtool check metrics` on an agent's `/metrics`: the text format, and the
/// naming conventions (base units, `_total` counters); returns the text.
fn metrics_checked(agent: &Agent) -> String {
    use std::io::Write as _;
    let a = agent.get("/metrics", None).expect("/metrics answers");
    assert_eq!(a.status, 200, "{a:?}");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(a.body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        a.body
    );
    a.body
}

/// The value of the series `series` (name and labels, as printed) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The disk paths a VM config names.
fn config_disks(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("path = "))
        .map(|p| p.trim_matches('"').to_owned())
        .collect()
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

/// The series of `name` in `text` (any labels) that carry `label`: (labels, value).
fn series<'a>(text: &'a str, name: &str, label: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            labels
                .contains(label)
                .then(|| Some((labels, value.parse().ok()?)))?
        })
        .collect()
}

#[test]
fn a_running_vms_signals_reach_metrics_from_its_vmm_and_the_probes() {
    if !require_kvm() || !require_ebpf() {
        return;
    }
    if !require_command(
        "promtool",
        "cargo xtask setup installs it (Debian package prometheus)",
    ) {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("agent-signals");
    let mut agent = Agent::configure(dir.path(), "host-a");
    let image = dir.join("db-1.img");
    std::fs::write(dir.join("vms/db-1.toml"), disk_vm_config("db-1", &image)).unwrap();
    agent.start();
    let t0 = std::time::Instant::now();
    agent.wait_for_vms("db-1 running", Duration::from_secs(60), |l| {
        running_with_heartbeats(l, &["db-1"])
    });
    wait_disk_writes(&agent.control("db-1"), 50);
    // The first sample is taken as soon as the VM runs; the probes count its exits
    // and disk I/O from then on.
    let vm = r#"vm="db-1""#;
    let text = loop {
        let text = metrics_checked(&agent);
        let probe_rate = series(&text, "ferry_vm_dirty_pages_per_second", vm)
            .iter()
            .any(|(l, _)| !l.contains("kvm_dirty_log"));
        if probe_rate && !series(&text, "ferry_vm_disk_latency_seconds_count", vm).is_empty() {
            break text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no dirty rate from the probes:\n{text}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "db-1's dirty rate and disk latency on /metrics {:.1} s after the agent started",
        t0.elapsed().as_secs_f64()
    );
    // The VMM's own log against the rate the guest is paced to (500 pages/s in an
    // 8 MiB working set: distinct pages a little under that), and the probes' view of
    // the same sample against the VMM's.
    let vmm = sample(
        &text,
        r#"ferry_vm_dirty_pages_per_second{source="kvm_dirty_log",vm="db-1"}"#,
    )
    .expect("the VMM's dirty rate");
    assert!(vmm > 150.0 && vmm < 600.0, "VMM log {vmm} pages/s\n{text}");
    let probes = series(&text, "ferry_vm_dirty_pages_per_second", vm)
        .into_iter()
        .find(|(l, _)| !l.contains("kvm_dirty_log"))
        .map(|(_, r)| r)
        .unwrap();
    assert!(
        (probes - vmm).abs() < 0.3 * vmm,
        "probes {probes} pages/s, VMM log {vmm} pages/s\n{text}"
    );
    assert!(
        sample(&text, r#"ferry_vm_working_set_pages{vm="db-1"}"#).is_some_and(|n| n > 0.0),
        "{text}"
    );
    let written = series(
        &text,
        "ferry_vm_disk_bytes_total",
        r#"op="write",vm="db-1""#,
    );
    assert!(written.first().is_some_and(|(_, b)| *b > 0.0), "{text}");
    assert!(
        series(&text, "ferry_vm_exits_total", vm)
            .iter()
            .any(|(_, n)| *n > 0.0),
        "{text}"
    );
    assert!(
        sample(&text, "ferry_probe_sources_attached").is_some_and(|n| n > 0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "ferry_probe_load_errors_total"), Some(0.0));
    // The VM gone (its config removed, then its VMM stopped), its series go too.
    let pid = agent.read("/v1/vms/db-1").json()["pid"].as_u64().unwrap();
    std::fs::remove_file(dir.join("vms/db-1.toml")).unwrap();
    // SAFETY: kill(2) on a pid this test's agent started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    agent.wait_for_vms("db-1 gone", Duration::from_secs(60), |l| {
        named(l, "db-1").is_none()
    });
    let text = metrics_checked(&agent);
    assert!(!text.contains(vm), "{text}");
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
    let a = request(&addr, "PUT", "/v1/vms", Some(&agent.token), Some("{}")).unwrap();
    assert_eq!(
        (a.status, a.kind().as_str()),
        (405, "method_not_allowed"),
        "{a:?}"
    );
    let h = get("/healthz", None);
    assert_eq!(h.status, 200, "{h:?}");
    assert_eq!(h.json()["name"], "host-a");
    let m = get("/metrics", None);
    assert_eq!(m.status, 200);
    for line in [
        r#"ferry_agent_http_requests_total{code="401",method="GET",route="/v1/vms"} 2"#,
        r#"ferry_agent_http_requests_total{code="403",method="GET",route="/v1/vms"} 1"#,
        r#"ferry_agent_http_requests_total{code="404",method="GET",route="other"} 1"#,
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

/// Two agents on this host, each the other's peer, `web-1` on the first.
fn two_hosts(tag: &str) -> (TempDir, Agent, Agent) {
    two_hosts_with(tag, &vm_config("web-1"))
}

fn two_hosts_with(tag: &str, web1: &str) -> (TempDir, Agent, Agent) {
    two_hosts_set(tag, web1, |_, _| {})
}

/// Two agents, peers of each other, `web-1` running on the first; `set` adjusts both
/// before they start.
fn two_hosts_set(
    tag: &str,
    web1: &str,
    set: impl FnOnce(&mut Agent, &mut Agent),
) -> (TempDir, Agent, Agent) {
    let dir = TempDir::new(tag);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    let mut a = Agent::configure(&dir.join("a"), "host-a");
    let mut b = Agent::configure(&dir.join("b"), "host-b");
    a.peer_with(&b);
    b.peer_with(&a);
    set(&mut a, &mut b);
    std::fs::write(dir.join("a/vms/web-1.toml"), web1).unwrap();
    a.start();
    b.start();
    a.wait_for_vms("web-1 running on host-a", Duration::from_secs(60), |l| {
        running_with_heartbeats(l, &["web-1"])
    });
    (dir, a, b)
}

/// `web-1` runs on `to` (heartbeats growing, its config kept there) and not on `from`,
/// which set its config aside; the guest finds no error in what it wrote.
fn moved(from: &Agent, to: &Agent) {
    let list = to.wait_for_vms(
        "web-1 running at its destination",
        Duration::from_secs(30),
        |l| running_with_heartbeats(l, &["web-1"]),
    );
    let before = named(&list, "web-1").unwrap()["heartbeats"]
        .as_u64()
        .unwrap();
    to.wait_for_vms("web-1's heartbeats growing", Duration::from_secs(30), |l| {
        named(l, "web-1").is_some_and(|v| v["heartbeats"].as_u64().unwrap_or(0) > before)
    });
    assert!(
        to.dir.join("vms/web-1.toml").exists(),
        "no config kept at the destination"
    );
    from.wait_for_vms("web-1 gone from its source", Duration::from_secs(30), |l| {
        named(l, "web-1").is_none()
    });
    assert!(from.dir.join("vms/web-1.toml.migrated").exists());
    assert!(!from.dir.join("vms/web-1.toml").exists());
    let out = ferry(&["verify", "--control", &to.control("web-1")]);
    assert!(
        out.status.success(),
        "verify at the destination: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_api_migration_moves_a_vm_there_and_back_and_it_arrives_intact() {
    if !require_kvm() {
        return;
    }
    if !require_command(
        "promtool",
        "cargo xtask setup installs it (Debian package prometheus)",
    ) {
        return;
    }
    let _host = alongside();
    let (_dir, a, b) = two_hosts("agent-migrate");
    let text = metrics_checked(&a);
    assert!(
        text.contains(r#"ferry_vm_heartbeat_gap_seconds{vm="web-1"}"#),
        "{text}"
    );
    let id = a.migrate(r#"{"vm": "web-1", "destination": "host-b"}"#);
    // Watched as it goes: server-sent events until the end.
    let watch = {
        let (addr, token, path) = (
            a.addr.clone(),
            a.token.clone(),
            format!("/v1/migrations/{id}?watch=true"),
        );
        std::thread::spawn(move || request(&addr, "GET", &path, Some(&token), None))
    };
    let m = a.wait_ended(&id, Duration::from_secs(120));
    let events = watch.join().unwrap().expect("the watch answered");
    assert!(events.headers.contains("text/event-stream"), "{events:?}");
    let last = events
        .body
        .rsplit("event: end\ndata: ")
        .next()
        .unwrap_or("");
    let last: Value =
        serde_json::from_str(last.lines().next().unwrap_or("")).expect("the end event's record");
    assert_eq!(last["state"], "completed", "{events:?}");
    assert!(
        events.body.contains("event: migration\ndata: "),
        "{events:?}"
    );
    assert_eq!(m["state"], "completed", "{m}\n{}", a.log_text());
    assert!(m["downtime_ms"].as_f64().is_some(), "{m}");
    assert!(!m["decisions"].as_array().unwrap().is_empty(), "{m}");
    assert!(m["destination_address"].as_str().is_some(), "{m}");
    moved(&a, &b);
    // Counted once as it ended, its downtime in the histogram; the VM's own series
    // left with it; the peer seen up (looked at every 10 s).
    let text = metrics_checked(&a);
    assert_eq!(
        sample(
            &text,
            r#"ferry_migrations_total{mode="precopy",outcome="completed",policy="adaptive",transport="tcp"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ferry_migration_downtime_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"ferry_migrations_in_progress{direction="outbound"}"#
        ),
        Some(0.0),
        "{text}"
    );
    assert!(text.contains("ferry_build_info{"), "{text}");
    assert!(!text.contains(r#"vm="web-1""#), "{text}");
    // Its bytes on the wire, by codec: memory only (no disk travelled).
    let memory: f64 = series(&text, "ferry_migration_bytes_total", r#"stream="memory""#)
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert!(memory > 0.0, "{text}");
    assert!(
        series(&text, "ferry_migration_bytes_total", r#"stream="disk""#).is_empty(),
        "{text}"
    );
    let t0 = std::time::Instant::now();
    while sample(&metrics_checked(&a), r#"ferry_peer_up{peer="host-b"}"#) != Some(1.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}",
            metrics_checked(&a)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // And back, driven by the other agent, asked from the command line.
    let out = b.cli(&[
        "migrate", "web-1", "--to", "host-a", "--policy", "static", "--json",
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_str(&said).expect("the migration's record");
    assert_eq!(
        (m["state"].as_str(), m["policy"].as_str()),
        (Some("completed"), Some("static"))
    );
    moved(&b, &a);
    let list = a.call("GET", "/v1/migrations", None);
    assert_eq!(list.json().as_array().unwrap().len(), 1, "{list:?}");
    let out = b.cli(&["migrations"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("completed"),
        "{table}"
    );
}

#[test]
fn a_handover_in_doubt_is_settled_between_the_agents_without_an_operator() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    // The source's VMM loses its connection right after it told the destination to
    // run the VM: the handover is in doubt, both copies paused.
    let (_dir, a, b) = two_hosts_set("agent-doubt", &vm_config("web-1"), |a, _| {
        a.env
            .push(("FERRY_FAILPOINTS".into(), "source.after-commit=drop".into()));
    });
    let id = a.migrate(r#"{"vm": "web-1", "destination": "host-b"}"#);
    let m = a.wait_ended(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "completed", "{m}\n{}", a.log_text());
    assert_eq!(m["resolution"]["vm_runs_on"], "destination", "{m}");
    assert_eq!(m["resolution"]["committed"], true, "{m}");
    assert!(m["error"].is_null(), "{m}");
    assert!(
        a.log_text().contains("handover in doubt settled"),
        "{}",
        a.log_text()
    );
    moved(&a, &b);
}

#[test]
fn concurrent_requests_start_one_migration_bad_ones_change_nothing_and_a_cancel_keeps_the_vm() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let (_dir, a, b) = two_hosts("agent-conflict");
    let post = |token: Option<&str>, body: &str| {
        request(&a.addr, "POST", "/v1/migrations", token, Some(body)).unwrap()
    };
    let good = r#"{"vm": "web-1", "destination": "host-b"}"#;
    for (token, body, status, words) in [
        (None, good, 401, "Authorization"),
        (Some(a.peer_token.as_str()), good, 403, "peer"),
        (Some(a.token.as_str()), "{\"vm\": ", 400, "JSON"),
        (
            Some(a.token.as_str()),
            r#"{"vm": "web-1", "destination": "host-b", "fast": true}"#,
            400,
            "fast",
        ),
        (
            Some(a.token.as_str()),
            r#"{"vm": "web-9", "destination": "host-b"}"#,
            404,
            "web-9",
        ),
        (
            Some(a.token.as_str()),
            r#"{"vm": "web-1", "destination": "host-z"}"#,
            404,
            "host-z",
        ),
        (
            Some(a.token.as_str()),
            r#"{"vm": "web-1", "destination": "host-b", "policy": "fastest"}"#,
            400,
            "fastest",
        ),
        (
            Some(a.token.as_str()),
            r#"{"vm": "web-1", "destination": "host-b", "limits": {"max_downtime_ms": -5}}"#,
            400,
            "max_downtime_ms",
        ),
    ] {
        let r = post(token, body);
        assert_eq!(r.status, status, "{body}: {r:?}");
        assert!(
            r.json()["message"].as_str().unwrap_or("").contains(words),
            "{body}: {r:?}"
        );
    }
    let big = format!("{{\"vm\": \"{}\"}}", "x".repeat(100_000));
    assert_eq!(post(Some(&a.token), &big).status, 413);
    assert_eq!(
        a.call("GET", "/v1/migrations", None).json(),
        serde_json::json!([])
    );
    assert!(b.read("/v1/vms").json().as_array().unwrap().is_empty());
    // Twenty at once, paced so the one that starts is still running when cancelled.
    let slow = r#"{"vm": "web-1", "destination": "host-b", "limits": {"bandwidth_mbit": 2}}"#;
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                s.spawn(|| {
                    let r = post(Some(&a.token), slow);
                    (r.status, r.body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let started: Vec<&(u16, String)> = answers.iter().filter(|(s, _)| *s == 201).collect();
    assert_eq!(started.len(), 1, "{answers:?}");
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 409).count(),
        19,
        "{answers:?}"
    );
    let id = serde_json::from_str::<Value>(&started[0].1).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The receiving VMM appears at the destination; then the cancel.
    b.wait_for_vms("web-1 arriving", Duration::from_secs(30), |l| {
        named(l, "web-1").is_some()
    });
    let c = a.call("DELETE", &format!("/v1/migrations/{id}"), None);
    assert_eq!(c.status, 202, "{c:?}");
    let m = a.wait_ended(&id, Duration::from_secs(60));
    assert_eq!(m["state"], "cancelled", "{m}");
    let again = a.call("DELETE", &format!("/v1/migrations/{id}"), None);
    assert_eq!(again.status, 409, "{again:?}");
    let out = a.cli(&["cancel", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("409"), "{err}");
    // The VM stays on the source, running; the destination keeps nothing of it.
    a.wait_for_vms(
        "web-1 still running on host-a",
        Duration::from_secs(10),
        |l| running_with_heartbeats(l, &["web-1"]),
    );
    b.wait_for_vms("nothing left at host-b", Duration::from_secs(30), |l| {
        l.is_empty()
    });
    assert!(!b.dir.join("vms/web-1.toml").exists());
    let out = ferry(&["verify", "--control", &a.control("web-1")]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_destination_refuses_a_receive_request_it_cannot_honour() {
    let _host = alongside();
    let dir = TempDir::new("agent-receive");
    let mut b = Agent::configure(dir.path(), "host-b");
    b.start();
    let post = |token: Option<&str>, body: &str| {
        request(&b.addr, "POST", "/v1/incoming", token, Some(body)).unwrap()
    };
    let body = |vm: &str, cfg: &str| {
        serde_json::json!({"vm": vm, "config": cfg, "source": "host-a"}).to_string()
    };
    let ok = body("web-1", &vm_config("web-1"));
    assert_eq!(post(None, &ok).status, 401);
    assert_eq!(post(Some(&b.webhook_token), &ok).status, 403);
    let r = post(Some(&b.peer_token), &body("web-2", &vm_config("web-1")));
    assert_eq!(r.status, 400, "{r:?}");
    let r = post(Some(&b.peer_token), &body("web-1", "memory_mib = "));
    assert_eq!(r.status, 400, "{r:?}");
    // A VM of that name already here.
    std::fs::write(
        dir.join("vms/web-1.toml"),
        "name = \"web-1\"\nmemory_mib = 32\n",
    )
    .unwrap();
    let r = post(Some(&b.peer_token), &ok);
    assert_eq!((r.status, r.kind().as_str()), (409, "conflict"), "{r:?}");
}

/// Where `web-1` ended: the one agent listing it running; fails if both or neither do.
fn the_one_host<'a>(a: &'a Agent, b: &'a Agent) -> (&'a Agent, &'a Agent) {
    let t0 = std::time::Instant::now();
    loop {
        let on = |x: &Agent| {
            let l = x
                .read("/v1/vms")
                .json()
                .as_array()
                .cloned()
                .unwrap_or_default();
            running_with_heartbeats(&l, &["web-1"])
        };
        let gone = |x: &Agent| {
            let l = x
                .read("/v1/vms")
                .json()
                .as_array()
                .cloned()
                .unwrap_or_default();
            named(&l, "web-1").is_none()
        };
        if on(a) && gone(b) {
            return (a, b);
        }
        if on(b) && gone(a) {
            return (b, a);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "web-1 is not on exactly one host:\nhost-a {}\nhost-b {}\n{}\n{}",
            a.read("/v1/vms").body,
            b.read("/v1/vms").body,
            a.log_text(),
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn killing_either_agent_mid_migration_leaves_the_vm_intact_on_exactly_one_host() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    // Paced: it writes ~3 Mbit/s, its 16 Mbit/s link carries that five times over,
    // so the migration ends on its own while an agent is away (taking seconds: the
    // first pass alone is 32 MiB).
    let paced = "name = \"web-1\"\nmemory_mib = 32\n[workload]\nworking_set_mib = 8\n\
                 dirty_pages_per_sec = 100\n";
    let (_dir, mut a, mut b) = two_hosts_with("agent-sigkill", paced);
    let slow = |to: &str| {
        format!(r#"{{"vm": "web-1", "destination": "{to}", "limits": {{"bandwidth_mbit": 16}}}}"#)
    };
    for victim in ["source", "destination"] {
        // The host web-1 is on drives its migration to the other.
        let (src, dst, to) = if a.dir.join("vms/web-1.toml").exists() {
            (&mut a, &mut b, "host-b")
        } else {
            (&mut b, &mut a, "host-a")
        };
        let id = src.migrate(&slow(to));
        let t0 = std::time::Instant::now();
        loop {
            let m = src
                .call("GET", &format!("/v1/migrations/{id}"), None)
                .json();
            if m["state"] == "running" && m["progress"].is_object() {
                break;
            }
            assert!(
                m["state"] == "starting" || m["state"] == "running",
                "{m}\nsource's agent: {}\ndestination's agent: {}\n{}",
                src.log_text(),
                dst.log_text(),
                std::fs::read_to_string(dst.dir.join("run/web-1.log")).unwrap_or_default()
            );
            assert!(t0.elapsed() < Duration::from_secs(30), "{m}");
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("killing the {victim}'s agent with the migration under way");
        let killed = if victim == "source" {
            &mut *src
        } else {
            &mut *dst
        };
        killed.signal(libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(300));
        killed.start();
        let (on, off) = the_one_host(src, dst);
        eprintln!("web-1 ended on {}", on.name);
        // The restarted source tells, under the id it gave, what became of the
        // migration it had started: followed again to its end.
        if victim == "source" {
            let m = src.wait_ended(&id, Duration::from_secs(60));
            assert_eq!(m["state"], "completed", "{m}\n{}", src.log_text());
            assert_eq!(on.name, dst.name);
            let list = src.call("GET", "/v1/migrations", None).json();
            let of_web1 = list
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["vm"] == "web-1")
                .count();
            assert_eq!(of_web1, 1, "one record of the one migration: {list}");
            assert!(
                src.log_text()
                    .contains("following again a migration begun before a restart"),
                "{}",
                src.log_text()
            );
        }
        assert!(!off.dir.join("vms/web-1.toml").exists());
        let out = ferry(&["verify", "--control", &on.control("web-1")]);
        assert!(out.status.success(), "verify on {}: {out:?}", on.name);
    }
}

#[test]
fn agents_in_two_network_namespaces_move_a_vm_over_their_link_and_back() {
    if !require_kvm() {
        return;
    }
    let Some(link) = ferry_tests::require_link("agents", None) else {
        return;
    };
    let _host = alongside();
    let dir = TempDir::new("agent-netns");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    let mut a = Agent::configure_in(
        &dir.join("a"),
        "host-a",
        &link.source_ns,
        ferry_tests::netns::SOURCE_ADDR,
    );
    let mut b = Agent::configure_in(
        &dir.join("b"),
        "host-b",
        &link.dest_ns,
        ferry_tests::netns::DEST_ADDR,
    );
    a.peer_with(&b);
    b.peer_with(&a);
    std::fs::write(dir.join("a/vms/web-1.toml"), vm_config("web-1")).unwrap();
    a.start();
    b.start();
    a.wait_for_vms("web-1 running on host-a", Duration::from_secs(60), |l| {
        running_with_heartbeats(l, &["web-1"])
    });
    let id = a.migrate(r#"{"vm": "web-1", "destination": "host-b"}"#);
    let m = a.wait_ended(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "completed", "{m}\n{}", a.log_text());
    assert!(
        m["destination_address"]
            .as_str()
            .unwrap_or("")
            .starts_with(ferry_tests::netns::DEST_ADDR),
        "{m}"
    );
    moved(&a, &b);
    let id = b.migrate(r#"{"vm": "web-1", "destination": "host-a"}"#);
    let m = b.wait_ended(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "completed", "{m}\n{}", b.log_text());
    moved(&b, &a);
    // The agents went before the link does.
    drop((a, b));
}

#[test]
fn a_storage_migration_through_the_api_moves_the_disks_under_a_writing_guest_and_the_config_follows()
 {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("agent-storage");
    let mut agent = Agent::configure(dir.path(), "host-a");
    agent.set(r#"datastores = ["ds1", "ds2"]"#);
    for ds in ["ds1", "ds2"] {
        std::fs::create_dir_all(dir.join(ds)).unwrap();
    }
    let image = dir.join("ds1/web-1-data.img");
    std::fs::write(dir.join("vms/web-1.toml"), disk_vm_config("web-1", &image)).unwrap();
    agent.start();
    agent.wait_for_vms("web-1 running", Duration::from_secs(60), |l| {
        running_with_heartbeats(l, &["web-1"])
    });
    wait_disk_writes(&agent.control("web-1"), 50);
    // What cannot be done is refused, and nothing moves.
    for (body, status, says) in [
        (
            r#"{"vm": "web-1", "datastore": "/elsewhere"}"#,
            400,
            "not one of this agent's datastores",
        ),
        (r#"{"vm": "web-9", "datastore": "ds2"}"#, 404, "no VM"),
        (
            r#"{"vm": "web-1", "datastore": "ds2", "disk": "root"}"#,
            404,
            "root",
        ),
        (
            r#"{"vm": "web-1", "datastore": "ds2", "speed": 1}"#,
            400,
            "speed",
        ),
    ] {
        let a = agent.call("POST", "/v1/storage-migrations", Some(body));
        assert_eq!(a.status, status, "{body}: {a:?}");
        assert!(a.body.contains(says), "{body}: {a:?}");
    }
    assert_eq!(
        agent.call("GET", "/v1/storage-migrations", None).json(),
        serde_json::json!([])
    );
    // Each datastore's space, for the rules that move VMs off a filling host.
    let text = agent.get("/metrics", None).unwrap().body;
    for ds in ["ds1", "ds2"] {
        let at = std::path::absolute(dir.join(ds)).unwrap();
        let free = sample(
            &text,
            &format!(
                "ferry_datastore_free_bytes{{datastore=\"{}\"}}",
                at.display()
            ),
        );
        assert!(free.is_some_and(|f| f > 0.0), "{ds}: {text}");
    }
    assert!(image.exists() && !dir.join("ds2/web-1").exists());
    let a = agent.call(
        "POST",
        "/v1/storage-migrations",
        Some(r#"{"vm": "web-1", "datastore": "ds2"}"#),
    );
    assert_eq!(a.status, 201, "{a:?}\n{}", agent.log_text());
    let id = a.json()["id"].as_str().unwrap().to_owned();
    let m = agent.wait_record_ended(
        &format!("/v1/storage-migrations/{id}"),
        Duration::from_secs(120),
    );
    assert_eq!(m["state"], "completed", "{m}\n{}", agent.log_text());
    assert_eq!(m["report"]["outcome"], "completed", "{m}");
    assert_eq!(m["report"]["disk_integrity_errors"], 0, "{m}");
    assert!(
        m["report"]["guest_bytes_written"].as_u64().unwrap_or(0) > 0,
        "{m}"
    );
    // The VM runs on the new image, and will start from it: its config names it.
    let moved = dir.join("ds2/web-1/web-1-data.img");
    assert!(moved.exists(), "{m}");
    let kept = dir.join("vms/web-1.toml");
    assert_eq!(
        m["config_rewritten"].as_str().map(std::path::PathBuf::from),
        Some(std::path::absolute(&kept).unwrap()),
        "{m}"
    );
    let names = config_disks(&kept);
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].ends_with("ds2/web-1/web-1-data.img"), "{names:?}");
    wait_disk_writes(&agent.control("web-1"), 50);
    let out = ferry(&["verify", "--control", &agent.control("web-1")]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Ended: a cancel is refused, the list shows it.
    let a = agent.call("DELETE", &format!("/v1/storage-migrations/{id}"), None);
    assert_eq!(a.status, 409, "{a:?}");
    let list = agent.call("GET", "/v1/storage-migrations", None).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
}

#[test]
fn a_vm_with_a_disk_migrates_through_the_agents_with_its_disk_there_and_back() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    // Host-a's own disk folder, not one of its datastores.
    let local = TempDir::new("agent-disks");
    let image = local.join("web-1-data.img");
    let (_dir, a, b) = two_hosts_set(
        "agent-disks-hosts",
        &disk_vm_config("web-1", &image),
        |a, b| {
            for agent in [a, b] {
                agent.set(r#"datastores = ["ds"]"#);
                std::fs::create_dir_all(agent.dir.join("ds")).unwrap();
            }
        },
    );
    wait_disk_writes(&a.control("web-1"), 50);
    // Not on storage host-b shares, and not sent along: refused before anything moves.
    let id = a.migrate(r#"{"vm": "web-1", "destination": "host-b"}"#);
    let m = a.wait_ended(&id, Duration::from_secs(60));
    assert_eq!(m["state"], "failed", "{m}");
    assert!(
        m["error"].as_str().unwrap_or("").contains("web-1-data.img"),
        "{m}"
    );
    a.wait_for_vms(
        "web-1 still running on host-a",
        Duration::from_secs(30),
        |l| running_with_heartbeats(l, &["web-1"]),
    );
    // Sent along: the copy lands in host-b's datastore, and host-b's config names it.
    let id = a.migrate(r#"{"vm": "web-1", "destination": "host-b", "copy_storage": true}"#);
    let m = a.wait_ended(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "completed", "{m}\n{}", a.log_text());
    moved(&a, &b);
    let there = b.dir.join("ds/web-1/web-1-data.img");
    assert!(there.exists());
    // The disk's bytes counted apart from the memory's.
    let text = a.get("/metrics", None).expect("/metrics answers").body;
    let disk: f64 = series(&text, "ferry_migration_bytes_total", r#"stream="disk""#)
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert!(disk >= 16.0 * 1024.0 * 1024.0 / 100.0, "{text}");
    let names = config_disks(&b.dir.join("vms/web-1.toml"));
    assert_eq!(
        names
            .iter()
            .map(std::path::PathBuf::from)
            .collect::<Vec<_>>(),
        vec![std::path::absolute(&there).unwrap()]
    );
    wait_disk_writes(&b.control("web-1"), 50);
    // And back, into host-a's datastore this time.
    let id = b.migrate(r#"{"vm": "web-1", "destination": "host-a", "copy_storage": true}"#);
    let m = b.wait_ended(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "completed", "{m}\n{}", b.log_text());
    moved(&b, &a);
    assert!(a.dir.join("ds/web-1/web-1-data.img").exists());
    // host-b still holds the copy it received: a third trip is refused, not written
    // over it, and the VM runs on where it is.
    let id = a.migrate(r#"{"vm": "web-1", "destination": "host-b", "copy_storage": true}"#);
    let m = a.wait_ended(&id, Duration::from_secs(60));
    assert_eq!(m["state"], "failed", "{m}");
    assert!(m["error"].as_str().unwrap_or("").contains("409"), "{m}");
    a.wait_for_vms(
        "web-1 still running on host-a",
        Duration::from_secs(30),
        |l| running_with_heartbeats(l, &["web-1"]),
    );
}

/// Two agents' folders (`a`, `b`) and a test CA and certificate (`pki`), each agent
/// serving HTTPS and migrating over TLS with them; not peered, not started.
fn tls_hosts(tag: &str) -> (TempDir, Agent, Agent) {
    let dir = TempDir::new(tag);
    for d in ["a", "b", "pki"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    write_test_pki(&dir.join("pki"));
    let mut a = Agent::configure(&dir.join("a"), "host-a");
    let mut b = Agent::configure(&dir.join("b"), "host-b");
    a.serve_tls(&dir.join("pki"));
    b.serve_tls(&dir.join("pki"));
    (dir, a, b)
}

#[test]
fn with_a_certificate_the_api_speaks_only_tls_and_agents_migrate_over_it() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let (dir, mut a, mut b) = tls_hosts("agent-tls");
    a.peer_with(&b);
    b.peer_with(&a);
    std::fs::write(dir.join("a/vms/web-1.toml"), vm_config("web-1")).unwrap();
    a.start();
    b.start();
    a.wait_for_vms("web-1 running on host-a", Duration::from_secs(60), |l| {
        running_with_heartbeats(l, &["web-1"])
    });
    // Plain HTTP gets no answer; a client that does not trust the CA gets no answer.
    let plain = request(&a.addr, "GET", "/healthz", None, None);
    assert!(plain.as_ref().is_none_or(|p| p.status != 200), "{plain:?}");
    let other = dir.join("other-ca");
    std::fs::create_dir_all(&other).unwrap();
    write_test_pki(&other);
    let untrusted = request_tls(
        &a.addr,
        &other.join("ca.pem"),
        "GET",
        "/healthz",
        None,
        None,
    );
    assert!(untrusted.is_err(), "{untrusted:?}");
    // A peer's token without the peer's certificate is no peer; an operator's token
    // needs none.
    let ca = dir.join("pki/ca.pem");
    let bare = request_tls(&a.addr, &ca, "GET", "/v1/vms", Some(&a.peer_token), None).unwrap();
    assert_eq!(bare.status, 401, "{bare:?}");
    assert!(bare.body.contains("certificate"), "{bare:?}");
    let bare = request_tls(
        &a.addr,
        &ca,
        "POST",
        "/v1/incoming",
        Some(&a.peer_token),
        Some(r#"{"vm": "x", "config": "", "source": "host-b"}"#),
    )
    .unwrap();
    assert_eq!(bare.status, 401, "{bare:?}");
    let operator = request_tls(&a.addr, &ca, "GET", "/v1/vms", Some(&a.token), None).unwrap();
    assert_eq!(operator.status, 200, "{operator:?}");
    // The CLI, given the CA.
    let out = a.cli(&["vms"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("web-1"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agents reach each other over TLS (each trusts the other's CA and presents
    // its own certificate).
    let id = a.migrate(r#"{"vm": "web-1", "destination": "host-b"}"#);
    let m = a.wait_ended(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "completed", "{m}\n{}", a.log_text());
    moved(&a, &b);
}

#[test]
fn eight_migrations_at_once_between_two_agents_all_complete_and_verify() {
    if !require_kvm() {
        return;
    }
    // Eight guests and sixteen VMMs at once: nothing else alongside.
    let _host = exclusive();
    let names: Vec<String> = (1..=8).map(|i| format!("vm-{i}")).collect();
    // Over TLS, as a fleet runs; eight slots each way.
    let (dir, mut a, mut b) = tls_hosts("agent-eight");
    for agent in [&mut a, &mut b] {
        agent.set("max_outbound = 8\nmax_inbound = 8");
    }
    a.peer_with(&b);
    b.peer_with(&a);
    for n in &names {
        std::fs::write(
            dir.join(format!("a/vms/{n}.toml")),
            format!(
                "name = \"{n}\"\nmemory_mib = 32\n[workload]\nworking_set_mib = 8\n\
                 dirty_pages_per_sec = 200\n"
            ),
        )
        .unwrap();
    }
    a.start();
    b.start();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    a.wait_for_vms(
        "the eight running on host-a",
        Duration::from_secs(120),
        |l| running_with_heartbeats(l, &all),
    );
    // Asked for all at once, as eight operators (or an evacuation) would.
    let ids: Vec<String> = std::thread::scope(|s| {
        let asks: Vec<_> = names
            .iter()
            .map(|n| {
                let a = &a;
                s.spawn(move || a.migrate(&format!(r#"{{"vm": "{n}", "destination": "host-b"}}"#)))
            })
            .collect();
        asks.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n, id) in names.iter().zip(&ids) {
        let m = a.wait_ended(id, Duration::from_secs(240));
        assert_eq!(m["state"], "completed", "{n}: {m}\n{}", a.log_text());
        assert_eq!(m["tls"], true, "{n}: {m}");
    }
    b.wait_for_vms(
        "the eight running on host-b",
        Duration::from_secs(60),
        |l| running_with_heartbeats(l, &all),
    );
    for n in &names {
        let out = ferry(&["verify", "--control", &b.control(n)]);
        assert!(
            out.status.success(),
            "{n} at its destination: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    a.wait_for_vms("none left on host-a", Duration::from_secs(30), |l| {
        l.is_empty()
    });
}
