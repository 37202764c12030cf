//! `ferry vmm`: the process that owns one VM.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::control;
use crate::migration::destination::Slot;
use crate::migration::door::{Door, Placement};
use crate::migration::migratable::Migratable;
use crate::migration::secure::Transport;
use crate::vmm::config::VmConfig;
use crate::vmm::launch;

pub enum Source {
    Config(PathBuf),
    Restore {
        dir: PathBuf,
        disk_dir: Option<PathBuf>,
    },
    Incoming(Incoming),
}

/// Wait for a migration on `addr`.
pub struct Incoming {
    pub addr: String,
    /// Where the disks go.
    pub place: Placement,
    /// Only a source presenting it, if there is one, is let in.
    pub ticket: Option<String>,
    /// TLS unless the operator said `--insecure`.
    pub transport: Transport,
    /// The guest memory of the VM expected, in MiB: faulted in while the port waits.
    pub memory_mib: Option<u64>,
}

impl Source {
    pub fn new(
        config: Option<PathBuf>,
        restore: Option<PathBuf>,
        disk_dir: Option<PathBuf>,
        incoming: Option<Incoming>,
    ) -> Self {
        match (config, restore, incoming) {
            (_, _, Some(incoming)) => Source::Incoming(incoming),
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
    let mut door = None;
    let listener = match &source {
        Source::Incoming(Incoming {
            addr,
            place,
            ticket,
            transport,
            memory_mib,
        }) => {
            for dir in place.shared.iter().chain(&place.datastore) {
                if !dir.is_dir() {
                    anyhow::bail!("{} is not a folder", dir.display());
                }
            }
            let tcp = TcpListener::bind(addr)
                .with_context(|| format!("cannot listen for a migration on {addr}"))?;
            let listener = control::bind(control_path)?;
            tracing::info!(
                pid = std::process::id(),
                control = %control_path.display(),
                "waiting for an incoming migration on {addr}"
            );
            let listening = tcp
                .local_addr()
                .with_context(|| format!("the address of the port bound for {addr}"))?;
            let d = Door::new(
                slot.clone(),
                place.clone(),
                ticket.clone(),
                listening,
                transport.clone(),
                memory_mib.map(|m| m << 20),
            );
            door = Some(d.clone());
            std::thread::Builder::new()
                .name("incoming-port".into())
                .spawn(move || d.serve(tcp))
                .context("starting the incoming port's thread")?;
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
            *slot.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Arc::new(Migratable::new(machine)));
            listener
        }
    };

    let ours = control::socket_identity(control_path);
    // SIGTERM and SIGINT stop the VM cleanly, like `ferry quit`.
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_terminate as *const () as libc::sighandler_t) };
    }
    // The socket's path goes before the listener closes: once an agent finds it
    // silent it may start a new VMM on the same path, which this one's exit must
    // never then remove.
    control::serve(
        listener,
        slot.clone(),
        door,
        || STOP.load(Ordering::Acquire),
        || {
            if ours.is_some() && control::socket_identity(control_path) == ours {
                let _ = std::fs::remove_file(control_path);
            }
        },
    );
    let served = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(vm) = served {
        let m = &vm.machine;
        if vm.receiving_postcopy() {
            // vCPUs waiting for pages that will never come cannot be joined; they end
            // with the process.
            tracing::warn!("stopping with post-copy incomplete: this copy of the VM is lost");
        } else {
            m.shutdown();
        }
        tracing::info!("VM {} stopped", m.cfg.name);
    }
    Ok(ExitCode::SUCCESS)
}
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
