//! Storage migrations on this host: a running VM's disk images move into another of
//! the agent's datastores. The VM's VMM copies them (`storage-migrate`) while the
//! guest runs; the agent checks the request, starts it, follows it on a thread of
//! its own and, once the VM runs on the new images, makes the VM's config in the VM
//! folder name them (so the VM starts from them next time).
//!
//! If the agent dies mid-way the VMM finishes on its own, and it rewrites the config
//! it was started from; the restarted agent reads its records back
//! (`run_dir/storage-migrations/<id>.json`, kept at each change of state), follows
//! again under the same id what it had started, and settles from the VMM's report
//! what ended while it was away.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::agent::{
    ApiErrorKind, MigrationState, StorageMigrationInfo, StorageMigrationRequest, VmPresence,
};
use ferry_api::{Outcome, Request, Status, StorageReport};

use super::inventory::{self, View};
use super::migrations::Refusal;
use super::records;
use crate::client::{self, ClientError};
use crate::migration::disk_stream;
use crate::sync::lock;
use crate::vmm::config::VmConfig;

/// How often a storage migration's progress is read from its VMM.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);
/// Looks in a row that find no answer before the VMM is given up on.
const MISSES: u32 = 25;
/// A VMM's answer within this, or it counts as a miss.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

pub struct StorageMigrations {
    datastores: Vec<PathBuf>,
    base: PathBuf,
    run_dir: PathBuf,
    /// Where the records are kept across restarts.
    dir: PathBuf,
    records: Mutex<BTreeMap<String, Arc<Mutex<StorageMigrationInfo>>>>,
    /// Records read back unended: followed again once the inventory has the VM.
    unfollowed: Mutex<Vec<String>>,
    next: AtomicU64,
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

impl StorageMigrations {
    /// `base`: where a relative datastore in a request starts (the agent config's
    /// folder, as for the config's own paths).
    pub fn new(datastores: &[PathBuf], base: &Path, run_dir: &Path) -> Self {
        let this = Self {
            datastores: datastores.iter().map(|d| absolute(d)).collect(),
            base: base.to_owned(),
            run_dir: run_dir.to_owned(),
            dir: run_dir.join("storage-migrations"),
            records: Mutex::new(BTreeMap::new()),
            unfollowed: Mutex::new(Vec::new()),
            next: AtomicU64::new(1),
        };
        this.read_back();
        this
    }

    /// The records a previous run of the agent kept.
    fn read_back(&self) {
        let kept = records::read_back::<StorageMigrationInfo>(&self.dir, "storage migration");
        let mut records = lock(&self.records);
        for (_, info) in kept {
            if !info.state.ended() {
                lock(&self.unfollowed).push(info.id.clone());
            }
            records.insert(info.id.clone(), Arc::new(Mutex::new(info)));
        }
        prune(&mut records, &self.dir);
    }

