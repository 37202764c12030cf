//! Disks travelling with a migration (`--copy-storage`), for hosts that share no
//! storage. The source sends every disk's data once (holes stay holes), then with each
//! pre-copy round the blocks the guest wrote meanwhile (the VMM sees every write), and
//! the last ones while the VM is paused. The destination writes them into images of
//! its own under `DATASTORE/<vm name>/`, and at the end a config there that names them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::codec::{Codec, Decompressor, Stored};
use super::protocol::{self, DISK_ZERO, MAX_DISK_CHUNK, Message};
use super::source::{MigrateError, Sender};
use super::storage::{Aligned, RUN_BLOCKS, data_blocks, pieces, steps, write_zeroes_at};
use super::wire::Wire;
use crate::bitmap::Bitmap;
use crate::vmm::block::{COPY_BLOCK, CopyJob, Mirror, WriteThrottle, log_path};
use crate::vmm::config::VmConfig;

/// A first copy shorter than this says little of its rate: the socket buffers take a
/// few megabytes at once.
const MEASURED_COPY_BYTES: u64 = 32 << 20;
/// Blocks the written-block sample encodes (over all disks, about), and how often it
/// is taken again (the guest's data changes as it writes): 512 KiB, a few ms of one
/// core under zstd.
const WRITTEN_SAMPLE_BLOCKS: u64 = 8;
const WRITTEN_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// A `DiskData` payload's fields before its data (disk, offset, length, encoding).
const DISK_DATA_FIELDS: usize = 4 + 8 + 4 + 1;

/// A run of disk bytes as it goes on the wire (`DiskData`): where it starts in what
/// was read, how long it is, and its encoding and data.
struct Piece {
    start: usize,
    len: u32,
    encoding: u8,
    data: Vec<u8>,
}

pub use ferry_api::DiskMirror;

/// A disk's copy at the destination, fed the guest's writes on the migration stream
/// itself (so they keep their order with the rounds' copies of the same blocks).
#[derive(Debug)]
struct NetMirror {
    disk: u32,
    wire: Wire,
    /// Guest bytes mirrored, summed over the disks.
    bytes: Arc<AtomicU64>,
}

impl Mirror for NetMirror {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut frames = Vec::with_capacity(data.len() + 256);
        for (n, part) in data.chunks(MAX_DISK_CHUNK as usize).enumerate() {
            let at = offset + (n * MAX_DISK_CHUNK as usize) as u64;
            // Raw: compressing on the guest's vCPU thread would slow its writes more
            // than the link does.
            for (range, is_zero) in pieces(part) {
                let msg = Message::DiskData {
                    disk: self.disk,
                    offset: at + range.start as u64,
                    len: range.len() as u32,
                    encoding: if is_zero {
                        DISK_ZERO
                    } else {
                        super::codec::wire_id(Codec::None)
                    },
                    data: if is_zero {
                        Vec::new()
                    } else {
                        part[range].to_vec()
                    },
                };
                protocol::send(&mut frames, &msg).map_err(std::io::Error::other)?;
            }
        }
        self.wire.send_now(&frames)?;
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl Sender<'_> {
    /// Announces the disks, starts noting guest writes, and sends every block that
    /// holds data.
    pub(super) fn disks_start(&mut self) -> Result<(), MigrateError> {
        let disks = &self.m.disks().disks;
        self.send(&Message::Disks {
            disks: disks.iter().map(|d| (d.id.clone(), d.size)).collect(),
        })?;
        // The destination creates its copies and times its datastore first: what the
        // pause's sync will cost there, known before the copy begins.
        self.w.flush().map_err(protocol::ProtocolError::from)?;
        match self.recv()? {
            Message::DisksReady {
                flush_us,
                write_us,
                bytes,
            } => {
                self.stats.dst_datastore = Some(DatastoreTiming {
                    flush_us,
                    write_us,
                    bytes,
                })
            }
            Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
            _ => return Err(MigrateError::Unexpected("something other than DisksReady")),
        }
        self.stats.disk_size = disks.iter().map(|d| d.size).sum();
        let mut todo = Vec::new();
        // The live settings: a change made since this thread last looked counts.
        let settings = crate::sync::lock(&self.vm.live)
            .as_ref()
            .map_or(self.settings, |l| l.settings);
        for (i, d) in disks.iter().enumerate() {
            let blocks = d.size.div_ceil(COPY_BLOCK);
            // Noting writes first, then looking for data: a write into a hole during
            // the scan is caught either way.
            *d.job() = Some(CopyJob {
                target: None,
                dirty: Bitmap::new(blocks),
                active: settings.disk_mirror == DiskMirror::Active,
                added_us: Vec::new(),
                throttle: settings
                    .disk_write_limit_bytes_per_sec
                    .map(WriteThrottle::new),
                mirror: Some(Arc::new(NetMirror {
                    disk: i as u32,
                    wire: self.w.clone(),
                    bytes: self.stats.disk_mirrored.clone(),
                })),
                written: 0,
                activations: 0,
            });
            let file = d
                .reopen_read()
                .map_err(|e| MigrateError::Vm(format!("disk {}: {e}", d.id)))?;
            let mut set = Bitmap::new(blocks);
            for b in data_blocks(&file, d.size) {
                set.set(b);
            }
            todo.push(set);
        }
        let started = std::time::Instant::now();
        let (wire0, send0) = (self.stats.bytes_on_wire, self.stats.send_time);
        self.stats.disk_round_at = Some(started);
        self.copy_mark = None;
        self.disks_send(todo, true, false)?;
        // The first copy's rate end to end: where the destination writes its copies
        // slower than the link carries them, it holds the stream back, and disk bytes
        // then cost their time at this rate, not the link's. Only a copy long enough
        // to be past the socket buffers says so.
        self.w.flush().map_err(protocol::ProtocolError::from)?;
        let secs = started.elapsed().as_secs_f64();
        self.stats.disk_copy = (
            self.stats.bytes_on_wire - wire0,
            self.stats.send_time.saturating_sub(send0),
            started.elapsed(),
        );
        if self.stats.disk_bytes >= MEASURED_COPY_BYTES && secs > 0.0 {
            self.stats.disk_copy_rate = Some(self.stats.disk_bytes as f64 / secs);
        }
        Ok(())
    }

