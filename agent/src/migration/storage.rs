//! Storage migration on one host: moves a running VM's disk images into another
//! folder (datastore) while the guest keeps reading and writing them.
//!
//! Per disk: a bulk copy (holes stay holes), then rounds that copy again the blocks
//! the guest wrote meanwhile (the VMM sees every guest write, so it keeps the dirty
//! set itself), then a short pause in which the last blocks are copied, the copy is
//! synced, the VM's config file is rewritten to name it, and the disk switches over.
//! In active mode every guest write also goes to the copy before it completes, so
//! the copy converges whatever the write rate. A copy step and a guest write never
//! interleave: both hold the disk's job lock.
//!
//! Crash safety: until the config rename, the config names the old images, which are
//! complete; the new config is written only once the copy is complete and synced with
//! the VM paused, so from the rename on it names complete images too. The old image
//! is removed (`--remove-source`) only after the copy was verified against it, block
//! by block, and the VM runs on the copy.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::migratable::Migratable;
use crate::bitmap::Bitmap;
use crate::vmm::block::{COPY_BLOCK, CopyJob, Disk, WriteThrottle, log_path};
use crate::vmm::capabilities::Movable;
use crate::vmm::machine::RunState;

/// Re-copy rounds at most before the pause (or before auto mode turns active).
const MAX_ROUNDS: u32 = 30;
/// Blocks left to copy that the pause may take on (4 MiB).
const PAUSE_BLOCKS: u64 = 64;
/// Adjacent blocks copied in one step (512 KiB): large transfers for the bulk copy,
/// while a guest write waits at most one step.
pub(super) const RUN_BLOCKS: u64 = 8;
const _: () = assert!(RUN_BLOCKS * COPY_BLOCK == super::protocol::MAX_DISK_CHUNK as u64);

pub use ferry_api::{
    MovedDisk, Outcome, ReportCore, StorageMode, StoragePhase, StorageProgress, StorageReport,
};

#[derive(Debug, Clone)]
pub struct Params {
    pub to: PathBuf,
    /// One disk by id; all disks when None.
    pub disk: Option<String>,
    pub mode: StorageMode,
    pub remove_source: bool,
    /// Cap on the guest's disk writes while its disks move, bytes per second.
    pub throttle_writes: Option<u64>,
    pub report: Option<PathBuf>,
    /// The VM's config file, rewritten to name the new images (None: the VM has
    /// none, e.g. it came in by migration).
    pub config_path: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("the destination {0} is not a folder")]
    NotAFolder(PathBuf),
    #[error("the destination {0} is the folder the image is already in")]
    SameFolder(PathBuf),
    #[error("no disk {0:?} in this VM")]
    NoSuchDisk(String),
    #[error("this VM has no disks")]
    NoDisks,
    #[error("{path} already exists; Ferry never overwrites an image")]
    Exists { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VM {0}")]
    Vm(String),
    #[error("cancelled")]
    Cancelled,
    #[error("the copy of {path} differs from its source in {blocks} blocks")]
    Mismatch { path: PathBuf, blocks: u64 },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A page-aligned buffer of one copy block (O_DIRECT wants aligned memory).
pub(super) struct Aligned {
    buf: Vec<u8>,
    at: usize,
}

impl Aligned {
    pub(super) fn new() -> Self {
        let buf = vec![0u8; (RUN_BLOCKS * COPY_BLOCK) as usize + 4096];
        let at = buf.as_ptr().align_offset(4096);
        Self { buf, at }
    }

    pub(super) fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.buf[self.at..self.at + len]
    }
}

struct Copier<'a> {
    vm: &'a Migratable,
    m: &'a dyn Movable,
    params: &'a Params,
    mode: StorageMode,
    bytes: u64,
    rounds: u32,
    added_us: Vec<u32>,
    switchover: Option<Duration>,
    copy_time: Duration,
    throttled: Duration,
    guest_written: u64,
    buf: Aligned,
    other: Aligned,
    /// Auto mode's latest decision, for the report.
    mode_reason: Option<String>,
}

