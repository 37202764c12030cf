//! The control socket: a unix socket speaking JSON lines. Each request is one JSON
//! object with a `cmd` field; each answer is one object with `ok` and either `result`
//! or `error`. See docs/CONTROL.md.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::migration::destination::Slot;
use crate::migration::disk_stream::DiskMirror;
use crate::migration::door::Door;
use crate::migration::migratable::Migratable;
use crate::migration::secure::Transport;
use crate::migration::{source, storage};
use crate::pki::MigrationTls;
use crate::sync::lock;
use crate::vmm::block::MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC;
use crate::vmm::machine::{
    DIRTY_SAMPLE_MS, DirtySampleError, MailboxError, PauseError, ResumeError, RunState,
    VerifyError, WorkloadError,
};
use crate::vmm::snapshot;

/// Longest request line accepted; anything longer is refused whole, not buffered.
pub const MAX_REQUEST: u64 = 64 * 1024;

use ferry_api::{
    Answer, Cancelling, CodecSamples, ErrorKind, PostcopyRequested, Resuming, Started, StateNow,
    WorkloadSet,
};
pub use ferry_api::{Migrate, Request, Settings, SettingsChange};

/// Why a request was not done: the one line the client shows, and which kind of no
/// (a front end maps the kind, never the words).
#[derive(Debug)]
struct Refusal {
    kind: ErrorKind,
    message: String,
}

impl Refusal {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    fn answer(&self) -> Value {
        json!(Answer::<()>::refused(self.message.clone(), self.kind))
    }
}

/// Anything not classified where it arose was tried and failed.
impl From<String> for Refusal {
    fn from(message: String) -> Self {
        Self::new(ErrorKind::Failed, message)
    }
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorKind::InvalidRequest, message)
}

fn busy(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorKind::Busy, message)
}

fn conflict(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorKind::Conflict, message)
}

fn not_found(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorKind::NotFound, message)
}

/// An operation's error, and which kind of no it is for a front end: each operation
/// has its own enum, and says here whether waiting, asking otherwise or nothing helps.
trait Kinded: std::fmt::Display {
    fn kind(&self) -> ErrorKind;
}

impl<E: Kinded> From<E> for Refusal {
    fn from(e: E) -> Self {
        Refusal::new(e.kind(), e.to_string())
    }
}

impl Kinded for PauseError {
    fn kind(&self) -> ErrorKind {
        match self {
            PauseError::Timeout(_) => ErrorKind::Failed,
        }
    }
}

impl Kinded for ResumeError {
    fn kind(&self) -> ErrorKind {
        match self {
            ResumeError::Crashed(_) | ResumeError::HandedOver | ResumeError::Held(_) => {
                ErrorKind::Conflict
            }
        }
    }
}

impl Kinded for VerifyError {
    fn kind(&self) -> ErrorKind {
        match self {
            VerifyError::Paused | VerifyError::HandedOver | VerifyError::Crashed(_) => {
                ErrorKind::Conflict
            }
            VerifyError::Timeout(_) => ErrorKind::Failed,
        }
    }
}

impl Kinded for WorkloadError {
    fn kind(&self) -> ErrorKind {
        match self {
            WorkloadError::NotRunning(_) => ErrorKind::Conflict,
            WorkloadError::Pause(e) => e.kind(),
            WorkloadError::Resume(e) => e.kind(),
            WorkloadError::Memory(_) => ErrorKind::Failed,
        }
    }
}

impl Kinded for DirtySampleError {
    fn kind(&self) -> ErrorKind {
        match self {
            DirtySampleError::LogInUse
            | DirtySampleError::Mailbox(MailboxError::PageMissing(_)) => ErrorKind::Busy,
            DirtySampleError::Dirty(_) | DirtySampleError::Mailbox(MailboxError::Memory(_)) => {
                ErrorKind::Failed
            }
        }
    }
}

impl Kinded for snapshot::SnapshotError {
    fn kind(&self) -> ErrorKind {
        use snapshot::SnapshotError as E;
        match self {
            E::Exists(_) => ErrorKind::Conflict,
            E::Crashed | E::Resume(_) => ErrorKind::Conflict,
            _ => ErrorKind::Failed,
        }
    }
}

