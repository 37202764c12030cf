//! Client commands that talk to a VMM over its control socket, typed end to end: a
//! request of the API crate out, its answer type back.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;

use ferry_api::{
    DirtySample, MigrationReport, Outcome, Request, SnapshotReport, Started, StateNow, Status,
    StorageProgress, StorageReport, VerifyReport,
};

use crate::client::call;

/// Exit code of `ferry verify` when the guest found errors.
pub const EXIT_INTEGRITY: u8 = 3;

/// `pause`, `resume`, `quit`: sends it and prints the state it answers with.
pub fn change_state(control: &Path, req: &Request) -> anyhow::Result<ExitCode> {
    let r: StateNow = call(control, req)?;
    println!("{}", r.state);
    Ok(ExitCode::SUCCESS)
}

/// Sends `req` and prints its answer, read as `T`, as JSON.
pub fn print_answer<T: Serialize + DeserializeOwned>(
    control: &Path,
    req: &Request,
) -> anyhow::Result<ExitCode> {
    let r: T = call(control, req)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(ExitCode::SUCCESS)
}

pub fn status(control: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let s: Status = call(control, &Request::Status {})?;
    if as_json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let s = match s {
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
    let r: VerifyReport = call(
        control,
        &Request::Verify {
            timeout_secs: Some(timeout_secs),
        },
    )?;
    if as_json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "memory: {} pages checked, {} errors\ndisk:   {} blocks checked, {} errors\n({} ms)",
            r.pages_checked, r.memory_errors, r.blocks_checked, r.disk_errors, r.elapsed_ms,
        );
    }
    Ok(if r.memory_errors + r.disk_errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INTEGRITY)
    })
}

pub fn snapshot(control: &Path, out: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let out = std::path::absolute(out)?;
    let r: SnapshotReport = call(control, &Request::Snapshot { out: out.clone() })?;
    if as_json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "snapshot written to {} (VM paused {:.1} ms; {} MiB of memory, {} bytes of disk data)",
            out.display(),
            r.pause_ms,
            r.memory_bytes >> 20,
            r.disk_bytes_copied,
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn dirty_rate(control: &Path, duration_ms: u64, as_json: bool) -> anyhow::Result<ExitCode> {
    let r: DirtySample = call(
        control,
        &Request::DirtySample {
            duration_ms: Some(duration_ms),
        },
    )?;
    if as_json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let secs = (r.elapsed_ms / 1e3).max(1e-9);
        println!(
            "dirty pages/s {:.0} ({:.0} in the working set), guest reported {:.0} writes/s [{}]",
            r.dirty_pages as f64 / secs,
            r.dirty_pages_in_working_set as f64 / secs,
            r.guest_pages_written as f64 / secs,
            r.mode,
        );
    }
    Ok(ExitCode::SUCCESS)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Release);
}

