//! The host's VMs: one config file each in the VM folder, one `ferry vmm` each. The
//! agent starts the VMM of a config it finds, or adopts the one already answering on
//! the VM's control socket (an agent restart never stops or pauses a VM: each VMM
//! runs in a session of its own, and the unit kills only the agent's own process).
//!
//! A thread of its own looks every [`REFRESH`] and keeps what it saw in a snapshot
//! the API reads without waiting on any VMM.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ferry_api::agent::{ApiErrorKind, IncomingOffer, IncomingRequest, VmInfo, VmPresence};
use ferry_api::{Request, RunState, Status};

use crate::client;
use crate::migration::{destination, disk_stream};
use crate::vmm::config::VmConfig;

/// How often the folder is read and every VMM asked for its status.
pub const REFRESH: Duration = Duration::from_millis(500);
/// A VMM that does not answer `status` within this is reported down, not waited for.
const STATUS_WITHIN: Duration = Duration::from_secs(2);
/// An incoming VMM whose migration has not begun by then is stopped: its source gave
/// up, or never came.
const ARRIVE_WITHIN: Duration = Duration::from_secs(60);

/// A VM on its way here: the config to keep once it runs, and until when to wait.
struct Arriving {
    config_text: String,
    source: String,
    deadline: Instant,
    /// Once its migration began, the deadline no longer applies (a long migration).
    begun: bool,
    /// Reserved, its VMM being started (by the request, without the inventory's
    /// lock): nothing to look at yet.
    starting: bool,
}

struct Vm {
    config: PathBuf,
    control: PathBuf,
    log: PathBuf,
    /// The VMM this agent started (None: adopted, or not started).
    child: Option<Child>,
    adopted: bool,
    arriving: Option<Arriving>,
    info: VmInfo,
}

/// Where incoming VMs are received.
#[derive(Debug, Clone)]
pub struct Reception {
    /// The address sources connect to.
    pub ip: IpAddr,
    /// Shared storage where the disks of an arriving VM are found by name.
    pub datastores: Vec<PathBuf>,
    /// VMs arriving at once at most.
    pub max_inbound: u32,
    /// The TLS files arriving VMs are let in with (None: plain TCP).
    pub tls: Option<ferry_api::TlsFiles>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("a VM named {0:?} is already on this host")]
    Exists(String),
    #[error("{0} migrations are already arriving here (the agent's max_inbound)")]
    Busy(u32),
    #[error("the VM's config: {0}")]
    Config(String),
    #[error("the config names the VM {config:?}, the request {asked:?}")]
    NameMismatch { config: String, asked: String },
    #[error("cannot start the VMM that receives it: {0}")]
    Start(String),
    #[error("{} already exists: the disks of a VM of that name were copied here before", .0.display())]
    Placed(PathBuf),
}

impl ReceiveError {
    pub fn kind(&self) -> ApiErrorKind {
        match self {
            ReceiveError::Exists(_) | ReceiveError::Placed(_) => ApiErrorKind::Conflict,
            ReceiveError::Busy(_) => ApiErrorKind::Busy,
            ReceiveError::Config(_) | ReceiveError::NameMismatch { .. } => {
                ApiErrorKind::InvalidRequest
            }
            ReceiveError::Start(_) => ApiErrorKind::Failed,
        }
    }
}

/// A VM reserved to arrive here, its VMM yet to be started.
pub struct Reserved {
    name: String,
    exe: PathBuf,
    args: Vec<std::ffi::OsString>,
    control: PathBuf,
    log: PathBuf,
    ticket: String,
    ticket_file: PathBuf,
}

