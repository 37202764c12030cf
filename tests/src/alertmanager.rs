//! A real Alertmanager (the Debian package's binary, `prometheus-alertmanager`) on a
//! free loopback port, sending every alert to webhooks; stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::agent::request;
use crate::free_port;

pub struct Alertmanager {
    pub addr: String,
    child: Child,
    log: PathBuf,
}

/// Where a webhook goes, and the file holding the bearer token it is sent with.
pub struct Webhook {
    pub url: String,
    pub token_file: PathBuf,
    /// An `https://` agent's certificate is checked against this CA.
    pub ca_file: Option<PathBuf>,
}

/// How Alertmanager groups and repeats: the route's timers.
pub struct Timers {
    pub group_wait: Duration,
    pub group_interval: Duration,
    pub repeat_interval: Duration,
}

/// A duration as Alertmanager and Prometheus read one ("5s", "1500ms").
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `alertmanager.yml` (YAML in its JSON form, which keeps any path quoted): one
/// route, grouped by alert, host and VM, to one receiver with a webhook per agent
/// (each with its token), resolved alerts sent too.
pub fn config(webhooks: &[Webhook], t: &Timers) -> Value {
    let hooks: Vec<Value> = webhooks
        .iter()
        .map(|w| {
            let mut hook = json!({
                "url": w.url,
                "send_resolved": true,
                "http_config": {
                    "authorization": {"type": "Bearer", "credentials_file": w.token_file},
                },
            });
            if let Some(ca) = &w.ca_file {
                hook["http_config"]["tls_config"] = json!({"ca_file": ca});
            }
            hook
        })
        .collect();
    json!({
        "route": {
            "receiver": "ferry-agents",
            "group_by": ["alertname", "host", "vm"],
            "group_wait": duration(t.group_wait),
            "group_interval": duration(t.group_interval),
            "repeat_interval": duration(t.repeat_interval),
        },
        "receivers": [{"name": "ferry-agents", "webhook_configs": hooks}],
    })
}

impl Alertmanager {
    /// Starts Alertmanager in `dir` (clustering off) and waits until it answers.
    pub fn start(dir: &Path, webhooks: &[Webhook], timers: &Timers) -> Self {
        std::fs::create_dir_all(dir).expect("the Alertmanager folder");
        let file = dir.join("alertmanager.yml");
        std::fs::write(&file, config(webhooks, timers).to_string()).expect("alertmanager.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("alertmanager.log");
        let out = std::fs::File::create(&log).expect("the Alertmanager log");
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("prometheus-alertmanager starts");
        let am = Self { addr, child, log };
        let t0 = Instant::now();
        while request(&am.addr, "GET", "/-/ready", None, None).is_none_or(|a| a.status != 200) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "Alertmanager is not ready after 60 s:\n{}",
                am.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        am
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