impl Kinded for source::SetParamsError {
    fn kind(&self) -> ErrorKind {
        match self {
            source::SetParamsError::NotRunning => ErrorKind::NotFound,
            source::SetParamsError::Invalid(_) => ErrorKind::InvalidRequest,
        }
    }
}

impl Kinded for source::ResolveError {
    fn kind(&self) -> ErrorKind {
        use source::ResolveError as E;
        match self {
            E::NoMigration | E::NoSession => ErrorKind::NotFound,
            E::Address(_) => ErrorKind::Unavailable,
            E::Protocol(_) | E::Unexpected(_) | E::Inconsistent { .. } => ErrorKind::Failed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {0} is in use by a running VMM")]
    InUse(PathBuf),
}

/// Which file a socket path names (device, inode): a VMM removes its socket on exit
/// only if the path still names the one it bound, never a newer VMM's.
pub fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Binds the socket, replacing a stale file but never a live VMM's socket.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ControlError::Bind {
            path: path.to_owned(),
            source,
        })?;
    Ok(listener)
}

/// Serves requests until `quit` (or `interrupted()` says so), one thread per connection.
/// `door`: the incoming port of a destination, whose counters `status` shows while no
/// VM is here.
/// Serves until told to stop; then `release` runs while the socket is still bound,
/// so that removing its path there can never remove a newer VMM's: [`bind`] refuses
/// a path whose socket still answers.
pub fn serve(
    listener: UnixListener,
    slot: Slot,
    door: Option<Arc<Door>>,
    interrupted: impl Fn() -> bool,
    release: impl FnOnce(),
) {
    let stop = Arc::new(AtomicBool::new(false));
    while !stop.load(Ordering::Acquire) && !interrupted() {
        // Block until a client connects, waking now and then to notice a signal.
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes only the one pollfd we pass.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let slot = slot.clone();
                let stop = stop.clone();
                let door = door.clone();
                let _ = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || handle_connection(stream, &slot, door.as_deref(), &stop));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    release();
    drop(listener);
}

/// One request line as read off the socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Request(String),
    /// Longer than [`MAX_REQUEST`]: `n` bytes, discarded up to and with its newline.
    TooLong(u64),
    NotUtf8,
}

/// Reads the next request line; None at the end of the stream. An oversized line is
/// discarded whole (never cut into pieces that would each run), and at most
/// `MAX_REQUEST + 1` bytes are ever buffered.
pub fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<Line>> {
    buf.clear();
    let n = r.by_ref().take(MAX_REQUEST + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && n as u64 > MAX_REQUEST {
        let mut skipped = n as u64;
        loop {
            let available = r.fill_buf()?;
            if available.is_empty() {
                break;
            }
            match available.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    r.consume(i + 1);
                    skipped += i as u64 + 1;
                    break;
                }
                None => {
                    let n = available.len();
                    r.consume(n);
                    skipped += n as u64;
                }
            }
        }
        buf.clear();
        return Ok(Some(Line::TooLong(skipped)));
    }
    Ok(Some(match std::str::from_utf8(buf) {
        Ok(text) => Line::Request(text.trim().to_owned()),
        Err(_) => Line::NotUtf8,
    }))
}