pub fn run(vm: Arc<Migratable>, params: Params) -> StorageReport {
    let m = vm.movable();
    let t0 = Instant::now();
    let mut c = Copier {
        vm: &vm,
        m,
        params: &params,
        mode: params.mode,
        bytes: 0,
        rounds: 0,
        added_us: Vec::new(),
        switchover: None,
        copy_time: Duration::ZERO,
        throttled: Duration::ZERO,
        guest_written: 0,
        buf: Aligned::new(),
        mode_reason: None,
        other: Aligned::new(),
    };
    let mut moved = Vec::new();
    let mut verified = None;
    let result = c.all(&mut moved, &mut verified);
    let mut added = c.added_us.clone();
    added.sort_unstable();
    let report = StorageReport {
        core: ReportCore {
            outcome: match &result {
                Ok(()) => Outcome::Completed,
                Err(StorageError::Cancelled) => Outcome::Cancelled,
                Err(_) => Outcome::Failed,
            },
            error: result.as_ref().err().map(|e| e.to_string()),
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            switchover_ms: c.switchover.map(|d| d.as_secs_f64() * 1e3),
        },
        // The mode used: under auto, active if any disk needed it.
        disk_mode: if moved.iter().any(|d| d.mode == StorageMode::Active) {
            StorageMode::Active
        } else if params.mode == StorageMode::Auto && !moved.is_empty() {
            StorageMode::Background
        } else {
            params.mode
        },
        disk_bytes_copied: c.bytes,
        disk_rounds: c.rounds,
        disk_verified: verified,
        disk_integrity_errors: m.disk_integrity_errors(),
        guest_write_latency_added_us_p99: (!added.is_empty())
            .then(|| u64::from(added[((added.len() - 1) as f64 * 0.99) as usize])),
        copy_ms: c.copy_time.as_secs_f64() * 1e3,
        guest_writes_delayed_ms: c.throttled.as_secs_f64() * 1e3,
        guest_bytes_written: c.guest_written,
        config_rewritten: result.is_ok().then(|| params.config_path.clone()).flatten(),
        disks: moved,
    };
    if let Some(e) = &report.core.error {
        tracing::warn!("storage migration {}: {e}", report.core.outcome);
    }
    if let Some(path) = &params.report
        && let Err(e) = std::fs::write(path, serde_json::to_vec_pretty(&report).unwrap_or_default())
    {
        tracing::warn!(
            "cannot write storage migration report {}: {e}",
            path.display()
        );
    }
    c.publish(StoragePhase::Done, "", 0);
    if let Some(p) = vm
        .storage
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
    {
        p.report = Some(report.clone());
    }
    report
}

