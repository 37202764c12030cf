//! The host's VMs: one config file each in the VM folder, one `ferry vmm` each. The
//! agent starts the VMM of a config it finds, or adopts the one already answering on
//! the VM's control socket (an agent restart never stops or pauses a VM: each VMM
//! runs in a session of its own, and the unit kills only the agent's own process).
//!
//! A thread of its own looks every [`REFRESH`] and keeps what it saw in a snapshot
//! the API reads without waiting on any VMM.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_api::agent::{VmInfo, VmPresence};
use ferry_api::{Request, Status};

use crate::client;
use crate::vmm::config::VmConfig;

/// How often the folder is read and every VMM asked for its status.
pub const REFRESH: Duration = Duration::from_millis(500);
/// A VMM that does not answer `status` within this is reported down, not waited for.
const STATUS_WITHIN: Duration = Duration::from_secs(2);

struct Vm {
    config: PathBuf,
    control: PathBuf,
    log: PathBuf,
    /// The VMM this agent started (None: adopted, or not started).
    child: Option<Child>,
    adopted: bool,
    info: VmInfo,
}

pub struct Inventory {
    vm_dir: PathBuf,
    run_dir: PathBuf,
    exe: PathBuf,
    vms: BTreeMap<String, Vm>,
    /// Config files that do not read, and why (logged once each).
    unreadable: BTreeMap<PathBuf, String>,
    snapshot: Arc<RwLock<Vec<VmInfo>>>,
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
    pub fn new(vm_dir: PathBuf, run_dir: PathBuf, exe: PathBuf) -> (Self, View) {
        let snapshot = Arc::new(RwLock::new(Vec::new()));
        let view = View(snapshot.clone());
        (
            Self {
                vm_dir,
                run_dir,
                exe,
                vms: BTreeMap::new(),
                unreadable: BTreeMap::new(),
                snapshot,
            },
            view,
        )
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
            look(vm);
        }
        // A VM whose config is gone and whose VMM is gone is forgotten; one whose
        // VMM still runs stays listed (it is still on this host).
        self.vms
            .retain(|_, vm| vm.config.exists() || vm.info.presence != VmPresence::Down);
        let infos = self.vms.values().map(|v| v.info.clone()).collect();
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = infos;
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
            info: VmInfo {
                name: name.to_owned(),
                presence: VmPresence::Starting,
                state: None,
                pid: None,
                config: config.display().to_string(),
                adopted: false,
                vcpus: None,
                memory_mib: None,
                uptime_ms: None,
                heartbeats: None,
                pages_written_per_sec: None,
                max_heartbeat_gap_ms: None,
                guest_integrity_errors: None,
                disk_integrity_errors: None,
                error: None,
            },
        };
        if status(&control).is_ok() {
            tracing::info!(vm = name, "adopted the VMM already running");
            vm.adopted = true;
            vm.info.adopted = true;
            return vm;
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
        std::fs::create_dir_all(&self.run_dir)?;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("vmm")
            .arg("--config")
            .arg(config)
            .arg("--control")
            .arg(control)
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

/// Asks one VMM how it is; notices one that exited.
fn look(vm: &mut Vm) {
    if let Some(child) = &mut vm.child
        && let Ok(Some(exit)) = child.try_wait()
    {
        vm.child = None;
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
    match status(&vm.control) {
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

fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().chars().take(300).collect())
}
