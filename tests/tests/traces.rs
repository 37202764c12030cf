//! OpenTelemetry traces from real agents to a receiver that decodes real OTLP
//! protobuf: one trace per migration across both hosts, over gRPC from one agent and
//! HTTP from the other; and a collector that never answers, or is not there, holds
//! no migration back.

use std::time::Duration;

use ferry_tests::agent::{Agent, write_test_pki};
use ferry_tests::otlp::{Receiver, Span};
use ferry_tests::{TempDir, alongside, require_kvm};

/// Two agents, web-1 (a guest that writes memory, and with `disk` a disk image in
/// host-a's datastore) on host-a; each agent's OTLP variables as given.
fn two_hosts(
    tag: &str,
    env_a: &[(&str, &str)],
    env_b: &[(&str, &str)],
    disk: bool,
) -> (TempDir, Agent, Agent) {
    let dir = TempDir::new(tag);
    let mut a = Agent::configure(&dir.join("a"), "host-a");
    let mut b = Agent::configure(&dir.join("b"), "host-b");
    // As a fleet runs: the API over HTTPS, migrations over TLS, one CA.
    std::fs::create_dir_all(dir.join("pki")).unwrap();
    write_test_pki(&dir.join("pki"));
    a.serve_tls(&dir.join("pki"));
    b.serve_tls(&dir.join("pki"));
    a.peer_with(&b);
    b.peer_with(&a);
    for (agent, env) in [(&mut a, env_a), (&mut b, env_b)] {
        agent.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }
    let mut config = "name = \"web-1\"\nmemory_mib = 64\n[workload]\nworking_set_mib = 16\n\
                      dirty_pages_per_sec = 300\n"
        .to_owned();
    if disk {
        for agent in [&a, &b] {
            agent.set(r#"datastores = ["ds"]"#);
            std::fs::create_dir_all(agent.dir.join("ds")).unwrap();
        }
        config.push_str(&format!(
            "[workload.disk]\nwrite_ops_per_sec = 200\n[[disks]]\nid = \"data\"\n\
             path = \"{}\"\nsize_mib = 16\n",
            a.dir.join("ds/web-1-data.img").display()
        ));
    }
    std::fs::write(dir.join("a/vms/web-1.toml"), config).unwrap();
    a.start();
    b.start();
    a.wait_for_vms("web-1 running on host-a", Duration::from_secs(60), |l| {
        l.iter()
            .any(|v| v["name"] == "web-1" && v["heartbeats"].as_u64().unwrap_or(0) > 0)
    });
    (dir, a, b)
}

fn one<'a>(spans: &'a [Span], host: &str, name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.host == host && s.name == name)
        .unwrap_or_else(|| panic!("no {name:?} span from {host}: {spans:#?}"))
}

