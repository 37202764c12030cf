//! The receiving side of a migration: `ferry vmm --incoming`. It builds the VM from
//! the source's config as soon as it arrives (so memory is mapped long before the
//! switchover), writes pages straight into guest memory, restores the device state
//! as soon as it arrives, opens the disks on `Complete` and answers `Ready`, and runs
//! the guest only on `Commit`.

use crate::migration::secure::Conn;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use super::Lap;
use super::codec::CodecError;
use super::disk_stream::DiskStore;
use super::door::{Placement, Routed};
use super::migratable::Migratable;
use super::page_receiver::{PageReceiver, PageSink};
use super::postcopy_dst;
use super::priority;
use super::protocol::{self, Hello, Kind, Message, ProtocolError, Session};
use crate::bitmap::Bitmap;
use crate::guest::abi::PAGE_SIZE;
use crate::sync::lock;
use crate::vmm::blob::{self, BlobKind};
use crate::vmm::block::DiskSet;
use crate::vmm::boot::Vm;
use crate::vmm::config::VmConfig;
use crate::vmm::launch;
use crate::vmm::machine::Machine;
use crate::vmm::prealloc::Prealloc;
use crate::vmm::prefault;
use crate::vmm::snapshot::MachineState;

const PAGE: usize = PAGE_SIZE as usize;

/// The VM a process serves once it exists (a destination's arrives by migration).
pub type Slot = Arc<Mutex<Option<Arc<Migratable>>>>;