    /// While the disks' first copy runs: its rate since the socket buffers' burst (the
    /// first [`MEASURED_COPY_BYTES`]), once two seconds say it (the buffers keep
    /// growing for a while), so a datastore slower than the link shows before the
    /// copy ends (which replaces it with the whole copy's).
    fn first_copy_rate_so_far(&mut self) {
        let now = std::time::Instant::now();
        let bytes = self.stats.disk_bytes;
        match self.copy_mark {
            None if bytes >= MEASURED_COPY_BYTES => self.copy_mark = Some((now, bytes)),
            Some((at, from)) => {
                let secs = (now - at).as_secs_f64();
                if secs >= 2.0 {
                    self.stats.disk_copy_rate = Some((bytes - from) as f64 / secs);
                }
            }
            None => {}
        }
    }

    /// The guest's disk dirty rate from what it dirtied since the dirty sets were
    /// last taken (once that is long enough to say).
    pub(super) fn measure_disk_dirtying(&mut self) {
        let Some(at) = self.stats.disk_round_at else {
            return;
        };
        let secs = at.elapsed().as_secs_f64();
        if secs >= 0.1 {
            self.stats.disk_dirty_rate = Some(self.disks_dirty_bytes() as f64 / secs);
            let written: u64 = self
                .m
                .disks()
                .disks
                .iter()
                .map(|d| d.job().as_ref().map_or(0, |j| j.written))
                .sum();
            self.stats.disk_write_rate = Some(written as f64 / secs);
        }
    }

    /// Blocks written since they were last sent, summed over the disks.
    pub(super) fn disks_dirty_bytes(&self) -> u64 {
        self.m
            .disks()
            .disks
            .iter()
            .map(|d| d.job().as_ref().map_or(0, |j| j.dirty.count()) * COPY_BLOCK)
            .sum()
    }

    /// Sends what the guest wrote since the last call (or, with the VM paused, the
    /// last of it; `last` also ends the noting).
    pub(super) fn disks_round(&mut self, last: bool) -> Result<(), MigrateError> {
        // Before the dirty sets are taken: they are what was dirtied since the last.
        self.measure_disk_dirtying();
        let mut todo = Vec::new();
        for d in &self.m.disks().disks {
            let mut job = d.job();
            let set = match job.as_mut() {
                Some(j) => {
                    j.written = 0;
                    let blocks = j.dirty.pages();
                    std::mem::replace(&mut j.dirty, Bitmap::new(blocks))
                }
                None => Bitmap::new(d.size.div_ceil(COPY_BLOCK)),
            };
            if last {
                *job = None;
            }
            todo.push(set);
        }
        self.stats.disk_round_at = Some(std::time::Instant::now());
        self.disks_send(todo, !last, true)
    }