impl Copier<'_> {
    fn publish(&self, phase: StoragePhase, disk: &str, remaining: u64) {
        let mut g = self.vm.storage.lock().unwrap_or_else(|e| e.into_inner());
        *g = Some(StorageProgress {
            phase,
            disk: disk.to_owned(),
            bytes_copied: self.bytes,
            round: self.rounds,
            remaining_blocks: remaining,
            mode: self.mode,
            report: None,
        });
    }

    fn all(
        &mut self,
        moved: &mut Vec<MovedDisk>,
        verified: &mut Option<bool>,
    ) -> Result<(), StorageError> {
        let disks = &self.m.disks().disks;
        if disks.is_empty() {
            return Err(StorageError::NoDisks);
        }
        let chosen: Vec<&Disk> = match &self.params.disk {
            Some(id) => vec![
                disks
                    .iter()
                    .find(|d| &d.id == id)
                    .ok_or_else(|| StorageError::NoSuchDisk(id.clone()))?,
            ],
            None => disks.iter().collect(),
        };
        let to = &self.params.to;
        if !to.is_dir() {
            return Err(StorageError::NotAFolder(to.clone()));
        }
        // Check every disk before touching any.
        let mut plan = Vec::new();
        for d in &chosen {
            let from = d.path();
            let name = from.file_name().map(PathBuf::from).unwrap_or_default();
            let target = to.join(name);
            let same = from
                .parent()
                .and_then(|p| p.canonicalize().ok())
                .zip(to.canonicalize().ok())
                .is_some_and(|(a, b)| a == b);
            if same {
                return Err(StorageError::SameFolder(to.clone()));
            }
            if target.exists() {
                return Err(StorageError::Exists { path: target });
            }
            plan.push((*d, from, target));
        }
        let mut all_verified = true;
        for (d, from, target) in plan {
            let t = Instant::now();
            let copied = self.one(d, &from, &target);
            self.copy_time += t.elapsed();
            copied?;
            moved.push(MovedDisk {
                id: d.id.clone(),
                from: from.clone(),
                to: target.clone(),
                mode: self.mode,
                mode_reason: self.mode_reason.take(),
            });
            let bad = self.verify(d, &from)?;
            all_verified &= bad == 0;
            if bad > 0 {
                *verified = Some(false);
                return Err(StorageError::Mismatch {
                    path: target,
                    blocks: bad,
                });
            }
            if self.params.remove_source {
                std::fs::remove_file(&from).map_err(io("removing the old image", &from))?;
                let _ = std::fs::remove_file(log_path(&from));
            }
        }
        *verified = Some(all_verified);
        Ok(())
    }

    fn check_vm(&self) -> Result<(), StorageError> {
        if self.vm.cancel.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StorageError::Cancelled);
        }
        match self.m.state() {
            RunState::Running | RunState::Paused => Ok(()),
            s => Err(StorageError::Vm(format!("is {s:?}"))),
        }
    }

    /// Moves one disk; on failure the copy is removed and the VM stays on the old image.
    fn one(&mut self, d: &Disk, from: &Path, target: &Path) -> Result<(), StorageError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create_new(true);
        if d.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(target).map_err(io("creating", target))?;
        if self.params.mode == StorageMode::Auto {
            // Each disk is judged on its own writes.
            self.mode = StorageMode::Background;
        }
        let result = self.copy_and_switch(d, from, target, file);
        if result.is_err() {
            *d.job() = None;
            // Only if the VM does not use it (the switch is the last step).
            if d.path() != target {
                let _ = std::fs::remove_file(target);
                let _ = std::fs::remove_file(log_path(target));
            }
        }
        result
    }

    fn copy_and_switch(
        &mut self,
        d: &Disk,
        from: &Path,
        target: &Path,
        file: File,
    ) -> Result<(), StorageError> {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io("locking", target)(std::io::Error::last_os_error()));
        }
        file.set_len(d.size).map_err(io("sizing", target))?;
        let blocks = d.size.div_ceil(COPY_BLOCK);
        let source = d.reopen_read().map_err(io("reading", from))?;
        // Track (or mirror) guest writes first, then look for data: a write landing in
        // a hole after the scan is then caught either way.
        let target_handle = file.try_clone().map_err(io("opening", target))?;
        *d.job() = Some(CopyJob {
            target: Some(target_handle),
            dirty: Bitmap::new(blocks),
            active: self.mode == StorageMode::Active,
            added_us: Vec::new(),
            throttle: self.params.throttle_writes.map(WriteThrottle::new),
            mirror: None,
            written: 0,
            activations: 0,
        });
        let mut todo = Bitmap::new(blocks);
        // Holes need no copy: the new image is sparse and reads as zero there too.
        for b in data_blocks(&source, d.size) {
            todo.set(b);
        }
        loop {
            self.check_vm()?;
            let n = todo.count();
            self.publish(StoragePhase::Copying, &d.id, n);
            let (round_start, bytes_before) = (Instant::now(), self.bytes);
            for (first, count) in steps(&todo) {
                self.copy_blocks(d, &source, &file, first, count, self.rounds > 0)?;
            }
            self.rounds += 1;
            crash_point("storage.copying");
            // What the guest wrote meanwhile (and was not mirrored).
            todo.clear_all();
            if let Some(job) = d.job().as_mut() {
                todo.or_assign_words(job.dirty.words());
                job.dirty.clear_all();
            }
            let left = todo.count();
            if self.params.mode == StorageMode::Auto && self.mode == StorageMode::Background {
                let secs = round_start.elapsed().as_secs_f64().max(1e-6);
                let copy = (self.bytes - bytes_before) as f64 / secs;
                let write = (left * COPY_BLOCK) as f64 / secs;
                let (active, reason) = crate::policy::disk::mirror_mode(write, copy);
                if active {
                    self.mode = StorageMode::Active;
                    if let Some(job) = d.job().as_mut() {
                        job.active = true;
                    }
                    tracing::info!("storage migration of {}: {reason}", d.id);
                }
                self.mode_reason = Some(reason);
            }
            if left <= PAUSE_BLOCKS || self.rounds >= MAX_ROUNDS {
                break;
            }
        }
        // The pause: the last blocks, the copy synced, the config rewritten, the switch.
        self.publish(StoragePhase::Switchover, &d.id, todo.count());
        let t = Instant::now();
        // Pausing drains the guest's disk I/O (it is synchronous at the vCPU's exit).
        let was_running = self.m.state() == RunState::Running;
        if was_running {
            self.m
                .pause()
                .map_err(|e| StorageError::Vm(e.to_string()))?;
        }
        let result = (|| {
            let mut job = d.job().take();
            if let Some(j) = job.as_mut() {
                todo.or_assign_words(j.dirty.words());
                self.added_us.append(&mut j.added_us);
                self.guest_written += j.written;
                if let Some(t) = &j.throttle {
                    self.throttled += t.delayed;
                }
            }
            for (first, count) in steps(&todo) {
                self.copy_unlocked(&source, &file, d.size, (first, count), true)?;
            }
            file.sync_all().map_err(io("syncing", target))?;
            // The write log goes with the image (the VM is paused: it is complete).
            let log = if d.logs_writes() {
                let (old_log, new_log) = (log_path(from), log_path(target));
                std::fs::copy(&old_log, &new_log).map_err(io("copying the write log", &old_log))?;
                Some(Disk::open_log(target).map_err(io("opening", &new_log))?)
            } else {
                None
            };
            crash_point("storage.config-rewrite");
            if let Some(cfg_path) = &self.params.config_path {
                let mut cfg = self.m.config();
                if let Some(c) = cfg.disks.iter_mut().find(|c| c.id == d.id) {
                    c.path = target.to_owned();
                }
                cfg.generation += 1;
                cfg.write_atomic(cfg_path)
                    .map_err(io("rewriting the config", cfg_path))?;
            }
            crash_point("storage.after-config");
            d.switch_to(
                target.to_owned(),
                file.try_clone().map_err(io("opening", target))?,
                log,
            );
            // From the first write after the resume on, note what the guest changes,
            // so the check against the old image skips exactly those blocks.
            *d.job() = Some(CopyJob {
                target: None,
                dirty: Bitmap::new(d.size.div_ceil(COPY_BLOCK)),
                active: false,
                added_us: Vec::new(),
                throttle: None,
                mirror: None,
                written: 0,
                activations: 0,
            });
            Ok(())
        })();
        let resumed = if was_running { self.m.resume() } else { Ok(()) };
        self.switchover = Some(self.switchover.unwrap_or_default() + t.elapsed());
        result?;
        resumed.map_err(|e| StorageError::Vm(e.to_string()))
    }

    fn copy_blocks(
        &mut self,
        d: &Disk,
        source: &File,
        target: &File,
        first: u64,
        count: u64,
        write_zeroes: bool,
    ) -> Result<(), StorageError> {
        // Held across read and write: no guest write to this disk in between.
        let mut job = d.job();
        self.copy_unlocked(source, target, d.size, (first, count), write_zeroes)?;
        if let Some(j) = job.as_mut() {
            for b in first..first + count {
                j.dirty.unset(b);
            }
            self.added_us.append(&mut j.added_us);
        }
        Ok(())
    }

    /// Copies blocks `first..first + count` (at most [`RUN_BLOCKS`]).
    fn copy_unlocked(
        &mut self,
        source: &File,
        target: &File,
        size: u64,
        (first, count): (u64, u64),
        write_zeroes: bool,
    ) -> Result<(), StorageError> {
        let at = first * COPY_BLOCK;
        let len = (count * COPY_BLOCK).min(size - at) as usize;
        let buf = self.buf.get(len);
        source
            .read_exact_at(buf, at)
            .map_err(io("reading", Path::new("the source image")))?;
        // Zero pieces stay holes, so a sparse image stays sparse: a first copy skips
        // them (the new image reads as zero there), a re-copy punches them out.
        for (range, is_zero) in pieces(buf) {
            let piece_at = at + range.start as u64;
            if !is_zero {
                target
                    .write_all_at(&buf[range], piece_at)
                    .map_err(io("writing", Path::new("the copy")))?;
            } else if write_zeroes {
                write_zeroes_at(target, piece_at, &buf[range])
                    .map_err(io("writing", Path::new("the copy")))?;
            }
        }
        self.bytes += len as u64;
        Ok(())
    }

    /// After the switch: every block of the copy equals the old image (now frozen),
    /// except blocks the guest has written since, which are tracked while checking.
    fn verify(&mut self, d: &Disk, old: &Path) -> Result<u64, StorageError> {
        let old_file = OpenOptions::new()
            .read(true)
            .custom_flags(if d.direct { libc::O_DIRECT } else { 0 })
            .open(old)
            .map_err(io("reading", old))?;
        let blocks = d.size.div_ceil(COPY_BLOCK);
        let new_file = d.reopen_read().map_err(io("reading", old))?;
        let mut bad = 0;
        self.publish(StoragePhase::Verifying, &d.id, blocks);
        for b in 0..blocks {
            let at = b * COPY_BLOCK;
            let len = COPY_BLOCK.min(d.size - at) as usize;
            // Read the copy under the job lock, so a block is either read before a
            // guest write or known to be written.
            let job = d.job();
            if job.as_ref().is_some_and(|j| j.dirty.is_set(b)) {
                continue;
            }
            new_file
                .read_exact_at(self.other.get(len), at)
                .map_err(io("reading", old))?;
            drop(job);
            old_file
                .read_exact_at(self.buf.get(len), at)
                .map_err(io("reading", old))?;
            if self.buf.get(len) != self.other.get(len) {
                bad += 1;
            }
        }
        *d.job() = None;
        if bad > 0 {
            tracing::error!("the copy of disk {} differs in {bad} blocks", d.id);
        }
        Ok(bad)
    }
}

