//! Harness for Ferry's end-to-end tests: real `ferry` processes on real KVM.
//!
//! Everything a test creates (processes, sockets, folders) is owned by a guard that
//! removes it on drop, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod netns;

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

/// True when KVM is usable. Under CI a missing /dev/kvm fails the test; elsewhere the
/// test reports itself skipped.
pub fn require_kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "/dev/kvm is missing: these tests need KVM"
    );
    eprintln!("SKIPPED: /dev/kvm is missing");
    false
}

/// True when eBPF probes can load here: root, tracefs mounted, kernel BTF. Under CI a
/// missing one fails the test, named; elsewhere the test reports itself skipped.
pub fn require_ebpf() -> bool {
    // SAFETY: geteuid has no preconditions.
    let missing = if unsafe { libc::geteuid() } != 0 {
        Some("root (eBPF programs need it)")
    } else if !Path::new("/sys/kernel/tracing/events").is_dir() {
        Some("tracefs at /sys/kernel/tracing (cargo xtask setup mounts it)")
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("kernel BTF (/sys/kernel/btf/vmlinux)")
    } else {
        None
    };
    match missing {
        None => true,
        Some(what) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{what} is missing: the eBPF probe tests need it"
            );
            eprintln!("SKIPPED: {what} is missing");
            false
        }
    }
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

/// Runs `ferry ARGS` to completion.
pub fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .args(args)
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
        Self::spawn_cmd(
            netns::LinkPair::command(ns, &ferry_bin()),
            dir,
            name,
            args,
            &[],
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
        let child = cmd
            .arg("vmm")
            .args(args)
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

    pub fn ctl(&self) -> &str {
        self.control.to_str().expect("utf-8 path")
    }

    pub fn try_status(&self) -> Option<Value> {
        let out = ferry(&["status", "--control", self.ctl(), "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("status failed: {}", self.log_text()))
    }

    /// `ferry verify --json` on this VM.
    pub fn verify(&self) -> Value {
        let out = ferry(&["verify", "--control", self.ctl(), "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(&text).unwrap_or_else(|_| {
            panic!(
                "verify failed ({}): {} {}\nlog: {}",
                out.status,
                text,
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            )
        })
    }

    /// Waits until `pred(status)` holds.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
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
pub fn incoming(dir: &Path, name: &str) -> (Vmm, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let vmm = Vmm::spawn(dir, name, &["--incoming", &addr]);
    (vmm, addr)
}

/// Runs `ferry migrate --json` from `src` to `to`; returns its exit success and report.
pub fn migrate(src: &Vmm, to: &str, extra: &[&str]) -> (bool, Value) {
    let mut args = vec!["migrate", "--control", src.ctl(), "--to", to, "--json"];
    args.extend_from_slice(extra);
    report_of(&args, || format!("source log: {}", src.log_text()))
}

/// Runs a `ferry ... --json` command that prints a report; returns its exit success
/// and the report. No report is a test failure, with `context()` in the message.
pub fn report_of(args: &[&str], context: impl Fn() -> String) -> (bool, Value) {
    let out = ferry(args);
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!(
            "{} printed no report ({}): {text} {}\n{}",
            args[0],
            out.status,
            String::from_utf8_lossy(&out.stderr),
            context()
        )
    });
    (out.status.success(), report)
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
        u64_of(s, "heartbeats") > 200
    });
    vm
}

/// The VM still runs (its heartbeats go on) and its guest finds nothing wrong.
pub fn assert_running_and_intact(vm: &Vmm) {
    let s0 = vm.status();
    assert_eq!(s0["state"], "running", "{s0}");
    vm.wait_for("the guest still running", Duration::from_secs(30), |s| {
        u64_of(s, "heartbeats") > u64_of(&s0, "heartbeats") + 200
    });
    let v = vm.verify();
    assert_eq!(u64_of(&v, "memory_errors"), 0, "{v}");
    assert_eq!(u64_of(&v, "disk_errors"), 0, "{v}");
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
pub fn check_arrived(src: &Vmm, dst: &Vmm, report: &Value, writes: bool) {
    assert_eq!(report["outcome"], "completed", "{report}");
    assert!(report["downtime_ms"].as_f64().is_some(), "{report}");
    assert!(u64_of(report, "pages_sent") > 0, "{report}");
    assert_eq!(u64_of(report, "guest_integrity_errors"), 0, "{report}");
    assert_eq!(report["memory_verified"], true, "{report}");
    let s0 = dst.status();
    assert_eq!(s0["state"], "running", "{s0}");
    let s1 = dst.wait_for("destination guest running", Duration::from_secs(30), |s| {
        u64_of(s, "heartbeats") > u64_of(&s0, "heartbeats") + 300
            && (!writes || u64_of(s, "guest_pages_written") > u64_of(&s0, "guest_pages_written"))
    });
    assert_eq!(u64_of(&s1, "guest_integrity_errors"), 0, "{s1}");
    assert_eq!(u64_of(&s1, "disk_integrity_errors"), 0, "{s1}");
    let v = dst.verify();
    assert_eq!(u64_of(&v, "memory_errors"), 0, "{v}");
    assert_eq!(u64_of(&v, "disk_errors"), 0, "{v}");
    assert_eq!(src.status()["state"], "migrated");
    let out = ferry(&["resume", "--control", src.ctl()]);
    assert!(
        !out.status.success(),
        "the source resumed after the handover"
    );
}