/// A report's table: its rows in order, each a key and its value as JSON shows it
/// (None: absent, left out).
pub(super) trait Table: Serialize {
    fn rows(&self) -> Vec<(&'static str, Option<String>)>;
    fn outcome(&self) -> Outcome;
}

/// `v` as the table shows it: text as it is, anything else as its JSON; None for null.
fn cell<T: Serialize>(v: &T) -> Option<String> {
    match serde_json::to_value(v).ok()? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

impl Table for MigrationReport {
    fn rows(&self) -> Vec<(&'static str, Option<String>)> {
        let c = &self.core;
        vec![
            ("outcome", cell(&c.outcome)),
            ("error", cell(&c.error)),
            ("mode", cell(&self.mode)),
            ("to", cell(&self.to)),
            ("tls", cell(&self.tls)),
            ("total_ms", cell(&c.total_ms)),
            ("downtime_ms", cell(&self.downtime_ms)),
            ("switchover_ms", cell(&c.switchover_ms)),
            ("max_heartbeat_gap_ms", cell(&self.max_heartbeat_gap_ms)),
            ("rounds", cell(&self.rounds)),
            ("pages_sent", cell(&self.pages_sent)),
            ("zero_pages", cell(&self.zero_pages)),
            ("bytes_on_wire", cell(&self.bytes_on_wire)),
            ("codec", cell(&self.codec)),
            ("compression_ratio", cell(&self.compression_ratio)),
            ("throttle_max_pct", cell(&self.throttle_max_pct)),
            ("memory_verified", cell(&self.memory_verified)),
            ("guest_integrity_errors", cell(&self.guest_integrity_errors)),
            ("postcopy_faults", cell(&self.postcopy_faults)),
            ("fault_latency_p50_us", cell(&self.fault_latency_p50_us)),
            ("fault_latency_p99_us", cell(&self.fault_latency_p99_us)),
            ("vcpu_blocked_ms", cell(&self.vcpu_blocked_ms)),
            ("recoveries", cell(&self.recoveries)),
            ("disk_bytes_copied", cell(&self.disk_bytes_copied)),
        ]
    }

    fn outcome(&self) -> Outcome {
        self.core.outcome
    }
}

impl Table for StorageReport {
    fn rows(&self) -> Vec<(&'static str, Option<String>)> {
        let c = &self.core;
        vec![
            ("outcome", cell(&c.outcome)),
            ("error", cell(&c.error)),
            ("disk_mode", cell(&self.disk_mode)),
            ("total_ms", cell(&c.total_ms)),
            ("switchover_ms", cell(&c.switchover_ms)),
            ("disk_bytes_copied", cell(&self.disk_bytes_copied)),
            ("disk_rounds", cell(&self.disk_rounds)),
            ("disk_verified", cell(&self.disk_verified)),
            ("disk_integrity_errors", cell(&self.disk_integrity_errors)),
            (
                "guest_write_latency_added_us_p99",
                cell(&self.guest_write_latency_added_us_p99),
            ),
            (
                "guest_writes_delayed_ms",
                cell(&self.guest_writes_delayed_ms),
            ),
            ("guest_bytes_written", cell(&self.guest_bytes_written)),
            ("config_rewritten", cell(&self.config_rewritten)),
        ]
    }

    fn outcome(&self) -> Outcome {
        self.core.outcome
    }
}

/// Prints `full` as JSON, or `table` as rows (absent ones left out); the exit status
/// says whether it completed.
pub(super) fn print_report(full: &impl Serialize, table: &impl Table, as_json: bool) -> ExitCode {
    if as_json {
        match serde_json::to_string(full) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("ferry: the report does not serialize: {e}"),
        }
    } else {
        let rows = table.rows();
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (key, value) in rows {
            if let Some(v) = value {
                println!("{key:<width$} {v}");
            }
        }
    }
    if table.outcome() == Outcome::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `ferry storage-migrate`: starts the move (`req`), shows progress, Ctrl-C cancels
/// it (the VM stays on its current images), prints the report.
pub fn storage_migrate(
    control: &Path,
    mut req: Request,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    if let Request::StorageMigrate { to, report, .. } = &mut req {
        *to = std::path::absolute(&*to)?;
        *report = report.as_deref().map(std::path::absolute).transpose()?;
    }
    let _: Started = call(control, &req)?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        )
    };
    let tty = std::io::stderr().is_terminal();
    let mut cancelled = false;
    let report = loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if INTERRUPTED.load(Ordering::Acquire) && !cancelled {
            cancelled = true;
            let _ = call::<serde::de::IgnoredAny>(control, &Request::Cancel {});
            eprintln!("\ncancelling; the VM stays on its current images");
        }
        let p: Option<StorageProgress> = match call(control, &Request::Status {})? {
            Status::Vm(s) => s.storage_migration,
            Status::Incoming(_) => None,
        };
        let Some(p) = p else {
            anyhow::bail!("the VMM shows no storage migration");
        };
        if let Some(r) = p.report {
            break r;
        }
        if tty {
            eprint!(
                "\r{} disk {} | round {} | {:.1} MiB copied | {} blocks left | mode {}    ",
                p.phase,
                p.disk,
                p.round,
                p.bytes_copied as f64 / 1048576.0,
                p.remaining_blocks,
                p.mode,
            );
        }
    };
    if tty {
        eprintln!();
    }
    let code = print_report(&report, &report, as_json);
    if !as_json {
        for d in &report.disks {
            println!("disk {} {} -> {}", d.id, d.from.display(), d.to.display());
        }
    }
    Ok(code)
}
