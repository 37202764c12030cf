//! Client commands that talk to a VMM over its control socket.

use std::path::Path;
use std::process::ExitCode;

use serde_json::{Value, json};

use ferry_api::{Request, Status};

use crate::client::{call, request};

/// Exit code of `ferry verify` when the guest found errors.
pub const EXIT_INTEGRITY: u8 = 3;

pub(super) fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or(&Value::Null)
}

fn num(v: &Value, key: &str) -> String {
    match get(v, key) {
        Value::Number(n) => n.to_string(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn simple(control: &Path, cmd: &str) -> anyhow::Result<ExitCode> {
    request_and_print(control, &json!({ "cmd": cmd }))
}

/// Sends `req` and prints the state it answers with, if any.
pub fn request_and_print(control: &Path, req: &Value) -> anyhow::Result<ExitCode> {
    let r = request(control, req)?;
    if let Some(state) = r.get("state").and_then(Value::as_str) {
        println!("{state}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn status(control: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    if as_json {
        println!("{}", request(control, &json!({"cmd": "status"}))?);
        return Ok(ExitCode::SUCCESS);
    }
    let s = match call::<Status>(control, &Request::Status {})? {
        Status::Vm(s) => s,
        Status::Incoming(i) => {
            println!("{:<22} {}", "state", i.state);
            println!("{:<22} {}", "pid", i.pid);
            if let Some(c) = i.incoming {
                println!(
                    "{:<22} {} rejected connections, {} failed migrations{}",
                    "incoming port",
                    c.rejected_connections,
                    c.failed_migrations,
                    c.last_rejection
                        .map(|e| format!(" (last: {e})"))
                        .unwrap_or_default()
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let m = &s.machine;
    let rows = [
        ("name", m.name.clone()),
        ("state", m.state.to_string()),
        ("pid", m.pid.to_string()),
        ("vcpus", m.vcpus.to_string()),
        ("memory", format!("{} MiB", m.memory_mib)),
        ("dirty tracking", m.dirty_tracking.clone()),
        ("heartbeats", m.heartbeats.to_string()),
        ("pages written", m.guest_pages_written.to_string()),
        ("pages written/s", format!("{:.0}", m.pages_written_per_sec)),
        ("integrity errors", m.guest_integrity_errors.to_string()),
        ("disk integrity errors", m.disk_integrity_errors.to_string()),
        (
            "disk writes / reads",
            format!("{} / {}", m.disk_writes, m.disk_reads),
        ),
        (
            "max heartbeat gap",
            format!("{} ms", m.max_heartbeat_gap_ms),
        ),
    ];
    for (k, v) in rows {
        println!("{k:<22} {v}");
    }
    if let Some(crash) = &m.crash {
        println!("{:<22} {crash}", "crash");
    }
    let error = |e: &Option<String>| e.as_ref().map(|e| format!(": {e}")).unwrap_or_default();
    if let Some(mig) = &s.migration {
        let line = match &mig.report {
            Some(r) => format!(
                "{} ({} mode, {} ms{})",
                r.core.outcome,
                r.mode,
                r.core.total_ms,
                error(&r.core.error)
            ),
            None => format!(
                "{} to {}, round {}, {} pages left, {:.1} MB/s",
                mig.phase,
                mig.to,
                mig.round,
                mig.postcopy_pages_left.unwrap_or(mig.remaining_dirty_pages),
                mig.bandwidth_bytes_per_sec / 1e6
            ),
        };
        println!("{:<22} {line}", "migration");
    }
    if let Some(p) = &s.incoming_postcopy {
        println!(
            "{:<22} {}, {} pages missing, {} faults, {} recoveries{}",
            "incoming post-copy",
            p.phase,
            p.missing_pages,
            p.faults,
            p.recoveries,
            error(&p.error)
        );
    }
    if let Some(st) = &s.storage_migration {
        let line = match &st.report {
            Some(r) => format!(
                "{} ({} ms{})",
                r.core.outcome,
                r.core.total_ms,
                error(&r.core.error)
            ),
            None => format!(
                "{} disk {}, round {}, {:.1} MiB copied, {} blocks left, {} mode",
                st.phase,
                st.disk,
                st.round,
                st.bytes_copied as f64 / 1048576.0,
                st.remaining_blocks,
                st.mode
            ),
        };
        println!("{:<22} {line}", "storage migration");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(control: &Path, as_json: bool, timeout_secs: u64) -> anyhow::Result<ExitCode> {
    let r = request(
        control,
        &json!({"cmd": "verify", "timeout_secs": timeout_secs}),
    )?;
    if as_json {
        println!("{r}");
    } else {
        println!(
            "memory: {} pages checked, {} errors\ndisk:   {} blocks checked, {} errors\n({} ms)",
            num(&r, "pages_checked"),
            num(&r, "memory_errors"),
            num(&r, "blocks_checked"),
            num(&r, "disk_errors"),
            num(&r, "elapsed_ms"),
        );
    }
    let errors = get(&r, "memory_errors").as_u64().unwrap_or(0)
        + get(&r, "disk_errors").as_u64().unwrap_or(0);
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INTEGRITY)
    })
}

pub fn snapshot(control: &Path, out: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let out = std::path::absolute(out)?;
    let r = request(control, &json!({"cmd": "snapshot", "out": out}))?;
    if as_json {
        println!("{r}");
    } else {
        println!(
            "snapshot written to {} (VM paused {:.1} ms; {} MiB of memory, {} bytes of disk data)",
            out.display(),
            get(&r, "pause_ms").as_f64().unwrap_or(0.0),
            get(&r, "memory_bytes").as_u64().unwrap_or(0) >> 20,
            num(&r, "disk_bytes_copied"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn dirty_rate(control: &Path, duration_ms: u64, as_json: bool) -> anyhow::Result<ExitCode> {
    let r = request(
        control,
        &json!({"cmd": "dirty-sample", "duration_ms": duration_ms}),
    )?;
    if as_json {
        println!("{r}");
    } else {
        let secs = get(&r, "elapsed_ms").as_f64().unwrap_or(1.0) / 1e3;
        let per_sec = |k: &str| get(&r, k).as_f64().unwrap_or(0.0) / secs.max(1e-9);
        println!(
            "dirty pages/s {:.0} ({:.0} in the working set), guest reported {:.0} writes/s [{}]",
            per_sec("dirty_pages"),
            per_sec("dirty_pages_in_working_set"),
            per_sec("guest_pages_written"),
            get(&r, "mode").as_str().unwrap_or("-"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Release);
}

/// Sends `req` (with `report` made absolute), then polls `status` until `section`
/// holds a report, which it returns. `progress` sees the section meanwhile; Ctrl-C
/// asks the VMM to cancel (once) and says `on_cancel`.
/// Starts what `req` asks (None: follows what already runs) and follows it to its
/// report.
fn start_and_follow(
    control: &Path,
    req: Option<Value>,
    report: Option<&Path>,
    (section, on_cancel): (&str, &str),
    mut progress: impl FnMut(&Value),
) -> anyhow::Result<Value> {
    if let Some(mut req) = req {
        let report = report.map(std::path::absolute).transpose()?;
        req["report"] = json!(report);
        strip_nulls(&mut req);
        request(control, &req)?;
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        )
    };
    let mut cancelled = false;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if INTERRUPTED.load(std::sync::atomic::Ordering::Acquire) && !cancelled {
            cancelled = true;
            let _ = request(control, &json!({"cmd": "cancel"}));
            eprintln!("\n{on_cancel}");
        }
        let s = request(control, &json!({"cmd": "status"}))?;
        let p = get(&s, section);
        if let Some(r) = p.get("report").filter(|r| !r.is_null()) {
            return Ok(r.clone());
        }
        progress(p);
    }
}

/// Prints a report as JSON or as a table of `keys` (absent ones left out); the exit
/// status says whether it completed.
pub(super) fn print_report(report: &Value, keys: &[&str], as_json: bool) -> ExitCode {
    if as_json {
        println!("{report}");
    } else {
        let width = keys.iter().map(|k| k.len()).max().unwrap_or(0);
        for key in keys {
            let v = get(report, key);
            if !v.is_null() {
                println!(
                    "{key:<width$} {}",
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                );
            }
        }
    }
    if get(report, "outcome").as_str() == Some("completed") {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What a migration's report shows as a table.
pub(super) const REPORT_KEYS: &[&str] = &[
    "outcome",
    "error",
    "mode",
    "to",
    "total_ms",
    "downtime_ms",
    "switchover_ms",
    "max_heartbeat_gap_ms",
    "rounds",
    "pages_sent",
    "zero_pages",
    "bytes_on_wire",
    "codec",
    "compression_ratio",
    "throttle_max_pct",
    "memory_verified",
    "guest_integrity_errors",
    "postcopy_faults",
    "fault_latency_p50_us",
    "fault_latency_p99_us",
    "vcpu_blocked_ms",
    "recoveries",
    "disk_bytes_copied",
];

/// Leaves out the arguments the user did not give.
fn strip_nulls(v: &mut Value) {
    if let Value::Object(map) = v {
        map.retain(|_, v| !v.is_null());
    }
}

pub fn set_params(control: &Path, mut req: Value) -> anyhow::Result<ExitCode> {
    strip_nulls(&mut req);
    let r = request(control, &req)?;
    println!("{r}");
    Ok(ExitCode::SUCCESS)
}

/// Sends a command and prints its result as JSON.
pub fn simple_json(control: &Path, cmd: &str) -> anyhow::Result<ExitCode> {
    let r = request(control, &json!({ "cmd": cmd }))?;
    println!("{r}");
    Ok(ExitCode::SUCCESS)
}

/// `ferry storage-migrate`: starts the move, shows progress, prints the report.
pub fn storage_migrate(
    control: &Path,
    mut req: Value,
    report: Option<&Path>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    if let Some(to) = req.get("to").and_then(Value::as_str) {
        req["to"] = json!(std::path::absolute(to)?);
    }
    let tty = std::io::stderr().is_terminal();
    let final_report = start_and_follow(
        control,
        Some(req),
        report,
        (
            "storage_migration",
            "cancelling; the VM stays on its current images",
        ),
        |p| {
            if tty {
                eprint!(
                    "\r{} disk {} | round {} | {:.1} MiB copied | {} blocks left | mode {}    ",
                    get(p, "phase").as_str().unwrap_or("-"),
                    get(p, "disk").as_str().unwrap_or("-"),
                    num(p, "round"),
                    get(p, "bytes_copied").as_f64().unwrap_or(0.0) / 1048576.0,
                    num(p, "remaining_blocks"),
                    get(p, "mode").as_str().unwrap_or("-"),
                );
            }
        },
    )?;
    if tty {
        eprintln!();
    }
    let code = print_report(
        &final_report,
        &[
            "outcome",
            "error",
            "disk_mode",
            "total_ms",
            "switchover_ms",
            "disk_bytes_copied",
            "disk_rounds",
            "disk_verified",
            "disk_integrity_errors",
            "guest_write_latency_added_us_p99",
            "guest_writes_delayed_ms",
            "guest_bytes_written",
            "config_rewritten",
        ],
        as_json,
    );
    if !as_json {
        for d in get(&final_report, "disks").as_array().into_iter().flatten() {
            println!(
                "disk {} {} -> {}",
                get(d, "id").as_str().unwrap_or("-"),
                get(d, "from").as_str().unwrap_or("-"),
                get(d, "to").as_str().unwrap_or("-")
            );
        }
    }
    Ok(code)
}
