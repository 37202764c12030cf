//! Alert-triggered migration: a real Prometheus evaluates a real rule of
//! `dashboards/alerts.yml` on a real metric (a datastore filled for real), a real
//! Alertmanager posts its webhook to every agent with the token, and the agent whose
//! host the alert names moves its VMs away.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::agent::{Agent, request};
use ferry_tests::alertmanager::{Alertmanager, Timers, Webhook};
use ferry_tests::otlp::Receiver;
use ferry_tests::prometheus::{Prometheus, Target, rules_firing_after, unix_now};
use ferry_tests::{TempDir, alongside, ferry, require_command, require_kvm, require_root};
use serde_json::Value;

/// A guest writing its memory at a steady pace, its pages random (so a migration's
/// bytes are what the link carries: nothing compresses away).
fn paced(name: &str, working_set_mib: u64) -> String {
    format!(
        "name = \"{name}\"\nmemory_mib = 32\n[workload]\nworking_set_mib = {working_set_mib}\n\
         dirty_pages_per_sec = 300\ncontent = \"random\"\nfill = true\n"
    )
}

fn ready() -> bool {
    require_kvm()
        && require_root("mounts a tmpfs datastore to fill")
        && require_command(
            "prometheus",
            "apt-get install prometheus (cargo xtask setup)",
        )
        && require_command(
            "prometheus-alertmanager",
            "apt-get install prometheus-alertmanager (cargo xtask setup)",
        )
}

/// A tmpfs of `mib` MiB at `path`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mount a tmpfs at {}", path.display());
        Self(path.to_owned())
    }

    /// Writes a file until less than `free_share` of the file system is free.
    fn fill(&self, free_share: f64) -> PathBuf {
        let (size, free) = ferry_tests::fs_space(&self.0).expect("statvfs the datastore");
        let want = (free as f64 - size as f64 * free_share * 0.5) as usize;
        let file = self.0.join("filler");
        std::fs::write(&file, vec![0xa5u8; want]).expect("fill the datastore");
        file
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn alerts_yml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/alerts.yml")
}

/// Two agents on loopback, each the other's peer; host-a's datastore a 16 MiB tmpfs;
/// `vms` started on host-a. Prometheus scrapes both (each target labelled with its
/// host) with alerts.yml's rules firing after 1 s instead of minutes; Alertmanager
/// posts to both agents' webhooks with each one's token.
struct Fleet {
    a: Agent,
    b: Agent,
    prom: Prometheus,
    _am: Alertmanager,
    ds: Tmpfs,
    _dir: TempDir,
}

/// `a_tables`: TOML tables appended to host-a's config (`[limits]` …).
/// `a_env`: set in host-a's agent's environment.
fn fleet(
    tag: &str,
    vms: &[(&str, String)],
    a_lines: &[&str],
    a_tables: &str,
    a_env: &[(&str, &str)],
) -> Fleet {
    let dir = TempDir::new(tag);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    let ds = Tmpfs::mount(&dir.join("a/ds"), 16);
    let mut a = Agent::configure(&dir.join("a"), "host-a");
    let mut b = Agent::configure(&dir.join("b"), "host-b");
    a.set("datastores = [\"ds\"]");
    a.env = a_env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for l in a_lines {
        a.set(l);
    }
    a.peer_with(&b);
    b.peer_with(&a);
    let config = a.dir.join("agent.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n{a_tables}\n")).unwrap();
    for (name, body) in vms {
        std::fs::write(dir.join(format!("a/vms/{name}.toml")), body).unwrap();
    }
    a.start();
    b.start();
    let names: Vec<&str> = vms.iter().map(|(n, _)| *n).collect();
    a.wait_for_vms("the VMs running on host-a", Duration::from_secs(60), |l| {
        names.iter().all(|n| {
            l.iter()
                .any(|v| v["name"] == *n && v["presence"] == "running" && v["state"] == "running")
        })
    });
    let rules = dir.join("alerts.yml");
    let changed = rules_firing_after(&alerts_yml(), &rules, "1s").unwrap();
    assert!(
        changed
            .iter()
            .any(|c| c.starts_with("FerryDatastoreFilling: for 5m")),
        "{changed:?}"
    );
    let webhook = |agent: &Agent| Webhook {
        ca_file: None,
        url: format!("http://{}/v1/alerts", agent.addr),
        token_file: agent.dir.join("webhook-token"),
    };
    let am = Alertmanager::start(
        &dir.join("alertmanager"),
        &[webhook(&a), webhook(&b)],
        &Timers {
            group_wait: Duration::from_secs(1),
            group_interval: Duration::from_secs(1),
            repeat_interval: Duration::from_secs(2),
        },
    );
    let prom = Prometheus::start_with(
        &dir.join("prometheus"),
        &[
            Target::host(&a.addr, "host-a"),
            Target::host(&b.addr, "host-b"),
        ],
        &[&rules],
        Some(&am.addr),
    );
    prom.wait_for(
        "host-a's datastore scraped",
        "ferry_datastore_free_bytes{host=\"host-a\"}",
        Duration::from_secs(30),
    );
    Fleet {
        a,
        b,
        prom,
        _am: am,
        ds,
        _dir: dir,
    }
}