    /// Sends the blocks of `todo`; `running`: between them, as between page batches,
    /// a cancel, the time limit and new settings are heeded and progress published
    /// (a first copy of a large disk over a slow link takes a while); `written`: blocks
    /// the guest wrote since their first copy.
    fn disks_send(
        &mut self,
        todo: Vec<Bitmap>,
        running: bool,
        written: bool,
    ) -> Result<(), MigrateError> {
        self.stats.disk_pending = todo.iter().map(|s| s.count() * COPY_BLOCK).sum();
        let mut buf = Aligned::new();
        for (i, set) in todo.iter().enumerate() {
            let d = &self.m.disks().disks[i];
            let file = d
                .reopen_read()
                .map_err(|e| MigrateError::Vm(format!("disk {}: {e}", d.id)))?;
            for (first, count) in steps(set) {
                let at = first * COPY_BLOCK;
                let len = (count.min(RUN_BLOCKS) * COPY_BLOCK).min(d.size - at) as usize;
                // Read under the job lock: a guest write lands before this read
                // (and is in it) or after (and is noted for the next round).
                let mut job = d.job();
                file.read_exact_at(buf.get(len), at)
                    .map_err(|e| MigrateError::Vm(format!("reading disk {}: {e}", d.id)))?;
                let mut activations = 0;
                if let Some(j) = job.as_mut() {
                    for b in first..first + count {
                        j.dirty.unset(b);
                    }
                    activations = j.activations;
                }
                // A mirrored write after this read must reach the stream after these
                // bytes, not before (it would be overwritten by older data): with the
                // mirror on, guest writes wait until the chunk is on its way.
                if !job.as_ref().is_some_and(|j| j.active) {
                    drop(job);
                    self.disk_chunk(i as u32, at, buf.get(len), written)?;
                    // The mirror may have been turned on (set-params, from another
                    // thread) between the read and the send: a guest write mirrored
                    // then went ahead of these older bytes and is not noted. The
                    // blocks go again next round, after it.
                    if let Some(j) = d.job().as_mut()
                        && j.activations != activations
                    {
                        for b in first..first + count {
                            j.dirty.set(b);
                        }
                    }
                } else {
                    self.disk_chunk(i as u32, at, buf.get(len), written)?;
                    drop(job);
                }
                self.stats.disk_pending = self.stats.disk_pending.saturating_sub(len as u64);
                if running && !written {
                    self.first_copy_rate_so_far();
                }
                if running {
                    self.check_cancel()?;
                }
            }
        }
        Ok(())
    }

    /// Disk bytes as they go on the wire: each zero run as its length, the rest under
    /// `codec` (stored raw where it does not shrink).
    fn encode_disk(
        &mut self,
        disk: u32,
        codec: Codec,
        bytes: &[u8],
    ) -> Result<Vec<Piece>, MigrateError> {
        let mut out = Vec::new();
        let mut encoded = Vec::new();
        for (range, is_zero) in pieces(bytes) {
            let (start, len) = (range.start, range.len() as u32);
            let (encoding, data) = if is_zero {
                (DISK_ZERO, Vec::new())
            } else {
                out.clear();
                match self
                    .compressor
                    .compress(codec, &bytes[range.clone()], &mut out)
                    .map_err(|e| MigrateError::Vm(format!("disk {disk}: {e}")))?
                {
                    Stored::Compressed(_) => (super::codec::wire_id(codec), out.clone()),
                    Stored::Raw => (super::codec::wire_id(Codec::None), bytes[range].to_vec()),
                }
            };
            encoded.push(Piece {
                start,
                len,
                encoding,
                data,
            });
        }
        Ok(encoded)
    }