/// The peer of a control connection hung up (an answer would go nowhere).
fn hung_up(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll reads and writes only the one pollfd we pass; it does not block.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn handle_connection(stream: UnixStream, slot: &Slot, door: Option<&Door>, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut writer = write_half;
    let Ok(peer) = stream.try_clone() else {
        return;
    };
    let gone = || hung_up(&peer);
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        let line = match read_line(&mut reader, &mut buf) {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => return,
        };
        let answer = match line {
            Line::TooLong(n) => invalid(format!(
                "request of {n} bytes is longer than the {MAX_REQUEST}-byte limit; it was discarded whole"
            ))
            .answer(),
            Line::NotUtf8 => invalid("request is not valid UTF-8").answer(),
            Line::Request(text) => {
                let machine = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let (answer, quit) = dispatch(&text, machine.as_ref(), door, &gone);
                if quit {
                    stop.store(true, Ordering::Release);
                }
                answer
            }
        };
        let mut text = answer.to_string();
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() {
            return;
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
    }
}

/// What `quit` answers.
fn quitting() -> StateNow {
    StateNow {
        state: "quitting".into(),
    }
}

/// Answers one request; true when the process is to stop.
fn dispatch(
    line: &str,
    vm: Option<&Arc<Migratable>>,
    door: Option<&Door>,
    client_gone: &dyn Fn() -> bool,
) -> (Value, bool) {
    let request: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return (invalid(format!("bad request: {e}")).answer(), false);
        }
    };
    let Some(vm) = vm else {
        // A destination before its VM has arrived.
        return match request {
            Request::Status {} => (
                json!(Answer::ok(ferry_api::IncomingStatus {
                    state: "incoming".into(),
                    pid: std::process::id(),
                    incoming: door.map(Door::counters),
                    listening: door.map(|d| d.listening().to_string()),
                })),
                false,
            ),
            Request::Quit { .. } => (json!(Answer::ok(quitting())), true),
            _ => (
                Refusal::new(
                    ErrorKind::Unavailable,
                    "no VM here yet: waiting for an incoming migration",
                )
                .answer(),
                false,
            ),
        };
    };
    let result = dispatch_to(request, vm, client_gone);
    let quit = matches!(result, Ok((_, true)));
    let answer = match result {
        Ok((v, _)) => json!(Answer::ok(v)),
        Err(e) => e.answer(),
    };
    (answer, quit)
}

