//! Installs what Ferry needs and is missing, saying what it does.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{have_command, step};

/// Debian packages Ferry's build, tests and lab use, with a command (or a file, when
/// it starts with /) that shows each is there.
const PACKAGES: &[(&str, &str)] = &[
    // `ss -K` and `ip netns` for fault and network tests.
    ("iproute2", "ss"),
    // The eBPF probes are C, compiled by clang against libbpf's helper headers.
    ("clang-19", "clang-19"),
    ("libbpf-dev", "/usr/include/bpf/bpf_helpers.h"),
    ("bpftool", "bpftool"),
    // `promtool` checks the agent's /metrics and the alert rules; the tests scrape a
    // real agent with Prometheus, and the lab runs Prometheus and Alertmanager.
    ("prometheus", "promtool"),
    ("prometheus-alertmanager", "prometheus-alertmanager"),
    // The dashboards are checked against Grafana's own types (an npm package).
    ("nodejs", "node"),
    ("npm", "npm"),
    // The lab's report.html is checked in a real headless browser, and its picture
    // in the README is that browser's screenshot.
    ("chromium", "chromium"),
    (
        "fonts-dejavu-core",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ),
];

/// The dashboards' schema check: its npm packages, pinned by the lock file.
const SCHEMA_DIR: &str = "dashboards/schema";

fn present(check: &str) -> bool {
    if check.starts_with('/') {
        Path::new(check).exists()
    } else {
        have_command(check)
    }
}

pub fn run() -> Result<()> {
    step("setup: checking what Ferry needs");
    check_kvm()?;
    install_packages()?;
    mount_tracefs();
    install_schema_tools()?;
    Ok(())
}

/// `npm ci` in dashboards/schema when its packages are missing or older than its
/// lock file: @grafana/schema (Grafana's dashboard types), ts-json-schema-generator
/// 2.4.0 and ajv.
fn install_schema_tools() -> Result<()> {
    let dir = crate::util::root().join(SCHEMA_DIR);
    let installed = dir.join("node_modules/.package-lock.json");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let current = match (
        modified(&installed),
        modified(&dir.join("package-lock.json")),
    ) {
        (Some(have), Some(want)) => have >= want,
        _ => false,
    };
    if current {
        println!("  dashboard schema tools present ({SCHEMA_DIR}/node_modules)");
        return Ok(());
    }
    println!("  installing the dashboard schema tools: npm ci in {SCHEMA_DIR}");
    let ok = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .context("running npm ci")?
        .success();
    if !ok {
        bail!("npm ci in {SCHEMA_DIR} failed");
    }
    Ok(())
}

fn check_kvm() -> Result<()> {
    if Path::new("/dev/kvm").exists() {
        println!("  /dev/kvm present");
        return Ok(());
    }
    // Try loading the module before giving up.
    let _ = Command::new("modprobe").arg("kvm").status();
    if Path::new("/dev/kvm").exists() {
        println!("  loaded the kvm module; /dev/kvm present");
        return Ok(());
    }
    if std::env::var_os("CI").is_some() {
        bail!("/dev/kvm is missing: Ferry's VMM and its tests need KVM");
    }
    println!(
        "  WARNING: /dev/kvm is missing; tests that need KVM will fail naming it \
         (FERRY_ALLOW_SKIP=1 skips them instead, and cargo xtask test lists each skip)"
    );
    Ok(())
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, check)| !present(check))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        println!("  packages present: {}", names());
        return Ok(());
    }
    println!("  installing Debian packages: {}", missing.join(" "));
    let ok = Command::new("apt-get")
        .arg("update")
        .status()
        .context("running apt-get update")?
        .success();
    if !ok {
        bail!("apt-get update failed");
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?
        .success();
    if !ok {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn names() -> String {
    PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Classic tracepoints need tracefs (the eBPF probes attach there).
fn mount_tracefs() {
    let target = "/sys/kernel/tracing";
    let mounted = Command::new("mountpoint")
        .args(["-q", target])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if mounted {
        println!("  tracefs mounted at {target}");
        return;
    }
    println!("  mounting tracefs at {target}");
    let ok = Command::new("mount")
        .args(["-t", "tracefs", "tracefs", target])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        println!("  WARNING: could not mount tracefs; eBPF tracepoint probes will be unavailable");
    }
}
