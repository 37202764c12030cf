//! `cargo xtask lab`: the whole system on one machine. Three hosts (network
//! namespaces on a bridge), a `ferry agent` in each, a Prometheus scraping them with
//! the rules of `dashboards/alerts.yml`, an Alertmanager posting to their webhook.
//! A VM starts on host-a; the lab shows its signals and the policy's plan, snapshots
//! it, migrates it to host-b through the API, moves its disks to a second datastore
//! there, then fills that datastore for real until the rule fires, and host-b's
//! agent evacuates the VM to the better of host-a and host-c on its own. It ends
//! with the guest verified, the disks checked, the snapshot restored, a summary
//! table and `target/lab/report.html`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_tests::agent::{Answer, request_tls};
use serde_json::{Value, json};

use crate::lab_net::{self, Host, LabNet, Link};
use crate::lab_report::{self, Mark};
use crate::util::{build_ferry, ctl, root, snapshot, step, target_dir};

pub const USAGE: &str =
    "usage: cargo xtask lab [--scenario NAME] [--link 1gbit|200mbit] [--keep] [--json FILE]
       cargo xtask lab --stop

Setup, then the whole system on this machine (root and KVM needed): three hosts as
network namespaces on a bridge (198.18.0.1-3), a ferry agent in each, Prometheus
scraping them with dashboards/alerts.yml, Alertmanager posting to their webhook.
A VM runs the scenario's workload on host-a; the lab shows its live signals and the
policy's plan, snapshots it, migrates it to host-b through the API, moves its disks
to a second datastore there, fills that datastore until FerryDatastoreFilling fires,
and host-b's agent evacuates the VM to host-a or host-c (host-c is kept busier) on
its own. Then: verify, disk-check, the snapshot restored, a summary per migration,
and target/lab/report.html (the dashboards' panels drawn from the lab's Prometheus).

  --scenario NAME  idle, web (default), database, runaway: xtask/scenarios/lab/NAME.toml
  --link RATE      shape every host's link: 1gbit or 200mbit (default: unshaped,
                   or the scenario's own)
  --keep           leave everything running at the end, and say how to stop it
  --json FILE      write the migrations' reports there ({\"migrations\": [...]}, each
                   with its trigger: api, alert:<alertname>)
  --stop           remove what a --keep run left (namespaces, processes, mounts)

Without --keep, everything the lab made is removed at its end, on Ctrl-C and on
any failure. Files stay in target/lab.";

/// What the user asked for.
pub struct Args {
    pub scenario: String,
    pub link: Option<Link>,
    pub keep: bool,
    pub json: Option<PathBuf>,
    pub stop: bool,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut a = Args {
            scenario: "web".into(),
            link: None,
            keep: false,
            json: None,
            stop: false,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value\n\n{USAGE}"))
            };
            match arg.as_str() {
                "--scenario" => a.scenario = value("--scenario")?,
                "--link" => a.link = Some(value("--link")?.parse::<Link>()?),
                "--keep" => a.keep = true,
                "--stop" => a.stop = true,
                "--json" => a.json = Some(PathBuf::from(value("--json")?)),
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        Ok(a)
    }
}

/// The lab's API port on every host.
const PORT: u16 = 7070;
/// Memory each lab host offers VMs: the hosts share this machine, so their capacity
/// is what the lab says it is.
const HOST_MEMORY_MIB: u64 = 2048;
/// The lab's copy of the alert rules fires after this instead of minutes.
const LAB_FOR: &str = "5s";
/// Alertmanager's group_wait in the lab.
const GROUP_WAIT: Duration = Duration::from_secs(2);
/// host-b's second datastore: a tmpfs this big, filled to leave this share free
/// (FerryDatastoreFilling fires under 10 %; the guest's disk still has room).
const FAST_MIB: u64 = 256;
const FILL_TO_FREE: f64 = 0.08;

struct Scenario {
    name: String,
    description: String,
    vm: toml::Table,
    limits: Option<toml::Table>,
    link: Option<Link>,
}

fn scenario(name: &str) -> Result<Scenario> {
    let dir = root().join("xtask/scenarios/lab");
    let path = dir.join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path).with_context(|| {
        let known: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_suffix(".toml")
                            .map(str::to_owned)
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "no scenario {name:?} ({}; known: {})",
            path.display(),
            known.join(", ")
        )
    })?;
    let mut t: toml::Table = toml::from_str(&text).with_context(|| path.display().to_string())?;
    let vm = match t.remove("vm") {
        Some(toml::Value::Table(vm)) => vm,
        _ => bail!("{}: no [vm] table", path.display()),
    };
    let limits = match t.remove("limits") {
        Some(toml::Value::Table(l)) => Some(l),
        None => None,
        Some(_) => bail!("{}: limits is not a table", path.display()),
    };
    let link = match t.remove("link") {
        Some(toml::Value::String(l)) => Some(l.parse::<Link>()?),
        None => None,
        Some(_) => bail!("{}: link is not a string", path.display()),
    };
    let description = t
        .remove("description")
        .and_then(|d| d.as_str().map(str::to_owned))
        .unwrap_or_else(|| name.to_owned());
    if let Some(k) = t.keys().next() {
        bail!("{}: unknown key {k:?}", path.display());
    }
    Ok(Scenario {
        name: name.to_owned(),
        description,
        vm,
        limits,
        link,
    })
}

