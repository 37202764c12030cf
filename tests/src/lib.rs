//! Harness for Ferry's end-to-end tests: real `ferry` processes on real KVM.
//!
//! Everything a test creates (processes, sockets, folders) is owned by a guard that
//! removes it on drop, also when the test fails.

use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_api::{MigrationReport, Outcome, PortCounters, RunState, Status, VerifyReport, VmStatus};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub mod agent;
pub mod alertmanager;
pub mod faults;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod prometheus;
pub mod wire;

/// The `ferry` binary under test: `$FERRY_BIN`, else the workspace's release or debug build.
pub fn ferry_bin() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        // Relative paths are taken from the workspace root, where cargo is usually run.
        return root.join(p);
    }
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("ferry");
        if p.exists() {
            return p;
        }
    }
    panic!("no ferry binary: build it (cargo build --release -p ferry) or set FERRY_BIN");
}

/// A facility the end-to-end tests need is missing. The test fails, naming it and how to
/// get it, unless `FERRY_ALLOW_SKIP=1`: then the skip is appended to the file
/// `$FERRY_SKIP_LOG` (as `<test binary>::<test name>: <facility>`, which `cargo xtask
/// test` lists at the end of its run) and this returns false for the test to return.
/// A test that passes because it did not run must never look like one that ran.
pub fn missing(facility: &str, fix: &str) -> bool {
    let allowed = std::env::var_os("FERRY_ALLOW_SKIP").is_some_and(|v| v == "1");
    assert!(
        allowed,
        "this test needs {facility}, which is missing here: {fix}. (FERRY_ALLOW_SKIP=1 \
         skips such tests instead, and cargo xtask test lists them.)"
    );
    let line = format!("{}: {facility}", test_id());
    eprintln!("SKIPPED {line}, which is missing here ({fix})");
    if let Some(log) = std::env::var_os("FERRY_SKIP_LOG") {
        use std::io::Write;
        // One write per line with O_APPEND: lines from tests running at once stay whole.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = written {
            panic!(
                "cannot record the skip of {line} in {}: {e}",
                Path::new(&log).display()
            );
        }
    }
    false
}

/// `<test binary>::<test name>` of the running test: libtest names each test's thread
/// after the test, and cargo names the binary `<target>-<hash>`.
fn test_id() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            Some((target, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => {
                target.to_owned()
            }
            _ => stem,
        })
        .unwrap_or_else(|| "?".into());
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_owned();
    format!("{binary}::{test}")
}

/// The command `cmd` is on the PATH, or the test fails naming it (see [`missing`]).
pub fn require_command(cmd: &str, fix: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(cmd).is_file()));
    found || missing(cmd, fix)
}

/// True when KVM is usable here; otherwise see [`missing`].
pub fn require_kvm() -> bool {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return missing(
            "KVM (/dev/kvm)",
            &format!(
                "opening /dev/kvm read-write failed ({e}); load the kvm module (modprobe \
                 kvm_intel or kvm_amd; cargo xtask setup tries modprobe kvm) on a host with \
                 hardware or nested virtualisation, and run as root or in group kvm"
            ),
        );
    }
    true
}

/// True when the tests run as root; otherwise see [`missing`].
pub fn require_root(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    missing(
        "root",
        &format!("{why}: run the tests as root (sudo -E cargo xtask test)"),
    )
}