    pub fn list(&self) -> Vec<StorageMigrationInfo> {
        lock(&self.records)
            .values()
            .map(|r| lock(r).clone())
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<StorageMigrationInfo> {
        lock(&self.records).get(id).map(|r| lock(r).clone())
    }

    /// Asks the VMM to stop the storage migration `id`: the VM stays on its old
    /// images, and the copies are dropped.
    pub fn cancel(&self, id: &str) -> Result<StorageMigrationInfo, Refusal> {
        let info = self.get(id).ok_or_else(|| {
            Refusal(
                ApiErrorKind::NotFound,
                format!("no storage migration {id:?}"),
            )
        })?;
        if info.state.ended() {
            return Err(Refusal(
                ApiErrorKind::Conflict,
                format!(
                    "storage migration {id} has already ended ({})",
                    info.state.as_str()
                ),
            ));
        }
        let control = inventory::control_socket(&self.run_dir, &info.vm);
        // The VMM's `cancel` stops whatever it runs: ask it only while what it runs
        // is this storage migration (it may have ended since the last look).
        let moving = client::call_within::<Status>(&control, &Request::Status {}, ANSWER_WITHIN)
            .map_err(refused)?
            .vm()
            .and_then(|v| v.storage_migration.as_ref())
            .is_some_and(|p| p.report.is_none());
        if !moving {
            return Err(Refusal(
                ApiErrorKind::Conflict,
                format!("storage migration {id} is ending; nothing is left to cancel"),
            ));
        }
        client::call_within::<serde_json::Value>(&control, &Request::Cancel {}, ANSWER_WITHIN)
            .map_err(refused)?;
        Ok(info)
    }

    /// The storage migration under way for `vm`, if any.
    pub fn moving(&self, vm: &str) -> Option<String> {
        lock(&self.records)
            .values()
            .map(|r| lock(r).clone())
            .find(|i| i.vm == vm && !i.state.ended())
            .map(|i| i.id)
    }

    /// The datastore `named` names, as configured: compared as absolute paths, a
    /// relative one taken from the config's folder as the config's own are (so
    /// `disks` and `./disks` are the same one).
    fn datastore(&self, named: &str) -> Result<PathBuf, Refusal> {
        let asked = absolute(&self.base.join(named));
        self.datastores
            .iter()
            .find(|d| **d == asked)
            .cloned()
            .ok_or_else(|| {
                Refusal(
                    ApiErrorKind::InvalidRequest,
                    if self.datastores.is_empty() {
                        "this agent has no datastores (`datastores` in its config)".into()
                    } else {
                        format!(
                            "{named:?} is not one of this agent's datastores ({})",
                            self.datastores
                                .iter()
                                .map(|d| d.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                )
            })
    }

    /// Checks `req`, asks the VM's VMM to start moving its disks and follows it on a
    /// thread of its own; returns the first record. `live_migration` is the VM's
    /// migration to another host under way, if any.
    pub fn start(
        self: &Arc<Self>,
        req: StorageMigrationRequest,
        vms: &View,
        live_migration: Option<String>,
    ) -> Result<StorageMigrationInfo, Refusal> {
        let store = self.datastore(&req.datastore)?;
        let vm = vms.get(&req.vm).ok_or_else(|| {
            Refusal(
                ApiErrorKind::NotFound,
                format!("no VM {:?} on this host", req.vm),
            )
        })?;
        if let Some(id) = live_migration {
            return Err(Refusal(
                ApiErrorKind::Conflict,
                format!(
                    "VM {} is migrating to another host (migration {id})",
                    req.vm
                ),
            ));
        }
        if vm.migrating || vm.moving_disks {
            return Err(Refusal(
                ApiErrorKind::Conflict,
                format!(
                    "VM {} is already moving (its VMM runs a {} migration)",
                    req.vm,
                    if vm.migrating { "live" } else { "storage" }
                ),
            ));
        }
        if vm.presence != VmPresence::Running {
            return Err(Refusal(
                ApiErrorKind::Conflict,
                format!("VM {} is not running here ({:?})", req.vm, vm.state),
            ));
        }
        let folder = disk_stream::vm_folder(&store, &req.vm);
        let record = {
            let mut records = lock(&self.records);
            if let Some(id) = records.values().find_map(|r| {
                let i = lock(r);
                (i.vm == req.vm && !i.state.ended()).then(|| i.id.clone())
            }) {
                return Err(Refusal(
                    ApiErrorKind::Conflict,
                    format!("VM {} is already moving (storage migration {id})", req.vm),
                ));
            }
            prune(&mut records, &self.dir);
            let id = records::new_id('s', &self.next);
            let r = Arc::new(Mutex::new(StorageMigrationInfo::new(
                id.clone(),
                &req.vm,
                &req.datastore,
                folder.display().to_string(),
                records::unix_ms(),
            )));
            records.insert(id, r.clone());
            r
        };
        let control = inventory::control_socket(&self.run_dir, &req.vm);
        let created = !folder.exists();
        let started = std::fs::create_dir_all(&folder)
            .map_err(|e| {
                Refusal(
                    ApiErrorKind::Failed,
                    format!("creating {}: {e}", folder.display()),
                )
            })
            .and_then(|()| {
                client::call_within::<serde_json::Value>(
                    &control,
                    &Request::StorageMigrate {
                        to: folder.clone(),
                        disk: req.disk.clone(),
                        mode: req.mode,
                        remove_source: req.remove_source,
                        throttle_writes_bytes_per_sec: req.throttle_writes_bytes_per_sec,
                        report: None,
                    },
                    ANSWER_WITHIN * 5,
                )
                .map_err(refused)
            });
        if let Err(r) = started {
            if created {
                // Only if still empty: nothing of the VM's is ever removed here.
                let _ = std::fs::remove_dir(&folder);
            }
            lock(&self.records).remove(&lock(&record).id);
            return Err(r);
        }
        {
            let mut i = lock(&record);
            i.state = MigrationState::Running;
            tracing::info!(
                vm = i.vm,
                id = i.id,
                to = %folder.display(),
                "storage migration started"
            );
            keep(&self.dir, &i);
        }
        self.follow(
            record.clone(),
            control,
            PathBuf::from(&vm.config),
            created.then(|| folder.clone()),
        );
        Ok(lock(&record).clone())
    }

    /// Follows, with a record of its own, every storage migration a VMM here runs
    /// that no record follows: one begun before this agent restarted (or by hand).
    pub fn follow_unowned(&self, vms: &View) {
        // First what this agent started before it restarted, under the same id: still
        // running, or ended meanwhile (the VMM's report says how).
        let pending = std::mem::take(&mut *lock(&self.unfollowed));
        for id in pending {
            let record = lock(&self.records).get(&id).cloned();
            let Some(record) = record else { continue };
            let name = lock(&record).vm.clone();
            match vms.get(&name) {
                Some(vm) => {
                    tracing::info!(
                        vm = name,
                        id,
                        "following again a storage migration begun before a restart"
                    );
                    self.follow(
                        record,
                        inventory::control_socket(&self.run_dir, &name),
                        PathBuf::from(&vm.config),
                        None,
                    );
                }
                None => lock(&self.unfollowed).push(id),
            }
        }
        for vm in vms.all().into_iter().filter(|v| v.moving_disks) {
            let record = {
                let mut records = lock(&self.records);
                let recent = records::unix_ms().saturating_sub(5_000);
                if records.values().any(|r| {
                    let i = lock(r);
                    i.vm == vm.name && (!i.state.ended() || i.ended_unix_ms > Some(recent))
                }) {
                    continue;
                }
                let id = records::new_id('s', &self.next);
                let mut info = StorageMigrationInfo::new(
                    id.clone(),
                    &vm.name,
                    "(begun before this agent started)",
                    String::new(),
                    records::unix_ms(),
                );
                info.state = MigrationState::Running;
                let r = Arc::new(Mutex::new(info));
                records.insert(id, r.clone());
                r
            };
            tracing::info!(
                vm = vm.name,
                "following a storage migration under way that this agent did not start"
            );
            self.follow(
                record,
                inventory::control_socket(&self.run_dir, &vm.name),
                PathBuf::from(&vm.config),
                None,
            );
        }
    }

    /// `made`: the folder the agent made for the images, removed again if the
    /// storage migration leaves it empty.
    fn follow(
        &self,
        record: Arc<Mutex<StorageMigrationInfo>>,
        control: PathBuf,
        config: PathBuf,
        made: Option<PathBuf>,
    ) {
        let spawned = std::thread::Builder::new()
            .name("storage-migration".into())
            .spawn({
                let record = record.clone();
                let dir = self.dir.clone();
                move || {
                    follow(&record, &control, &config);
                    keep(&dir, &lock(&record));
                    if let Some(folder) = made
                        && lock(&record).state != MigrationState::Completed
                    {
                        // Only if empty: nothing of the VM's is ever removed here. An
                        // empty folder left would refuse the VM's disks arriving later.
                        let _ = std::fs::remove_dir(&folder);
                    }
                }
            });
        if let Err(e) = spawned {
            end(
                &record,
                MigrationState::Failed,
                Some(format!("no thread to follow it: {e}")),
            );
        }
    }
}

/// What the VMM said no with, as the API says it.
fn refused(e: ClientError) -> Refusal {
    Refusal(e.kind().into(), format!("the VM's VMM: {e}"))
}

fn end(record: &Mutex<StorageMigrationInfo>, state: MigrationState, error: Option<String>) {
    let mut i = lock(record);
    i.state = state;
    i.ended_unix_ms = Some(records::unix_ms());
    i.error = error;
}

fn prune(records: &mut BTreeMap<String, Arc<Mutex<StorageMigrationInfo>>>, dir: &Path) {
    let ended = records
        .iter()
        .filter_map(|(id, r)| lock(r).ended_unix_ms.map(|t| (t, id.clone())))
        .collect();
    for id in records::beyond_keep(ended) {
        records.remove(&id);
        let _ = std::fs::remove_file(dir.join(format!("{id}.json")));
    }
}

/// Keeps a record as it is now, for a restarted agent; one that cannot be kept is
/// still served.
fn keep(dir: &Path, info: &StorageMigrationInfo) {
    let file = dir.join(format!("{}.json", info.id));
    let tmp = file.with_extension("json.tmp");
    let written = serde_json::to_vec_pretty(info)
        .map_err(std::io::Error::other)
        .and_then(|t| std::fs::write(&tmp, t))
        .and_then(|()| std::fs::rename(&tmp, &file));
    if let Err(e) = written {
        tracing::warn!(
            "cannot keep the storage migration record {}: {e}",
            file.display()
        );
    }
}

/// Reads the VMM's progress until its report comes, then settles the record (and
/// the VM's config).
fn follow(record: &Mutex<StorageMigrationInfo>, control: &Path, config: &Path) {
    let mut misses = 0;
    let report = loop {
        std::thread::sleep(FOLLOW_EVERY);
        let seen = client::call_within::<Status>(control, &Request::Status {}, ANSWER_WITHIN);
        let progress = match seen {
            Ok(Status::Vm(s)) => s.storage_migration,
            Ok(Status::Incoming(_)) => None,
            Err(e) if misses < MISSES => {
                misses += 1;
                tracing::debug!("a storage migration's VMM did not answer: {e}");
                continue;
            }
            Err(e) => {
                let vm = lock(record).vm.clone();
                tracing::error!(vm, "lost the VMM moving the VM's disks: {e}");
                return end(
                    record,
                    MigrationState::Failed,
                    Some(format!("its VMM stopped answering: {e}")),
                );
            }
        };
        misses = 0;
        let Some(p) = progress else {
            return end(
                record,
                MigrationState::Failed,
                Some("the VMM no longer shows a storage migration".into()),
            );
        };
        let report = p.report.clone();
        lock(record).progress = Some(p);
        if let Some(r) = report {
            break r;
        }
    };
    let vm = lock(record).vm.clone();
    let (state, error) = match report.core.outcome {
        Outcome::Completed => match keep_config(config, &report) {
            Ok(()) => {
                tracing::info!(
                    vm,
                    copy_ms = report.copy_ms,
                    bytes = report.disk_bytes_copied,
                    "storage migration completed"
                );
                lock(record).config_rewritten = Some(config.display().to_string());
                (MigrationState::Completed, None)
            }
            Err(e) => {
                // The VM runs on the new images; only its next start would not.
                tracing::error!(
                    vm,
                    "storage migration completed, but the VM's config still names the old \
                     images: {e}"
                );
                (
                    MigrationState::Completed,
                    Some(format!(
                        "the VM runs on the new images, but its config {} could not be \
                         rewritten to name them: {e}",
                        config.display()
                    )),
                )
            }
        },
        Outcome::Cancelled => {
            tracing::info!(
                vm,
                "storage migration cancelled; the disks stay where they were"
            );
            (MigrationState::Cancelled, report.core.error.clone())
        }
        Outcome::Failed => {
            tracing::error!(vm, "storage migration failed: {:?}", report.core.error);
            (MigrationState::Failed, report.core.error.clone())
        }
    };
    lock(record).report = Some(report);
    end(record, state, error);
}

/// Makes the VM's config name each moved disk's new image. The VMM rewrites the
/// config it was started from itself; a VM that arrived by migration (whose VMM
/// knows no config file) has it rewritten here.
fn keep_config(config: &Path, report: &StorageReport) -> std::io::Result<()> {
    if report.config_rewritten.as_deref().map(absolute) == Some(absolute(config)) {
        return Ok(());
    }
    let mut cfg = VmConfig::load(config).map_err(std::io::Error::other)?;
    for moved in &report.disks {
        if let Some(d) = cfg.disks.iter_mut().find(|d| d.id == moved.id) {
            d.path.clone_from(&moved.to);
        }
    }
    cfg.write_atomic(config)
}