/// One lab host: its namespace, folders, tokens and agent.
struct Lab {
    host: Host,
    dir: PathBuf,
    token: String,
    /// Its certificate, its key and the lab's CA: its API is HTTPS and its
    /// migrations TLS, both ways.
    pki: ferry_tests::pki::Issued,
    agent: Option<Child>,
}

impl Lab {
    fn addr(&self) -> String {
        format!("{}:{PORT}", self.host.ip)
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<Answer> {
        match request_tls(
            &self.addr(),
            &self.pki.ca,
            method,
            path,
            Some(&self.token),
            body,
        ) {
            Ok(a) => Ok(a),
            Err(_) => {
                self.alive()?;
                bail!(
                    "the agent on {} did not answer {method} {path}",
                    self.host.name
                )
            }
        }
    }

    /// The agent's process is gone, or a zombie not yet reaped.
    fn exited(&self) -> bool {
        self.agent.as_ref().is_some_and(|c| {
            std::fs::read_to_string(format!("/proc/{}/stat", c.id())).map_or(true, |stat| {
                stat.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    == Some("Z")
            })
        })
    }

    fn json(&self, path: &str) -> Result<Value> {
        let a = self.call("GET", path, None)?;
        if a.status != 200 {
            bail!("{} {path}: {} {}", self.host.name, a.status, a.body);
        }
        serde_json::from_str(&a.body).with_context(|| format!("{} {path}", self.host.name))
    }

    /// Fails if the agent has exited: the lab reports it and cleans up.
    fn alive(&self) -> Result<()> {
        if self.exited() {
            let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            bail!(
                "the agent on {} exited; the last lines of {}:\n  {}",
                self.host.name,
                self.dir.join("agent.log").display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
            );
        }
        Ok(())
    }

    fn control(&self, vm: &str) -> PathBuf {
        self.dir.join("run").join(format!("{vm}.sock"))
    }
}

fn labs_alive(labs: &[Lab]) -> Result<()> {
    if lab_net::interrupted() {
        bail!("interrupted");
    }
    labs.iter().try_for_each(Lab::alive)
}

/// Polls until `f` gives Some, checking the agents and Ctrl-C between looks.
fn wait_until<T>(
    labs: &mut [Lab],
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&mut [Lab]) -> Result<Option<T>>,
) -> Result<T> {
    let t0 = Instant::now();
    loop {
        labs_alive(labs)?;
        if let Some(v) = f(labs)? {
            return Ok(v);
        }
        if t0.elapsed() > timeout {
            bail!("{what}: not within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn unix_ms() -> u64 {
    (ferry_tests::prometheus::unix_now() * 1e3) as u64
}

fn write_agent_config(
    lab: &Lab,
    all: &[Host],
    datastores: &[PathBuf],
    limits: Option<&toml::Table>,
) -> Result<PathBuf> {
    let d = &lab.dir;
    let mut text = format!(
        "name = \"{}\"\nlisten = \"{}\"\nvm_dir = \"vms\"\nrun_dir = \"run\"\n\
         token_file = \"token\"\npeer_token_file = \"peer-token\"\n\
         webhook_token_file = \"../webhook-token\"\ndatastores = [{}]\n\
         capacity_memory_mib = {HOST_MEMORY_MIB}\nmax_outbound = 2\nmax_inbound = 2\n\
         tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nca_file = \"{}\"\n\n\
         # The lab samples each VM's dirty rate every 5 s so its charts fill in within the\n\
         # story's minute (the default, once a minute, costs the guest less).\n\
         [sampling]\nevery_secs = 5\n\n\
         # The host-health alerts of dashboards/alerts.yml move VMs, their disks along:\n\
         # a host's failing datastore must not keep them.\n\
         [[alert_rules]]\nmatchers = ['ferry_action=\"migrate-away\"']\ncopy_storage = true\n",
        lab.host.name,
        lab.addr(),
        datastores
            .iter()
            .map(|p| format!("\"{}\"", p.display()))
            .collect::<Vec<_>>()
            .join(", "),
        lab.pki.cert.display(),
        lab.pki.key.display(),
        lab.pki.ca.display(),
    );
    if let Some(l) = limits {
        text.push_str(&format!("\n[limits]\n{}", toml::to_string(l)?));
    }
    for peer in all.iter().filter(|h| h.name != lab.host.name) {
        text.push_str(&format!(
            "\n[[peers]]\nname = \"{}\"\nurl = \"https://{}:{PORT}\"\ntoken_file = \"../{}/peer-token\"\n",
            peer.name, peer.ip, peer.name
        ));
    }
    let path = d.join("agent.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn start_agent(net: &LabNet, lab: &mut Lab, ferry: &Path) -> Result<()> {
    let log = std::fs::File::create(lab.dir.join("agent.log"))?;
    // `ip netns exec` gives the agent a mount namespace with /sys mounted afresh,
    // without tracefs: mounted again there (and only there), the eBPF probes load.
    let mut cmd = net.command(&lab.host, Path::new("sh"));
    cmd.arg("-c")
        .arg(
            "mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing; \
             exec \"$0\" \"$@\"",
        )
        .arg(ferry)
        .args(["agent", "--config"])
        .arg(lab.dir.join("agent.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Traces go where the user said, if anywhere.
    for k in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "RUST_LOG",
    ] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    lab.agent = Some(cmd.spawn().context("starting ferry agent")?);
    Ok(())
}

/// A VM config: the scenario's `[vm]` with a name and one disk image.
fn vm_config(vm: &toml::Table, name: &str, image: &Path, disk_mib: u64) -> Result<String> {
    let mut t = vm.clone();
    t.insert("name".into(), name.into());
    let mut disk = toml::Table::new();
    disk.insert("id".into(), "root".into());
    disk.insert("path".into(), image.display().to_string().into());
    disk.insert("size_mib".into(), (disk_mib as i64).into());
    // Direct I/O: each guest write reaches the host's block layer as it happens, so
    // the host disk latency the probes and the dashboards show is the guest's.
    disk.insert("cache".into(), "none".into());
    t.insert(
        "disks".into(),
        toml::Value::Array(vec![toml::Value::Table(disk)]),
    );
    Ok(format!("name = \"{name}\"\n{}", {
        t.remove("name");
        toml::to_string(&t)?
    }))
}

fn show_vm(label: &str, v: &Value) {
    println!(
        "  {label:<8} {:<10} state={:<8} heartbeats={:>8} pages/s={:>7.0} integrity errors={}/{} max gap={:.2} ms",
        v["name"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("-"),
        v["heartbeats"].as_u64().unwrap_or(0),
        v["pages_written_per_sec"].as_f64().unwrap_or(0.0),
        v["guest_integrity_errors"].as_u64().unwrap_or(0),
        v["disk_integrity_errors"].as_u64().unwrap_or(0),
        v["max_heartbeat_gap_ms"].as_f64().unwrap_or(0.0),
    );
}

fn vm_on(lab: &Lab, vm: &str) -> Result<Option<Value>> {
    let list = lab.json("/v1/vms")?;
    Ok(list
        .as_array()
        .and_then(|l| l.iter().find(|v| v["name"] == vm).cloned()))
}

fn running_on(lab: &Lab, vm: &str) -> Result<Option<Value>> {
    Ok(vm_on(lab, vm)?.filter(|v| v["presence"] == "running" && v["state"] == "running"))
}

/// Follows a migration record until it ends, a line per change of phase or round
/// and every decision as it is made; returns the final record.
fn follow(labs: &mut [Lab], i: usize, id: &str) -> Result<Value> {
    let mut shown = 0;
    let mut last_line = String::new();
    wait_until(
        labs,
        &format!("migration {id}"),
        Duration::from_secs(600),
        |labs| {
            let m = labs[i].json(&format!("/v1/migrations/{id}"))?;
            let decisions = m["decisions"].as_array().cloned().unwrap_or_default();
            for d in decisions.iter().skip(shown) {
                println!(
                    "    {:>6.2}s  {:<23} {:<10} {}",
                    d["t_ms"].as_f64().unwrap_or(0.0) / 1e3,
                    d["setting"].as_str().unwrap_or(""),
                    d["value"].as_str().unwrap_or(""),
                    d["reason"].as_str().unwrap_or("")
                );
            }
            shown = decisions.len();
            let p = &m["progress"];
            if !p.is_null() {
                let line = format!(
                    "    {} round {} remaining {} pages, {:.0} Mbit/s, codec {}, throttle {}%",
                    p["phase"].as_str().unwrap_or("?"),
                    p["round"],
                    p["remaining_dirty_pages"],
                    p["bandwidth_bytes_per_sec"].as_f64().unwrap_or(0.0) * 8.0 / 1e6,
                    p["codec"].as_str().unwrap_or("?"),
                    p["throttle_pct"],
                );
                if line != last_line {
                    println!("{line}");
                    last_line = line;
                }
            }
            let state = m["state"].as_str().unwrap_or("");
            if state == "failed" {
                // A peer's agent that died is why, more than what the migration met
                // (given a moment: its end may reach the record before its exit is
                // seen).
                for _ in 0..20 {
                    labs_alive(labs)?;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Ok(["completed", "failed", "cancelled"]
                .contains(&state)
                .then_some(m))
        },
    )
}

/// One row of the summary, and the report's entry.
fn summarize(m: &Value) -> Value {
    let decisions = m["decisions"].as_array().cloned().unwrap_or_default();
    let p = &m["progress"];
    let postcopy = decisions.iter().any(|d| d["setting"] == "postcopy");
    let throttle = decisions
        .iter()
        .filter(|d| d["setting"] == "throttle_pct")
        .filter_map(|d| {
            d["value"]
                .as_str()?
                .trim_end_matches('%')
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    json!({
        "id": m["id"], "vm": m["vm"], "source": m["source"], "destination": m["destination"],
        "trigger": m["trigger"], "state": m["state"], "error": m["error"],
        "mode": if postcopy { "post-copy" } else { "pre-copy" },
        "codec": p["codec"], "max_throttle_pct": throttle, "rounds": p["round"],
        "total_ms": m["total_ms"], "downtime_ms": m["downtime_ms"],
        "max_downtime_ms": m["max_downtime_ms"],
        "bytes_on_wire": p["bytes_on_wire"], "disk_bytes_on_wire": p["disk_bytes_on_wire"],
        "predicted_total_ms": m["predicted_total_ms"],
        "predicted_downtime_ms": m["predicted_downtime_ms"],
        "started_unix_ms": m["started_unix_ms"], "ended_unix_ms": m["ended_unix_ms"],
        "decisions": decisions,
    })
}

fn print_summary(rows: &[Value]) {
    println!(
        "  {:<28} {:<15} {:<9} {:<6} {:>8} {:>6} {:>8} {:>9} {:>9}  predicted (total / downtime)",
        "trigger",
        "from → to",
        "mode",
        "codec",
        "throttle",
        "rounds",
        "total",
        "downtime",
        "MiB sent"
    );
    for r in rows {
        let ms = |k: &str| r[k].as_f64();
        println!(
            "  {:<28} {:<15} {:<9} {:<6} {:>7}% {:>6} {:>7.2}s {:>7.1}ms {:>9.1}  {} / {}",
            r["trigger"].as_str().unwrap_or("-"),
            format!(
                "{} → {}",
                r["source"].as_str().unwrap_or("?"),
                r["destination"].as_str().unwrap_or("?")
            ),
            r["mode"].as_str().unwrap_or("?"),
            r["codec"].as_str().unwrap_or("?"),
            r["max_throttle_pct"],
            r["rounds"],
            ms("total_ms").unwrap_or(f64::NAN) / 1e3,
            ms("downtime_ms").unwrap_or(f64::NAN),
            r["bytes_on_wire"].as_f64().unwrap_or(0.0) / 1048576.0,
            ms("predicted_total_ms").map_or("-".into(), |t| format!("{:.2}s", t / 1e3)),
            ms("predicted_downtime_ms").map_or("-".into(), |t| format!("{t:.1}ms")),
        );
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let args = Args::parse(args)?;
    let lab_dir = target_dir().join("lab");
    if args.stop {
        step("removing what a kept lab left behind");
        return LabNet::clean_up_leftovers(&lab_dir);
    }
    let scenario = scenario(&args.scenario)?;
    let link = args.link.or(scenario.link);
    let ferry = build_ferry()?;
    // A kept lab (or a killed one) still holds the folder: its processes and mounts
    // go first, then its files.
    if lab_dir.exists() {
        LabNet::clean_up_leftovers(&lab_dir)?;
        std::fs::remove_dir_all(&lab_dir)
            .with_context(|| format!("removing the last lab's files in {}", lab_dir.display()))?;
    }
    std::fs::create_dir_all(&lab_dir)?;
    let lab_dir = std::fs::canonicalize(&lab_dir)?;

    step(&format!(
        "three lab hosts: network namespaces on a bridge{}",
        link.map_or(String::new(), |l| format!(", links shaped to {l}"))
    ));
    let mut net = LabNet::create(link)?;
    let result = story(&mut net, &ferry, &lab_dir, &scenario, &args, link);
    if let Err(e) = &result {
        println!("\nthe lab failed: {e:#}");
    }
    if args.keep && result.is_ok() {
        net.keep();
        step("kept running (--keep)");
        println!(
            "  agents: {}\n  stop everything with: cargo xtask lab --stop",
            net.hosts
                .iter()
                .map(|h| format!("{} http://{}:{PORT}", h.name, h.ip))
                .collect::<Vec<_>>()
                .join(", ")
        );
    } else {
        step("cleaning up: processes, namespaces, links, mounts");
        net.clean_up();
    }
    result
}

fn story(
    net: &mut LabNet,
    ferry: &Path,
    lab_dir: &Path,
    scenario: &Scenario,
    args: &Args,
    link: Option<Link>,
) -> Result<()> {
    let t_start = unix_ms();
    let hosts = net.hosts.clone();
    let webhook_token = "lab-webhook-token-0123456789abcdef";
    std::fs::write(lab_dir.join("webhook-token"), webhook_token)?;
    // The lab's CA, and a certificate for each host naming it and its address.
    let ca = ferry_tests::pki::Ca::new(&lab_dir.join("pki"), "ferry lab CA")
        .context("creating the lab's CA")?;
    println!(
        "  lab CA {}: each host's API is HTTPS and its migrations TLS 1.3, both ends \
         authenticated",
        lab_dir.join("pki/ca.pem").display()
    );
    let mut labs: Vec<Lab> = Vec::new();
    for h in &hosts {
        let dir = lab_dir.join(&h.name);
        for sub in ["vms", "run", "ds1"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let token = format!("lab-operator-{}-0123456789abcdef", h.name);
        std::fs::write(dir.join("token"), &token)?;
        std::fs::write(
            dir.join("peer-token"),
            format!("lab-peer-{}-0123456789abcdef", h.name),
        )?;
        let pki = ca
            .issue(&h.name, &[&h.name, &h.ip])
            .with_context(|| format!("a certificate for {}", h.name))?;
        labs.push(Lab {
            host: h.clone(),
            dir,
            token,
            pki,
            agent: None,
        });
    }
    // host-b's second datastore: a file system of its own, so that filling it is
    // what a real datastore filling up is.
    let fast = labs[1].dir.join("fast");
    net.mount_tmpfs(&fast, FAST_MIB)?;

    step("starting a ferry agent on each host");
    for (i, lab) in labs.iter().enumerate() {
        let mut stores = vec![lab.dir.join("ds1")];
        if i == 1 {
            stores.push(fast.clone());
        }
        let cfg = write_agent_config(lab, &hosts, &stores, scenario.limits.as_ref())?;
        println!(
            "  {}: {} (config {})",
            lab.host.name,
            lab.addr(),
            cfg.display()
        );
    }
    for lab in labs.iter_mut() {
        start_agent(net, lab, ferry)?;
    }
    wait_until(
        &mut labs,
        "every agent answering",
        Duration::from_secs(60),
        |labs| {
            Ok(labs
                .iter()
                .all(|l| {
                    request_tls(&l.addr(), &l.pki.ca, "GET", "/healthz", None, None)
                        .is_ok_and(|a| a.status == 200)
                })
                .then_some(()))
        },
    )?;

    step(
        "Prometheus (alerts.yml, each agent a target labelled with its host) and Alertmanager (webhook to every agent)",
    );
    let rules = lab_dir.join("alerts.yml");
    let changed = ferry_tests::prometheus::rules_firing_after(
        &root().join("dashboards/alerts.yml"),
        &rules,
        LAB_FOR,
    )
    .map_err(anyhow::Error::msg)?;
    println!(
        "  the lab's copy of dashboards/alerts.yml fires after {LAB_FOR}, so the story fits in a minute:"
    );
    for c in &changed {
        println!("    {c}");
    }
    let mon = lab_net::start_monitoring(
        net,
        &lab_dir.join("monitoring"),
        &rules,
        &lab_dir.join("webhook-token"),
        &lab_dir.join("pki/ca.pem"),
        GROUP_WAIT,
    )?;
    println!(
        "  Prometheus http://{}  Alertmanager http://{}",
        mon.prometheus, mon.alertmanager
    );

    step(&format!(
        "scenario {}: {}",
        scenario.name, scenario.description
    ));
    let vm = "lab1";
    let config = vm_config(&scenario.vm, vm, &labs[0].dir.join("ds1/lab1-root.img"), 64)?;
    println!("{config}");
    std::fs::write(labs[0].dir.join("vms/lab1.toml"), &config)?;
    // host-c is kept busier: a VM of its own takes memory there.
    let busy = vm_config(
        &toml::from_str(
            "memory_mib = 1024\nvcpus = 1\n[workload]\nworking_set_mib = 16\ndirty_pages_per_sec = 100\n",
        )?,
        "batch1",
        &labs[2].dir.join("ds1/batch1-root.img"),
        16,
    )?;
    std::fs::write(labs[2].dir.join("vms/batch1.toml"), busy)?;
    let first = wait_until(
        &mut labs,
        "lab1 running on host-a",
        Duration::from_secs(60),
        |labs| running_on(&labs[0], vm),
    )?;
    show_vm("host-a", &first);
    wait_until(
        &mut labs,
        "batch1 running on host-c",
        Duration::from_secs(60),
        |labs| running_on(&labs[2], "batch1"),
    )?;
    println!("  host-c runs batch1 (1024 MiB): it has less room than host-a");

    step("snapshot of lab1 (pause, copy memory, state, config and disks, resume)");
    let snap = lab_dir.join("snapshot");
    let report = snapshot(ferry, &labs[0].control(vm), &snap)?;
    println!(
        "  written to {}: paused {:.1} ms, {:.0} MiB memory written sparse",
        snap.display(),
        report.pause_ms,
        report.memory_bytes_written as f64 / 1048576.0
    );

    step("lab1's live signals: the eBPF probes beside the guest's own figures (ferry signals)");
    let out = Command::new(ferry)
        .args(["signals", "--duration-secs", "2", "--control"])
        .arg(labs[0].control(vm))
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        println!(
            "  the probes could not run: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    let mbit = link.map_or(1000, |l| l.mbit());
    step(&format!(
        "the adaptive policy's plan for a {mbit} Mbit/s link (ferry plan)"
    ));
    print!(
        "{}",
        ctl(
            ferry,
            &["plan", "--bandwidth-mbit", &mbit.to_string()],
            &labs[0].control(vm)
        )?
    );

    step("migrating lab1 to host-b through host-a's API, its disk along (POST /v1/migrations)");
    let body = json!({"vm": vm, "destination": "host-b", "copy_storage": true}).to_string();
    let a = labs[0].call("POST", "/v1/migrations", Some(&body))?;
    if a.status != 201 {
        bail!("host-a refused the migration: {} {}", a.status, a.body);
    }
    let id = serde_json::from_str::<Value>(&a.body)?["id"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let first_move = follow(&mut labs, 0, &id)?;
    if first_move["state"] != "completed" {
        bail!(
            "the migration to host-b ended {}: {}",
            first_move["state"],
            first_move["error"]
        );
    }
    let on_b = wait_until(
        &mut labs,
        "lab1 running on host-b",
        Duration::from_secs(60),
        |labs| running_on(&labs[1], vm),
    )?;
    show_vm("host-b", &on_b);

    step("storage migration on host-b: lab1's disk moves to the datastore `fast` while it writes");
    let body = json!({"vm": vm, "datastore": fast.display().to_string()}).to_string();
    let a = labs[1].call("POST", "/v1/storage-migrations", Some(&body))?;
    if a.status != 201 {
        bail!(
            "host-b refused the storage migration: {} {}",
            a.status,
            a.body
        );
    }
    let sid = serde_json::from_str::<Value>(&a.body)?["id"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let moved = wait_until(
        &mut labs,
        "the storage migration",
        Duration::from_secs(300),
        |labs| {
            let s = labs[1].json(&format!("/v1/storage-migrations/{sid}"))?;
            Ok(["completed", "failed", "cancelled"]
                .contains(&s["state"].as_str().unwrap_or(""))
                .then_some(s))
        },
    )?;
    if moved["state"] != "completed" {
        bail!(
            "the storage migration ended {}: {}",
            moved["state"],
            moved["error"]
        );
    }
    println!(
        "  completed: disks now in {}; config rewritten: {}",
        moved["folder"].as_str().unwrap_or("?"),
        moved["config_rewritten"].as_str().unwrap_or("-")
    );

    step("host-b goes bad: a file fills its datastore `fast` until FerryDatastoreFilling fires");
    let filler = fast.join("filler");
    fill(&fast, &filler, FILL_TO_FREE)?;
    let prom = mon.prometheus.clone();
    let firing =
        "ALERTS{alertname=\"FerryDatastoreFilling\",alertstate=\"firing\",host=\"host-b\"}";
    let mut pending_seen = false;
    let t_filled = Instant::now();
    wait_until(
        &mut labs,
        "FerryDatastoreFilling firing",
        Duration::from_secs(120),
        |_| {
            if !pending_seen && !query(&prom, &firing.replace("firing", "pending"))?.is_empty() {
                println!(
                    "  {:>5.1}s  pending (for: {LAB_FOR})",
                    t_filled.elapsed().as_secs_f64()
                );
                pending_seen = true;
            }
            Ok((!query(&prom, firing)?.is_empty()).then_some(()))
        },
    )?;
    // When Prometheus first wrote the alert firing (its rule evaluation), not when
    // this loop saw it.
    let fired_ms = query(&prom, &format!("min_over_time(timestamp({firing})[5m:1s])"))?
        .first()
        .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
        .map_or_else(unix_ms, |t| (t * 1e3) as u64);
    println!(
        "  {:>5.1}s  firing in Prometheus; Alertmanager waits group_wait ({} s), then posts to every agent",
        t_filled.elapsed().as_secs_f64(),
        GROUP_WAIT.as_secs()
    );
    let alert = wait_until(
        &mut labs,
        "host-b's agent acting on the alert",
        Duration::from_secs(60),
        |labs| {
            let alerts = labs[1].json("/v1/alerts")?;
            Ok(alerts.as_array().and_then(|l| {
                l.iter()
                    .find(|a| {
                        a["action"] == "evacuate"
                            && a["migrations"].as_array().is_some_and(|m| !m.is_empty())
                    })
                    .cloned()
            }))
        },
    )?;
    let eid = alert["migrations"][0].as_str().unwrap_or("").to_owned();
    let evac_start = labs[1].json(&format!("/v1/migrations/{eid}"))?;
    let started_ms = evac_start["started_unix_ms"].as_u64().unwrap_or(0);
    println!(
        "  host-b's agent evacuates (migration {eid}): started {:.2} s after the alert fired, {:.2} s beyond group_wait",
        (started_ms as f64 - fired_ms as f64) / 1e3,
        (started_ms as f64 - fired_ms as f64) / 1e3 - GROUP_WAIT.as_secs_f64()
    );
    for l in labs.iter().filter(|l| l.host.name != "host-b") {
        let at = l.json("/v1/alerts")?;
        if let Some(a) = at.as_array().and_then(|v| v.first()) {
            println!(
                "  {} was sent the alert too: {} ({}), so it is no destination while it fires",
                l.host.name,
                a["action"].as_str().unwrap_or("?"),
                a["host"].as_str().unwrap_or("?")
            );
        }
    }
    let evacuated = follow(&mut labs, 1, &eid)?;
    if evacuated["state"] != "completed" {
        bail!(
            "the evacuation ended {}: {}",
            evacuated["state"],
            evacuated["error"]
        );
    }
    let to = evacuated["destination"].as_str().unwrap_or("?").to_owned();
    let dest = labs
        .iter()
        .position(|l| l.host.name == to)
        .context("the evacuation's destination is not a lab host")?;
    let there = wait_until(
        &mut labs,
        "lab1 running at its new host",
        Duration::from_secs(60),
        |labs| running_on(&labs[dest], vm),
    )?;
    show_vm(&to, &there);

    step("host-b recovers: the file goes, the alert resolves");
    std::fs::remove_file(&filler)?;
    wait_until(
        &mut labs,
        "the alert resolved at host-b",
        Duration::from_secs(120),
        |labs| {
            let alerts = labs[1].json("/v1/alerts")?;
            Ok(alerts
                .as_array()
                .is_some_and(|l| l.iter().all(|a| a["status"] == "resolved"))
                .then_some(()))
        },
    )?;
    println!("  resolved; host-b takes VMs again");

    step(&format!(
        "verify on {to}: the guest re-checks every page and disk block it wrote"
    ));
    let verified = ctl(ferry, &["verify"], &labs[dest].control(vm))?;
    print!("{verified}");
    let after = running_on(&labs[dest], vm)?.context("lab1 stopped running")?;
    let integrity = (
        after["guest_integrity_errors"].as_u64().unwrap_or(u64::MAX),
        after["disk_integrity_errors"].as_u64().unwrap_or(u64::MAX),
    );

    step("the snapshot taken on host-a, restored in a ferry vmm of its own");
    let restored_dir = lab_dir.join("restored");
    std::fs::create_dir_all(&restored_dir)?;
    let mut restored = crate::util::Vmm::spawn(
        ferry,
        &[
            "--restore",
            &snap.display().to_string(),
            "--disk-dir",
            &restored_dir.display().to_string(),
        ],
        &lab_dir.join("restored.sock"),
        &lab_dir.join("restored.log"),
    )?;
    let r = crate::util::vm_of(restored.wait_ready(ferry)?)?;
    println!(
        "  restored: state={} heartbeats={} (the guest carries on from the snapshot's moment)",
        r.machine.state.as_str(),
        r.machine.heartbeats
    );
    restored.quit(ferry)?;

    let end_ms = unix_ms();
    let mut rows = Vec::new();
    for l in &labs {
        for m in l
            .json("/v1/migrations")?
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            rows.push(summarize(&m));
        }
    }
    rows.sort_by_key(|r| r["started_unix_ms"].as_u64().unwrap_or(0));

    step(
        "disk-check: every block the guest was told was written is in the images its config names",
    );
    labs_alive(&labs)?;
    // Stopped first (its agent does not start it again while the lab ends): the
    // images are checked at rest.
    ctl(ferry, &["quit"], &labs[dest].control(vm)).ok();
    std::thread::sleep(Duration::from_millis(500));
    let checked = Command::new(ferry)
        .arg("disk-check")
        .arg("--config")
        .arg(labs[dest].dir.join("vms/lab1.toml"))
        .status()?;

    step("every migration");
    print_summary(&rows);

    step("the report: target/lab/report.html");
    let mut marks: Vec<Mark> = Vec::new();
    for r in &rows {
        let base = r["started_unix_ms"].as_u64().unwrap_or(0);
        marks.push(Mark {
            t_unix_ms: base,
            label: format!(
                "{} {}",
                r["trigger"].as_str().unwrap_or("api"),
                r["destination"].as_str().unwrap_or("")
            ),
            detail: format!(
                "migration {} of {}",
                r["id"].as_str().unwrap_or(""),
                r["vm"].as_str().unwrap_or("")
            ),
        });
        for d in r["decisions"].as_array().into_iter().flatten() {
            marks.push(Mark {
                t_unix_ms: base + d["t_ms"].as_f64().unwrap_or(0.0) as u64,
                label: format!(
                    "{}={}",
                    d["setting"].as_str().unwrap_or(""),
                    d["value"].as_str().unwrap_or("")
                ),
                detail: d["reason"].as_str().unwrap_or("").to_owned(),
            });
        }
    }
    marks.push(Mark {
        t_unix_ms: fired_ms,
        label: "FerryDatastoreFilling firing".into(),
        detail: "host-b's datastore `fast` under 10 % free".into(),
    });
    let html = lab_dir.join("report.html");
    let drawn = lab_report::write(
        &mon.prometheus,
        &root().join("dashboards"),
        t_start as f64 / 1e3,
        end_ms as f64 / 1e3 + 2.0,
        &marks,
        &html,
    )?;
    println!(
        "  {} charts from the dashboards' PromQL, {} with data; {} marks (decisions, migrations, the alert)",
        drawn.charts,
        drawn.charts - drawn.empty.len(),
        marks.len()
    );
    if !drawn.empty.is_empty() {
        println!("  no data in this lab's range: {}", drawn.empty.join(", "));
    }
    // Opened as a user would, in a real browser; its picture beside it.
    let png = lab_dir.join("report.png");
    match lab_report::check_in_browser(&html)
        .and_then(|c| lab_report::screenshot(&html, &png).map(|()| c))
    {
        Ok(c) => println!(
            "  opened in Chromium: {} charts, {} with data, {} console errors; picture {}",
            c.charts,
            c.charts_with_data,
            c.console_errors.len(),
            png.display()
        ),
        Err(e) => println!("  not opened in a browser: {e:#}"),
    }

    step("where to look");
    for l in &labs {
        println!(
            "  {}  https://{}/metrics  (API: token in {}, CA {})",
            l.host.name,
            l.addr(),
            l.dir.join("token").display(),
            l.pki.ca.display()
        );
    }
    println!(
        "  Prometheus UI  http://{}  (alerts: /alerts)",
        mon.prometheus
    );
    println!("  Alertmanager   http://{}", mon.alertmanager);
    println!("  Grafana: import dashboards/ferry-fleet.json and dashboards/ferry-migration.json");
    println!("  the report without Grafana: {}", html.display());
    match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(e) => {
            println!("  traces: sent to {e} (one per migration, the alert's choice on its root)")
        }
        Err(_) => println!("  traces: set OTEL_EXPORTER_OTLP_ENDPOINT to send one per migration"),
    }

    let report = json!({
        "scenario": scenario.name,
        "link": link.map(|l| l.to_string()),
        "migrations": rows,
        "storage_migrations": [moved],
        "alert": {
            "name": "FerryDatastoreFilling", "fired_unix_ms": fired_ms,
            "evacuation_started_unix_ms": started_ms,
            "group_wait_ms": GROUP_WAIT.as_millis() as u64,
        },
        "integrity": {"guest_errors": integrity.0, "disk_errors": integrity.1},
        "verify": verified.trim(),
        "disk_check_ok": checked.success(),
        "report_html": html,
        "charts": drawn.charts, "charts_without_data": drawn.empty,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("  the migrations' reports: {}", path.display());
    }
    if integrity != (0, 0) {
        bail!(
            "the guest found integrity errors: {} in memory, {} on disk",
            integrity.0,
            integrity.1
        );
    }
    if !checked.success() {
        bail!("disk-check found errors");
    }
    step(&format!(
        "lab done in {:.0} s; files in {}",
        (unix_ms() - t_start) as f64 / 1e3,
        lab_dir.display()
    ));
    Ok(())
}

/// Writes `file` into the file system of `dir` until `free_share` of it is free.
fn fill(dir: &Path, file: &Path, free_share: f64) -> Result<()> {
    let (size, free) =
        ferry_tests::fs_space(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let want = (free as f64 - size as f64 * free_share).max(0.0) as usize;
    println!(
        "  {} is {} MiB with {} MiB free; writing {} MiB to {} (leaves {:.0} %)",
        dir.display(),
        size >> 20,
        free >> 20,
        want >> 20,
        file.display(),
        free_share * 100.0
    );
    std::fs::write(file, vec![0x5a; want]).with_context(|| format!("writing {}", file.display()))
}

/// An instant query's result vector.
fn query(prometheus: &str, expr: &str) -> Result<Vec<Value>> {
    ferry_tests::prometheus::query_at(prometheus, expr)
        .map_err(|e| anyhow::anyhow!("Prometheus at {prometheus}: {e}"))
}