    /// Until a round has re-sent written blocks (whose ratio then says it): a few of
    /// the blocks the guest wrote, spread over what it dirtied, encoded as a round
    /// would send them under the codec in force, once a second or on a codec change.
    /// A round's disk bytes are otherwise costed at the first copy's ratio (long
    /// runs, far better) or the pages' (another kind of data).
    pub(super) fn sample_written(&mut self) -> Result<(), MigrateError> {
        let codec = self.settings.codec;
        // (No disks travel, or their copy has not begun.)
        if self.stats.disk_round_at.is_none()
            || self.stats.disk_written.ratio().is_some()
            || self
                .stats
                .disk_written_sample
                .is_some_and(|(c, at, _)| c == codec && at.elapsed() < WRITTEN_SAMPLE_EVERY)
        {
            return Ok(());
        }
        // Tried once a second whatever comes of it: a disk that cannot be read is
        // the copy's to report, not this estimate's to retry.
        let previous = self.stats.disk_written_sample.and_then(|(.., r)| r);
        self.stats.disk_written_sample = Some((codec, std::time::Instant::now(), previous));
        // The blocks: the sample's share of each disk by what the guest dirtied there,
        // each the first dirty block from an evenly spaced point on (a walk over the
        // words, not over every dirty block, with the guest's writes waiting on the
        // lock).
        let dirty: Vec<u64> = (self.m.disks().disks.iter())
            .map(|d| d.job().as_ref().map_or(0, |j| j.dirty.count()))
            .collect();
        let all: u64 = dirty.iter().sum();
        if all == 0 {
            return Ok(());
        }
        let (mut raw, mut wire) = (0usize, 0usize);
        let mut buf = Aligned::new();
        for (i, d) in self.m.disks().disks.iter().enumerate() {
            let n = (WRITTEN_SAMPLE_BLOCKS * dirty[i]).div_ceil(all);
            let mut blocks: Vec<u64> = match d.job().as_ref() {
                Some(j) if n > 0 => (0..n)
                    .filter_map(|k| j.dirty.next_set_wrapping(k * j.dirty.pages() / n))
                    .collect(),
                _ => continue,
            };
            blocks.sort_unstable();
            blocks.dedup();
            let file = d
                .reopen_read()
                .map_err(|e| MigrateError::Vm(format!("disk {}: {e}", d.id)))?;
            for b in blocks {
                let at = b * COPY_BLOCK;
                let len = COPY_BLOCK.min(d.size - at) as usize;
                file.read_exact_at(buf.get(len), at)
                    .map_err(|e| MigrateError::Vm(format!("reading disk {}: {e}", d.id)))?;
                let encoded = self.encode_disk(i as u32, codec, buf.get(len))?;
                raw += len;
                wire += encoded
                    .iter()
                    .map(|p| protocol::HEADER_LEN + DISK_DATA_FIELDS + p.data.len())
                    .sum::<usize>();
            }
        }
        if wire > 0 {
            self.stats.disk_written_sample = Some((
                codec,
                std::time::Instant::now(),
                Some(raw as f64 / wire as f64),
            ));
        }
        Ok(())
    }

    /// Sends disk bytes read at `at`: zero runs as their length, the rest with the
    /// migration's current codec (stored raw where it does not shrink).
    fn disk_chunk(
        &mut self,
        disk: u32,
        at: u64,
        bytes: &[u8],
        written: bool,
    ) -> Result<(), MigrateError> {
        let wire_before = self.stats.bytes_on_wire;
        for p in self.encode_disk(disk, self.settings.codec, bytes)? {
            self.send(&Message::DiskData {
                disk,
                offset: at + p.start as u64,
                len: p.len,
                encoding: p.encoding,
                data: p.data,
            })?;
        }
        self.stats.disk_bytes += bytes.len() as u64;
        self.fault("source.disk-mirror")?;
        let wire = self.stats.bytes_on_wire - wire_before;
        self.stats.disk_wire_bytes += wire;
        let keep = (-(bytes.len() as f64) / DISK_RATIO_SPAN).exp();
        let (raw, wire) = (bytes.len() as f64, wire as f64);
        self.stats.disk_recent.add(raw, wire, keep);
        if written {
            // Apart: the first copy's long runs of similar blocks compress far better
            // than the scattered ones a round re-sends (with zstd:3, 14.8 against 3.3
            // measured on a lab disk the guest had rewritten whole).
            self.stats.disk_written.add(raw, wire, keep);
        }
        Ok(())
    }

    /// Paused: each disk's write log, compacted to the last acknowledged generation
    /// per block, so `ferry disk-check` works on the destination's copies too.
    pub(super) fn disks_logs(&mut self) -> Result<(), MigrateError> {
        for (i, d) in self.m.disks().disks.iter().enumerate() {
            if !d.logs_writes() {
                continue;
            }
            let raw = std::fs::read(log_path(&d.path())).unwrap_or_default();
            let mut last = std::collections::BTreeMap::new();
            for rec in raw.chunks_exact(16) {
                let offset = u64::from_le_bytes(rec[..8].try_into().unwrap_or_default());
                let generation = u64::from_le_bytes(rec[8..].try_into().unwrap_or_default());
                let g = last.entry(offset).or_insert(0u64);
                *g = (*g).max(generation);
            }
            let records = last
                .into_iter()
                .flat_map(|(o, g)| o.to_le_bytes().into_iter().chain(g.to_le_bytes()))
                .collect();
            self.send(&Message::DiskLog {
                disk: i as u32,
                records,
            })?;
        }
        Ok(())
    }

