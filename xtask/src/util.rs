//! Shared helpers: running commands, finding the workspace, talking to `ferry`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_api::{SnapshotReport, Status, VmStatus};
use serde_json::Value;

pub fn step(what: &str) {
    println!("\n==> {what}");
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn have_command(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(cmd).is_file()))
        .unwrap_or(false)
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn run(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Builds the release `ferry` binary and returns its path.
pub fn build_ferry() -> Result<PathBuf> {
    // The tests run the lab with the binary they were given, built already (a
    // nested `cargo build` would wait on the lock of the `cargo test` running them).
    if let Some(bin) = std::env::var_os("FERRY_BIN") {
        let bin = PathBuf::from(bin);
        step(&format!("using ferry at {} (FERRY_BIN)", bin.display()));
        return Ok(bin);
    }
    step("building ferry (release)");
    let mut c = cargo();
    c.args(["build", "--release", "-p", "ferry"]);
    run(c, "cargo build --release -p ferry")?;
    Ok(target_dir().join("release/ferry"))
}

/// Where cargo builds: `$CARGO_TARGET_DIR` (relative to the workspace) or `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root().join(dir),
        _ => root().join("target"),
    }
}

pub fn test(extra: &[&str]) -> Result<()> {
    step("cargo fmt --check");
    let mut c = cargo();
    c.args(["fmt", "--all", "--check"]);
    run(c, "cargo fmt --check")?;
    step("cargo clippy --all-targets -- -D warnings");
    let mut c = cargo();
    c.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--release",
        "--",
        "-D",
        "warnings",
    ]);
    run(c, "cargo clippy")?;
    // One build of everything the tests run, the `ferry` binary among them (its
    // package's integration tests want it): built with the features the whole
    // workspace's tests unify, so the test run compiles nothing again. (`cargo build
    // -p ferry` would resolve fewer features and make cargo build ferry and half its
    // dependencies twice.)
    let ferry = match std::env::var_os("FERRY_BIN") {
        Some(bin) => {
            let bin = root().join(bin);
            step(&format!("using ferry at {} (FERRY_BIN)", bin.display()));
            bin
        }
        None => {
            step("building the tests and ferry (release)");
            let mut c = cargo();
            // Whole, whatever ARGS select: a filtered build might leave the binary
            // out (it is built for the ferry package's own integration tests).
            c.args(["test", "--workspace", "--release", "--no-run"]);
            run(c, "cargo test --no-run")?;
            let bin = target_dir().join("release/ferry");
            if !bin.is_file() {
                bail!("cargo test --no-run built no {}", bin.display());
            }
            bin
        }
    };
    step("cargo test (unit, integration, end-to-end)");
    let skip_log = fresh_skip_log()?;
    let mut c = cargo();
    c.args(["test", "--workspace", "--release"])
        .args(extra)
        .env("FERRY_BIN", &ferry)
        .env("FERRY_SKIP_LOG", &skip_log);
    let tested = run(c, "cargo test");
    // Listed whether the tests passed or not: a skipped test passed without running.
    let skipped = report_skips(&skip_log)?;
    tested?;
    if skipped > 0 && !skips_allowed() {
        bail!(
            "{skipped} test(s) skipped although FERRY_ALLOW_SKIP=1 is not set: a test that \
             does not run must fail instead"
        );
    }
    Ok(())
}

/// Whether tests may skip when a facility they need is missing (`FERRY_ALLOW_SKIP=1`,
/// read by the tests' harness); otherwise they fail, naming it.
fn skips_allowed() -> bool {
    std::env::var_os("FERRY_ALLOW_SKIP").is_some_and(|v| v == "1")
}

/// An empty `target/test-skips.log`, which the tests' harness appends a line to for
/// each test that skipped (`<test binary>::<test name>: <facility>`).
fn fresh_skip_log() -> Result<PathBuf> {
    let dir = root().join("target");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join("test-skips.log");
    std::fs::write(&log, "").with_context(|| format!("emptying {}", log.display()))?;
    Ok(log)
}

/// Prints every test that skipped, or that none did; returns how many.
fn report_skips(log: &Path) -> Result<usize> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        println!("skipped tests: none");
    } else {
        println!("skipped tests ({}):", lines.len());
        for line in &lines {
            println!("  {line}");
        }
    }
    Ok(lines.len())
}