/// True when eBPF probes can load here: root, tracefs mounted, kernel BTF; otherwise
/// see [`missing`], which names the first one missing.
pub fn require_ebpf() -> bool {
    if !require_root("loading eBPF programs needs it") {
        return false;
    }
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        return missing(
            "tracefs at /sys/kernel/tracing",
            "cargo xtask setup mounts tracefs (mount -t tracefs tracefs /sys/kernel/tracing)",
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return missing(
            "kernel BTF (/sys/kernel/btf/vmlinux)",
            "the eBPF probes are CO-RE and need a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        );
    }
    true
}

/// Two network namespaces joined by a veth pair (shaped to `rate_mbit` when given), or,
/// when that cannot be made here, [`missing`] naming what failed and `None`.
pub fn require_link(tag: &str, rate_mbit: Option<u32>) -> Option<netns::LinkPair> {
    if !require_root("network namespaces need CAP_NET_ADMIN") {
        return None;
    }
    match netns::LinkPair::new(tag, rate_mbit) {
        Ok(link) => Some(link),
        Err(e) => {
            let facility = if rate_mbit.is_some() {
                "network namespaces, veth and tc tbf"
            } else {
                "network namespaces and veth"
            };
            missing(
                facility,
                &format!(
                    "{e}; cargo xtask setup installs iproute2 (ip, tc); the kernel needs \
                     CONFIG_NET_NS, CONFIG_VETH and, for shaped links, CONFIG_NET_SCH_TBF"
                ),
            );
            None
        }
    }
}

/// Serializes the tests that must have the host's CPUs to themselves: those that run a
/// guest at full speed (unpaced, or paced far past what a link carries) and those
/// whose premise depends on the host's speed ("the guest out-runs the link", a round
/// count, a throttle the policy must decide on, a post-copy runaway). libtest runs
/// tests of one binary on several threads at once; two such tests on a 2-core machine
/// starve each other, and a guest that was meant to out-run its link then falls behind
/// it and the migration converges. Each such test holds this guard for its whole run.
///
/// A lock inside the process is enough: cargo runs the test binaries one after another,
/// so only tests of the same binary can overlap. Every other test of a binary that has
/// such tests takes [`alongside`], so a guarded test runs alone in its binary; other
/// work may still share the host, which is why the tests resting on a guest out-running
/// its link also measure that premise from the guest's own counters before looking at
/// the outcome (see [`assert_outruns`]). (A guarded test that ran beside another test's
/// migration once saw its guest dirty 4x its link instead of 30x.)
pub fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    // A test that failed while holding it poisons it; the next one still runs alone.
    HOST.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// For every other test that runs guests, in a binary with [`exclusive`] tests: they
/// run beside one another, never beside a guarded one.
pub fn alongside() -> std::sync::RwLockReadGuard<'static, ()> {
    HOST.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

static HOST: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// How many times faster than its link a guest must dirty memory (or disk) for a test
/// whose premise is "the guest out-runs the link": far enough that a guest slowed by a
/// busy host still out-runs it, so the outcome does not hang on the host's speed.
pub const OUTRUN_FACTOR: f64 = 10.0;

/// Pages per second the guest wrote between two of its VMM's statuses, from its own
/// counter (`guest_pages_written`) over the VMM's clock (`uptime_ms`).
pub fn guest_write_rate(before: &Printed<VmStatus>, after: &Printed<VmStatus>) -> f64 {
    let (b, a) = (&before.machine, &after.machine);
    let pages = a.guest_pages_written.saturating_sub(b.guest_pages_written);
    let ms = a.uptime_ms.saturating_sub(b.uptime_ms);
    assert!(
        ms > 0,
        "no time between the statuses to measure the guest over: {before} {after}"
    );
    pages as f64 * 1e3 / ms as f64
}

/// Fails the test, before its outcome is looked at, unless the guest dirtied
/// `bytes_per_sec` (measured, during `when`) at least [`OUTRUN_FACTOR`] times what a
/// `link_mbit` link carries. When it did not, the host was too busy for the guest to
/// keep its pace (or is slower than the test assumes) and the outcome would not say what
/// the test claims: the message says so, with the numbers.
pub fn assert_outruns(what: &str, when: &str, bytes_per_sec: f64, link_mbit: f64) {
    let link = link_mbit * 1e6 / 8.0;
    let times = bytes_per_sec / link;
    assert!(
        times >= OUTRUN_FACTOR,
        "premise did not hold: {what} at {:.1} MB/s {when}, {times:.1}x the {link_mbit} Mbit/s \
         link ({:.1} MB/s); this test needs {OUTRUN_FACTOR}x. The host was contended (or is \
         slower than assumed), so the outcome would not mean what the test says",
        bytes_per_sec / 1e6,
        link / 1e6
    );
    eprintln!(
        "premise: {what} at {:.1} MB/s {when}, {times:.1}x the {link_mbit} Mbit/s link",
        bytes_per_sec / 1e6
    );
}

/// A scratch folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let base = std::env::var_os("FERRY_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "ferry-{tag}-{}-{:x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&dir).expect("create test folder");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u64() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n
}

/// A process's resident memory, KiB (0 if it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `ferry ARGS` to completion.
pub fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .args(pki::secured(args))
        .stdin(Stdio::null())
        .output()
        .expect("run ferry")
}