    /// A failed or finished migration stops noting guest writes.
    pub(super) fn disks_stop(&self) {
        for d in &self.m.disks().disks {
            *d.job() = None;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskStoreError {
    #[error(
        "the source sends its disks (--copy-storage) but this destination has no datastore; \
         start it with --datastore DIR"
    )]
    NoDatastore,
    #[error("{path} already exists; Ferry never overwrites a VM's folder")]
    Exists { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the source's disks do not match its config: {0}")]
    Mismatch(String),
    #[error("disk data that does not decode: {0}")]
    Decode(String),
    #[error("disk data outside disk {disk}: {len} bytes at {offset}")]
    OutOfRange { disk: u32, offset: u64, len: usize },
}

/// The destination's copies of a migrating VM's disks, in `DATASTORE/<name>/`. Removed
/// again unless [`DiskStore::finish`] ran.
pub struct DiskStore {
    folder: PathBuf,
    disks: Vec<(PathBuf, File, u64)>,
    kept: bool,
    buf: Aligned,
    decompressor: Decompressor,
    /// Bytes written since writeback was last started.
    unsynced: u64,
    /// The config naming the copies, written and synced under a temporary name at
    /// the start, so the pause only renames it (None: staging failed; written whole
    /// at the end).
    staged: Option<(PathBuf, VmConfig)>,
    /// The copies' sync at each round's end, timed.
    sync: RoundSync,
    /// The datastore timed at creation (see [`DatastoreTiming`]).
    timing: DatastoreTiming,
}

/// What this datastore took, measured when the copies were created: to write and sync
/// [`PROBE_BYTES`] of zeros into the first copy (with the copy's own caching), and to
/// rewrite one block and sync the file whole. The pause's sync costs about the second
/// plus the pause's disk bytes at the rate the first shows (what the rounds wrote
/// before, each round's end has synced): measured on this storage, not assumed,
/// before the first byte of the copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatastoreTiming {
    pub flush_us: u32,
    pub write_us: u32,
    pub bytes: u32,
}

/// Zeros written to time the datastore: enough to see its write rate past a flush's
/// fixed cost, little enough to cost a slow device (40 MB/s) a tenth of a second. The
/// copy overwrites them (or they stand for a hole: zeros either way).
const PROBE_BYTES: u64 = 4 << 20;
/// The block the flush probes rewrite (a sector multiple, for direct I/O).
const PROBE_BLOCK: usize = 4096;
const FLUSH_PROBES: usize = 3;

fn micros(d: std::time::Duration) -> u32 {
    d.as_micros().clamp(1, u128::from(u32::MAX)) as u32
}

/// Syncs the copies in the background when a round ends and times it. The pause's
/// own sync covers what the last round's writes cover (the blocks the guest wrote
/// during one round), so the latest of these is that sync's cost measured on this
/// host's storage, not assumed; and the pause then finds less to write.
#[derive(Default)]
struct RoundSync {
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Microseconds the last completed sync took (0: none yet).
    last_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RoundSync {
    /// Starts a sync of `files` unless one is still running.
    fn start(&self, files: Vec<File>) {
        use std::sync::atomic::Ordering;
        if files.is_empty() || self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let (busy, last) = (self.busy.clone(), self.last_us.clone());
        let spawned = std::thread::Builder::new()
            .name("disk-sync".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                // A failure shows at the final sync, which is the one that counts.
                let ok = files.iter().all(|f| f.sync_data().is_ok());
                if ok {
                    last.store(u64::from(micros(t.elapsed())), Ordering::Release);
                }
                busy.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.busy.store(false, Ordering::Release);
        }
    }

    fn last_us(&self) -> Option<u32> {
        let us = self.last_us.load(std::sync::atomic::Ordering::Acquire);
        (us > 0).then(|| us.min(u64::from(u32::MAX)) as u32)
    }
}

/// Disk bytes the recent disk compression ratio spans (about).
const DISK_RATIO_SPAN: f64 = 8.0 * 1024.0 * 1024.0;

/// Writeback starts every this many bytes, so the sync at the switchover (when the
/// guest is paused) finds little left to write: at most this much beside the pause's
/// own blocks, even when the pause follows the disks' first copy at once.
const WRITEBACK_EVERY: u64 = 4 << 20;

/// The folder a migration copies the VM `vm`'s disks into, in `datastore`, beside the
/// config it writes there.
pub fn vm_folder(datastore: &Path, vm: &str) -> PathBuf {
    datastore.join(vm)
}

/// Where the copy of the VM `vm`'s disk `disk` lands in `datastore`.
pub fn image_path(datastore: &Path, vm: &str, disk: &str) -> PathBuf {
    vm_folder(datastore, vm).join(format!("{vm}-{disk}.img"))
}

impl DiskStore {
    /// Creates the VM's folder and one sparse image per disk of the config.
    pub fn create(
        datastore: Option<&Path>,
        cfg: &VmConfig,
        announced: &[(String, u64)],
    ) -> Result<Self, DiskStoreError> {
        let datastore = datastore.ok_or(DiskStoreError::NoDatastore)?;
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| DiskStoreError::Io { what, path, source }
        };
        if announced.len() != cfg.disks.len()
            || announced
                .iter()
                .zip(&cfg.disks)
                .any(|((id, size), c)| id != &c.id || *size != c.size_mib << 20)
        {
            return Err(DiskStoreError::Mismatch(format!("{announced:?}")));
        }
        // Absolute: the config written beside the images must name them from anywhere.
        let datastore = std::path::absolute(datastore).map_err(io("resolving", datastore))?;
        let folder = vm_folder(&datastore, &cfg.name);
        if folder.exists() {
            match abandoned(&folder) {
                Some(owner) => {
                    tracing::warn!(
                        "removing {}: the copies of an arrival that never finished (its \
                         VMM, pid {owner}, is gone)",
                        folder.display()
                    );
                    std::fs::remove_dir_all(&folder).map_err(io("removing", &folder))?;
                }
                None => return Err(DiskStoreError::Exists { path: folder }),
            }
        }
        std::fs::create_dir_all(&folder).map_err(io("creating", &folder))?;
        // From here on an error drops the store, and with it the folder.
        let mut store = Self {
            folder,
            disks: Vec::new(),
            kept: false,
            buf: Aligned::new(),
            decompressor: Decompressor::new(),
            unsynced: 0,
            staged: None,
            sync: RoundSync::default(),
            timing: DatastoreTiming::default(),
        };
        let marker = store.folder.join(ARRIVING);
        std::fs::write(&marker, owner_tag(std::process::id()).unwrap_or_default())
            .map_err(io("creating", &marker))?;
        for c in &cfg.disks {
            let path = image_path(&datastore, &cfg.name, &c.id);
            let mut opts = OpenOptions::new();
            opts.read(true).write(true).create_new(true);
            if c.cache == crate::vmm::config::DiskCache::None {
                opts.custom_flags(libc::O_DIRECT);
            }
            let file = opts.open(&path).map_err(io("creating", &path))?;
            file.set_len(c.size_mib << 20)
                .map_err(io("sizing", &path))?;
            store.disks.push((path, file, c.size_mib << 20));
        }
        let final_cfg = store.final_config(cfg);
        let staged = store.folder.join(format!(".{}.toml.staged", cfg.name));
        let written = (|| {
            use std::io::Write;
            let mut f = File::create(&staged)?;
            f.write_all(final_cfg.to_toml().as_bytes())?;
            f.sync_all()
        })();
        match written {
            Ok(()) => store.staged = Some((staged, final_cfg)),
            Err(e) => {
                tracing::warn!(
                    "staging {}: {e}; it is written at the end",
                    staged.display()
                );
                let _ = std::fs::remove_file(&staged);
            }
        }
        store.time_writes()?;
        Ok(store)
    }

