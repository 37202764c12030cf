//! `ferry agent`: the host daemon. It keeps the host's VMs (one `ferry vmm` each,
//! started from the VM folder or adopted after a restart) and serves the HTTP API.
//! This file only wires: the config, the inventory's thread, the server, the signals.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod config;
pub mod evacuate;
mod families;
pub mod inventory;
pub mod metrics;
pub mod migrations;
pub mod placement;
pub mod records;
pub mod sampler;
pub mod storage;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use config::AgentConfig;
use inventory::{Inventory, Reception};

use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::AgentConfigError),
    #[error("cannot create the run folder {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the agent's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot find this program to start VMMs with: {0}")]
    Exe(std::io::Error),
    #[error("serving the API: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
}

/// On a stop, how long migrations under way may take to finish, and then to cancel
/// (the unit's TimeoutStopSec, 60 s, covers both).
const WIND_DOWN_FINISH: std::time::Duration = std::time::Duration::from_secs(30);
const WIND_DOWN_CANCEL: std::time::Duration = std::time::Duration::from_secs(15);

/// How often each peer's `/healthz` is asked.
const PEER_LOOK: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the peer's agent answers its `/healthz` within 5 s.
fn answers(peer: &config::Peer) -> bool {
    evacuate::ask_health(peer, std::time::Duration::from_secs(5)).is_ok()
}

/// Runs the agent until SIGTERM or SIGINT. VMs keep running after it exits.
pub fn run(config_path: &Path) -> Result<(), AgentError> {
    let cfg = AgentConfig::load(config_path)?;
    std::fs::create_dir_all(&cfg.run_dir).map_err(|source| AgentError::RunDir {
        path: cfg.run_dir.clone(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(AgentError::Exe)?;
    let (mut inventory, view) = Inventory::new(
        cfg.vm_dir.clone(),
        cfg.run_dir.clone(),
        exe,
        Reception {
            ip: cfg.migration_ip,
            datastores: cfg.datastores.clone(),
            max_inbound: cfg.max_inbound,
            tls: cfg.migration_tls.clone(),
        },
    );
    // The first look before the port opens: the API never answers with an inventory
    // it has not read yet.
    inventory.recover_arrivals();
    let inventory = Arc::new(Mutex::new(inventory));
    let telemetry = Arc::new(crate::telemetry::Telemetry::from_env(
        "ferry-agent",
        &cfg.name,
    )?);
    match &telemetry.endpoint {
        Some(e) => tracing::info!(endpoint = e, "exporting traces over OTLP"),
        None => tracing::info!("no OTEL_EXPORTER_OTLP_ENDPOINT: no traces exported"),
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let migrations = Arc::new(migrations::Migrations::new(
        &cfg,
        metrics.clone(),
        telemetry.clone(),
    ));
    // Before the first look: a VM whose migration a record follows is not the
    // looker's to settle.
    migrations.recover(&inventory, &cfg.run_dir);
    lock(&inventory).refresh();
    let storage = Arc::new(storage::StorageMigrations::new(
        &cfg.datastores,
        &cfg.base,
        &cfg.run_dir,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let looker = {
        let stop = stop.clone();
        let inventory = inventory.clone();
        let migrations = migrations.clone();
        let storage = storage.clone();
        let (view, run_dir) = (view.clone(), cfg.run_dir.clone());
        std::thread::Builder::new()
            .name("inventory".into())
            .spawn(move || {
                loop {
                    migrations.follow_unowned(&view, &inventory, &run_dir);
                    storage.follow_unowned(&view);
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    std::thread::sleep(inventory::REFRESH);
                    lock(&inventory).refresh();
                }
                lock(&inventory).release();
            })
            .map_err(AgentError::Runtime)?
    };
    // The peers' health (ferry_peer_up): a look at each one's /healthz every
    // PEER_LOOK. Not joined: it ends with the stop, or with the process.
    {
        let (stop, peers, metrics) = (stop.clone(), cfg.peers.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("peers".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    for p in &peers {
                        metrics.peer_seen(&p.name, answers(p));
                    }
                    let t0 = std::time::Instant::now();
                    while t0.elapsed() < PEER_LOOK && !stop.load(Ordering::Acquire) {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            })
            .map_err(AgentError::Runtime)?;
    }
    // The VMs' signals between migrations. Not joined: it ends with the stop.
    let observed = sampler::Shared::default();
    {
        let sampler = sampler::Sampler::new(
            cfg.sampling,
            view.clone(),
            cfg.run_dir.clone(),
            observed.clone(),
        );
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || sampler.run(&stop))
            .map_err(AgentError::Runtime)?;
    }
    // Alerts' moves, on a thread of their own. Not joined: it ends with the stop.
    let evacuation = Arc::new(evacuate::Evacuation::new(
        &cfg.name,
        cfg.alert_rules.clone(),
        migrations.clone(),
        metrics.clone(),
        view.clone(),
        observed.clone(),
        cfg.peers.clone(),
        cfg.limits.clone(),
        cfg.max_outbound,
    ));
    {
        let (stop, evacuation, inventory) = (stop.clone(), evacuation.clone(), inventory.clone());
        let run_dir = cfg.run_dir.clone();
        std::thread::Builder::new()
            .name("evacuation".into())
            .spawn(move || evacuation.run(&stop, &inventory, &run_dir))
            .map_err(AgentError::Runtime)?;
    }
    let shared = Arc::new(api::Shared {
        stopping: AtomicBool::new(false),
        host: cfg.name.clone(),
        tokens: cfg.tokens.clone(),
        vms: view,
        metrics: metrics.clone(),
        telemetry: telemetry.clone(),
        observed,
        datastores: cfg.datastores.clone(),
        inventory,
        migrations: migrations.clone(),
        storage,
        run_dir: cfg.run_dir.clone(),
        evacuation: evacuation.clone(),
        capacity_memory_mib: cfg.capacity_memory_mib,
        max_inbound: cfg.max_inbound,
        peers_certified: cfg.peers_certified,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agent")
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| AgentError::Listen {
                addr: cfg.listen,
                source,
            })?;
        tracing::info!(
            host = cfg.name,
            listen = %cfg.listen,
            tls = cfg.tls.is_some(),
            vm_dir = %cfg.vm_dir.display(),
            "agent serving"
        );
        let on_stop = shared.clone();
        let stopped = async move {
            terminated().await;
            // Watches end, so the server's graceful stop does not wait on them.
            on_stop.stopping.store(true, Ordering::Release);
        };
        // Each request learns whether its connection presented a certificate.
        let app = api::router(shared).into_make_service_with_connect_info::<tls::Caller>();
        match cfg.tls.clone() {
            Some(config) => {
                let listener =
                    tls::TlsListener::new(listener, config).map_err(AgentError::Serve)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
                    .map_err(AgentError::Serve)
            }
            None => axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
                .map_err(AgentError::Serve),
        }
    });
    // No new work is taken from here on; what runs finishes, or is cancelled, within
    // the unit's stop timeout.
    evacuation.halt();
    migrations.wind_down(WIND_DOWN_FINISH, WIND_DOWN_CANCEL);
    stop.store(true, Ordering::Release);
    let _ = looker.join();
    telemetry.shutdown();
    tracing::info!("agent stopped; the VMs keep running");
    served
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot watch for SIGTERM; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}
