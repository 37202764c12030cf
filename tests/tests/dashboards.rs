//! The dashboards and alert rules against a real Prometheus scraping real agents
//! during a real migration: every query of both dashboards returns data.

use std::path::PathBuf;
use std::time::Duration;

use ferry_tests::agent::Agent;
use ferry_tests::prometheus::{Prometheus, unix_now};
use ferry_tests::{TempDir, alongside, require_command, require_ebpf, require_kvm};
use serde_json::Value;

fn dashboards() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// (where, PromQL) of every panel target and annotation of a dashboard.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((format!("panel {} {}", p["title"], t["refId"]), e.to_owned()));
                }
            }
            walk(p["panels"].as_array().map_or(&[], |v| v), out);
        }
    }
    let mut out = Vec::new();
    walk(dashboard["panels"].as_array().map_or(&[], |v| v), &mut out);
    for a in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(e) = a["target"]["expr"].as_str() {
            out.push((format!("annotation {}", a["name"]), e.to_owned()));
        }
    }
    out
}

/// Grafana's substitutions for a 1 s scrape interval: `$__rate_interval` is at least
/// four scrape intervals.
fn substitute(expr: &str, vm: &str) -> String {
    expr.replace("$__rate_interval", "5s")
        .replace("$__interval", "2s")
        .replace("$instance", ".*")
        .replace("$vm", vm)
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus_scraping_agents_during_a_migration() {
    if !require_kvm() || !require_ebpf() {
        return;
    }
    if !require_command(
        "prometheus",
        "cargo xtask setup installs it (Debian package prometheus)",
    ) {
        return;
    }
    let _host = alongside();
    let dir = TempDir::new("dashboards-prometheus");
    let mut a = Agent::configure(&dir.join("a"), "host-a");
    let mut b = Agent::configure(&dir.join("b"), "host-b");
    a.peer_with(&b);
    b.peer_with(&a);
    for agent in [&a, &b] {
        agent.set(r#"datastores = ["ds"]"#);
        std::fs::create_dir_all(agent.dir.join("ds")).unwrap();
    }
    // A guest that dirties memory and writes its disk directly (O_DIRECT: the host's
    // block layer sees every write at once).
    std::fs::write(
        dir.join("a/vms/web-1.toml"),
        format!(
            "name = \"web-1\"\nmemory_mib = 64\n[workload]\nworking_set_mib = 16\n\
             dirty_pages_per_sec = 100\n[workload.disk]\nwrite_ops_per_sec = 200\n\
             [[disks]]\nid = \"data\"\npath = \"{}\"\nsize_mib = 16\ncache = \"none\"\n",
            a.dir.join("ds/web-1-data.img").display()
        ),
    )
    .unwrap();
    a.start();
    b.start();
    a.wait_for_vms("web-1 running on host-a", Duration::from_secs(60), |l| {
        l.iter()
            .any(|v| v["name"] == "web-1" && v["heartbeats"].as_u64().unwrap_or(0) > 0)
    });
    let rules = dashboards().join("alerts.yml");
    let prom = Prometheus::start(
        &dir.join("prometheus"),
        &[a.addr.as_str(), b.addr.as_str()],
        &[&rules],
    );
    // Both agents scraped, the VM's first sample in.
    prom.wait_for(
        "both agents scraped",
        r#"count(up{job="ferry"} == 1) == 2"#,
        Duration::from_secs(60),
    );
    prom.wait_for(
        "web-1's dirty rate scraped",
        r#"ferry_vm_dirty_pages_per_second{vm="web-1"}"#,
        Duration::from_secs(60),
    );
    // The alert rules load in a real Prometheus, every one of them.
    let groups = prom.api("/api/v1/rules").expect("the rules");
    let loaded: usize = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().map_or(0, Vec::len))
        .sum();
    let written = std::fs::read_to_string(&rules)
        .unwrap()
        .matches("- alert:")
        .count();
    assert_eq!(loaded, written, "{groups}");
    let start = unix_now() - 5.0;
    // Capped at 16 Mbit/s, the migration lasts seconds whatever this host's speed:
    // every per-migration series is scraped while it runs.
    let id = a.migrate(
        r#"{"vm": "web-1", "destination": "host-b", "copy_storage": true,
            "limits": {"bandwidth_mbit": 16}}"#,
    );
    let m = a.wait_ended(&id, Duration::from_secs(180));
    assert_eq!(m["state"], "completed", "{m}\n{}", a.log_text());
    let total_ms = m["total_ms"].as_f64().unwrap_or(0.0);
    assert!(
        total_ms > 3000.0,
        "the migration took {total_ms} ms: too short for 1 s scrapes to see it run"
    );
    // A few scrapes after the end: the counters it ended with, the VM on host-b.
    prom.wait_for(
        "the migration counted",
        r#"ferry_migrations_total{outcome="completed"}"#,
        Duration::from_secs(30),
    );
    prom.wait_for(
        "web-1 sampled on host-b",
        r#"ferry_vm_dirty_pages_per_second{vm="web-1",instance=~".*"} and on(instance) ferry_agent_info{host="host-b"}"#,
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(3));
    let end = unix_now();
    let mut empty = Vec::new();
    let mut ran = 0;
    for file in ["ferry-fleet.json", "ferry-migration.json"] {
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(dashboards().join(file)).unwrap())
                .unwrap();
        for (what, expr) in queries(&d) {
            let expr = substitute(&expr, "web-1");
            ran += 1;
            match prom.query_range(&expr, start, end, 1.0) {
                Ok(series) if !series.is_empty() => {}
                Ok(_) => empty.push(format!("{file} {what}: no series from `{expr}`")),
                Err(e) => empty.push(format!("{file} {what}: `{expr}` fails: {e}")),
            }
        }
    }
    assert!(ran > 20, "{ran} queries");
    assert!(
        empty.is_empty(),
        "{} of {ran} dashboard queries returned nothing:\n{}",
        empty.len(),
        empty.join("\n")
    );
}
