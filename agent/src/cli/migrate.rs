//! `ferry migrate`: the driver against this host's VMM, with a progress bar, Ctrl-C to
//! cancel, and the report printed (and written to `--report`).

use std::cell::Cell;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_api::Migrate;

use super::client::print_report;
use crate::driver::ferry_vmm::FerryVmm;
use crate::driver::observe::PROBE_WINDOW_MS;
use crate::driver::{Driver, DriverError, Event, Start};
use crate::policy::{Limits, Policy};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Release);
}

/// Runs the migration `req` describes (None: attaches to the one under way), steered
/// by `policy` within `limits`, until it ends; prints its report.
pub fn run(
    control: &Path,
    req: Option<Migrate>,
    report: Option<&Path>,
    as_json: bool,
    (policy, limits): (Option<Box<dyn Policy>>, Limits),
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let report = report.map(std::path::absolute).transpose()?;
    let start = match req {
        Some(mut req) => {
            req.report.clone_from(&report);
            Start::New(Box::new(req))
        }
        None => Start::Attach,
    };
    let tty = std::io::stderr().is_terminal();
    let started = Cell::new(false);
    // The bar counts guest pages through the first full pass; later rounds show in
    // its message (phase, round, what remains, bandwidth, ETA, the guest's dirty rate).
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut driver = Driver::new(policy, limits)
        .with_probes(Duration::from_millis(PROBE_WINDOW_MS as u64))
        .cancel_on(&INTERRUPTED);
    driver.subscribe(|e| match e {
        Event::Started { memory_pages, .. } => {
            started.set(true);
            // From here Ctrl-C cancels the migration (the VM stays here); before it,
            // it ends this client before anything started.
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe {
                libc::signal(
                    libc::SIGINT,
                    on_interrupt as *const () as libc::sighandler_t,
                )
            };
            if tty {
                let b = indicatif::ProgressBar::new(*memory_pages);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:30.cyan/blue} {percent:>3}% {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar = Some(b);
            }
        }
        Event::Cancelling { .. } => {
            eprintln!("\ncancelling; the VM keeps running on the source");
        }
        Event::Progress {
            progress: p,
            sample,
        } => {
            let Some(bar) = &bar else { return };
            let bw = p.bandwidth_bytes_per_sec;
            let sent = p.pages_sent + p.zero_pages;
            let remaining = match (p.postcopy_pages_left, p.round) {
                (Some(left), _) => left,
                (None, 0) => bar.length().unwrap_or(0).saturating_sub(sent),
                (None, _) => p.remaining_dirty_pages,
            };
            let eta = if bw > 0.0 {
                format!("{:.1} s", remaining as f64 * 4096.0 / bw)
            } else {
                "-".into()
            };
            bar.set_position(sent.min(bar.length().unwrap_or(0)));
            let dirty = sample
                .as_ref()
                .and_then(|s| s.dirty_pages_per_sec)
                .map_or(String::new(), |d| {
                    format!(" | guest dirties {d:.0} pages/s")
                });
            bar.set_message(format!(
                "{} round {} | remaining {remaining} pages | {:.1} MB/s | ETA {eta}{dirty}",
                p.phase,
                p.round,
                bw / 1e6,
            ));
        }
        Event::Outcome(_) => {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
        }
        _ => {}
    });
    let result = driver.run(&mut FerryVmm::new(control), start);
    let r = match result {
        Ok(r) => r,
        Err(DriverError::NothingToAttach) => {
            anyhow::bail!("no migration to attach to: this VM has not migrated")
        }
        Err(e) => return Err(e.into()),
    };
    if !started.get() {
        // Attached to one that had already ended: its report as the VMM wrote it.
        eprintln!("ferry: the migration has already ended; its report:");
        return Ok(print_report(&r.migration, &r.migration, as_json));
    }
    // The VMM wrote its report there; this one adds the policy's record and what the
    // probes saw.
    if let Some(path) = &report
        && let Err(e) = std::fs::write(path, serde_json::to_vec_pretty(&r).unwrap_or_default())
    {
        eprintln!(
            "ferry: cannot add the probes' signals to {}: {e}",
            path.display()
        );
    }
    Ok(print_report(&r, &r.migration, as_json))
}
