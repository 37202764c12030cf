//! `ferry agent` (the daemon, with its logging) and the commands that ask an agent.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use ferry_api::agent::{ApiError, VmInfo};

pub fn serve(config: &Path, log_format: &str) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if log_format == "json" {
        fmt.json().flatten_event(true).try_init()
    } else {
        fmt.with_target(false).try_init()
    };
    crate::daemon::run(config)?;
    Ok(ExitCode::SUCCESS)
}

/// GETs `path` of the agent at `base`, presenting the token in `token_file`.
fn get(base: &str, path: &str, token_file: Option<&Path>) -> anyhow::Result<String> {
    let token = token_file
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|t| t.trim().to_owned())
                .with_context(|| format!("reading the token file {}", f.display()))
        })
        .transpose()?;
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .new_agent();
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut req = agent.get(&url);
    if let Some(t) = &token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = req
        .call()
        .with_context(|| format!("cannot reach the agent at {base}"))?;
    let status = resp.status();
    let body = resp
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the agent's answer to {url}"))?;
    if !status.is_success() {
        let why = serde_json::from_str::<ApiError>(&body)
            .map(|e| e.message)
            .unwrap_or(body);
        anyhow::bail!("the agent at {base} answered {status}: {why}");
    }
    Ok(body)
}

pub fn vms(agent: &str, token_file: Option<&Path>, as_json: bool) -> anyhow::Result<ExitCode> {
    let body = get(agent, "/v1/vms", token_file)?;
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
            serde_json::to_value(v.presence)
                .ok()
                .and_then(|p| p.as_str().map(str::to_owned))
                .unwrap_or_default(),
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
