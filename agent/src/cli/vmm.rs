//! `ferry vmm`: the process that owns one VM.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::migration::destination::{self, Slot};
use crate::vmm::config::VmConfig;
use crate::vmm::{control, launch};

pub enum Source {
    Config(PathBuf),
    Restore {
        dir: PathBuf,
        disk_dir: Option<PathBuf>,
    },
    /// Wait for a migration on this TCP address; disks sent along go to the datastore.
    Incoming(String, Option<PathBuf>),
}

impl Source {
    pub fn new(
        config: Option<PathBuf>,
        restore: Option<PathBuf>,
        disk_dir: Option<PathBuf>,
        incoming: Option<String>,
        datastore: Option<PathBuf>,
    ) -> Self {
        match (config, restore, incoming) {
            (_, _, Some(addr)) => Source::Incoming(addr, datastore),
            (_, Some(dir), None) => Source::Restore { dir, disk_dir },
            (Some(c), None, None) => Source::Config(c),
            // clap requires one of the three.
            (None, None, None) => Source::Config(PathBuf::from("vm.toml")),
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

pub fn run(source: Source, control_path: &Path, paused: bool) -> anyhow::Result<ExitCode> {
    init_logging();
    let slot: Slot = Arc::new(Mutex::new(None));
    let incoming_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let listener = match &source {
        Source::Incoming(addr, datastore) => {
            let tcp = TcpListener::bind(addr)
                .with_context(|| format!("cannot listen for a migration on {addr}"))?;
            let listener = control::bind(control_path)?;
            tracing::info!(
                pid = std::process::id(),
                control = %control_path.display(),
                "waiting for an incoming migration on {addr}"
            );
            let slot = slot.clone();
            let datastore = datastore.clone();
            let error = incoming_error.clone();
            std::thread::Builder::new()
                .name("incoming".into())
                .spawn(move || {
                    let result = destination::receive(&tcp, &slot, datastore.as_deref())
                        .and_then(|()| destination::serve_resolve(&tcp, &slot));
                    if let Err(e) = result {
                        tracing::error!("incoming migration failed: {e}");
                        *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                        STOP.store(true, Ordering::Release);
                    }
                })
                .context("starting the incoming migration thread")?;
            listener
        }
        Source::Config(_) | Source::Restore { .. } => {
            let machine = match &source {
                Source::Config(path) => launch::boot(VmConfig::load(path)?)?,
                Source::Restore { dir, disk_dir } => launch::restore(dir, disk_dir.as_deref())?,
                Source::Incoming(..) => unreachable!("handled above"),
            };
            let listener = control::bind(control_path)?;
            let machine = Arc::new(machine);
            if let Source::Config(path) = &source {
                *machine
                    .config_path
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(std::path::absolute(path)?);
            }
            machine.start(!paused).context("starting the vCPUs")?;
            tracing::info!(
                name = %machine.cfg.name,
                pid = std::process::id(),
                vcpus = machine.cfg.vcpus,
                memory_mib = machine.cfg.memory_mib,
                control = %control_path.display(),
                "VM {}",
                if matches!(source, Source::Config(_)) { "started" } else { "restored" }
            );
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(machine);
            listener
        }
    };

    let ours = control::socket_identity(control_path);
    // SIGTERM and SIGINT stop the VM cleanly, like `ferry quit`.
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_terminate as *const () as libc::sighandler_t) };
    }
    control::serve(listener, slot.clone(), || STOP.load(Ordering::Acquire));
    let machine = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(m) = machine {
        if m.postcopy_status().is_some_and(|p| p.phase != "completed") {
            // vCPUs waiting for pages that will never come cannot be joined; they end
            // with the process.
            tracing::warn!("stopping with post-copy incomplete: this copy of the VM is lost");
        } else {
            m.shutdown();
        }
        tracing::info!("VM {} stopped", m.cfg.name);
    }
    if ours.is_some() && control::socket_identity(control_path) == ours {
        let _ = std::fs::remove_file(control_path);
    }
    if let Some(e) = incoming_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        anyhow::bail!("incoming migration failed: {e}");
    }
    Ok(ExitCode::SUCCESS)
}
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