impl Reserved {
    /// Starts the receiving VMM and waits until it says where it listens (the
    /// source connects as soon as it has the offer). Takes no lock: a slow start
    /// holds neither the inventory's look at the other VMs nor other requests.
    pub fn start(&self) -> Result<(Child, String), ReceiveError> {
        let mut child = spawn(&self.exe, &self.args, &self.log)
            .map_err(|e| ReceiveError::Start(e.to_string()))?;
        let t0 = Instant::now();
        loop {
            if let Ok(Status::Incoming(i)) = status(&self.control)
                && let Some(a) = i.listening
            {
                return Ok((child, a));
            }
            if let Ok(Some(exit)) = child.try_wait() {
                return Err(ReceiveError::Start(format!(
                    "it exited ({exit}){}",
                    last_line(&self.log).map_or(String::new(), |l| format!(": {l}"))
                )));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ReceiveError::Start("it did not answer within 10 s".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Inventory {
    vm_dir: PathBuf,
    run_dir: PathBuf,
    exe: PathBuf,
    reception: Reception,
    vms: BTreeMap<String, Vm>,
    /// VMs whose migration this agent drives now: their end is the driver's to handle.
    driven: BTreeMap<String, u32>,
    /// Config files that do not read, and why (logged once each).
    unreadable: BTreeMap<PathBuf, String>,
    snapshot: Arc<RwLock<Vec<VmInfo>>>,
    /// Arrivals' traces, ended as each arrival does.
    arrival_traces: BTreeMap<String, crate::telemetry::ReceiveTrace>,
}

/// What the API reads: the VMs as last seen.
#[derive(Clone)]
pub struct View(Arc<RwLock<Vec<VmInfo>>>);

impl View {
    pub fn all(&self) -> Vec<VmInfo> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn get(&self, name: &str) -> Option<VmInfo> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|v| v.name == name)
            .cloned()
    }
}

/// The control socket of the VM named `name`.
pub fn control_socket(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.sock"))
}

impl Inventory {
    pub fn new(
        vm_dir: PathBuf,
        run_dir: PathBuf,
        exe: PathBuf,
        reception: Reception,
    ) -> (Self, View) {
        let snapshot = Arc::new(RwLock::new(Vec::new()));
        let view = View(snapshot.clone());
        (
            Self {
                vm_dir,
                run_dir,
                exe,
                reception,
                vms: BTreeMap::new(),
                driven: Default::default(),
                unreadable: BTreeMap::new(),
                snapshot,
                arrival_traces: BTreeMap::new(),
            },
            view,
        )
    }

    /// After a restart: takes up the VMs that were on their way here, whose VMMs
    /// still answer.
    pub fn recover_arrivals(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.run_dir) else {
            return;
        };
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if path.extension().is_none_or(|x| x != "arriving") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            let control = control_socket(&self.run_dir, &name);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.is_empty() || status(&control).is_err() {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            tracing::info!(
                vm = name,
                "following on a VM that was arriving when the agent stopped"
            );
            let file = self.vm_dir.join(format!("{name}.toml"));
            let mut info = blank_info(&name, &file);
            info.adopted = true;
            self.vms.insert(
                name.clone(),
                Vm {
                    config: file,
                    control,
                    log: self.run_dir.join(format!("{name}.log")),
                    child: None,
                    adopted: true,
                    arriving: Some(Arriving {
                        config_text: text,
                        source: "(before the agent restarted)".into(),
                        deadline: Instant::now() + ARRIVE_WITHIN,
                        begun: false,
                        starting: false,
                    }),
                    info,
                },
            );
        }
    }

    /// Reads the folder, starts or adopts what is new, asks every VMM how it is.
    pub fn refresh(&mut self) {
        for (path, cfg) in self.configs() {
            if !self.vms.contains_key(&cfg.name) {
                let vm = self.take_on(path, &cfg.name);
                self.vms.insert(cfg.name.clone(), vm);
            }
        }
        for vm in self.vms.values_mut() {
            if vm.arriving.as_ref().is_some_and(|a| a.starting) {
                continue;
            }
            let was_arriving = vm.arriving.is_some();
            look(vm, &self.vm_dir);
            if was_arriving && vm.arriving.is_none() {
                let _ =
                    std::fs::remove_file(self.run_dir.join(format!("{}.arriving", vm.info.name)));
                if let Some(mut t) = self.arrival_traces.remove(&vm.info.name) {
                    t.finish(match (vm.info.presence, &vm.info.error) {
                        (VmPresence::Running, _) => Ok(()),
                        (_, Some(e)) => Err(e),
                        (_, None) => Err("not received"),
                    });
                }
            }
        }
        // A VM handed over to another host while no one here drove its migration
        // (the agent was down, or `ferry migrate` ran by hand): its copy here is done.
        let handed: Vec<String> = self
            .vms
            .iter()
            .filter(|(n, v)| {
                v.info.state == Some(RunState::Migrated)
                    && !v.info.migrating
                    && !v.info.in_doubt
                    && v.config.exists()
                    && !self.driven.contains_key(*n)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in handed {
            tracing::warn!(
                vm = name,
                "found handed over to another host; its copy here is stopped"
            );
            self.moved_away(&name);
        }
        // A VM whose config is gone and whose VMM is gone is forgotten; one whose
        // VMM still runs stays listed (it is still on this host).
        self.vms.retain(|_, vm| {
            let child_lives = vm
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            vm.config.exists() || vm.info.presence != VmPresence::Down || child_lives
        });
        self.publish();
    }

    fn configs(&mut self) -> Vec<(PathBuf, VmConfig)> {
        let entries = match std::fs::read_dir(&self.vm_dir) {
            Ok(e) => e,
            Err(e) => {
                let why = e.to_string();
                if self.unreadable.insert(self.vm_dir.clone(), why.clone()) != Some(why) {
                    tracing::error!("cannot read the VM folder {}: {e}", self.vm_dir.display());
                }
                return Vec::new();
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        paths.sort();
        let mut out: Vec<(PathBuf, VmConfig)> = Vec::new();
        for path in paths {
            match VmConfig::load(&path) {
                Ok(cfg) => {
                    self.unreadable.remove(&path);
                    if let Some((first, _)) = out.iter().find(|(_, c)| c.name == cfg.name) {
                        let why = format!(
                            "it names the VM {:?}, as {} does",
                            cfg.name,
                            first.display()
                        );
                        if self.unreadable.insert(path.clone(), why.clone()) != Some(why.clone()) {
                            tracing::error!("VM config {}: {why}; ignored", path.display());
                        }
                        continue;
                    }
                    out.push((path, cfg));
                }
                Err(e) => {
                    let why = e.to_string();
                    if self.unreadable.insert(path.clone(), why.clone()) != Some(why) {
                        tracing::error!("VM config {}: {e}; ignored", path.display());
                    }
                }
            }
        }
        out
    }

    /// Adopts the VM's VMM if one answers on its socket, or starts one.
    fn take_on(&self, config: PathBuf, name: &str) -> Vm {
        let control = control_socket(&self.run_dir, name);
        let log = self.run_dir.join(format!("{name}.log"));
        let mut vm = Vm {
            config: config.clone(),
            control: control.clone(),
            log: log.clone(),
            child: None,
            adopted: false,
            arriving: None,
            info: blank_info(name, &config),
        };
        match status(&control) {
            Ok(_) => {
                tracing::info!(vm = name, "adopted the VMM already running");
                vm.adopted = true;
                vm.info.adopted = true;
                return vm;
            }
            Err(client::ClientError::Connect { .. }) => {}
            // Something answers on its socket, but not as a VMM of this version
            // answers in time: starting another would only collide with it.
            Err(e) => {
                tracing::error!(vm = name, "its socket answers, but: {e}; not started");
                vm.info.presence = VmPresence::Down;
                vm.info.error = Some(format!("its control socket answers, but: {e}"));
                vm.adopted = true;
                return vm;
            }
        }
        match self.start(&config, &control, &log) {
            Ok(child) => {
                tracing::info!(vm = name, pid = child.id(), "started its VMM");
                vm.info.pid = Some(child.id());
                vm.child = Some(child);
            }
            Err(e) => {
                tracing::error!(vm = name, "cannot start its VMM: {e}");
                vm.info.presence = VmPresence::Down;
                vm.info.error = Some(format!("cannot start its VMM: {e}"));
            }
        }
        vm
    }

    fn start(&self, config: &Path, control: &Path, log: &Path) -> std::io::Result<Child> {
        self.spawn(
            &[
                "vmm".into(),
                "--config".into(),
                config.into(),
                "--control".into(),
                control.into(),
            ],
            log,
        )
    }

    /// Starts `ferry ARGS` in a session of its own, its output appended to `log`.
    fn spawn(&self, args: &[std::ffi::OsString], log: &Path) -> std::io::Result<Child> {
        std::fs::create_dir_all(&self.run_dir)?;
        spawn(&self.exe, args, log)
    }

    /// Reserves the VM `req` names to arrive here (its name, a place among
    /// `max_inbound`, a one-time ticket); [`Reserved::start`] then starts its VMM
    /// without the inventory's lock, and [`Inventory::received`] settles it. Once the
    /// VM runs here its config is written into the VM folder; if its migration
    /// fails, or does not begin within [`ARRIVE_WITHIN`], the VMM is stopped and
    /// nothing is left.
    pub fn reserve(&mut self, req: &IncomingRequest) -> Result<Reserved, ReceiveError> {
        let cfg = VmConfig::parse_unresolved(&req.config, Path::new("the request's config"))
            .map_err(|e| ReceiveError::Config(e.to_string()))?;
        if cfg.name != req.vm {
            return Err(ReceiveError::NameMismatch {
                config: cfg.name,
                asked: req.vm.clone(),
            });
        }
        let name = &cfg.name;
        let file = self.vm_dir.join(format!("{name}.toml"));
        if self
            .vms
            .get(name)
            .is_some_and(|v| v.info.presence != VmPresence::Down)
            || file.exists()
        {
            return Err(ReceiveError::Exists(name.clone()));
        }
        let arriving = self.vms.values().filter(|v| v.arriving.is_some()).count();
        if arriving >= self.reception.max_inbound as usize {
            return Err(ReceiveError::Busy(self.reception.max_inbound));
        }
        let kept = self.placed(&cfg, req)?;
        let control = control_socket(&self.run_dir, name);
        // A VMM of that name still answering here (one handed over and still
        // stopping, say) holds the socket a new one needs.
        if status(&control).is_ok() {
            return Err(ReceiveError::Exists(name.clone()));
        }
        let start = |e: std::io::Error| ReceiveError::Start(e.to_string());
        std::fs::create_dir_all(&self.run_dir).map_err(start)?;
        let ticket = random_hex(16).map_err(start)?;
        let ticket_file = self.run_dir.join(format!("{name}.ticket"));
        write_private(&ticket_file, &ticket).map_err(start)?;
        // Port 0: the VMM binds a port the system chooses and says which in its
        // status, so no other process can take it in between.
        let bind = std::net::SocketAddr::new(self.reception.ip, 0).to_string();
        let log = self.run_dir.join(format!("{name}.log"));
        let mut args: Vec<std::ffi::OsString> = vec![
            "vmm".into(),
            "--incoming".into(),
            bind.into(),
            "--ticket-file".into(),
            ticket_file.clone().into(),
            // Faulted in while the VMM waits for the source, off the stream's path.
            "--memory-mib".into(),
            cfg.memory_mib.to_string().into(),
            "--control".into(),
            control.clone().into(),
        ];
        match &self.reception.tls {
            Some(f) => {
                for (flag, path) in [
                    ("--tls-cert", &f.cert),
                    ("--tls-key", &f.key),
                    ("--tls-ca", &f.ca),
                ] {
                    args.push(flag.into());
                    args.push(path.into());
                }
            }
            None => args.push("--insecure".into()),
        }
        match (req.copy_storage, self.reception.datastores.first()) {
            (true, Some(d)) => {
                args.push("--datastore".into());
                args.push(d.into());
            }
            _ => {
                for d in &self.reception.datastores {
                    args.push("--shared-dir".into());
                    args.push(d.into());
                }
            }
        }
        self.vms.insert(
            name.clone(),
            Vm {
                config: file.clone(),
                control: control.clone(),
                log: log.clone(),
                child: None,
                adopted: false,
                arriving: Some(Arriving {
                    config_text: kept,
                    source: req.source.clone(),
                    deadline: Instant::now() + ARRIVE_WITHIN,
                    begun: false,
                    starting: true,
                }),
                info: blank_info(name, &file),
            },
        );
        Ok(Reserved {
            name: name.clone(),
            exe: self.exe.clone(),
            args,
            control,
            log,
            ticket,
            ticket_file,
        })
    }

    /// Follows the arrival of `name` (just received) in `trace`, ended as it ends.
    pub fn trace_arrival(&mut self, name: &str, trace: crate::telemetry::ReceiveTrace) {
        if self.vms.get(name).is_some_and(|v| v.arriving.is_some()) {
            self.arrival_traces.insert(name.to_owned(), trace);
        }
    }

    /// Settles what [`Reserved::start`] did: the VM arriving here, or its place given
    /// back.
    pub fn received(
        &mut self,
        reserved: Reserved,
        started: Result<(Child, String), ReceiveError>,
    ) -> Result<IncomingOffer, ReceiveError> {
        let name = &reserved.name;
        let vm = self
            .vms
            .get_mut(name)
            .filter(|v| v.arriving.as_ref().is_some_and(|a| a.starting));
        let (vm, (child, address)) = match (vm, started) {
            (Some(vm), Ok(started)) => (vm, started),
            (vm, result) => {
                if vm.is_some() {
                    self.vms.remove(name);
                }
                let _ = std::fs::remove_file(&reserved.ticket_file);
                return Err(match result {
                    Err(e) => e,
                    Ok((mut child, _)) => {
                        // Cannot happen: only this request takes its reservation.
                        let _ = child.kill();
                        let _ = child.wait();
                        ReceiveError::Start("its reservation was lost".into())
                    }
                });
            }
        };
        let Some(a) = vm.arriving.as_mut() else {
            unreachable!("filtered on arriving above");
        };
        a.starting = false;
        a.deadline = Instant::now() + ARRIVE_WITHIN;
        // Remembered, so that an agent restarted meanwhile follows it on.
        if let Err(e) = std::fs::write(
            self.run_dir.join(format!("{name}.arriving")),
            &a.config_text,
        ) {
            tracing::warn!(vm = name, "cannot note its arrival for a restart: {e}");
        }
        tracing::info!(vm = name, source = a.source, %address, "receiving a VM");
        vm.info.pid = Some(child.id());
        vm.child = Some(child);
        Ok(IncomingOffer {
            address,
            ticket: reserved.ticket,
        })
    }

    /// The config this host keeps for the VM `cfg` once it runs here: the source's,
    /// with each disk where it will be on this host. Disks that travel land in the
    /// first datastore, in a folder of the VM's name that must not exist yet; disks
    /// on shared storage must be found now, by file name, in a datastore (so a
    /// request this host cannot honour is refused before any page moves).
    fn placed(&self, cfg: &VmConfig, req: &IncomingRequest) -> Result<String, ReceiveError> {
        if cfg.disks.is_empty() {
            return Ok(req.config.clone());
        }
        let bad = |e: String| ReceiveError::Config(e);
        let mut kept = cfg.clone();
        // As the source's VMM sends them: plain file names, which this side places.
        for d in &mut kept.disks {
            d.path = d.path.file_name().map(PathBuf::from).unwrap_or_default();
        }
        destination::check_wire_names(&kept).map_err(|e| bad(e.to_string()))?;
        let stores = &self.reception.datastores;
        if req.copy_storage {
            let Some(store) = stores.first() else {
                return Err(bad(format!(
                    "VM {} brings its disks, and this host has no datastore to put them in \
                     (`datastores` in the agent's config)",
                    cfg.name
                )));
            };
            let store = std::path::absolute(store).unwrap_or_else(|_| store.clone());
            let folder = disk_stream::vm_folder(&store, &cfg.name);
            if folder.exists() {
                return Err(ReceiveError::Placed(folder));
            }
            for d in &mut kept.disks {
                d.path = disk_stream::image_path(&store, &cfg.name, &d.id);
            }
        } else {
            let found = destination::shared_disks(&kept, stores).map_err(|e| {
                bad(format!(
                    "{e} (a VM whose disks are not on storage both hosts share migrates with \
                     copy_storage)"
                ))
            })?;
            for (d, path) in kept.disks.iter_mut().zip(found) {
                d.path = path;
            }
        }
        Ok(kept.to_toml())
    }

    /// Marks the VM `name` as one whose migration this agent drives (or no longer).
    pub fn set_driven(&mut self, name: &str, driven: bool) {
        let n = self.driven.entry(name.to_owned()).or_default();
        if driven {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.driven.remove(name);
            }
        }
    }

    /// The VM `name` now runs on another host: its VMM here (handed over, paused for
    /// good) is stopped, and its config set aside as `<name>.toml.migrated` so it is
    /// not started again.
    pub fn moved_away(&mut self, name: &str) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        // Set aside first: a config left in the folder with no VMM behind it would be
        // booted again. If that fails, the VMM stays as it is (paused for good) and
        // the VM stays listed, rather than risk running twice.
        let aside = vm.config.with_extension("toml.migrated");
        if vm.config.exists()
            && let Err(e) = std::fs::rename(&vm.config, &aside)
        {
            tracing::error!(
                vm = name,
                "handed over, but its config cannot be set aside ({e}); its copy here is \
                 left paused, not stopped, until it can"
            );
            vm.info.error = Some(format!("handed over; its config cannot be set aside: {e}"));
            return;
        }
        // Refused while a migration still needs it (post-copy pages, a handover in
        // doubt): then it stays, and the config comes back.
        if let Err(e) = client::call_within::<serde_json::Value>(
            &vm.control,
            &Request::Quit { force: false },
            STATUS_WITHIN,
        ) {
            tracing::warn!(vm = name, "its handed-over VMM does not stop yet: {e}");
            if let Err(e) = std::fs::rename(&aside, &vm.config) {
                tracing::error!(vm = name, "cannot put its config back: {e}");
            }
            return;
        }
        reap(vm);
        // Gone from this host now, not at the next look: it may be sent back at once.
        self.vms.remove(name);
        self.publish();
    }

    fn publish(&self) {
        let infos = self
            .vms
            .values()
            .map(|v| VmInfo {
                arriving: v.arriving.is_some(),
                ..v.info.clone()
            })
            .collect();
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = infos;
    }

    /// Stops asking after the VMs; their VMMs keep running. Children are reaped by
    /// init once this process is gone.
    pub fn release(&mut self) {
        for vm in self.vms.values_mut() {
            vm.child = None;
        }
    }
}

fn status(control: &Path) -> Result<Status, client::ClientError> {
    client::call_within(control, &Request::Status {}, STATUS_WITHIN)
}

/// Asks one VMM how it is; notices one that exited; keeps an arrived VM's config.
fn look(vm: &mut Vm, vm_dir: &Path) {
    if let Some(child) = &mut vm.child
        && let Ok(Some(exit)) = child.try_wait()
    {
        vm.child = None;
        vm.arriving = None;
        vm.info.presence = VmPresence::Down;
        vm.info.state = None;
        vm.info.error = Some(format!(
            "its VMM exited ({exit}); its log: {}{}",
            vm.log.display(),
            last_line(&vm.log).map_or(String::new(), |l| format!(" ends: {l}"))
        ));
        tracing::warn!(vm = vm.info.name, "its VMM exited ({exit})");
        return;
    }
    let seen = status(&vm.control);
    if vm.arriving.is_some() && arrival(vm, &seen, vm_dir) {
        return;
    }
    match seen {
        Ok(Status::Vm(s)) => {
            let m = &s.machine;
            let i = &mut vm.info;
            i.presence = VmPresence::Running;
            i.state = Some(m.state);
            i.pid = Some(m.pid);
            i.vcpus = Some(m.vcpus);
            i.memory_mib = Some(m.memory_mib);
            i.uptime_ms = Some(m.uptime_ms);
            i.heartbeats = Some(m.heartbeats);
            i.pages_written_per_sec = Some(m.pages_written_per_sec);
            i.max_heartbeat_gap_ms = Some(m.max_heartbeat_gap_ms);
            i.guest_integrity_errors = Some(m.guest_integrity_errors);
            i.disk_integrity_errors = Some(m.disk_integrity_errors);
            i.error = m.crash.clone();
            i.migrating = s.migration.as_ref().is_some_and(|p| p.report.is_none());
            i.in_doubt = s
                .migration
                .as_ref()
                .is_some_and(|p| p.phase == ferry_api::Phase::InDoubt);
            i.moving_disks = s
                .storage_migration
                .as_ref()
                .is_some_and(|p| p.report.is_none());
        }
        Ok(Status::Incoming(s)) => {
            vm.info.presence = VmPresence::Starting;
            vm.info.pid = Some(s.pid);
        }
        Err(e) => {
            // Still starting (our child lives, no socket yet) or gone.
            if vm.child.is_none() || vm.info.presence != VmPresence::Starting {
                if vm.info.presence != VmPresence::Down {
                    tracing::warn!(vm = vm.info.name, "its VMM does not answer: {e}");
                }
                vm.info.presence = VmPresence::Down;
                vm.info.state = None;
                vm.info.error = Some(e.to_string());
            }
        }
    }
}

/// Follows a VM on its way here; true when its VMM was stopped (the migration failed
/// or never came).
fn arrival(vm: &mut Vm, seen: &Result<Status, client::ClientError>, vm_dir: &Path) -> bool {
    let Some(a) = &mut vm.arriving else {
        return false;
    };
    let why = match seen {
        Ok(Status::Vm(s)) if s.machine.state == RunState::Running => {
            // It runs here: from now on it is one of the folder's VMs.
            let tmp = vm_dir.join(format!(".{}.toml.tmp", vm.info.name));
            let kept = std::fs::write(&tmp, &a.config_text)
                .and_then(|()| std::fs::rename(&tmp, &vm.config));
            match kept {
                Ok(()) => tracing::info!(
                    vm = vm.info.name,
                    source = a.source,
                    "arrived; its config is {}",
                    vm.config.display()
                ),
                Err(e) => tracing::error!(
                    vm = vm.info.name,
                    "arrived, but its config could not be written to {}: {e}",
                    vm.config.display()
                ),
            }
            vm.arriving = None;
            return false;
        }
        // Handed over but waiting for its source's word (in doubt), or receiving.
        Ok(Status::Vm(_)) => {
            a.begun = true;
            return false;
        }
        Ok(Status::Incoming(i)) => {
            let c = i.incoming.clone().unwrap_or_default();
            if c.failed_migrations > 0 {
                format!(
                    "its migration failed: {}",
                    c.last_rejection.unwrap_or_default()
                )
            } else if c.receiving {
                a.begun = true;
                return false;
            } else if a.begun {
                // It began, and the port waits again with no VM: the handover was
                // settled for the source (its ticket is spent; nothing more comes).
                "its migration ended without the VM staying here".into()
            } else if !a.begun && Instant::now() > a.deadline {
                format!("no migration began within {} s", ARRIVE_WITHIN.as_secs())
            } else {
                return false;
            }
        }
        // Gone for sure (no socket, nobody listening): a slow or odd answer is
        // not evidence, and after the handover began a wrong guess loses the VM.
        Err(e @ client::ClientError::Connect { .. }) => format!("its VMM is gone: {e}"),
        Err(e) => {
            tracing::warn!(vm = vm.info.name, "an arriving VM's VMM answers oddly: {e}");
            return false;
        }
    };
    tracing::warn!(vm = vm.info.name, source = a.source, "not received: {why}");
    let _ = client::call_within::<serde_json::Value>(
        &vm.control,
        &Request::Quit { force: true },
        STATUS_WITHIN,
    );
    reap(vm);
    vm.arriving = None;
    vm.info.presence = VmPresence::Down;
    vm.info.state = None;
    vm.info.error = Some(format!("not received: {why}"));
    true
}

/// Waits a little for a VMM told to quit to be gone: one this agent started is
/// waited for (no zombie), an adopted one until its socket stops answering.
fn reap(vm: &mut Vm) {
    if vm.child.is_none() {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5)
            && !matches!(
                status(&vm.control),
                Err(client::ClientError::Connect { .. })
            )
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if let Some(mut child) = vm.child.take() {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts `exe ARGS` in a session of its own, its output appended to `log`.
fn spawn(exe: &Path, args: &[std::ffi::OsString], log: &Path) -> std::io::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid is async-signal-safe and touches no memory of this process.
    // A session of its own: a signal to the agent's process group (a terminal's
    // Ctrl-C, a stop) never reaches the VM.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn blank_info(name: &str, config: &Path) -> VmInfo {
    VmInfo::new(name, config.display().to_string())
}

fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())
}

fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().chars().take(300).collect())
}
