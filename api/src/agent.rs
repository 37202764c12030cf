//! The host agent's HTTP API (`ferry agent`): what its endpoints take and answer.
//! `docs/API.md` describes them; `docs/openapi.json` is checked against the routes.

use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;
use crate::status::RunState;

/// The API's path prefix; a change that breaks clients gets a new one.
pub const PREFIX: &str = "/v1";

/// Every error answer's body: the kind (which fixes the HTTP status) and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ApiErrorKind,
    pub message: String,
}

/// An error's kind: the control API's kinds, and the two of HTTP's own that a
/// caller must tell apart (no credentials; credentials for another role).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorKind {
    InvalidRequest,
    NotFound,
    Conflict,
    Busy,
    Unavailable,
    Failed,
    Unauthenticated,
    Forbidden,
    TooLarge,
    MethodNotAllowed,
}

impl ApiErrorKind {
    pub fn http_status(self) -> u16 {
        match self {
            ApiErrorKind::InvalidRequest => ErrorKind::InvalidRequest.http_status(),
            ApiErrorKind::NotFound => ErrorKind::NotFound.http_status(),
            ApiErrorKind::Conflict => ErrorKind::Conflict.http_status(),
            ApiErrorKind::Busy => ErrorKind::Busy.http_status(),
            ApiErrorKind::Unavailable => ErrorKind::Unavailable.http_status(),
            ApiErrorKind::Failed => ErrorKind::Failed.http_status(),
            ApiErrorKind::Unauthenticated => 401,
            ApiErrorKind::Forbidden => 403,
            ApiErrorKind::TooLarge => 413,
            ApiErrorKind::MethodNotAllowed => 405,
        }
    }
}

impl From<ErrorKind> for ApiErrorKind {
    fn from(k: ErrorKind) -> Self {
        match k {
            ErrorKind::InvalidRequest => ApiErrorKind::InvalidRequest,
            ErrorKind::NotFound => ApiErrorKind::NotFound,
            ErrorKind::Conflict => ApiErrorKind::Conflict,
            ErrorKind::Busy => ApiErrorKind::Busy,
            ErrorKind::Unavailable => ApiErrorKind::Unavailable,
            ErrorKind::Failed => ApiErrorKind::Failed,
        }
    }
}

/// Where a VM of this host's inventory stands, as the agent knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPresence {
    /// Its VMM answers on its control socket.
    Running,
    /// Its VMM is being started.
    Starting,
    /// Its VMM does not answer (it exited, or crashed); `error` says what is known.
    Down,
}
named!(
    VmPresence,
    "presence",
    [Running = "running", Starting = "starting", Down = "down"]
);

/// `GET /v1/vms/{name}` and each item of `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub presence: VmPresence,
    /// The VM's own state (None while its VMM does not answer).
    pub state: Option<RunState>,
    /// The VMM's process id.
    pub pid: Option<u32>,
    /// The config file it was started from.
    pub config: String,
    /// Whether this agent started its VMM or found it running (after a restart).
    pub adopted: bool,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub uptime_ms: Option<u64>,
    /// The lab guest's heartbeats so far (the guest runs while they grow).
    pub heartbeats: Option<u64>,
    /// Live signal: pages the guest writes per second.
    pub pages_written_per_sec: Option<f64>,
    pub max_heartbeat_gap_ms: Option<f64>,
    pub guest_integrity_errors: Option<u64>,
    pub disk_integrity_errors: Option<u64>,
    /// Why the VM is down, or the last error starting or reaching it.
    pub error: Option<String>,
    /// Its VMM is sending it to another host now.
    #[serde(default)]
    pub migrating: bool,
    /// Its VMM handed it over, and the destination's word that it runs there was
    /// lost: both copies stay paused until the two sides settle it.
    #[serde(default)]
    pub in_doubt: bool,
    /// Its VMM is moving its disks to another datastore now.
    #[serde(default)]
    pub moving_disks: bool,
    /// On its way here from a peer: its VMM receives it.
    #[serde(default)]
    pub arriving: bool,
}

