//! `ferry vmm`: the process that owns one VM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

use crate::vmm::config::VmConfig;
use crate::vmm::{control, launch};

pub enum Source {
    Config(PathBuf),
    Restore {
        dir: PathBuf,
        disk_dir: Option<PathBuf>,
    },
}

impl Source {
    pub fn new(
        config: Option<PathBuf>,
        restore: Option<PathBuf>,
        disk_dir: Option<PathBuf>,
    ) -> Self {
        match (config, restore) {
            (_, Some(dir)) => Source::Restore { dir, disk_dir },
            (Some(c), None) => Source::Config(c),
            // clap requires one of the two.
            (None, None) => Source::Config(PathBuf::from("vm.toml")),
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

pub fn run(source: Source, control_path: &Path, paused: bool) -> anyhow::Result<ExitCode> {
    init_logging();
    let machine = match &source {
        Source::Config(path) => {
            let cfg = VmConfig::load(path)?;
            launch::boot(cfg)?
        }
        Source::Restore { dir, disk_dir } => launch::restore(dir, disk_dir.as_deref())?,
    };
    let listener = control::bind(control_path)?;
    let machine = Arc::new(machine);
    machine.start(!paused).context("starting the vCPUs")?;
    tracing::info!(
        name = %machine.cfg.name,
        pid = std::process::id(),
        vcpus = machine.cfg.vcpus,
        memory_mib = machine.cfg.memory_mib,
        control = %control_path.display(),
        "VM {}",
        match source {
            Source::Config(_) => "started",
            Source::Restore { .. } => "restored",
        }
    );

    // SIGTERM and SIGINT stop the VM cleanly, like `ferry quit`.
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_terminate as *const () as libc::sighandler_t) };
    }
    control::serve(listener, machine.clone(), || STOP.load(Ordering::Acquire));
    machine.shutdown();
    let _ = std::fs::remove_file(control_path);
    tracing::info!("VM {} stopped", machine.cfg.name);
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