/// A `ferry vmm` process, killed on drop.
pub struct Vmm {
    pub child: Child,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl Vmm {
    /// Starts `ferry vmm ARGS --control SOCK` and waits until it answers `status`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Self {
        Self::spawn_with_env(dir, name, args, &[])
    }

    /// As [`Vmm::spawn`], with extra environment variables (test fault hooks).
    pub fn spawn_with_env(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_cmd(Command::new(ferry_bin()), dir, name, args, env)
    }

    /// As [`Vmm::spawn`], inside network namespace `ns`.
    pub fn spawn_in(ns: &str, dir: &Path, name: &str, args: &[&str]) -> Self {
        Self::spawn_in_with_env(ns, dir, name, args, &[])
    }

    /// As [`Vmm::spawn_in`], with extra environment variables (failpoints).
    pub fn spawn_in_with_env(
        ns: &str,
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_cmd(
            netns::LinkPair::command(ns, &ferry_bin()),
            dir,
            name,
            args,
            env,
        )
    }

    fn spawn_cmd(
        mut cmd: Command,
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let control = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let logf = std::fs::File::create(&log).expect("log file");
        let mut vmm_args = vec!["vmm"];
        vmm_args.extend_from_slice(args);
        let child = cmd
            .args(pki::secured(&vmm_args))
            .arg("--control")
            .arg(&control)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("spawn ferry vmm");
        let mut vmm = Self {
            child,
            control,
            log,
        };
        let t0 = Instant::now();
        loop {
            if let Some(status) = vmm.child.try_wait().expect("wait") {
                panic!("ferry vmm exited with {status}: {}", vmm.log_text());
            }
            if vmm.try_status().is_some() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "ferry vmm never answered: {}",
                vmm.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vmm
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` `count` times (it may hold more) and
    /// returns it. The VMM writes some lines only after acting (a connection is
    /// closed, then logged), so whoever saw the act may be ahead of the line.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let log = self.log_text();
            if log.matches(needle).count() >= count {
                return log;
            }
            assert!(
                t0.elapsed() < timeout,
                "timed out waiting for {count} lines saying {needle:?}\nlog: {log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ctl(&self) -> &str {
        self.control.to_str().expect("utf-8 path")
    }

    /// `status`, or None when the VMM does not answer.
    pub fn try_status(&self) -> Option<Printed<Status>> {
        status_at(self.ctl())
    }

    /// `status`: a VM, or a destination still waiting for one.
    pub fn status(&self) -> Printed<Status> {
        status_or_why(self.ctl())
            .unwrap_or_else(|why| panic!("status failed: {why}\nVMM log: {}", self.log_text()))
    }

    /// `status` of a VM; a destination still waiting for one fails the test.
    pub fn vm_status(&self) -> Printed<VmStatus> {
        vm_of(self.status())
    }

    /// `ferry verify --json` on this VM.
    pub fn verify(&self) -> Printed<VerifyReport> {
        let out = ferry(&["verify", "--control", self.ctl(), "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| {
            panic!(
                "verify failed ({}): {} {}\nlog: {}",
                out.status,
                text,
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            )
        });
        Printed::new("verify", v)
    }

    /// Waits until `pred(status)` holds of this VM's status.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&VmStatus) -> bool,
    ) -> Printed<VmStatus> {
        vm_of(self.wait_for_status(what, timeout, |s| {
            pred(s.vm().unwrap_or_else(|| panic!("no VM here yet: {s:?}")))
        }))
    }

    /// Waits until `pred(status)` holds, of a VM or of a destination waiting for one.
    pub fn wait_for_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> Printed<Status> {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < timeout,
                "timed out waiting for {what}; last status {s}\nlog: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks the VMM to quit and waits for the process to end.
    pub fn quit(mut self) {
        let _ = ferry(&["quit", "--control", self.ctl()]);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ferry vmm did not quit: {}", self.log_text());
    }

    /// Kills the process at once, as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.control);
    }
}

/// `v` read as the API type `T`; a mismatch is a test failure naming `what`.
pub fn typed<T: DeserializeOwned>(what: &str, v: &Value) -> T {
    serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{what} does not match the ferry-api types: {e}\n{v}"))
}

/// What `ferry` printed, read through the API type `T` (its fields by deref), with the
/// JSON as it was: `{}` shows that, and `raw` holds the keys no API type has.
#[derive(Debug, Clone)]
pub struct Printed<T> {
    pub typed: T,
    pub raw: Value,
}

impl<T: DeserializeOwned> Printed<T> {
    /// `raw` read as `T`; a mismatch is a test failure naming `what`.
    pub fn new(what: &str, raw: Value) -> Self {
        Self {
            typed: typed(what, &raw),
            raw,
        }
    }
}

impl<T> Deref for Printed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.typed
    }
}

impl<T> fmt::Display for Printed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.raw.fmt(f)
    }
}

impl Printed<MigrationReport> {
    /// The whole report `ferry migrate` printed: the VMM's, and what the driver adds
    /// (the policy, its steps and prediction, the probes' signals).
    pub fn driven(&self) -> ferry_api::DriverReport {
        typed("the driver's report", &self.raw)
    }

    /// The decisions recorded on `setting`, in order.
    pub fn decisions_on(&self, setting: &str) -> Vec<&ferry_api::Decision> {
        self.decisions
            .iter()
            .filter(|d| d.setting == setting)
            .collect()
    }
}

/// `ferry status --json` on the VMM at `control`, or None when it does not answer.
pub fn status_at(control: &str) -> Option<Printed<Status>> {
    status_or_why(control).ok()
}

/// `ferry status --json` on the VMM at `control`, or what `ferry` said instead.
fn status_or_why(control: &str) -> Result<Printed<Status>, String> {
    let out = ferry(&["status", "--control", control, "--json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(Printed::new("status", v))
}

/// The state a status names: a VM's run state, or a waiting destination's (`incoming`).
pub fn state_of(s: &Status) -> &str {
    match s {
        Status::Vm(vm) => vm.machine.state.as_str(),
        Status::Incoming(i) => &i.state,
    }
}

/// A waiting destination's port counters (None: a VM is here, or it keeps none).
pub fn port_counters(s: &Status) -> Option<&PortCounters> {
    match s {
        Status::Incoming(i) => i.incoming.as_ref(),
        Status::Vm(_) => None,
    }
}

/// A VM's status; a destination still waiting for one fails the test.
pub fn vm_of(s: Printed<Status>) -> Printed<VmStatus> {
    match s.typed {
        Status::Vm(vm) => Printed {
            typed: *vm,
            raw: s.raw,
        },
        Status::Incoming(i) => panic!("no VM here yet: {i:?}"),
    }
}

pub fn u64_of(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no integer {key} in {v}"))
}

pub fn f64_of(v: &Value, key: &str) -> f64 {
    v.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// Writes a VM config into `dir` and returns its path.
pub fn write_config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("name = \"{name}\"\n{body}")).expect("write config");
    path
}

/// A TCP port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A `ferry vmm --incoming` on a free loopback port; returns it and its address.
/// Shared disks are found in `dir/disks`, where the tests' configs keep them.
pub fn incoming(dir: &Path, name: &str) -> (Vmm, String) {
    incoming_with(dir, name, &[])
}

/// As [`incoming`], over plain TCP (`--insecure`): for tests that speak the wire
/// protocol themselves, and so test Ferry's own frame checks rather than TLS's.
pub fn incoming_insecure(dir: &Path, name: &str) -> (Vmm, String) {
    incoming_with(dir, name, &["--insecure"])
}

fn incoming_with(dir: &Path, name: &str, extra: &[&str]) -> (Vmm, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let shared = dir.join("disks");
    std::fs::create_dir_all(&shared).expect("create the shared disk folder");
    let mut args = vec![
        "--incoming",
        &addr,
        "--shared-dir",
        shared.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    (Vmm::spawn(dir, name, &args), addr)
}

/// Runs `ferry migrate --json` from `src` to `to`; returns its exit success and report.
pub fn migrate(src: &Vmm, to: &str, extra: &[&str]) -> (bool, Printed<MigrationReport>) {
    let mut args = vec!["migrate", "--control", src.ctl(), "--to", to, "--json"];
    args.extend_from_slice(extra);
    report_of(&args, || format!("source log: {}", src.log_text()))
}

/// Runs a `ferry ... --json` command that prints a report; returns its exit success
/// and the report, read as `T`. No report, or one that does not read as `T`, is a
/// test failure, with `context()` in the message.
pub fn report_of<T: DeserializeOwned>(
    args: &[&str],
    context: impl Fn() -> String,
) -> (bool, Printed<T>) {
    let out = ferry(args);
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!(
            "{} printed no report ({}): {text} {}\n{}",
            args[0],
            out.status,
            String::from_utf8_lossy(&out.stderr),
            context()
        )
    });
    (
        out.status.success(),
        Printed::new(&format!("the {} report", args[0]), report),
    )
}

/// Breaks every TCP connection to `port` on loopback (`ss -K`), as a failing network
/// path would.
pub fn kill_connections_to(port: &str) {
    let out = Command::new("ss")
        .args(["-K", "dst", "127.0.0.1", "dport", "=", &format!(":{port}")])
        .output()
        .expect("ss (iproute2) is installed by cargo xtask setup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a config, starts `ferry vmm` on it and waits until its guest has run a while.
pub fn boot(dir: &Path, name: &str, body: &str) -> Vmm {
    let cfg = write_config(dir, name, body);
    let vm = Vmm::spawn(dir, name, &["--config", cfg.to_str().expect("utf-8 path")]);
    vm.wait_for("the guest running", Duration::from_secs(30), |s| {
        s.machine.heartbeats > 200
    });
    vm
}

/// Waits (up to a minute) until the guest of the VMM at `control` has made more than
/// `at_least` disk writes.
pub fn wait_disk_writes(control: &str, at_least: u64) {
    let t0 = Instant::now();
    loop {
        if let Some(s) = status_at(control)
            && let Status::Vm(vm) = &s.typed
            && vm.machine.disk_writes > at_least
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no disk writes at {control}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VM still runs (its heartbeats go on) and its guest finds nothing wrong.
pub fn assert_running_and_intact(vm: &Vmm) {
    let s0 = vm.vm_status();
    assert_eq!(s0.machine.state, RunState::Running, "{s0}");
    vm.wait_for("the guest still running", Duration::from_secs(30), |s| {
        s.machine.heartbeats > s0.machine.heartbeats + 200
    });
    let v = vm.verify();
    assert_eq!(v.memory_errors, 0, "{v}");
    assert_eq!(v.disk_errors, 0, "{v}");
}

/// CRC-32 (IEEE), as Ferry's frames and snapshot manifests use it.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// After a completed migration: the destination runs and verifies clean, the source
/// is handed over for good. `writes`: the workload still writes pages after its fill.
pub fn check_arrived(src: &Vmm, dst: &Vmm, report: &Printed<MigrationReport>, writes: bool) {
    assert_eq!(report.core.outcome, Outcome::Completed, "{report}");
    // A measured pause: the guest stopped on one side and went on on the other.
    assert!(
        report.downtime_ms.is_some_and(|d| d.is_finite() && d > 0.0),
        "{report}"
    );
    assert!(report.pages_sent > 0, "{report}");
    assert_eq!(report.guest_integrity_errors, 0, "{report}");
    assert_eq!(report.memory_verified, Some(true), "{report}");
    let s0 = dst.vm_status();
    assert_eq!(s0.machine.state, RunState::Running, "{s0}");
    let s1 = dst.wait_for("destination guest running", Duration::from_secs(30), |s| {
        s.machine.heartbeats > s0.machine.heartbeats + 300
            && (!writes || s.machine.guest_pages_written > s0.machine.guest_pages_written)
    });
    assert_eq!(s1.machine.guest_integrity_errors, 0, "{s1}");
    assert_eq!(s1.machine.disk_integrity_errors, 0, "{s1}");
    let v = dst.verify();
    assert_eq!(v.memory_errors, 0, "{v}");
    assert_eq!(v.disk_errors, 0, "{v}");
    assert_eq!(src.vm_status().machine.state, RunState::Migrated);
    let out = ferry(&["resume", "--control", src.ctl()]);
    assert!(
        !out.status.success(),
        "the source resumed after the handover"
    );
}

/// The size of the file system holding `path` and what is free of it to an
/// unprivileged writer, bytes (statvfs(3)).
pub fn fs_space(path: &Path) -> std::io::Result<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs(3) to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs to fill, both live for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize))
}