impl VmInfo {
    /// A VM taken on from `config`, nothing known of it yet.
    pub fn new(name: &str, config: String) -> Self {
        Self {
            name: name.to_owned(),
            presence: VmPresence::Starting,
            state: None,
            pid: None,
            config,
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
            migrating: false,
            in_doubt: false,
            moving_disks: false,
            arriving: false,
        }
    }
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub name: String,
    pub version: String,
    pub vms: usize,
    /// The host is being evacuated (an alert said so): it takes no VM in.
    #[serde(default)]
    pub evacuating: bool,
    /// What the host has room for: what a peer choosing a destination weighs.
    #[serde(default)]
    pub capacity: Option<Capacity>,
    /// The rate the latest completed migration from this host to each peer moved
    /// guest memory at: a peer that never sent here predicts its migrations to this
    /// host from it.
    #[serde(default)]
    pub links: Vec<PeerLink>,
}

/// A link to a peer, as a completed migration over it measured it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerLink {
    pub peer: String,
    pub bytes_per_sec: f64,
}

/// A host's room for VMs, as its agent counts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Memory VMs may have here (the config's `capacity_memory_mib`, else the host's).
    pub memory_mib: u64,
    /// What its VMs have, arriving ones included.
    pub vms_memory_mib: u64,
    /// Migrations it takes at once, and how many arrive now.
    pub max_inbound: u32,
    pub inbound: u32,
}

impl Capacity {
    pub fn free_memory_mib(&self) -> u64 {
        self.memory_mib.saturating_sub(self.vms_memory_mib)
    }
}

/// `GET /v1/alerts`: an alert this agent was sent and acts on (or acted on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertInfo {
    pub fingerprint: String,
    pub alertname: String,
    /// `firing`, or `resolved` for the last ones that ended (kept for a while).
    pub status: String,
    /// The host or VM it names.
    pub host: Option<String>,
    pub vm: Option<String>,
    /// What this agent did: `evacuate`, `migrate`, or `none` (about another host).
    pub action: String,
    /// The rule of the agent's config that matched (its index in `alert_rules`).
    pub rule: usize,
    pub received_unix_ms: u64,
    /// Times Alertmanager sent it again (repeats start nothing).
    pub repeats: u64,
    /// VMs still waiting for a free outbound slot or a destination.
    pub queued: Vec<String>,
    /// The migrations it started.
    pub migrations: Vec<String>,
    /// Why it is waiting, or what went wrong, most recent first.
    pub note: Option<String>,
}

/// `POST /v1/alerts`'s answer: what each alert of the post did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertsReceived {
    pub alerts: Vec<AlertOutcome>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertOutcome {
    pub fingerprint: String,
    pub alertname: String,
    /// `evacuate`, `migrate`, `repeat` (already acted on), `cancel` (resolved: its
    /// queued VMs dropped), `ignored`.
    pub action: String,
    pub reason: String,
}

/// `POST /v1/incoming` (a peer agent): receive the VM `vm`, whose config is `config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    pub vm: String,
    /// The VM's config file as the source runs it (TOML).
    pub config: String,
    /// The asking host's name.
    pub source: String,
    /// The disks travel with the VM: copies go into this host's first datastore.
    /// Otherwise this host finds each image by its file name in its datastores
    /// (shared storage).
    #[serde(default)]
    pub copy_storage: bool,
}

/// The answer to an [`IncomingRequest`]: where to send the VM, and the one-time
/// ticket to present there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingOffer {
    pub address: String,
    pub ticket: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    /// Asking the destination's agent, starting the VMM's migration.
    Starting,
    Running,
    /// Handed over, and the destination's word lost: settling with the destination
    /// where the VM runs (both copies paused until then).
    Resolving,
    Completed,
    Failed,
    Cancelled,
}

named!(
    MigrationState,
    "migration state",
    [
        Starting = "starting",
        Running = "running",
        Resolving = "resolving",
        Completed = "completed",
        Failed = "failed",
        Cancelled = "cancelled"
    ]
);