/// A failpoint (test builds, see [`crate::failpoint`]): tests crash the VMM here, as
/// a power cut would, to show the config always names complete images, or hold it.
fn crash_point(point: &str) {
    crate::failpoint::reach(point);
}

/// Splits disk bytes into alternating runs of 4 KiB pieces that are all zero and
/// pieces that are not: zero runs are elided (holes, or a length on the wire).
pub(super) fn pieces(buf: &[u8]) -> impl Iterator<Item = (std::ops::Range<usize>, bool)> + '_ {
    const PIECE: usize = 4096;
    let len = buf.len();
    let zero = move |j: usize| buf[j..(j + PIECE).min(len)].iter().all(|&x| x == 0);
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= len {
            return None;
        }
        let is_zero = zero(i);
        let mut j = i + PIECE;
        while j < len && zero(j) == is_zero {
            j += PIECE;
        }
        let range = i..j.min(len);
        i = range.end;
        Some((range, is_zero))
    })
}

/// Makes `zeroes.len()` bytes at `at` read as zero: a punched hole where the file
/// system can, the zeroes written where it cannot.
pub(super) fn write_zeroes_at(target: &File, at: u64, zeroes: &[u8]) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; the range lies inside the file.
    let rc = unsafe {
        libc::fallocate(
            target.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            zeroes.len() as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        target.write_all_at(zeroes, at)
    }
}