    /// Writes and syncs [`PROBE_BYTES`] of zeros at the start of the first copy, timed.
    fn time_writes(&mut self) -> Result<(), DiskStoreError> {
        let Some((path, file, size)) = self.disks.first() else {
            return Ok(());
        };
        let bytes = PROBE_BYTES.min(*size);
        let io = |source| DiskStoreError::Io {
            what: "timing writes to",
            path: path.clone(),
            source,
        };
        let chunk = RUN_BLOCKS * COPY_BLOCK;
        let buf = self.buf.get(chunk as usize);
        buf.fill(0);
        let t = std::time::Instant::now();
        let mut at = 0;
        while at < bytes {
            let n = chunk.min(bytes - at) as usize;
            file.write_all_at(&buf[..n], at).map_err(io)?;
            at += n as u64;
        }
        file.sync_data().map_err(io)?;
        self.timing.write_us = micros(t.elapsed());
        self.timing.bytes = bytes as u32;
        // The pause's sync in small: a block rewritten and the file synced whole (its
        // times changed: a journal commit). A throttled device answers a small write
        // at its next slice, so the middle of a few.
        let mut flushes = [0u32; FLUSH_PROBES];
        for f in &mut flushes {
            let t = std::time::Instant::now();
            file.write_all_at(&buf[..PROBE_BLOCK], 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            *f = micros(t.elapsed());
        }
        flushes.sort_unstable();
        self.timing.flush_us = flushes[FLUSH_PROBES / 2];
        Ok(())
    }

    /// The datastore as timed when the copies were created.
    pub fn timing(&self) -> DatastoreTiming {
        self.timing
    }

    /// `cfg` naming the copies.
    fn final_config(&self, cfg: &VmConfig) -> VmConfig {
        let mut cfg = cfg.clone();
        for ((path, _, _), c) in self.disks.iter().zip(cfg.disks.iter_mut()) {
            c.path = path.clone();
        }
        cfg
    }

    /// Writes `len` bytes at `offset` of a disk, decoded from `data` as `encoding`
    /// says (see [`Message::DiskData`]).
    pub fn write(
        &mut self,
        disk: u32,
        offset: u64,
        len: u32,
        encoding: u8,
        data: &[u8],
    ) -> Result<(), DiskStoreError> {
        let len = len as usize;
        let out_of_range = DiskStoreError::OutOfRange { disk, offset, len };
        let (path, file, size) = self.disks.get(disk as usize).ok_or(out_of_range)?;
        if offset.saturating_add(len as u64) > *size {
            return Err(DiskStoreError::OutOfRange { disk, offset, len });
        }
        let io = |source| DiskStoreError::Io {
            what: "writing",
            path: path.clone(),
            source,
        };
        // O_DIRECT wants aligned memory: the frame buffer may not be.
        let buf = self.buf.get(len);
        if encoding == DISK_ZERO {
            buf.fill(0);
            write_zeroes_at(file, offset, buf).map_err(io)?;
        } else {
            let codec = super::codec::from_wire_id(encoding)
                .map_err(|e| DiskStoreError::Decode(e.to_string()))?;
            self.decompressor
                .decompress_exact(codec, data, buf)
                .map_err(|e| DiskStoreError::Decode(e.to_string()))?;
            file.write_all_at(buf, offset).map_err(io)?;
        }
        self.unsynced += len as u64;
        if self.unsynced >= WRITEBACK_EVERY {
            self.unsynced = 0;
            // Start writeback without waiting; failures show at the final sync.
            // SAFETY: sync_file_range on a file descriptor we own.
            unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            // And commit what the copy has allocated so far (direct I/O leaves no data
            // behind, but the blocks it filled in a sparse copy wait for a journal
            // commit): otherwise the sync at the first pass's end commits the whole
            // copy's, and a pause soon after waits on it.
            self.sync_in_background();
        }
        Ok(())
    }

    /// A round has ended: syncs the copies in the background (timed), and returns
    /// how long the last completed sync took, microseconds (None: none has yet).
    pub fn round_ended(&self) -> Option<u32> {
        self.sync_in_background();
        self.sync.last_us()
    }

    /// Syncs the copies on a background thread, timed (unless one is running).
    fn sync_in_background(&self) {
        let files = self
            .disks
            .iter()
            .filter_map(|(_, f, _)| f.try_clone().ok())
            .collect();
        self.sync.start(files);
    }

    /// The source's write log for a disk: becomes the copy's log.
    pub fn write_log(&self, disk: u32, records: &[u8]) -> Result<(), DiskStoreError> {
        let (path, _, _) = self
            .disks
            .get(disk as usize)
            .ok_or(DiskStoreError::OutOfRange {
                disk,
                offset: 0,
                len: records.len(),
            })?;
        let log = log_path(path);
        std::fs::write(&log, records).map_err(|source| DiskStoreError::Io {
            what: "writing",
            path: log,
            source,
        })
    }

    /// Syncs the images and writes `DATASTORE/<name>/<name>.toml` naming them; returns
    /// the config the VM now runs with.
    pub fn finish(mut self, cfg: &VmConfig) -> Result<(VmConfig, Arrival), DiskStoreError> {
        for (path, file, _) in &self.disks {
            file.sync_all().map_err(|source| DiskStoreError::Io {
                what: "syncing",
                path: path.clone(),
                source,
            })?;
        }
        let cfg = self.final_config(cfg);
        let config = self.folder.join(format!("{}.toml", cfg.name));
        let io = |source| DiskStoreError::Io {
            what: "writing",
            path: config.clone(),
            source,
        };
        match self.staged.take() {
            // Only now, with the copies synced, may a config name them.
            Some((staged, same)) if same == cfg => {
                std::fs::rename(&staged, &config).map_err(io)?;
                File::open(&self.folder)
                    .and_then(|d| d.sync_all())
                    .map_err(io)?;
            }
            _ => cfg.write_atomic(&config).map_err(io)?,
        }
        // Complete, not yet committed: the arrival owns the folder from here.
        self.kept = true;
        Ok((
            cfg,
            Arrival {
                folder: self.folder.clone(),
                settled: false,
            },
        ))
    }
}

/// Complete disk copies whose handover is not yet committed. Dropped unsettled (the
/// migration failed, or its handover was resolved for the source), it removes them;
/// [`Arrival::settle`] makes them the VM's own.
pub struct Arrival {
    folder: PathBuf,
    settled: bool,
}

impl Arrival {
    /// The source committed: from now on the guest may write these disks, so a VMM
    /// that dies later leaves a VM folder, never leftovers for the next arrival to
    /// clear.
    pub fn settle(mut self) {
        let marker = self.folder.join(ARRIVING);
        if let Err(e) = std::fs::remove_file(&marker) {
            tracing::warn!("removing {}: {e}", marker.display());
        }
        let _ = File::open(&self.folder).and_then(|d| d.sync_all());
        self.settled = true;
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        if !self.settled {
            tracing::info!(
                "removing {}: the disk copies of a migration that did not hand over",
                self.folder.display()
            );
            let _ = std::fs::remove_dir_all(&self.folder);
        }
    }
}

/// In a VM folder while its copies arrive: the VMM receiving them (`pid start-time`).
/// A VMM killed mid-way cannot remove its copies; the next arrival of the same VM
/// finds this file naming a process that is gone and clears the folder, instead of
/// refusing every later migration of that VM to this datastore.
const ARRIVING: &str = ".arriving";

/// `pid start-time` of a process (its start in clock ticks since boot, from
/// `/proc/PID/stat`): a pid the kernel reused names another start time.
fn owner_tag(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields count from
    // the last ')'. The start time is field 22, the 20th after it.
    let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// The pid of the VMM that left `folder` half-received, if that VMM is gone.
fn abandoned(folder: &Path) -> Option<u32> {
    let tag = std::fs::read_to_string(folder.join(ARRIVING)).ok()?;
    let pid: u32 = tag.split_whitespace().next()?.parse().ok()?;
    (owner_tag(pid).as_deref() != Some(tag.trim())).then_some(pid)
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_dir_all(&self.folder);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::codec::Compressor;

    #[test]
    fn only_a_folder_whose_receiver_is_gone_counts_as_abandoned() {
        let dir = std::env::temp_dir().join(format!("ferry-arriving-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let me = owner_tag(std::process::id()).unwrap();
        std::fs::write(dir.join(ARRIVING), &me).unwrap();
        assert_eq!(abandoned(&dir), None, "a live receiver's folder");
        // This pid, another start time: the pid was reused.
        let pid = std::process::id();
        std::fs::write(dir.join(ARRIVING), format!("{pid} 1")).unwrap();
        assert_eq!(abandoned(&dir), Some(pid));
        std::fs::write(dir.join(ARRIVING), "").unwrap();
        assert_eq!(abandoned(&dir), None, "an unreadable marker proves nothing");
        std::fs::remove_file(dir.join(ARRIVING)).unwrap();
        assert_eq!(abandoned(&dir), None, "no marker: a VM's folder");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_encoding_lands_as_the_bytes_it_stands_for() {
        let dir = std::env::temp_dir().join(format!("ferry-diskstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = VmConfig::parse(
            "name = \"ds\"\nmemory_mib = 16\n[[disks]]\nid = \"root\"\npath = \"r.img\"\nsize_mib = 1\n",
            Path::new("t.toml"),
            &dir,
        )
        .unwrap();
        let mut store = DiskStore::create(Some(&dir), &cfg, &[("root".into(), 1 << 20)]).unwrap();
        let text: Vec<u8> = (0..65536u32)
            .map(|i| b"ferry disk "[i as usize % 11])
            .collect();
        let mut lz4 = Vec::new();
        let stored = Compressor::new()
            .compress(Codec::Lz4, &text, &mut lz4)
            .unwrap();
        assert!(matches!(stored, Stored::Compressed(_)));
        store
            .write(0, 0, 65536, super::super::codec::wire_id(Codec::Lz4), &lz4)
            .unwrap();
        store.write(0, 65536, 4096, 0, &[9; 4096]).unwrap();
        store.write(0, 65536, 512, DISK_ZERO, &[]).unwrap();
        // Data that does not decode to its length, or lands past the end: refused.
        assert!(
            store
                .write(0, 0, 4096, super::super::codec::wire_id(Codec::Lz4), &lz4)
                .is_err()
        );
        assert!(store.write(0, 1 << 20, 512, 0, &[1; 512]).is_err());
        assert!(store.write(3, 0, 512, 0, &[1; 512]).is_err());
        let image = std::fs::read(dir.join("ds/ds-root.img")).unwrap();
        assert_eq!(&image[..65536], &text[..]);
        assert!(image[65536..65536 + 512].iter().all(|&b| b == 0));
        assert!(image[65536 + 512..65536 + 4096].iter().all(|&b| b == 9));
        assert!(image[65536 + 4096..].iter().all(|&b| b == 0));
        drop(store);
        // Never finished: the folder is gone again.
        assert!(!dir.join("ds").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