/// A `ferry vmm` process that is killed if still running when dropped.
pub struct Vmm {
    pub child: Child,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl Vmm {
    pub fn spawn(ferry: &Path, args: &[&str], control: &Path, log: &Path) -> Result<Self> {
        Self::spawn_cmd(Command::new(ferry), args, control, log)
    }

    /// As [`Vmm::spawn`], with the command given (e.g. run in a network namespace).
    pub fn spawn_cmd(mut cmd: Command, args: &[&str], control: &Path, log: &Path) -> Result<Self> {
        let logf =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        // The migration stream is TLS unless a caller says --insecure: benchmarks
        // measure what the product does by default.
        let mut vmm_args = vec!["vmm"];
        vmm_args.extend_from_slice(args);
        let child = cmd
            .args(ferry_tests::pki::secured(&vmm_args))
            .arg("--control")
            .arg(control)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("starting ferry vmm")?;
        Ok(Self {
            child,
            control: control.to_owned(),
            log: log.to_owned(),
        })
    }

    pub fn wait_ready(&mut self, ferry: &Path) -> Result<Status> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "ferry vmm exited ({st}):\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok(s) = status(ferry, &self.control) {
                return Ok(s);
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("ferry vmm did not answer within 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn quit(mut self, ferry: &Path) -> Result<()> {
        ctl(ferry, &["quit"], &self.control)?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `ferry vmm ARGS`, called `name` in `dir` (its control socket and log there), in
/// network namespace `ns` if given; ready.
pub fn vmm_in(
    ns: Option<&str>,
    ferry: &Path,
    dir: &Path,
    args: &[&str],
    name: &str,
) -> Result<Vmm> {
    let cmd = match ns {
        Some(ns) => ferry_tests::netns::LinkPair::command(ns, ferry),
        None => Command::new(ferry),
    };
    let mut vm = Vmm::spawn_cmd(
        cmd,
        args,
        &dir.join(format!("{name}.sock")),
        &dir.join(format!("{name}.log")),
    )?;
    vm.wait_ready(ferry)?;
    Ok(vm)
}

/// A `ferry vmm --incoming` on a free loopback port, called `name` in `dir` (with
/// `extra` arguments), ready; and the address it listens on.
pub fn incoming(ferry: &Path, dir: &Path, name: &str, extra: &[&str]) -> Result<(Vmm, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--incoming", addr.as_str()];
    args.extend_from_slice(extra);
    let mut vm = Vmm::spawn(
        ferry,
        &args,
        &dir.join(format!("{name}.sock")),
        &dir.join(format!("{name}.log")),
    )?;
    vm.wait_ready(ferry)?;
    Ok((vm, addr))
}

/// Runs `ferry ARGS --control SOCK` and returns its stdout.
pub fn ctl(ferry: &Path, args: &[&str], control: &Path) -> Result<String> {
    let out = Command::new(ferry)
        .args(args)
        .arg("--control")
        .arg(control)
        .output()
        .context("running ferry")?;
    if !out.status.success() {
        bail!(
            "ferry {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ferry snapshot --out DIR --json` on a VM; returns the snapshot report.
pub fn snapshot(ferry: &Path, control: &Path, out: &Path) -> Result<SnapshotReport> {
    let out = out.to_str().unwrap_or_default();
    Ok(serde_json::from_str(&ctl(
        ferry,
        &["snapshot", "--out", out, "--json"],
        control,
    )?)?)
}

/// `ferry status --json`: a VM, or a destination still waiting for one.
pub fn status(ferry: &Path, control: &Path) -> Result<Status> {
    Ok(serde_json::from_str(&ctl(
        ferry,
        &["status", "--json"],
        control,
    )?)?)
}

/// `status` of a VM; a destination still waiting for one is an error.
pub fn vm_status(ferry: &Path, control: &Path) -> Result<VmStatus> {
    vm_of(status(ferry, control)?)
}

/// A VM's status; a destination still waiting for one is an error.
pub fn vm_of(s: Status) -> Result<VmStatus> {
    match s {
        Status::Vm(vm) => Ok(*vm),
        Status::Incoming(i) => bail!("no VM here yet: {i:?}"),
    }
}

/// An optional figure as the bench and lab print it: its value, or `-`.
pub fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A number read from JSON that no ferry-api type describes (NaN when absent).
pub fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// CLOCK_MONOTONIC in nanoseconds, comparable with the VMM's own timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    Ok(stat_cpu_seconds(&std::fs::read_to_string(format!(
        "/proc/{pid}/stat"
    ))?))
}

/// User + system time from a `/proc/.../stat` line (a process's or a thread's).
pub fn stat_cpu_seconds(stat: &str) -> f64 {
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> f64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (field(11) + field(12)) / hz
}

/// The `/proc/PID/task/TID` folders of a VMM's vCPU threads (named `vcpuN`).
pub fn vcpu_tasks(pid: u32) -> Result<Vec<PathBuf>> {
    let mut tasks = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.starts_with("vcpu") {
            tasks.push(task);
        }
    }
    Ok(tasks)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// A scratch folder under target/ for lab and bench runs.
pub fn work_dir(name: &str) -> Result<PathBuf> {
    let dir = root().join("target").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_skip_recorded_is_counted_and_blank_lines_are_not() {
        let log = std::env::temp_dir().join(format!("ferry-skips-{}.log", std::process::id()));
        std::fs::write(
            &log,
            "probes::a: KVM (/dev/kvm)\n\nstorage::b: tmpfs mounts\n",
        )
        .unwrap();
        let counted = report_skips(&log);
        let _ = std::fs::remove_file(&log);
        assert_eq!(counted.unwrap(), 2);
    }
}
