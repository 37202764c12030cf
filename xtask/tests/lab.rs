//! `cargo xtask lab` end to end, as a new user runs it: three hosts, agents,
//! Prometheus, Alertmanager, a migration through the API and an evacuation by an
//! alert; then what it leaves behind (nothing), and its report in a real browser.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use ferry_tests::{TempDir, exclusive, ferry_bin, require_command, require_kvm, require_root};
use serde_json::Value;

fn ready() -> bool {
    require_kvm()
        && require_root("the lab makes network namespaces and mounts")
        && require_command(
            "prometheus",
            "apt-get install prometheus (cargo xtask setup)",
        )
        && require_command(
            "prometheus-alertmanager",
            "apt-get install prometheus-alertmanager (cargo xtask setup)",
        )
        && require_command("chromium", "apt-get install chromium (cargo xtask setup)")
}

fn lab() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.arg("lab").env("FERRY_BIN", ferry_bin());
    c
}

fn lab_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lab")
}

/// Nothing of the lab is left: no namespace, bridge, mount or process of it.
fn nothing_left() {
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains("ferry-lab-"), "namespaces left: {netns}");
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("ferrylab"), "links left: {links}");
    let dir = std::fs::canonicalize(lab_dir()).unwrap_or_else(|_| lab_dir());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "mounts left under {}: {mounts}",
        dir.display()
    );
    // Processes the lab started run from or in its folder: agents (their config is
    // there), VMMs (their sockets), Prometheus and Alertmanager (their data).
    let mut left = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&dir.display().to_string()) {
            left.push(format!("{pid}: {cmdline}"));
        }
    }
    assert!(left.is_empty(), "processes left: {left:#?}");
}

/// What a headless Chromium makes of `html`: the DOM after its scripts ran, and
/// every console message it logged.
fn in_browser(html: &Path) -> (String, Vec<String>) {
    let profile = TempDir::new("chromium");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let console = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .map(str::to_owned)
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

fn attr(dom: &str, name: &str) -> Option<u64> {
    let at = dom.find(&format!("{name}=\""))? + name.len() + 2;
    dom[at..].split('"').next()?.parse().ok()
}

#[test]
fn the_lab_runs_web_end_to_end_and_leaves_nothing_behind() {
    if !ready() {
        return;
    }
    let _alone = exclusive();
    let dir = TempDir::new("lab");
    let json = dir.join("lab.json");
    let t0 = Instant::now();
    let out = lab()
        .args(["--scenario", "web", "--json"])
        .arg(&json)
        .output()
        .expect("run the lab");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the lab failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("the lab ran in {:.0} s", t0.elapsed().as_secs_f64());
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let migrations = report["migrations"].as_array().unwrap();
    assert!(migrations.len() >= 2, "{report:#}");
    for m in migrations {
        assert_eq!(m["state"], "completed", "{m:#}");
    }
    let triggers: Vec<&str> = migrations
        .iter()
        .filter_map(|m| m["trigger"].as_str())
        .collect();
    assert_eq!(
        triggers,
        ["api", "alert:FerryDatastoreFilling"],
        "{report:#}"
    );
    // The alert's evacuation went to host-a: host-c was kept busier.
    let evacuation = &migrations[1];
    assert_eq!(evacuation["source"], "host-b");
    assert_eq!(evacuation["destination"], "host-a", "{evacuation:#}");
    let placed = &evacuation["decisions"][0];
    assert_eq!(placed["setting"], "destination");
    assert!(
        placed["reason"].as_str().unwrap().contains("host-c"),
        "the reason weighs host-c too: {placed}"
    );
    assert_eq!(report["integrity"]["guest_errors"], 0);
    assert_eq!(report["integrity"]["disk_errors"], 0);
    assert_eq!(report["disk_check_ok"], true);
    assert_eq!(report["storage_migrations"][0]["state"], "completed");
    nothing_left();

    // The report: every chart drawn with data, no console error.
    let html = PathBuf::from(report["report_html"].as_str().unwrap());
    let (dom, console) = in_browser(&html);
    assert!(console.is_empty(), "console messages: {console:#?}");
    let charts = attr(&dom, "data-charts").expect("data-charts set by the page");
    let with_data = attr(&dom, "data-charts-with-data").expect("data-charts-with-data");
    assert!(charts > 0);
    assert_eq!(
        with_data, charts,
        "charts without data: {}",
        report["charts_without_data"]
    );
}

#[test]
fn a_lab_whose_agent_dies_halfway_says_so_and_still_cleans_up() {
    if !ready() {
        return;
    }
    let _alone = exclusive();
    let mut child = lab()
        .args(["--scenario", "idle"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the lab");
    let stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut lines = BufReader::new(stdout).lines();
    // Halfway: as the first migration starts, host-b's agent is killed.
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("migrating lab1 to host-b") {
            break;
        }
    }
    assert!(seen.contains("migrating lab1 to host-b"), "{seen}");
    let pids = Command::new("ip")
        .args(["netns", "pids", "ferry-lab-b"])
        .output()
        .unwrap();
    let mut killed = 0;
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(" agent --config") {
            // SAFETY: kill(2) on a pid just read from the lab's namespace.
            unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
            killed += 1;
        }
    }
    assert_eq!(
        killed,
        1,
        "host-b's agent found: {}",
        String::from_utf8_lossy(&pids.stdout)
    );
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "the lab must fail: {seen}");
    assert!(
        seen.contains("the agent on host-b exited") || err.contains("the agent on host-b exited"),
        "the lab names the dead agent:\n{seen}\n{err}"
    );
    assert!(seen.contains("cleaning up"), "{seen}");
    nothing_left();
}
