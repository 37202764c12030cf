//! `ferry agent` (the daemon, with its logging) and the commands that ask an agent.

use std::path::Path;
use std::process::ExitCode;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use ferry_api::agent::{ApiError, MigrationInfo, MigrationState, VmInfo};

pub fn serve(config: &Path, log_format: &str) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: journald and log files get plain text.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if log_format == "json" {
        fmt.json().flatten_event(true).try_init()
    } else {
        fmt.with_target(false).try_init()
    };
    crate::daemon::run(config)?;
    Ok(ExitCode::SUCCESS)
}

/// Where an agent's API is and how to speak to it.
pub struct Endpoint<'a> {
    pub url: &'a str,
    /// The token to present.
    pub token_file: Option<&'a Path>,
    /// The CA an `https://` agent's certificate is checked against.
    pub ca_file: Option<&'a Path>,
}

/// An agent's API at `base`, presenting the token in `token_file`.
pub struct AgentClient {
    base: String,
    token: Option<String>,
    http: ureq::Agent,
}

impl AgentClient {
    pub fn new(at: &Endpoint) -> anyhow::Result<Self> {
        let token = at
            .token_file
            .map(|f| {
                std::fs::read_to_string(f)
                    .map(|t| t.trim().to_owned())
                    .with_context(|| format!("reading the token file {}", f.display()))
            })
            .transpose()?;
        let http = crate::daemon::tls::client(at.ca_file, std::time::Duration::from_secs(30))?;
        Ok(Self {
            base: at.url.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    /// `method path` with an optional JSON body; the answer's body, or the agent's
    /// refusal as an error naming the status and the reason.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let sent = match method {
            "GET" | "DELETE" => {
                let mut r = if method == "GET" {
                    self.http.get(&url)
                } else {
                    self.http.delete(&url)
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = self
                    .http
                    .post(&url)
                    .header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(body.unwrap_or("{}").as_bytes())
            }
        };
        let mut resp = sent.with_context(|| format!("cannot reach the agent at {}", self.base))?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the agent's answer to {url}"))?;
        if !status.is_success() {
            let why = serde_json::from_str::<ApiError>(&text)
                .map(|e| e.message)
                .unwrap_or(text);
            anyhow::bail!("the agent at {} answered {status}: {why}", self.base);
        }
        Ok(text)
    }
}

pub fn vms(at: &Endpoint, as_json: bool) -> anyhow::Result<ExitCode> {
    let body = AgentClient::new(at)?.call("GET", "/v1/vms", None)?;
    if as_json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let vms: Vec<VmInfo> = serde_json::from_str(&body).context("the agent's list of VMs")?;
    println!(
        "{:<20} {:<9} {:<9} {:>8} {:>12} {:>14}",
        "NAME", "PRESENCE", "STATE", "PID", "HEARTBEATS", "PAGES/S"
    );
    let dash = || "-".to_owned();
    for v in vms {
        println!(
            "{:<20} {:<9} {:<9} {:>8} {:>12} {:>14}",
            v.name,
            v.presence.as_str(),
            v.state.map_or_else(dash, |s| s.to_string()),
            v.pid.map_or_else(dash, |p| p.to_string()),
            v.heartbeats.map_or_else(dash, |h| h.to_string()),
            v.pages_written_per_sec
                .map_or_else(dash, |p| format!("{p:.0}")),
        );
        if let Some(e) = v.error {
            println!("  {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn migrations(at: &Endpoint, as_json: bool) -> anyhow::Result<ExitCode> {
    let body = AgentClient::new(at)?.call("GET", "/v1/migrations", None)?;
    if as_json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let list: Vec<MigrationInfo> =
        serde_json::from_str(&body).context("the agent's list of migrations")?;
    println!(
        "{:<22} {:<14} {:<12} {:<10} {:>10} {:>12}",
        "ID", "VM", "TO", "STATE", "TOTAL MS", "DOWNTIME MS"
    );
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for m in list {
        println!(
            "{:<22} {:<14} {:<12} {:<10} {:>10} {:>12}",
            m.id,
            m.vm,
            m.destination,
            m.state.as_str(),
            ms(m.total_ms),
            ms(m.downtime_ms)
        );
        if let Some(e) = m.error {
            println!("  {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn cancel(at: &Endpoint, id: &str) -> anyhow::Result<ExitCode> {
    AgentClient::new(at)?.call("DELETE", &format!("/v1/migrations/{id}"), None)?;
    eprintln!("cancelling migration {id}; the VM stays where it is");
    Ok(ExitCode::SUCCESS)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Release);
}

/// `ferry migrate VM --to PEER --agent URL`: asks the agent to move its VM, then
/// follows the migration: a progress bar (phase, round, remaining, bandwidth, ETA),
/// each decision as it is made, and the outcome. Ctrl-C cancels it.
pub fn migrate(
    at: &Endpoint,
    request: &serde_json::Value,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let client = AgentClient::new(at)?;
    let started: MigrationInfo =
        serde_json::from_str(&client.call("POST", "/v1/migrations", Some(&request.to_string()))?)
            .context("the agent's answer to the migration request")?;
    let id = started.id.clone();
    eprintln!(
        "migration {id}: {} to {} under the {} policy (Ctrl-C cancels; the VM stays)",
        started.vm, started.destination, started.policy
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        )
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b
    });
    let say = |line: String| match &bar {
        Some(b) => b.println(line),
        None => eprintln!("{line}"),
    };
    let mut shown = 0;
    let mut cancelled = false;
    let last = loop {
        if INTERRUPTED.load(Ordering::Acquire) && !cancelled {
            cancelled = true;
            match client.call("DELETE", &format!("/v1/migrations/{id}"), None) {
                Ok(_) => say("cancelling; the VM keeps running on the source".into()),
                Err(e) => say(format!("cannot cancel: {e}")),
            }
        }
        let m: MigrationInfo =
            serde_json::from_str(&client.call("GET", &format!("/v1/migrations/{id}"), None)?)
                .context("the agent's record of the migration")?;
        for d in &m.decisions[shown.min(m.decisions.len())..] {
            say(format!(
                "{:>8.0} ms  {} = {}: {}",
                d.t_ms, d.setting, d.value, d.reason
            ));
        }
        shown = m.decisions.len();
        if let (Some(b), Some(p)) = (&bar, &m.progress) {
            let bw = p.bandwidth_bytes_per_sec;
            let remaining = p.postcopy_pages_left.unwrap_or(p.remaining_dirty_pages);
            let eta = if bw > 0.0 {
                format!("{:.1} s", remaining as f64 * 4096.0 / bw)
            } else {
                "-".into()
            };
            b.set_message(format!(
                "{} round {} | remaining {remaining} pages | {:.1} MB/s | ETA {eta}",
                p.phase,
                p.round,
                bw / 1e6
            ));
            b.tick();
        }
        if m.state.ended() {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if as_json {
        println!("{}", serde_json::to_string(&last)?);
    } else {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} ms"));
        println!(
            "{} {}: total {}, downtime {}{}",
            last.vm,
            last.state,
            ms(last.total_ms),
            ms(last.downtime_ms),
            last.error.map(|e| format!(" ({e})")).unwrap_or_default()
        );
    }
    Ok(if last.state == MigrationState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