/// A request to this VM: its result, and whether the process is to stop.
fn dispatch_to(
    request: Request,
    vm: &Arc<Migratable>,
    client_gone: &dyn Fn() -> bool,
) -> Result<(Value, bool), Refusal> {
    let m = &vm.machine;
    let migrating = vm.migrating();
    // A migration owns pausing and resuming until it ends: a resume during its
    // switchover could leave two running copies.
    if migrating
        && matches!(
            request,
            Request::Pause {} | Request::Resume {} | Request::Snapshot { .. }
        )
    {
        return Err(busy(
            "a migration is running; wait for it or cancel it first",
        ));
    }
    // Incoming post-copy: memory is still arriving, and the VM's pausing belongs to it.
    if vm.receiving_postcopy()
        && matches!(
            request,
            Request::Pause {} | Request::Resume {} | Request::Snapshot { .. }
        )
    {
        return Err(busy(
            "post-copy is still bringing this VM's memory in; wait for it to complete",
        ));
    }
    let phase = lock(&vm.progress).as_ref().map(|p| p.phase);
    let moving_disks = vm.moving_disks();
    if moving_disks
        && matches!(
            request,
            Request::Snapshot { .. } | Request::Migrate { .. } | Request::StorageMigrate { .. }
        )
    {
        return Err(busy(
            "a storage migration is running; wait for it or cancel it first",
        ));
    }
    if migrating && matches!(request, Request::StorageMigrate { .. }) {
        return Err(busy(
            "a migration is running; wait for it or cancel it first",
        ));
    }
    if let Request::Quit { force } = request {
        return quit(vm, force, migrating || moving_disks, phase).map(|v| (v, true));
    }
    let result: Result<Value, Refusal> = match request {
        Request::Status {} => Ok(json!(vm.status())),
        Request::Mechanics {} => Ok(json!(crate::migration::MECHANICS)),
        Request::Pause {} => m
            .pause()
            .map(|()| {
                json!(StateNow {
                    state: m.state().to_string(),
                })
            })
            .map_err(Refusal::from),
        Request::Resume {} => m
            .resume()
            .map(|()| {
                json!(StateNow {
                    state: m.state().to_string(),
                })
            })
            .map_err(Refusal::from),
        Request::Verify { timeout_secs } => m
            .verify(Duration::from_secs(timeout_secs.unwrap_or(600)))
            .map(|r| json!(r))
            .map_err(Refusal::from),
        Request::Snapshot { out } if out.as_os_str().is_empty() => Err(invalid(
            "snapshot: `out` is empty; name the folder to write the snapshot into",
        )),
        Request::Snapshot { out } => snapshot::take(m, &out)
            .map(|r| json!(r))
            .map_err(Refusal::from),
        Request::CodecSample {} => {
            let (samples, zero_fraction) = source::sample_pages(vm.movable());
            Ok(json!(CodecSamples {
                codec_samples: samples,
                zero_fraction,
            }))
        }
        Request::SetWorkload {
            dirty_pages_per_sec,
        } => crate::vmm::config::check_dirty_rate(dirty_pages_per_sec)
            .map_err(invalid)
            .and_then(|()| {
                m.set_dirty_rate(dirty_pages_per_sec)
                    .map(|()| {
                        json!(WorkloadSet {
                            dirty_pages_per_sec
                        })
                    })
                    .map_err(Refusal::from)
            }),
        Request::DirtySample { duration_ms } => {
            let ms = duration_ms.unwrap_or(1000);
            if DIRTY_SAMPLE_MS.contains(&ms) {
                m.dirty_sample(Duration::from_millis(ms), client_gone, &|| vm.migrating())
                    .map(|r| json!(r))
                    .map_err(Refusal::from)
            } else {
                Err(invalid(format!(
                    "duration_ms = {ms} is outside {}..={}",
                    DIRTY_SAMPLE_MS.start(),
                    DIRTY_SAMPLE_MS.end()
                )))
            }
        }
        Request::Migrate(req) => start_migration(vm, *req).map_err(Refusal::from),
        Request::StorageMigrate {
            to,
            disk,
            mode,
            remove_source,
            throttle_writes_bytes_per_sec,
            report,
        } => start_storage_migration(
            vm,
            (to, disk),
            mode.unwrap_or_default(),
            (remove_source, throttle_writes_bytes_per_sec),
            report,
        )
        .map_err(Refusal::from),
        Request::StartPostcopy {} => match phase {
            Some(source::Phase::Precopy) if migrating => {
                vm.postcopy_requested.store(true, Ordering::Release);
                Ok(json!(PostcopyRequested {
                    postcopy: "requested".into(),
                }))
            }
            _ if migrating => Err(conflict("post-copy can only start during pre-copy")),
            _ => Err(not_found("no migration is running")),
        },
        Request::ResumeMigration {} => match phase {
            Some(source::Phase::PostcopyPaused) => {
                vm.resume.store(true, Ordering::Release);
                Ok(json!(Resuming { resuming: true }))
            }
            _ => Err(not_found(
                "no post-copy is waiting for its link to come back",
            )),
        },
        Request::SetParams { settings, reasons } => source::set_params(vm, &settings, &reasons)
            .map(|s| json!(s))
            .map_err(Refusal::from),
        Request::Cancel {} => {
            if matches!(
                phase,
                Some(source::Phase::Postcopy | source::Phase::PostcopyPaused)
            ) {
                Err(conflict(
                    "post-copy has started: the guest runs on the destination and cannot come \
                     back; the migration can only finish",
                ))
            } else if migrating || moving_disks {
                vm.cancel.store(true, Ordering::Release);
                Ok(json!(Cancelling {
                    cancelling: true,
                    what: None,
                }))
            } else if m.dirty_sample_lock.try_lock().is_err() {
                m.dirty_sample_end.store(true, Ordering::Release);
                Ok(json!(Cancelling {
                    cancelling: true,
                    what: Some("dirty-sample".into()),
                }))
            } else {
                Err(not_found("no migration or dirty-rate sample is running"))
            }
        }
        Request::Resolve {} if lock(&vm.progress).is_none() => {
            Err(not_found("no migration to resolve"))
        }
        Request::Resolve {} => source::resolve(vm).map(|r| json!(r)).map_err(Refusal::from),
        Request::Quit { .. } => unreachable!("answered above"),
    };
    result.map(|v| (v, false))
}

/// `quit`: refused while a migration moves the VM (stopping it then could leave it
/// running nowhere), unless forced.
fn quit(
    vm: &Migratable,
    force: bool,
    moving: bool,
    phase: Option<source::Phase>,
) -> Result<Value, Refusal> {
    if moving && !force {
        let how = if matches!(
            phase,
            Some(source::Phase::Postcopy | source::Phase::PostcopyPaused)
        ) {
            "post-copy has started, so the guest already runs on the destination: wait for \
             the migration to finish"
        } else {
            "cancel it first (`ferry cancel`; the VM keeps running here), then quit"
        };
        return Err(busy(format!(
            "a migration is moving this VM; quitting now would stop it before the destination \
             has it: {how}. `ferry quit --force` stops it anyway"
        )));
    }
    if moving {
        tracing::warn!("quit --force during a migration: the migration is abandoned");
        vm.cancel.store(true, Ordering::Release);
    }
    Ok(json!(quitting()))
}