impl MigrationState {
    pub fn ended(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}

/// `GET /v1/migrations/{id}`: one migration this agent drives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    pub id: String,
    pub vm: String,
    /// This host.
    pub source: String,
    /// The peer's name.
    pub destination: String,
    /// Where the VM's stream goes (once the destination's agent said).
    pub destination_address: Option<String>,
    pub state: MigrationState,
    pub policy: String,
    pub started_unix_ms: u64,
    pub ended_unix_ms: Option<u64>,
    /// The latest progress the VMM reported.
    pub progress: Option<crate::MigrationProgress>,
    /// Every setting the policy chose or changed, when, and why.
    pub decisions: Vec<crate::Decision>,
    pub predicted_total_ms: Option<f64>,
    pub predicted_downtime_ms: Option<f64>,
    /// Once ended: how long it took, and the guest's pause.
    pub total_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub error: Option<String>,
    /// A handover in doubt, settled with the destination: where the VM runs.
    #[serde(default)]
    pub resolution: Option<crate::Resolution>,
    /// The operator's downtime limit for it (None: not known, as for a migration
    /// this agent did not start).
    #[serde(default)]
    pub max_downtime_ms: Option<f64>,
    /// What started it: `api` (an operator), `alert:<alertname>` (Alertmanager).
    /// None for a migration this agent did not start.
    #[serde(default)]
    pub trigger: Option<String>,
    /// The stream is TLS (true) or plain TCP (false): as configured, then as the
    /// VMM reported. None for a migration this agent did not start, until it ends.
    #[serde(default)]
    pub tls: Option<bool>,
}

impl MigrationInfo {
    /// A migration just asked for: `starting`, nothing measured yet.
    pub fn new(
        id: String,
        vm: &str,
        source: &str,
        destination: &str,
        policy: &str,
        started_unix_ms: u64,
    ) -> Self {
        Self {
            id,
            vm: vm.to_owned(),
            source: source.to_owned(),
            destination: destination.to_owned(),
            destination_address: None,
            state: MigrationState::Starting,
            policy: policy.to_owned(),
            started_unix_ms,
            ended_unix_ms: None,
            progress: None,
            decisions: Vec::new(),
            predicted_total_ms: None,
            predicted_downtime_ms: None,
            total_ms: None,
            downtime_ms: None,
            error: None,
            resolution: None,
            max_downtime_ms: None,
            trigger: None,
            tls: None,
        }
    }
}

/// `POST /v1/storage-migrations`: move a running VM's disk images (or one) into
/// another of this host's datastores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageMigrationRequest {
    pub vm: String,
    /// One of the agent's `datastores`, as its config names it; the images go into
    /// the VM's folder there.
    pub datastore: String,
    /// One disk by its id (None: every disk).
    #[serde(default)]
    pub disk: Option<String>,
    /// `auto` (the default), `background` or `active`.
    #[serde(default)]
    pub mode: Option<crate::StorageMode>,
    /// Delete the old images once the VM runs on the new ones.
    #[serde(default)]
    pub remove_source: bool,
    /// Cap on the guest's disk writes while its disks move, bytes per second.
    #[serde(default)]
    pub throttle_writes_bytes_per_sec: Option<u64>,
}

/// `GET /v1/storage-migrations/{id}`: one storage migration this agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageMigrationInfo {
    pub id: String,
    pub vm: String,
    /// The datastore, as the request named it.
    pub datastore: String,
    /// The folder the images go into.
    pub folder: String,
    pub state: MigrationState,
    pub started_unix_ms: u64,
    pub ended_unix_ms: Option<u64>,
    /// The latest progress the VMM reported.
    pub progress: Option<crate::StorageProgress>,
    /// Once ended: the VMM's report (each disk's old and new place, the check).
    pub report: Option<crate::StorageReport>,
    /// The VM's config in the agent's VM folder, once it names the new images.
    pub config_rewritten: Option<String>,
    pub error: Option<String>,
}

impl StorageMigrationInfo {
    /// A storage migration just asked for: `starting`, nothing measured yet.
    pub fn new(id: String, vm: &str, datastore: &str, folder: String, started: u64) -> Self {
        Self {
            id,
            vm: vm.to_owned(),
            datastore: datastore.to_owned(),
            folder,
            state: MigrationState::Starting,
            started_unix_ms: started,
            ended_unix_ms: None,
            progress: None,
            report: None,
            config_rewritten: None,
            error: None,
        }
    }
}