/// The set blocks of `todo` as copy steps: runs of adjacent blocks, cut at
/// [`RUN_BLOCKS`].
pub(super) fn steps(todo: &Bitmap) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (mut first, mut count) in todo.runs() {
        while count > 0 {
            let n = count.min(RUN_BLOCKS);
            out.push((first, n));
            first += n;
            count -= n;
        }
    }
    out
}

/// The copy blocks that hold data (SEEK_DATA / SEEK_HOLE); all of them if the file
/// system cannot say.
pub(super) fn data_blocks(f: &File, size: u64) -> Vec<u64> {
    let blocks = size.div_ceil(COPY_BLOCK);
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut at: i64 = 0;
    while (at as u64) < size {
        // SAFETY: lseek on a descriptor we own; results are checked.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // only holes from here on
            }
            return (0..blocks).collect();
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size as i64 } else { hole };
        let first = data as u64 / COPY_BLOCK;
        let last = ((end as u64).saturating_sub(1)) / COPY_BLOCK;
        for b in first..=last.min(blocks - 1) {
            if out.last() != Some(&b) {
                out.push(b);
            }
        }
        at = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_alternate_between_zero_and_data() {
        let mut buf = vec![0u8; 5 * 4096 + 512];
        buf[4096 + 7] = 1;
        buf[2 * 4096] = 2;
        buf[5 * 4096 + 100] = 3;
        let got: Vec<_> = pieces(&buf).collect();
        assert_eq!(
            got,
            [
                (0..4096, true),
                (4096..3 * 4096, false),
                (3 * 4096..5 * 4096, true),
                (5 * 4096..5 * 4096 + 512, false)
            ]
        );
        assert_eq!(pieces(&[]).count(), 0);
    }

    #[test]
    fn steps_follow_runs_and_stop_at_the_run_limit() {
        let mut todo = Bitmap::new(100);
        for b in [0, 1, 2, 10] {
            todo.set(b);
        }
        for b in 20..(20 + RUN_BLOCKS * 2 + 3) {
            todo.set(b);
        }
        let s = steps(&todo);
        assert_eq!(s[0], (0, 3));
        assert_eq!(s[1], (10, 1));
        assert_eq!(s[2], (20, RUN_BLOCKS));
        assert_eq!(s[3], (20 + RUN_BLOCKS, RUN_BLOCKS));
        assert_eq!(s[4], (20 + 2 * RUN_BLOCKS, 3));
        assert_eq!(s.len(), 5);
    }

    #[test]
    fn modes_parse_and_unknown_ones_are_named() {
        assert_eq!("active".parse::<StorageMode>(), Ok(StorageMode::Active));
        let e = "fast".parse::<StorageMode>().unwrap_err().to_string();
        assert!(e.contains("fast") && e.contains("background"), "{e}");
    }
}
