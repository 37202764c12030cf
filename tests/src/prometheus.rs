//! A real Prometheus (the Debian package's binary) on a free loopback port, scraping
//! the targets it is given every second; stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::agent::request;
use crate::free_port;

pub struct Prometheus {
    pub addr: String,
    child: Child,
    log: PathBuf,
}

/// `s` as a URL query value.
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A scrape target and the labels its series get.
pub struct Target {
    pub addr: String,
    pub labels: Vec<(String, String)>,
}

impl Target {
    pub fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_owned(),
            labels: Vec::new(),
        }
    }

    /// An agent's target, labelled with its `host` name: what alerts about a host
    /// carry for the agents to act on (`instance` alone is `host:port`).
    pub fn host(addr: &str, host: &str) -> Self {
        Self {
            addr: addr.to_owned(),
            labels: vec![("host".into(), host.to_owned())],
        }
    }
}

/// `prometheus.yml` (YAML in its JSON form): scrapes and rule evaluation every
/// second, the job `ferry`, alerts sent to `alertmanager` if given.
pub fn config(targets: &[Target], rules: &[&Path], alertmanager: Option<&str>) -> Value {
    let targets: Vec<Value> = targets
        .iter()
        .map(|t| {
            let mut v = json!({"targets": [t.addr]});
            if !t.labels.is_empty() {
                v["labels"] = t
                    .labels
                    .iter()
                    .map(|(k, l)| (k.clone(), json!(l)))
                    .collect();
            }
            v
        })
        .collect();
    let mut c = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": rules.iter().map(|r| r.display().to_string()).collect::<Vec<_>>(),
        "scrape_configs": [{"job_name": "ferry", "static_configs": targets}],
    });
    if let Some(am) = alertmanager {
        c["alerting"] = json!({"alertmanagers": [{"static_configs": [{"targets": [am]}]}]});
    }
    c
}

/// `config` scraping its targets over HTTPS, their certificates checked against `ca`.
pub fn over_tls(mut config: Value, ca: &Path) -> Value {
    if let Some(jobs) = config["scrape_configs"].as_array_mut() {
        for job in jobs {
            job["scheme"] = json!("https");
            job["tls_config"] = json!({"ca_file": ca});
        }
    }
    config
}

/// `src` (Prometheus rule groups, as dashboards/alerts.yml) with every rule's `for:`
/// set to `for_` (e.g. "2s"): the real expressions and labels, firing within seconds
/// rather than the minutes a fleet waits. Written to `out`; returns what changed
/// (`"FerryDatastoreFilling: for 5m -> 2s"`).
pub fn rules_firing_after(src: &Path, out: &Path, for_: &str) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let mut changed = Vec::new();
    let mut alert = String::new();
    let mut lines = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        }
        match trimmed.strip_prefix("for:") {
            Some(was) => {
                let indent = &line[..line.len() - trimmed.len()];
                changed.push(format!("{alert}: for {} -> {for_}", was.trim()));
                lines.push(format!("{indent}for: {for_}"));
            }
            None => lines.push(line.to_owned()),
        }
    }
    std::fs::write(out, lines.join("\n") + "\n").map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(changed)
}

impl Prometheus {
    /// Starts Prometheus in `dir` with the job `ferry` scraping `targets` (host:port)
    /// every second and the rule files `rules` loaded; waits until it answers.
    pub fn start(dir: &Path, targets: &[&str], rules: &[&Path]) -> Self {
        let targets: Vec<Target> = targets.iter().map(|t| Target::new(t)).collect();
        Self::start_with(dir, &targets, rules, None)
    }

    /// As [`Prometheus::start`], each target with its own labels (a `host` label per
    /// agent, as alerts need), alerts sent to `alertmanager` (host:port) if given.
    pub fn start_with(
        dir: &Path,
        targets: &[Target],
        rules: &[&Path],
        alertmanager: Option<&str>,
    ) -> Self {
        std::fs::create_dir_all(dir).expect("the Prometheus folder");
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config(targets, rules, alertmanager).to_string())
            .expect("prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).expect("the Prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("prometheus starts");
        let p = Self { addr, child, log };
        let t0 = Instant::now();
        while request(&p.addr, "GET", "/-/ready", None, None).is_none_or(|a| a.status != 200) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "Prometheus is not ready after 60 s:\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` of the HTTP API; its `data`, or why not.
    pub fn api(&self, path: &str) -> Result<Value, String> {
        api_at(&self.addr, path)
    }

    /// An instant query's result vector.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        query_at(&self.addr, expr)
    }

    /// A range query's series, `start` and `end` in Unix seconds, a step of `step_secs`.
    pub fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step_secs: f64,
    ) -> Result<Vec<Value>, String> {
        let data = self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step_secs}",
            encode(expr)
        ))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `expr` returns at least one series (bounded at `timeout`).
    pub fn wait_for(&self, what: &str, expr: &str, timeout: Duration) -> Vec<Value> {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = self.query(expr)
                && !r.is_empty()
            {
                return r;
            }
            assert!(
                t0.elapsed() < timeout,
                "{what}: `{expr}` returned nothing for {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` of the HTTP API of the Prometheus at `addr` (host:port); its `data`, or
/// why not.
pub fn api_at(addr: &str, path: &str) -> Result<Value, String> {
    let a = request(addr, "GET", path, None, None).ok_or_else(|| format!("no answer to {path}"))?;
    let v: Value = serde_json::from_str(&a.body).map_err(|e| format!("{path}: {e}: {}", a.body))?;
    if v["status"] != "success" {
        return Err(format!("{path}: {} {}", a.status, a.body));
    }
    Ok(v["data"].clone())
}

/// An instant query's result vector, of the Prometheus at `addr`.
pub fn query_at(addr: &str, expr: &str) -> Result<Vec<Value>, String> {
    let data = api_at(addr, &format!("/api/v1/query?query={}", encode(expr)))?;
    Ok(data["result"].as_array().cloned().unwrap_or_default())
}

/// Now, in Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