/// Why `storage-migrate` did not start one.
#[derive(Debug, thiserror::Error)]
enum StorageStartError {
    #[error("throttle_writes_bytes_per_sec must be at least {MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC}")]
    ZeroThrottle,
    #[error("the destination {} is not a folder", .0.display())]
    NotAFolder(PathBuf),
    #[error("the destination {}: {source}", .path.display())]
    Destination {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no disk {0:?} in this VM")]
    NoSuchDisk(String),
    #[error("this VM has no disks")]
    NoDisks,
    #[error("the vm is {0}")]
    State(RunState),
    #[error("a storage migration is already running")]
    AlreadyRunning,
    #[error("cannot start the storage migration thread: {0}")]
    Thread(std::io::Error),
}

impl Kinded for StorageStartError {
    fn kind(&self) -> ErrorKind {
        match self {
            StorageStartError::ZeroThrottle
            | StorageStartError::NotAFolder(_)
            | StorageStartError::Destination { .. } => ErrorKind::InvalidRequest,
            StorageStartError::NoSuchDisk(_) | StorageStartError::NoDisks => ErrorKind::NotFound,
            StorageStartError::State(_) => ErrorKind::Conflict,
            StorageStartError::AlreadyRunning => ErrorKind::Busy,
            StorageStartError::Thread(_) => ErrorKind::Failed,
        }
    }
}

fn start_storage_migration(
    vm: &Arc<Migratable>,
    (to, disk): (PathBuf, Option<String>),
    mode: storage::StorageMode,
    (remove_source, throttle_writes_bytes_per_sec): (bool, Option<u64>),
    report: Option<PathBuf>,
) -> Result<Value, StorageStartError> {
    let m = &vm.machine;
    if throttle_writes_bytes_per_sec.is_some_and(|b| b < MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC) {
        return Err(StorageStartError::ZeroThrottle);
    }
    if !to.is_dir() {
        return Err(StorageStartError::NotAFolder(to));
    }
    let to = to
        .canonicalize()
        .map_err(|source| StorageStartError::Destination {
            path: to.clone(),
            source,
        })?;
    if let Some(id) = &disk
        && !m.disks.disks.iter().any(|d| &d.id == id)
    {
        return Err(StorageStartError::NoSuchDisk(id.clone()));
    }
    if m.disks.disks.is_empty() {
        return Err(StorageStartError::NoDisks);
    }
    if !matches!(m.state(), RunState::Running | RunState::Paused) {
        return Err(StorageStartError::State(m.state()));
    }
    {
        let mut slot = lock(&vm.storage);
        if slot.as_ref().is_some_and(|p| p.report.is_none()) {
            return Err(StorageStartError::AlreadyRunning);
        }
        *slot = Some(storage::StorageProgress {
            phase: storage::StoragePhase::Starting,
            disk: String::new(),
            bytes_copied: 0,
            round: 0,
            remaining_blocks: 0,
            mode,
            report: None,
        });
        vm.cancel.store(false, Ordering::Release);
    }
    let params = storage::Params {
        to,
        disk,
        mode,
        remove_source,
        throttle_writes: throttle_writes_bytes_per_sec,
        report,
        config_path: m
            .config_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    };
    let vm = vm.clone();
    std::thread::Builder::new()
        .name("storage-migration".into())
        .spawn(move || {
            storage::run(vm, params);
        })
        .map_err(StorageStartError::Thread)?;
    Ok(json!(Started { started: true }))
}

/// Why `migrate` did not start one.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("precopy_pass only applies to mode postcopy")]
    PrecopyPassNeedsPostcopy,
    #[error("copy_storage works with mode precopy")]
    CopyStorageNeedsPrecopy,
    #[error("disk_write_limit_bytes_per_sec applies to disks that travel (copy_storage)")]
    DiskLimitNeedsCopyStorage,
    #[error("disk_mirror = \"active\" applies to disks that travel (copy_storage)")]
    ActiveMirrorNeedsCopyStorage,
    #[error("{0}")]
    DiskWriteLimit(String),
    #[error("max_downtime_ms must be at least 1")]
    ZeroDowntime,
    #[error("throttle_pct = {0} is outside 0..=99")]
    Throttle(u32),
    #[error("max_total_secs, timeout_secs and recover_secs must be at least 1")]
    ZeroTime,
    #[error("the vm is {0}, not running")]
    NotRunning(RunState),
    #[error("{0}")]
    Unresolvable(source::MigrateError),
    #[error("{0}")]
    Unreachable(source::MigrateError),
    #[error("a migration is already running")]
    AlreadyRunning,
    #[error(
        "no TLS for the migration stream: give this host's certificate, key and CA \
         (--tls-cert, --tls-key, --tls-ca), or --insecure for plain TCP"
    )]
    NoTls,
    #[error("tls and insecure exclude each other")]
    TlsAndInsecure,
    #[error("{0}")]
    Tls(crate::pki::PkiError),
    #[error("{0}")]
    Handshake(source::MigrateError),
    #[error("cannot start the migration thread: {0}")]
    Thread(std::io::Error),
}