fn json_list(agent: &Agent, path: &str) -> Vec<Value> {
    let a = agent.read(path);
    assert_eq!(a.status, 200, "{a:?}");
    a.json().as_array().cloned().unwrap_or_default()
}

/// Polls `path` of `agent` until `pred` holds for its list.
fn wait_list(agent: &Agent, path: &str, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let t0 = std::time::Instant::now();
    loop {
        let list = json_list(agent, path);
        if pred(&list) {
            return list;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what}: not within 60 s: {list:#?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const FIRING: &str =
    "ALERTS{alertname=\"FerryDatastoreFilling\",alertstate=\"firing\",host=\"host-a\"}";

#[test]
fn a_real_alert_moves_the_vm_off_its_host_once_and_the_host_takes_none_in() {
    if !ready() {
        return;
    }
    let _shared = alongside();
    let receiver = Receiver::start();
    let f = fleet(
        "alert-move",
        &[("web-1", paced("web-1", 4))],
        &[],
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.grpc),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    );
    let filler = f.ds.fill(0.10);
    f.prom
        .wait_for("the alert firing", FIRING, Duration::from_secs(60));
    let fired = unix_now();
    // Alertmanager posts to both agents; host-a's moves web-1 to its only peer.
    let migrations = wait_list(&f.a, "/v1/migrations", "a migration started", |l| {
        !l.is_empty()
    });
    let m = &migrations[0];
    assert_eq!(m["vm"], "web-1");
    assert_eq!(m["trigger"], "alert:FerryDatastoreFilling", "{m:#}");
    let first = &m["decisions"][0];
    assert_eq!(first["setting"], "destination", "{m:#}");
    assert_eq!(first["value"], "host-b");
    assert!(
        first["reason"].as_str().unwrap().contains("host-b: ")
            && first["reason"].as_str().unwrap().contains("free"),
        "{first}"
    );
    eprintln!(
        "alert firing (seen by the test) to migration started: {:.2} s (group_wait 1 s)",
        m["started_unix_ms"].as_f64().unwrap() / 1e3 - fired
    );
    let id = m["id"].as_str().unwrap();
    let ended = f.a.wait_ended(id, Duration::from_secs(120));
    assert_eq!(ended["state"], "completed", "{ended:#}");
    assert_eq!(
        ended["decisions"][0]["setting"], "destination",
        "the choice stays the record's first decision: {ended:#}"
    );
    f.b.wait_for_vms("web-1 running on host-b", Duration::from_secs(30), |l| {
        l.iter()
            .any(|v| v["name"] == "web-1" && v["state"] == "running")
    });
    // The trace says what started it and why there: the choice is an event on its root.
    let spans = receiver.wait_for("the migration's root span", Duration::from_secs(60), |s| {
        s.iter()
            .any(|s| s.name == "migration" && s.host == "host-a")
    });
    let root = spans
        .iter()
        .find(|s| s.name == "migration" && s.host == "host-a")
        .unwrap();
    assert_eq!(
        root.attr("ferry.migration.trigger"),
        Some("alert:FerryDatastoreFilling"),
        "{root:#?}"
    );
    let placed = root
        .events
        .iter()
        .find(|(name, _)| name == "placement.decision")
        .unwrap_or_else(|| panic!("no placement.decision event: {root:#?}"));
    let attr = |k: &str| {
        placed
            .1
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(attr("ferry.value"), Some("host-b"), "{placed:?}");
    assert!(
        attr("ferry.reason").is_some_and(|r| r.contains("free")),
        "{placed:?}"
    );
    let out = ferry(&["verify", "--control", &f.b.control("web-1")]);
    assert!(
        out.status.success(),
        "verify at the destination: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Alertmanager sends the alert again (repeat_interval 2 s): nothing new starts.
    let alerts = wait_list(&f.a, "/v1/alerts", "a repeat received", |l| {
        l.iter().any(|a| a["repeats"].as_u64().unwrap_or(0) >= 2)
    });
    let alert = &alerts[0];
    assert_eq!(alert["action"], "evacuate");
    assert_eq!(alert["migrations"].as_array().unwrap().len(), 1);
    assert_eq!(json_list(&f.a, "/v1/migrations").len(), 1);
    // host-b was sent the same alert, and moved nothing: it names host-a.
    let at_b = json_list(&f.b, "/v1/alerts");
    assert_eq!(at_b.len(), 1, "{at_b:#?}");
    assert_eq!(at_b[0]["action"], "none");
    assert!(json_list(&f.b, "/v1/migrations").is_empty());

    // While the alert fires, host-a takes no VM in.
    let health = f.a.read("/healthz").json();
    assert_eq!(health["evacuating"], true, "{health}");
    let back = f.b.call(
        "POST",
        "/v1/migrations",
        Some(r#"{"vm":"web-1","destination":"host-a"}"#),
    );
    assert_eq!(back.status, 201, "{back:?}");
    let refused =
        f.b.wait_ended(back.json()["id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(refused["state"], "failed");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("being evacuated"),
        "{refused:#}"
    );

    // The datastore emptied: the alert resolves, and host-a takes VMs again.
    std::fs::remove_file(filler).unwrap();
    wait_list(&f.a, "/v1/alerts", "the alert resolved", |l| {
        l.iter().all(|a| a["status"] == "resolved")
    });
    assert_eq!(f.a.read("/healthz").json()["evacuating"], false);
    let metrics = request(&f.a.addr, "GET", "/metrics", None, None)
        .unwrap()
        .body;
    assert!(
        metrics.contains("ferry_alerts_total{action=\"evacuate\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ferry_host_evacuating 0"));
}

#[test]
fn a_resolved_alert_drops_the_vms_still_queued_and_moves_no_more() {
    if !ready() {
        return;
    }
    let _shared = alongside();
    // One migration at a time, over a stream capped so that it lasts while the
    // alert resolves: the two other VMs wait in the queue.
    let vms: Vec<(&str, String)> = ["db-1", "db-2", "db-3"]
        .into_iter()
        .map(|n| (n, paced(n, 16)))
        .collect();
    let f = fleet(
        "alert-resolve",
        &vms,
        &["max_outbound = 1"],
        "[limits]\nbandwidth_mbit = 8",
        &[],
    );
    let filler = f.ds.fill(0.10);
    f.prom
        .wait_for("the alert firing", FIRING, Duration::from_secs(60));
    let alerts = wait_list(&f.a, "/v1/alerts", "one VM leaving, two queued", |l| {
        l.iter().any(|a| {
            a["migrations"].as_array().is_some_and(|m| m.len() == 1)
                && a["queued"].as_array().is_some_and(|q| q.len() == 2)
        })
    });
    let leaving = alerts[0]["migrations"][0].as_str().unwrap().to_owned();
    let running = f.a.read(&format!("/v1/migrations/{leaving}")).json();
    assert!(
        !["completed", "failed", "cancelled"].contains(&running["state"].as_str().unwrap()),
        "premise: the first migration still runs when the alert resolves: {running:#}"
    );
    std::fs::remove_file(filler).unwrap();
    let alerts = wait_list(&f.a, "/v1/alerts", "the alert resolved", |l| {
        l.iter().all(|a| a["status"] == "resolved")
    });
    assert!(
        alerts[0]["queued"].as_array().unwrap().is_empty(),
        "{alerts:#?}"
    );
    // The one under way goes on (it is cancelled here only to end the test sooner).
    let now = f.a.read(&format!("/v1/migrations/{leaving}")).json();
    if !["completed", "failed", "cancelled"].contains(&now["state"].as_str().unwrap()) {
        let c =
            f.a.call("DELETE", &format!("/v1/migrations/{leaving}"), None);
        assert_eq!(c.status, 202, "{c:?}");
    }
    f.a.wait_ended(&leaving, Duration::from_secs(120));
    // Slots free, queue empty: nothing more leaves.
    std::thread::sleep(Duration::from_secs(2));
    let all = json_list(&f.a, "/v1/migrations");
    assert_eq!(all.len(), 1, "{all:#?}");
    let on_a = json_list(&f.a, "/v1/vms");
    let left: Vec<&str> = on_a.iter().filter_map(|v| v["name"].as_str()).collect();
    for n in ["db-1", "db-2", "db-3"] {
        if all[0]["vm"] != n || all[0]["state"] != "completed" {
            assert!(left.contains(&n), "{n} still on host-a: {on_a:#?}");
        }
    }
    let metrics = request(&f.a.addr, "GET", "/metrics", None, None)
        .unwrap()
        .body;
    assert!(
        metrics.contains("ferry_alerts_total{action=\"cancel\"} 1"),
        "{metrics}"
    );
}

fn webhook_body(version: &str, status: &str, fingerprint: &str, labels: &str) -> String {
    format!(
        r#"{{"version":"{version}","groupKey":"{{}}:{{}}","truncatedAlerts":0,"status":"{status}","receiver":"ferry","groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"http://am","alerts":[{{"status":"{status}","labels":{labels},"annotations":{{}},"startsAt":"2026-12-07T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://p","fingerprint":"{fingerprint}"}}]}}"#
    )
}

#[test]
fn the_webhook_takes_only_its_token_refuses_bad_payloads_and_holds_a_thousand_posts_a_second() {
    if !require_kvm() {
        return;
    }
    let _shared = alongside();
    let dir = TempDir::new("alert-hook");
    let mut a = Agent::configure(dir.path(), "host-a");
    std::fs::write(dir.join("vms/web-1.toml"), paced("web-1", 4)).unwrap();
    a.start();
    let here =
        r#"{"alertname":"FerryDatastoreFilling","ferry_action":"migrate-away","host":"host-a"}"#;
    let post = |token: Option<&str>, body: &str| {
        request(&a.addr, "POST", "/v1/alerts", token, Some(body)).expect("the agent answers")
    };
    // No token, a peer's, the operator's for reading only: nothing happens.
    let firing = webhook_body("4", "firing", "fp-here", here);
    assert_eq!(post(None, &firing).status, 401);
    assert_eq!(post(Some("not-a-token-of-this-agent"), &firing).status, 401);
    assert_eq!(post(Some(&a.peer_token), &firing).status, 403);
    assert_eq!(
        request(&a.addr, "GET", "/v1/alerts", Some(&a.webhook_token), None)
            .unwrap()
            .status,
        403
    );
    // Bad payloads: 400 with the reason, nothing booked.
    for (body, why) in [
        (webhook_body("3", "firing", "fp-here", here), "version"),
        (
            webhook_body(
                "4",
                "firing",
                "fp-x",
                r#"{"alertname":"X","ferry_action":"migrate-away"}"#,
            ),
            "neither a `host` nor a `vm`",
        ),
        (webhook_body("4", "firing", "", here), "fingerprint"),
        ("{\"version\": \"4\"}".to_owned(), "webhook payload"),
        ("not json".to_owned(), "webhook payload"),
    ] {
        let r = post(Some(&a.webhook_token), &body);
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert!(r.body.contains(why), "{why} in {}", r.body);
    }
    assert!(json_list(&a, "/v1/alerts").is_empty());
    assert_eq!(a.read("/healthz").json()["evacuating"], false);

    // Load: 1,000 posts a second for 10 s from 8 clients, about another host: half
    // repeats of one alert, half 5,000 new ones. Every post answered, each new alert
    // booked once, no migration started, the agent's memory bounded.
    let other = here.replace("host-a", "host-c");
    let repeat = webhook_body("4", "firing", "fp-other", &other);
    let pid = a.child.as_ref().expect("the agent runs").id();
    let rss0 = ferry_tests::rss_kib(pid);
    const CLIENTS: usize = 8;
    const EACH: usize = 1250;
    let t0 = std::time::Instant::now();
    let answered: Vec<u16> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (a, repeat, other) = (&a, &repeat, &other);
                s.spawn(move || {
                    (0..EACH)
                        .map(|i| {
                            // 125 posts a second per client.
                            let due = t0 + Duration::from_millis(i as u64 * 8);
                            std::thread::sleep(
                                due.saturating_duration_since(std::time::Instant::now()),
                            );
                            let body = if i % 2 == 0 {
                                repeat.clone()
                            } else {
                                webhook_body("4", "firing", &format!("fp-{c}-{i}"), other)
                            };
                            post(Some(&a.webhook_token), &body).status
                        })
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let rss1 = ferry_tests::rss_kib(pid);
    assert_eq!(answered.len(), CLIENTS * EACH);
    assert!(answered.iter().all(|s| *s == 200), "{answered:?}");
    eprintln!(
        "{} webhook posts from {CLIENTS} clients in {secs:.2} s ({:.0}/s); agent RSS {} -> {} KiB",
        CLIENTS * EACH,
        (CLIENTS * EACH) as f64 / secs,
        rss0,
        rss1
    );
    // Each kept alert is a few hundred bytes: 5,000 of them are far from 64 MiB.
    assert!(rss1 < rss0 + (64 << 10), "RSS {rss0} -> {rss1} KiB");
    let alerts = json_list(&a, "/v1/alerts");
    assert_eq!(alerts.len(), 1 + CLIENTS * EACH / 2, "{}", alerts.len());
    let kept = alerts
        .iter()
        .find(|x| x["fingerprint"] == "fp-other")
        .unwrap();
    assert_eq!(kept["repeats"], CLIENTS * EACH / 2 - 1);
    assert_eq!(kept["action"], "none");
    assert!(json_list(&a, "/v1/migrations").is_empty());
    assert_eq!(json_list(&a, "/v1/vms").len(), 1);
}