#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("disk {id:?}: {why}")]
    DiskPlace { id: String, why: String },
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("the source sent {0:?} where it should not")]
    Unexpected(Kind),
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    #[error("the source's config: {0}")]
    Config(#[from] crate::vmm::config::ConfigError),
    #[error("the source's config has {config} MiB of memory but its hello said {hello} bytes")]
    MemoryMismatch { config: u64, hello: u64 },
    #[error("building the VM: {0}")]
    Launch(#[from] launch::LaunchError),
    #[error("the source's device state: {0}")]
    Blob(#[from] blob::BlobError),
    #[error("restoring the source's device state: {0}")]
    State(#[from] crate::vmm::state::StateError),
    #[error("the source completed without sending its device state")]
    NoState,
    #[error("the device state has {got} vCPUs, the config {want}")]
    VcpuMismatch { got: usize, want: u32 },
    #[error("opening the shared disks: {0}")]
    Disk(#[from] crate::vmm::block::DiskError),
    #[error("starting the vCPUs: {0}")]
    VcpuStart(#[from] crate::vmm::machine::VcpuStartError),
    #[error("{0}")]
    Resume(#[from] crate::vmm::machine::ResumeError),
    #[error("post-copy: {0}")]
    Postcopy(#[from] postcopy_dst::PostcopyError),
    #[error("{0}")]
    DiskStore(#[from] super::disk_stream::DiskStoreError),
}

/// Receives the migration whose `Hello` came on `conn`; its later connections (the
/// post-copy fault channel, recoveries) arrive on `routed`. Returns once the guest
/// runs here (the machine is then in `slot`) or waits here for its source's word (a
/// handover in doubt), or with the reason it never will; on an error nothing of
/// the migration is left but what is in `slot`, which the caller discards.
pub fn receive(
    conn: Conn,
    hello: Hello,
    session: Session,
    routed: &mpsc::Receiver<Routed>,
    slot: &Slot,
    (place, memory): (&Placement, Option<Prealloc>),
) -> Result<(), Failed> {
    let w = conn.try_clone().map_err(|e| Failed {
        error: ProtocolError::from(e).into(),
        answer: None,
    })?;
    let mut rx = Receiver {
        // Small: pages are read past it straight into guest memory (a bigger buffer
        // would take more of them in first, to copy them again), and it holds runs of
        // small frames (zero runs, keepalives) for one read.
        r: conn.reader(16 << 10),
        w,
        place,
        memory,
        config_path: None,
        last_sent: Instant::now(),
        answer_every: Duration::from_millis(u64::from(hello.timeout_ms.max(100)) / 4),
        refused: false,
    };
    rx.run(hello, session, routed, slot)
        .map_err(|error| Failed {
            error,
            answer: rx.refused.then_some(rx.w),
        })
}

/// A migration that failed here.
pub struct Failed {
    pub error: IncomingError,
    /// Where the source is owed an `Abort` naming `error` (None: the connection broke,
    /// or the source ended it). The connection stays open until this is dropped, so
    /// the caller tells the source only after letting go of everything the migration
    /// held: a source that retries at once must find the port free.
    pub answer: Option<Conn>,
}

/// Where each disk of `cfg` lives on this host's shared storage: the image of the
/// name the source sent in one of the `shared` folders, a regular file inside it
/// (a symlink may point elsewhere in the folder, never out of it).
pub fn shared_disks(cfg: &VmConfig, shared: &[PathBuf]) -> Result<Vec<PathBuf>, IncomingError> {
    cfg.disks
        .iter()
        .map(|d| {
            let name = d.path.to_string_lossy();
            for dir in shared {
                let candidate = dir.join(&d.path);
                if std::fs::symlink_metadata(&candidate).is_err() {
                    continue;
                }
                let bad = |why: String| IncomingError::DiskPlace {
                    id: d.id.clone(),
                    why,
                };
                let (Ok(real), Ok(folder)) = (candidate.canonicalize(), dir.canonicalize()) else {
                    return Err(bad(format!("{} does not resolve", candidate.display())));
                };
                if !real.starts_with(&folder) {
                    return Err(bad(format!(
                        "{} leads out of {} (to {})",
                        candidate.display(),
                        folder.display(),
                        real.display()
                    )));
                }
                if !std::fs::metadata(&real).is_ok_and(|m| m.file_type().is_file()) {
                    return Err(bad(format!(
                        "{} is not a regular file (a device or a folder?)",
                        real.display()
                    )));
                }
                return Ok(real);
            }
            Err(IncomingError::DiskPlace {
                id: d.id.clone(),
                why: if shared.is_empty() {
                    format!(
                        "image {name:?} is on shared storage, and this destination was given \
                         no --shared-dir to find it in (or --datastore for a copy)"
                    )
                } else {
                    format!(
                        "no image {name:?} in {} (disks sent along with --copy-storage need \
                         --datastore DIR here)",
                        shared
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            })
        })
        .collect()
}

/// Disk paths from the wire are names: one plain file name each, which this side
/// places itself.
pub fn check_wire_names(cfg: &VmConfig) -> Result<(), IncomingError> {
    for d in &cfg.disks {
        let mut parts = d.path.components();
        let plain = matches!(
            (parts.next(), parts.next()),
            (Some(std::path::Component::Normal(_)), None)
        );
        if !plain {
            return Err(IncomingError::DiskPlace {
                id: d.id.clone(),
                why: format!(
                    "the source named its image {:?}: disks travel as plain file names \
                     (no folders, no \"..\", not absolute)",
                    d.path
                ),
            });
        }
    }
    Ok(())
}

/// Decodes the source's device state and writes it into this VM's vCPUs and VM.
fn restore_state(
    blob: &[u8],
    cfg: &VmConfig,
    vm: &Vm,
    vcpus: &[VcpuFd],
) -> Result<MachineState, IncomingError> {
    let state: MachineState = blob::decode(BlobKind::MachineState, blob)?;
    if state.vcpus.len() != cfg.vcpus as usize {
        return Err(IncomingError::VcpuMismatch {
            got: state.vcpus.len(),
            want: cfg.vcpus,
        });
    }
    state.restore(&vm.fd, vcpus)?;
    Ok(state)
}

/// What the stream delivered up to `Complete`.
struct Received {
    /// Already written into the vCPUs and the VM.
    state: MachineState,
    /// `--copy-storage`: the disks' copies here.
    disks: Option<DiskStore>,
    /// Post-copy: the pages still to come once the guest runs here.
    postcopy: Option<Bitmap>,
    /// Held from the source's `Pausing` until the guest runs here.
    urgent: Option<priority::Urgent>,
}

struct Receiver<'a> {
    /// Where the disks go.
    place: &'a Placement,
    /// Guest memory faulted in while the port waited, if it was told the size.
    memory: Option<Prealloc>,
    /// The config written beside them, once the disks are complete.
    config_path: Option<std::path::PathBuf>,
    r: BufReader<Conn>,
    w: Conn,
    /// When this side last sent anything, and how often it must while the stream
    /// flows (a quarter of the source's timeout): the source takes a longer silence
    /// for a dead destination.
    last_sent: Instant,
    answer_every: Duration,
    /// The source is owed an `Abort` with the reason it failed.
    refused: bool,
}

impl Receiver<'_> {
    fn send(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        protocol::send(&mut self.w, msg)?;
        self.w.flush()?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Tells the source this side is alive, if it has not heard so for a while.
    fn keep_alive(&mut self) -> Result<(), ProtocolError> {
        if self.last_sent.elapsed() >= self.answer_every {
            self.send(&Message::Keepalive)?;
        }
        Ok(())
    }

    /// Marks the source as owed the reason, then returns the error. The reason is
    /// sent by whoever receives the [`Failed`], once nothing of the migration is left.
    fn refuse(&mut self, e: IncomingError) -> IncomingError {
        self.refused = true;
        e
    }

    fn run(
        &mut self,
        hello: Hello,
        session: Session,
        routed: &mpsc::Receiver<Routed>,
        slot: &Slot,
    ) -> Result<(), IncomingError> {
        if let Err(e) = protocol::check_hello(&hello) {
            return Err(self.refuse(e.into()));
        }
        // The source's keepalive promise: a silence longer than this is a dead peer.
        let timeout = Duration::from_millis(u64::from(hello.timeout_ms.max(100)));
        self.w
            .set_read_timeout(Some(timeout))
            .map_err(ProtocolError::from)?;
        self.send(&Message::HelloAck {
            version: protocol::VERSION,
            secret: session.secret,
        })?;
        let cfg = match protocol::recv(&mut self.r, None)? {
            Message::Config { toml } => {
                match VmConfig::parse_unresolved(&toml, Path::new("the migration stream"))
                    .map_err(IncomingError::from)
                    .and_then(|c| check_wire_names(&c).map(|()| c))
                {
                    Ok(c) => c,
                    Err(e) => return Err(self.refuse(e)),
                }
            }
            other => return Err(self.refuse(IncomingError::Unexpected(other.kind()))),
        };
        // Shared storage: found now, so a source that cannot succeed hears it before
        // any page moves (disks that travel are placed when they are announced).
        let shared = match (
            shared_disks(&cfg, &self.place.shared),
            &self.place.datastore,
        ) {
            (Err(e), None) => return Err(self.refuse(e)),
            (r, _) => r,
        };
        if cfg.memory_mib << 20 != hello.memory_bytes {
            return Err(self.refuse(IncomingError::MemoryMismatch {
                config: cfg.memory_mib,
                hello: hello.memory_bytes,
            }));
        }
        let mut populated = false;
        let memory = self.memory.take().and_then(|p| {
            let (have, done) = (p.bytes(), p.pages_done());
            match p.take(hello.memory_bytes) {
                Ok(region) => {
                    populated = done * PAGE as u64 == have;
                    tracing::info!(
                        "guest memory preallocated: {} of {} MiB faulted in",
                        (done * PAGE as u64) >> 20,
                        have >> 20
                    );
                    Some(region)
                }
                Err(_) => {
                    tracing::warn!(
                        "{} MiB were preallocated for a VM of {} MiB: let go, fresh memory \
                         is mapped",
                        have >> 20,
                        hello.memory_bytes >> 20
                    );
                    None
                }
            }
        });
        let (vm, dirty, vcpus) = match launch::prepare_in(&cfg, memory) {
            Ok(v) => v,
            Err(e) => return Err(self.refuse(e.into())),
        };
        // Now, not in the pause of a later migration of this VM.
        let msr_lists = match crate::vmm::state::probe_vcpus(&vm.kvm, &vcpus) {
            Ok(l) => l,
            Err(e) => return Err(self.refuse(e.into())),
        };
        self.send(&Message::Prepared)?;
        let pages = vm.layout.memory_bytes / PAGE as u64;
        // SAFETY: the mapping is memory_bytes long, and no vCPU runs until the
        // handover, so nothing else touches guest memory while pages land.
        let memory = unsafe { vm.memory_mut() };
        let t0 = Instant::now();
        // Pages never sent stay zero; the source sends every page at least once anyway.
        let mut crcs = vec![crc32fast::hash(&[0u8; PAGE]); pages as usize];
        let region = prefault::Region {
            base: vm.host_base() as usize,
            pages,
        };
        let ahead = prefault::Ahead::default();
        let received = std::thread::scope(|s| {
            // Memory preallocated whole needs no helper: it would only walk page
            // tables, on the core the sender needs.
            let helper = (!populated).then(|| {
                std::thread::Builder::new()
                    .name("prefault".into())
                    .spawn_scoped(s, || {
                        let n = prefault::run(region, &ahead);
                        ahead.finish();
                        n
                    })
                    .inspect_err(|e| {
                        tracing::debug!("no prefault helper ({e}); pages fault in as they land")
                    })
            });
            if !matches!(helper, Some(Ok(_))) {
                ahead.finish();
            }
            let r = self.receive_memory(memory, (pages, &cfg), &mut crcs, &ahead, (&vm, &vcpus));
            ahead.stop();
            r
        });
        let Received {
            state,
            postcopy,
            disks: store,
            urgent,
        } = match received {
            Ok(b) => b,
            Err(e) => return Err(self.refuse(e)),
        };
        tracing::info!("memory received in {:?}; opening disks", t0.elapsed());
        let mut lap = Lap::new();
        let mut cfg = cfg;
        let mut arrival = None;
        let opened = (|| -> Result<DiskSet, IncomingError> {
            if let Some(store) = store {
                // The copies are complete (the source sent the last blocks paused):
                // sync them and write the config that names them.
                let (named, copies) = store.finish(&cfg)?;
                cfg = named;
                arrival = Some(copies);
                self.config_path = cfg
                    .disks
                    .first()
                    .and_then(|d| d.path.parent())
                    .map(|f| f.join(format!("{}.toml", cfg.name)));
            } else {
                for (d, path) in cfg.disks.iter_mut().zip(shared?) {
                    d.path = path;
                }
            }
            Ok(DiskSet::open_existing(&cfg.disks)?)
        })();
        let disks = match opened {
            Ok(d) => d,
            Err(e) => return Err(self.refuse(e)),
        };
        lap.mark("disks opened");
        // Post-copy: the fault channel first, then the pages still on the source become
        // absent and userfaultfd takes over (before any vCPU can touch them).
        let postcopy = match postcopy {
            None => None,
            Some(missing) => {
                let prepared = (|| -> Result<_, IncomingError> {
                    let fault =
                        postcopy_dst::wait_fault_channel(routed, session, Duration::from_secs(10))?;
                    let tracker = Arc::new(postcopy_dst::Tracker::prepare(
                        region.base,
                        pages,
                        missing,
                        // Moved, not copied: a fresh megabyte costs a host page
                        // fault per page here, in the pause.
                        std::mem::take(&mut crcs),
                    )?);
                    // Serving faults before the guest can take one.
                    let faults = postcopy_dst::FaultThread::start(tracker.clone(), fault)
                        .map_err(ProtocolError::from)?;
                    Ok((tracker, faults))
                })();
                match prepared {
                    Ok(p) => Some(p),
                    Err(e) => return Err(self.refuse(e)),
                }
            }
        };
        lap.mark("post-copy prepared");
        let dev = state.devices;
        let mut machine = Machine::new(cfg, vm, vcpus, dirty, disks, dev.tsc_hz, dev.seed);
        machine.msr_lists = msr_lists;
        let machine = Arc::new(machine);
        *machine
            .config_path
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.config_path.clone();
        let served = Arc::new(Migratable::new(machine.clone()));
        // Held with the VM: dropped with it if this arrival is discarded.
        *lock(&served.arrival) = arrival.take();
        if let Some((tracker, _)) = &postcopy {
            *lock(&served.incoming) = Some(tracker.clone());
            *lock(&machine.absent) = Some(tracker.clone());
        }
        *machine.hold.lock().unwrap_or_else(|e| e.into_inner()) =
            Some("a migration is handing this VM over; waiting for the source's commit".into());
        machine.start(false)?;
        *lock(slot) = Some(served.clone());
        lap.mark("vCPU threads started");
        crate::failpoint::reach("destination.after-complete");
        self.send(&Message::Ready)?;
        lap.mark("ready sent");
        match protocol::recv(&mut self.r, None) {
            Ok(Message::Commit) => {}
            Ok(Message::Abort { reason }) => return Err(IncomingError::Aborted(reason)),
            Ok(other) => return Err(IncomingError::Unexpected(other.kind())),
            Err(e) => {
                // The source may or may not have sent Commit: stay paused, never guess.
                tracing::error!(
                    "handover in doubt: the connection broke after Ready ({e}); this copy stays paused"
                );
                *machine.hold.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                    "handover in doubt: the connection to the source broke after Ready ({e})"
                ));
                return Ok(());
            }
        }
        *machine.hold.lock().unwrap_or_else(|e| e.into_inner()) = None;
        lap.mark("commit received");
        if let Some(copies) = lock(&served.arrival).take() {
            copies.settle();
        }
        crate::failpoint::reach("destination.after-commit");
        machine.resume()?;
        lap.mark("resumed");
        drop(urgent);
        tracing::info!("migration complete: the guest runs here");
        // From here on the guest is ours: a lost connection only leaves the source in
        // doubt (it resolves with `ferry migrate --resolve`), it never stops this copy.
        if let Err(e) = self.send(&Message::Resumed) {
            tracing::warn!(
                "could not confirm the handover to the source ({e}); it will be in doubt"
            );
            if postcopy.is_none() {
                return Ok(());
            }
        }
        let digest = match postcopy {
            None => protocol::digest(&crcs),
            Some((tracker, faults)) => {
                let incoming = postcopy_dst::Incoming {
                    tracker: tracker.clone(),
                    machine: &machine,
                    routed,
                    session,
                    timeout,
                    recover: Duration::from_millis(u64::from(hello.recover_ms)),
                };
                let conn = self.r.get_ref().try_clone().map_err(ProtocolError::from)?;
                let r = std::mem::replace(&mut self.r, conn.reader(8 << 10));
                let (r, w) =
                    incoming.run(r, self.w.try_clone().map_err(ProtocolError::from)?, faults);
                self.r = r;
                self.w = w;
                tracing::info!("post-copy complete: every page is here");
                let _ = self.send(&Message::PostcopyDone(incoming.figures()));
                tracker.digest()
            }
        };
        let _ = self.send(&Message::MemoryDigest { digest });
        // Downtime is measured by the source from each vCPU's first heartbeat here.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut firsts = machine.first_heartbeats_ns();
        while firsts.contains(&0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
            firsts = machine.first_heartbeats_ns();
        }
        let _ = self.send(&Message::FirstHeartbeats { ns: firsts });
        Ok(())
    }

    /// Writes pages into guest memory until `Complete`; returns the device state.
    fn receive_memory(
        &mut self,
        memory: &mut [u8],
        (pages, cfg): (u64, &VmConfig),
        crcs: &mut [u32],
        ahead: &prefault::Ahead,
        (vm, vcpus): (&Vm, &[VcpuFd]),
    ) -> Result<Received, IncomingError> {
        let mut disks: Option<DiskStore> = None;
        let mut land = Landing {
            memory,
            crcs,
            ahead,
            zero_crc: crc32fast::hash(&[0u8; PAGE]),
            landed: Bitmap::new(pages),
            known: Bitmap::new(pages),
            absent: Bitmap::new(pages),
            postcopy: None,
        };
        let mut receiver = PageReceiver::new(pages);
        let mut state = None;
        let mut urgent = None;
        let mut frame = protocol::Frame {
            kind: Kind::Keepalive,
            payload: Vec::new(),
        };
        loop {
            self.keep_alive()?;
            let integrity = self.r.get_ref().integrity();
            let header = protocol::read_header(&mut self.r, protocol::MAX_PAYLOAD)?;
            if header.kind == Kind::Pages {
                receiver.read_in_place(&mut self.r, &header, integrity, &mut land)?;
                continue;
            }
            protocol::read_payload(&mut self.r, &header, &mut frame.payload, integrity)?;
            frame.kind = header.kind;
            if receiver.apply(&frame, &mut land)? {
                continue;
            }
            match Message::decode(&frame, Some(pages))? {
                Message::RoundEnd { round } => {
                    // After the first full pass every page has landed or is known to be
                    // zero: faulting in more would only spend CPU and host memory.
                    ahead.stop();
                    if let Some(us) = disks.as_ref().and_then(DiskStore::round_ended) {
                        self.send(&Message::DiskSynced { us })?;
                    }
                    self.send(&Message::RoundAck { round })?
                }
                Message::Ping { seq } => {
                    self.send(&Message::Pong { seq })?;
                }
                Message::Keepalive => {}
                Message::Pausing => {
                    urgent.get_or_insert_with(priority::Urgent::enter);
                }
                Message::Postcopy { missing } => {
                    // Pages that landed but changed since are dropped now (the source
                    // sends these while its guest still runs, so the work stays out of
                    // the pause); they come back on demand.
                    // Pages that never landed are dropped too: the prefault helper
                    // (stopped for good now) may have populated them.
                    ahead.stop_and_wait();
                    land.stale(&Bitmap::from_words(pages, &missing))?;
                }
                Message::Disks { disks: announced } => {
                    let store =
                        DiskStore::create(self.place.datastore.as_deref(), cfg, &announced)?;
                    let t = store.timing();
                    disks = Some(store);
                    self.send(&Message::DisksReady {
                        flush_us: t.flush_us,
                        write_us: t.write_us,
                        bytes: t.bytes,
                    })?;
                }
                Message::DiskData {
                    disk,
                    offset,
                    len,
                    encoding,
                    data,
                } => match &mut disks {
                    Some(store) => store.write(disk, offset, len, encoding, &data)?,
                    None => return Err(IncomingError::Unexpected(Kind::DiskData)),
                },
                Message::DiskLog { disk, records } => match &disks {
                    Some(store) => store.write_log(disk, &records)?,
                    None => return Err(IncomingError::Unexpected(Kind::DiskLog)),
                },
                // Restored at once, while the pages sent after it are still coming:
                // restoring writes no guest memory, and it is then out of the pause.
                Message::DeviceState { blob } => {
                    let t = Instant::now();
                    state = Some(restore_state(&blob, cfg, vm, vcpus)?);
                    tracing::debug!("device state restored in {:?}", t.elapsed());
                }
                Message::Complete { .. } => {
                    return Ok(Received {
                        state: state.ok_or(IncomingError::NoState)?,
                        postcopy: land.missing()?,
                        disks,
                        urgent,
                    });
                }
                Message::Abort { reason } => return Err(IncomingError::Aborted(reason)),
                other => return Err(IncomingError::Unexpected(other.kind())),
            }
        }
    }
}

/// Pre-copy's page sink: guest memory no vCPU runs on yet, and what the destination
/// must know about each page should post-copy follow.
struct Landing<'a> {
    memory: &'a mut [u8],
    crcs: &'a mut [u32],
    ahead: &'a prefault::Ahead,
    zero_crc: u32,
    /// Pages that received data. Fresh guest memory is zero: zero runs over pages that
    /// never received data need not be written, and touching them would cost a host
    /// page fault each.
    landed: Bitmap,
    /// Landed or announced as zero: what post-copy need not fetch.
    known: Bitmap,
    /// Dropped, and nothing landed since: absent from memory already.
    absent: Bitmap,
    /// Once post-copy is announced: the pages it must fetch.
    postcopy: Option<Bitmap>,
}

impl Landing<'_> {
    /// Pages that changed on the source after they landed (announced while its guest
    /// still runs, so the work stays out of the pause): dropped now, fetched on demand.
    /// Pages that never landed are dropped too: the prefault helper (stopped for good
    /// by now) may have populated them.
    fn stale(&mut self, stale: &Bitmap) -> Result<(), IncomingError> {
        let mut drop = stale.clone();
        drop.and_not_assign(&self.absent);
        postcopy_dst::discard(self.memory.as_mut_ptr() as usize, &drop)?;
        self.absent.or_assign_words(drop.words());
        let pages = self.known.pages();
        self.postcopy
            .get_or_insert_with(|| Bitmap::new(pages))
            .or_assign_words(stale.words());
        Ok(())
    }

    /// At `Complete`: the pages post-copy must fetch, if it follows — the stale ones
    /// and whatever never came (the prefault helper may have populated some of it with
    /// zeroes).
    fn missing(&mut self) -> Result<Option<Bitmap>, IncomingError> {
        let Some(mut m) = self.postcopy.take() else {
            return Ok(None);
        };
        let never = self.known.complement();
        let mut drop = never.clone();
        drop.and_not_assign(&self.absent);
        postcopy_dst::discard(self.memory.as_mut_ptr() as usize, &drop)?;
        m.or_assign_words(never.words());
        Ok(Some(m))
    }

    fn mark(&mut self, page: u64) {
        self.known.set(page);
        // Sent again after it was declared stale: current now.
        if let Some(m) = self.postcopy.as_mut() {
            m.unset(page);
        }
    }
}

impl PageSink for Landing<'_> {
    type Error = IncomingError;

    fn memory(&mut self) -> Option<&mut [u8]> {
        Some(self.memory)
    }

    fn wrote(&mut self, page: u64, crc: u32) -> Result<(), IncomingError> {
        self.crcs[page as usize] = crc;
        self.landed.set(page);
        self.absent.unset(page);
        self.ahead.landed(page);
        self.mark(page);
        Ok(())
    }

    /// Never reached: this sink's memory is always there.
    fn fill(&mut self, _page: u64, _data: &[u8]) -> Result<(), IncomingError> {
        Err(IncomingError::Unexpected(Kind::Pages))
    }

    fn zeros(&mut self, first: u64, count: u64) -> Result<(), IncomingError> {
        for page in first..first + count {
            if self.landed.is_set(page) {
                let at = page as usize * PAGE;
                self.memory[at..at + PAGE].fill(0);
                self.absent.unset(page);
            }
            self.mark(page);
        }
        self.crcs[first as usize..(first + count) as usize].fill(self.zero_crc);
        Ok(())
    }
}