impl Kinded for StartError {
    fn kind(&self) -> ErrorKind {
        match self {
            StartError::NotRunning(_) => ErrorKind::Conflict,
            StartError::Unreachable(_) => ErrorKind::Unavailable,
            StartError::Handshake(_) => ErrorKind::Failed,
            StartError::AlreadyRunning => ErrorKind::Busy,
            StartError::Thread(_) => ErrorKind::Failed,
            _ => ErrorKind::InvalidRequest,
        }
    }
}

fn start_migration(vm: &Arc<Migratable>, req: Migrate) -> Result<Value, StartError> {
    let m = &vm.machine;
    let Migrate {
        to,
        settings: req,
        max_total_secs,
        timeout_secs,
        report,
        no_verify,
        mode,
        recover_secs,
        precopy_pass,
        copy_storage,
        reasons,
        ticket,
        traceparent,
        tls,
        insecure,
    } = req;
    let verify = !no_verify;
    let mode = mode.unwrap_or_default();
    if precopy_pass && mode != source::Mode::Postcopy {
        return Err(StartError::PrecopyPassNeedsPostcopy);
    }
    if copy_storage && mode != source::Mode::Precopy {
        return Err(StartError::CopyStorageNeedsPrecopy);
    }
    source::check_disk_write_limit(req.disk_write_limit_bytes_per_sec)
        .map_err(StartError::DiskWriteLimit)?;
    let settings = Settings::default().with(&req);
    if !copy_storage && settings.disk_write_limit_bytes_per_sec.is_some() {
        return Err(StartError::DiskLimitNeedsCopyStorage);
    }
    if !copy_storage && req.disk_mirror == Some(DiskMirror::Active) {
        return Err(StartError::ActiveMirrorNeedsCopyStorage);
    }
    if settings.max_downtime_ms == 0 {
        return Err(StartError::ZeroDowntime);
    }
    if settings.throttle_pct > 99 {
        return Err(StartError::Throttle(settings.throttle_pct));
    }
    if matches!(max_total_secs, Some(0))
        || matches!(timeout_secs, Some(0))
        || matches!(recover_secs, Some(0))
    {
        return Err(StartError::ZeroTime);
    }
    let transport = match (tls, insecure) {
        (Some(_), true) => return Err(StartError::TlsAndInsecure),
        (None, false) => return Err(StartError::NoTls),
        (None, true) => Transport::Insecure,
        (Some(f), false) => Transport::Tls(Arc::new(
            MigrationTls::load(&f.cert, &f.key, &f.ca).map_err(StartError::Tls)?,
        )),
    };
    if m.state() != RunState::Running {
        return Err(StartError::NotRunning(m.state()));
    }
    // Reached before "started" is said: a destination that cannot be reached or
    // proved is an answer now, not a failed report later.
    let conn = source::dial(&transport, &to, Duration::from_secs(5)).map_err(|e| match e {
        source::MigrateError::Resolve(_) => StartError::Unresolvable(e),
        source::MigrateError::Handshake(_) => StartError::Handshake(e),
        _ => StartError::Unreachable(e),
    })?;
    {
        let mut slot = lock(&vm.progress);
        if slot.as_ref().is_some_and(|p| p.report.is_none()) {
            return Err(StartError::AlreadyRunning);
        }
        if m.state() != RunState::Running {
            return Err(StartError::NotRunning(m.state()));
        }
        // Claimed here, under the lock, so two requests cannot both start one.
        *slot = Some(source::starting(&to, &settings));
        vm.cancel.store(false, Ordering::Release);
        vm.postcopy_requested.store(false, Ordering::Release);
        vm.resume.store(false, Ordering::Release);
        // A new migration's handshake names it; the last one's names go.
        *lock(&vm.session) = None;
        *lock(&vm.transport) = Some(transport.clone());
        // A dirty-rate sample holding the log ends now rather than delay this.
        m.dirty_sample_end.store(true, Ordering::Release);
    }
    let params = source::Params {
        to,
        report,
        max_total: max_total_secs.map(Duration::from_secs),
        timeout: Duration::from_secs(timeout_secs.unwrap_or(5)),
        verify,
        settings,
        mode,
        recover: Duration::from_secs(recover_secs.unwrap_or(60)),
        precopy_pass,
        copy_storage,
        reasons,
        ticket: ticket.unwrap_or_default(),
        traceparent: traceparent.unwrap_or_default(),
        transport,
    };
    let vm = vm.clone();
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            source::run(vm, params, conn);
        })
        .map_err(StartError::Thread)?;
    Ok(json!(Started { started: true }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines(input: &[u8]) -> Vec<Line> {
        let mut r = std::io::BufReader::with_capacity(1024, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some(l) = read_line(&mut r, &mut buf).unwrap() {
            assert!(
                buf.capacity() <= 2 * (MAX_REQUEST as usize + 1),
                "{}",
                buf.capacity()
            );
            out.push(l);
        }
        out
    }

    #[test]
    fn an_oversized_line_is_one_refusal_and_none_of_it_runs() {
        let mut smuggled = br#"{"cmd":"status","x":""#.to_vec();
        smuggled.resize(128 << 10, b'A');
        smuggled.extend_from_slice(b"{\"cmd\":\"pause\"}\n{\"cmd\":\"status\"}\n");
        let got = lines(&smuggled);
        assert_eq!(
            got,
            vec![
                Line::TooLong((128 << 10) + 16),
                Line::Request(r#"{"cmd":"status"}"#.into())
            ]
        );
        assert_eq!(
            lines(b"\xff\xfe\n{}\n"),
            vec![Line::NotUtf8, Line::Request("{}".into())]
        );
        // Exactly at the limit is still a request.
        let mut edge = vec![b' '; MAX_REQUEST as usize];
        edge.push(b'\n');
        assert_eq!(lines(&edge), vec![Line::Request(String::new())]);
    }

    proptest! {
        /// Arbitrary bytes: no panic, bounded memory, and one answer per line (the
        /// newlines outside oversized lines, plus an unterminated tail).
        #[test]
        fn arbitrary_bytes_give_one_line_per_newline(
            chunks in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..200),
                    (1usize..3).prop_map(|n| vec![b'x'; n * MAX_REQUEST as usize]),
                ],
                0..6,
            )
        ) {
            let input: Vec<u8> = chunks.concat();
            let got = lines(&input);
            let newlines = input.iter().filter(|&&b| b == b'\n').count();
            let tail = usize::from(!input.is_empty() && input.last() != Some(&b'\n'));
            prop_assert!(got.len() <= newlines + tail);
            for l in &got {
                if let Line::Request(text) = l {
                    prop_assert!(text.len() as u64 <= MAX_REQUEST);
                    // Whatever parses or not, answering never panics.
                    let _ = serde_json::from_str::<Request>(text);
                }
            }
        }
    }

    #[test]
    fn every_refusal_says_its_kind() {
        let gone = || false;
        let (a, quit) = dispatch("{not json", None, None, &gone);
        assert_eq!(a["ok"], false);
        assert_eq!(a["kind"], "invalid-request", "{a}");
        assert!(!quit);
        let (a, _) = dispatch(r#"{"cmd":"pause"}"#, None, None, &gone);
        assert_eq!(a["kind"], "unavailable", "{a}");
        assert_eq!(ErrorKind::Unavailable.http_status(), 503);
        let m: Refusal = VerifyError::Paused.into();
        assert_eq!(
            (m.kind, m.message.as_str()),
            (ErrorKind::Conflict, "the VM is paused; resume it first")
        );
        assert_eq!(
            Refusal::from(DirtySampleError::LogInUse).kind,
            ErrorKind::Busy
        );
        assert_eq!(
            Refusal::from(source::ResolveError::NoMigration).kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            Refusal::from(source::ResolveError::Address(
                source::MigrateError::Connect {
                    to: "h:1".into(),
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                }
            ))
            .kind,
            ErrorKind::Unavailable
        );
        assert_eq!(
            Refusal::from(snapshot::SnapshotError::Exists("/s".into())).kind,
            ErrorKind::Conflict
        );
        assert_eq!(Refusal::from("x".to_string()).kind, ErrorKind::Failed);
        // Each operation's errors carry their kind with them.
        let r: Refusal = StartError::AlreadyRunning.into();
        assert_eq!(
            (r.kind, r.message.as_str()),
            (ErrorKind::Busy, "a migration is already running")
        );
        let r: Refusal = StartError::NotRunning(RunState::Paused).into();
        assert_eq!(
            (r.kind, r.message.as_str()),
            (ErrorKind::Conflict, "the vm is paused, not running")
        );
        assert_eq!(
            Refusal::from(StartError::ZeroTime).kind,
            ErrorKind::InvalidRequest
        );
        assert_eq!(
            Refusal::from(StorageStartError::NoDisks).kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            Refusal::from(StorageStartError::State(RunState::Crashed)).message,
            "the vm is crashed"
        );
    }

    #[test]
    fn requests_parse_and_unknown_fields_are_refused() {
        assert!(matches!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#),
            Ok(Request::Status {})
        ));
        assert!(matches!(
            serde_json::from_str::<Request>(r#"{"cmd":"snapshot","out":"/x"}"#),
            Ok(Request::Snapshot { .. })
        ));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"snapshot"}"#).is_err());
        let r: Request = serde_json::from_str(
            r#"{"cmd":"migrate","to":"h:1","bandwidth_bytes_per_sec":100000000}"#,
        )
        .unwrap();
        match r {
            Request::Migrate(m) => {
                assert_eq!(m.to, "h:1");
                let s = Settings::default().with(&m.settings);
                assert_eq!(s.bandwidth_bytes_per_sec, Some(100_000_000));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            serde_json::from_str::<Request>(r#"{"cmd":"set-params","throttle":5}"#).is_err(),
            "a misspelt setting must not pass silently"
        );
    }

    #[test]
    fn a_disk_write_limit_is_bytes_per_second_and_zero_lifts_it() {
        // What a set-params leaves in force over a cap of 2 MB/s, or why it refuses.
        let limit = |json: &str| match serde_json::from_str::<Request>(json).unwrap() {
            Request::SetParams { settings, .. } => {
                source::check_disk_write_limit(settings.disk_write_limit_bytes_per_sec).map(|()| {
                    Settings {
                        disk_write_limit_bytes_per_sec: Some(2_000_000),
                        ..Settings::default()
                    }
                    .with(&settings)
                    .disk_write_limit_bytes_per_sec
                })
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            limit(r#"{"cmd":"set-params","disk_write_limit_bytes_per_sec":6500000}"#),
            Ok(Some(6_500_000))
        );
        assert_eq!(
            limit(r#"{"cmd":"set-params","disk_write_limit_bytes_per_sec":0}"#),
            Ok(None)
        );
        assert_eq!(limit(r#"{"cmd":"set-params"}"#), Ok(Some(2_000_000)));
        assert!(
            serde_json::from_str::<Request>(
                r#"{"cmd":"set-params","disk_write_limit_bytes_per_sec":-1}"#
            )
            .is_err()
        );
        // Below the floor a guest write would stall its vCPU.
        let e = limit(r#"{"cmd":"set-params","disk_write_limit_bytes_per_sec":1000}"#).unwrap_err();
        assert!(e.contains("disk_write_limit_bytes_per_sec"), "{e}");
    }
}