#[test]
fn one_migration_is_one_trace_across_both_hosts_over_grpc_and_http() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let receiver = Receiver::start();
    let (dir, a, b) = two_hosts(
        "traces-one",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.grpc),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.http),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "ferry-agent-b"),
        ],
        true,
    );
    // Capped, so the migration lasts seconds and has rounds to show; its disk
    // travels too.
    let id = a.migrate(
        r#"{"vm": "web-1", "destination": "host-b", "copy_storage": true,
            "limits": {"bandwidth_mbit": 32}}"#,
    );
    let m = a.wait_ended(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "completed", "{m}\n{}", a.log_text());
    let spans = receiver.wait_for("both hosts' spans", Duration::from_secs(60), |s| {
        s.iter()
            .any(|s| s.host == "host-a" && s.name == "migration")
            && s.iter().any(|s| s.host == "host-b" && s.name == "receive")
    });
    let root = one(&spans, "host-a", "migration");
    let trace = &root.trace_id;
    assert_eq!(
        root.attr("ferry.migration.id"),
        Some(id.as_str()),
        "{root:#?}"
    );
    assert_eq!(root.parent_span_id, "", "the root has no parent");
    // Each host's exporter, its own protocol and service name.
    assert!(
        spans
            .iter()
            .filter(|s| s.host == "host-a")
            .all(|s| s.via == "grpc" && s.service == "ferry-agent"),
        "{spans:#?}"
    );
    assert!(
        spans
            .iter()
            .filter(|s| s.host == "host-b")
            .all(|s| s.via == "http" && s.service == "ferry-agent-b"),
        "{spans:#?}"
    );
    // One trace: the destination's spans under the source's call to its agent.
    let call = one(&spans, "host-a", "POST /v1/incoming");
    let server = one(&spans, "host-b", "POST /v1/incoming");
    let receive = one(&spans, "host-b", "receive");
    for s in [call, server, receive] {
        assert_eq!(&s.trace_id, trace, "{s:#?}");
    }
    assert_eq!(server.parent_span_id, call.span_id);
    assert_eq!(receive.parent_span_id, server.span_id);
    assert_eq!(receive.attr("ferry.received"), Some("true"), "{receive:#?}");
    for name in ["vmm start", "receiving"] {
        assert_eq!(one(&spans, "host-b", name).parent_span_id, receive.span_id);
    }
    // The phases under the root, the rounds under pre-copy, the pause and the
    // verification under the switchover.
    let setup = one(&spans, "host-a", "setup");
    assert_eq!(setup.parent_span_id, root.span_id);
    assert_eq!(call.parent_span_id, setup.span_id);
    let precopy = one(&spans, "host-a", "precopy");
    let switchover = one(&spans, "host-a", "switchover");
    for s in [precopy, switchover] {
        assert_eq!(s.parent_span_id, root.span_id, "{s:#?}");
    }
    let first = one(&spans, "host-a", "first pass");
    assert_eq!(first.parent_span_id, precopy.span_id);
    let disk = one(&spans, "host-a", "disk copy");
    assert_eq!(disk.parent_span_id, precopy.span_id);
    assert!(disk.attr("ferry.disk.bytes").is_some(), "{disk:#?}");
    let rounds: Vec<_> = spans.iter().filter(|s| s.name == "round").collect();
    assert!(
        rounds.iter().all(|r| r.parent_span_id == precopy.span_id),
        "{rounds:#?}"
    );
    assert!(first.attr("ferry.codec").is_some(), "{first:#?}");
    assert!(
        first.attr("ferry.dirty_pages_per_second").is_some(),
        "{first:#?}"
    );
    let pause = one(&spans, "host-a", "pause");
    assert_eq!(pause.parent_span_id, switchover.span_id);
    assert!(pause.attr("ferry.switchover_ms").is_some(), "{pause:#?}");
    let verification = one(&spans, "host-a", "verification");
    assert_eq!(verification.attr("ferry.memory_verified"), Some("true"));
    // Every decision an event with its setting, value and reason; the prediction
    // and the measured outcome on the root.
    let decisions: Vec<_> = root
        .events
        .iter()
        .filter(|(n, _)| n == "policy.decision")
        .collect();
    for (_, attrs) in &decisions {
        for key in ["ferry.setting", "ferry.value", "ferry.reason"] {
            assert!(attrs.iter().any(|(k, _)| k == key), "{attrs:?}");
        }
    }
    let told = |setting: &str, value: &str| {
        decisions.iter().any(|(_, a)| {
            a.contains(&("ferry.setting".into(), setting.into()))
                && a.contains(&("ferry.value".into(), value.into()))
        })
    };
    let record = m["decisions"].as_array().unwrap();
    assert!(!record.is_empty(), "{m}");
    for d in record {
        let (setting, value) = (d["setting"].as_str().unwrap(), d["value"].as_str().unwrap());
        assert!(
            told(setting, value),
            "{setting} = {value} is not an event: {root:#?}"
        );
    }
    for key in [
        "ferry.predicted.total_ms",
        "ferry.predicted.downtime_ms",
        "ferry.total_ms",
        "ferry.downtime_ms",
        "ferry.bytes_on_wire",
    ] {
        assert!(root.attr(key).is_some(), "{key}: {root:#?}");
    }
    assert_eq!(root.attr("ferry.outcome"), Some("completed"));
    assert_eq!(root.status, 1, "{root:#?}");
    // The logs name the trace: the source's agent, and both VMMs (the handshake
    // carried it).
    assert!(
        a.log_text().contains(&format!("trace_id={trace}")),
        "{}",
        a.log_text()
    );
    for (agent, log) in [(&a, "run/web-1.log"), (&b, "run/web-1.log")] {
        let text = std::fs::read_to_string(agent.dir.join(log)).unwrap_or_default();
        assert!(
            text.contains(&format!("trace_id={trace}")),
            "{}: {text}",
            agent.name
        );
    }
    // Counted as exported.
    let text = a.get("/metrics", None).expect("/metrics").body;
    assert!(
        text.lines().any(
            |l| l.starts_with(r#"ferry_otel_spans_total{outcome="exported"}"#)
                && !l.ends_with(" 0")
        ),
        "{text}"
    );
    assert_eq!(m["tls"], true, "{m}");
    assert!(
        text.contains(r#"outcome="completed",policy="adaptive",transport="tls"} 1"#),
        "{text}"
    );
    nothing_secret(&dir, &[&a, &b], &spans);
}

/// No token, one-time ticket or key material in anything the agents and their VMMs
/// wrote or exported: their logs, the VMMs' logs, the metrics, the spans.
fn nothing_secret(dir: &TempDir, agents: &[&Agent], spans: &[Span]) {
    let mut secrets: Vec<(String, String)> = Vec::new();
    for a in agents {
        for (what, t) in [
            ("operator token", &a.token),
            ("peer token", &a.peer_token),
            ("webhook token", &a.webhook_token),
        ] {
            secrets.push((format!("{}'s {what}", a.name), t.clone()));
        }
    }
    let key = std::fs::read_to_string(dir.join("pki/key.pem")).unwrap();
    secrets.push(("a key's PEM label".into(), "PRIVATE KEY".into()));
    for line in key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
    {
        secrets.push(("a line of the private key".into(), line.to_owned()));
    }
    let mut texts: Vec<(String, String)> = vec![("the spans".into(), format!("{spans:?}"))];
    for a in agents {
        texts.push((format!("{}'s log", a.name), a.log_text()));
        texts.push((
            format!("{}'s metrics", a.name),
            a.get("/metrics", None).expect("/metrics").body,
        ));
        for entry in std::fs::read_dir(a.dir.join("run")).unwrap().flatten() {
            let path = entry.path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if path.extension().is_some_and(|e| e == "ticket") {
                secrets.push((format!("the ticket {}", path.display()), text.trim().into()));
            } else if path.extension().is_some_and(|e| e == "log") {
                texts.push((path.display().to_string(), text));
            }
        }
    }
    assert!(
        texts.len() >= 6,
        "{:?}",
        texts.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for (what, secret) in &secrets {
        assert!(!secret.is_empty());
        for (name, text) in &texts {
            assert!(!text.contains(secret.as_str()), "{what} is in {name}");
        }
    }
}

#[test]
fn a_collector_that_never_answers_or_is_not_there_holds_no_migration_back() {
    if !require_kvm() {
        return;
    }
    let _host = alongside();
    let receiver = Receiver::start();
    receiver.go_silent();
    let nowhere = format!("http://127.0.0.1:{}", ferry_tests::free_port());
    let (_dir, a, b) = two_hosts(
        "traces-away",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.grpc),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &nowhere),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ],
        false,
    );
    let id = a.migrate(r#"{"vm": "web-1", "destination": "host-b"}"#);
    let m = a.wait_ended(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "completed", "{m}\n{}", a.log_text());
    // And back, once host-b's agent has seen it run there (its record on host-a may
    // say completed first): the second migration is not held by the first's spans
    // either.
    b.wait_for_vms("web-1 running on host-b", Duration::from_secs(30), |l| {
        l.iter()
            .any(|v| v["name"] == "web-1" && v["state"] == "running")
    });
    let id = b.migrate(r#"{"vm": "web-1", "destination": "host-a"}"#);
    let m = b.wait_ended(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "completed", "{m}\n{}", b.log_text());
    // What could not go is counted, on both hosts (an export is given up on after
    // 10 s).
    for agent in [&a, &b] {
        let t0 = std::time::Instant::now();
        loop {
            let text = agent.get("/metrics", None).expect("/metrics").body;
            let dropped = text
                .lines()
                .find_map(|l| l.strip_prefix(r#"ferry_otel_spans_total{outcome="dropped"} "#))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if dropped > 0.0 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{}: no dropped spans counted:\n{text}",
                agent.name
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    assert!(receiver.spans().is_empty());
}

#[test]
fn an_unknown_otlp_protocol_stops_the_agent_at_start_by_name() {
    let dir = TempDir::new("traces-protocol");
    let _agent = Agent::configure(dir.path(), "host-a");
    let out = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["agent", "--config"])
        .arg(dir.join("agent.toml"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && said.contains("http/json"),
        "{said}"
    );
}
