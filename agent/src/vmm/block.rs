//! The lab block device: raw image files, one request at a time per vCPU, described
//! in the vCPU's mailbox and carried out synchronously at the port exit (so pausing
//! the vCPUs drains all disk I/O by construction).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::config::{DiskCache, DiskConfig};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk {id:?}: cannot create folder {path}: {source}")]
    Folder {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {id:?}: cannot open {path}: {source}")]
    Open {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {id:?}: {path} is in use by another VM (its lock is held)")]
    Locked { id: String, path: PathBuf },
    #[error("disk {id:?}: {path} is {actual} bytes but the config says {expected}")]
    Size {
        id: String,
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("disk {id:?}: {what} on {path}: {source}")]
    Io {
        id: String,
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct Disk {
    pub id: String,
    pub size: u64,
    pub direct: bool,
    /// The image the VM uses; a storage migration swaps it for its copy.
    backing: std::sync::RwLock<Backing>,
    /// A running storage migration of this disk. Guest writes take this lock, so a
    /// copy step (which holds it while it copies a chunk) never interleaves with one.
    job: std::sync::Mutex<Option<CopyJob>>,
    /// Bumped, and its waiters woken, whenever the write cap changes: a write the old
    /// cap is holding back completes at once (a pause must not wait out a cap it is
    /// about to lift).
    limit_changed: (std::sync::Mutex<u64>, std::sync::Condvar),
}

#[derive(Debug)]
struct Backing {
    path: PathBuf,
    file: File,
    /// `<image>.wlog`: (offset, generation) of every completed guest write.
    log: Option<File>,
}

/// The write log beside an image.
pub fn log_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".wlog");
    PathBuf::from(p)
}

fn open_log(image: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(log_path(image))
}

/// What a storage migration needs from the guest's writes: which blocks changed
/// since they were copied, and, in active mode, the same write on the copy.
#[derive(Debug)]
pub struct CopyJob {
    /// The copy being made (None: only tracking which blocks the guest writes).
    pub target: Option<File>,
    /// Written since copied, in units of [`COPY_BLOCK`].
    pub dirty: crate::bitmap::Bitmap,
    /// Active (write-blocking) mode: guest writes also go to the target before they
    /// complete.
    pub active: bool,
    /// Active mode: time each mirrored write added, microseconds.
    pub added_us: Vec<u32>,
    /// Caps the guest's write throughput while the job runs (so a background copy
    /// can outrun it); None: no cap.
    pub throttle: Option<WriteThrottle>,
    /// A copy on another host (`--copy-storage`): in active mode a guest write is
    /// sent there before it completes. None: no such copy.
    pub mirror: Option<std::sync::Arc<dyn Mirror>>,
    /// Bytes the guest wrote while the job ran, every write counted (rewrites of a
    /// block too, unlike `dirty`): what an active mirror would carry.
    pub written: u64,
    /// Times the mirror was turned on: a copier that read blocks before a turn and
    /// sends them after it knows a mirrored write may have overtaken them.
    pub activations: u64,
}

/// A disk's copy elsewhere that takes a guest write as it happens (an active mirror
/// over the migration stream).
pub trait Mirror: std::fmt::Debug + Send + Sync {
    /// Sends `data`, written at `offset`; returns once the copy's side has taken it.
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
}

/// The lowest cap on a guest's disk writes, bytes per second: a 64 KiB write waits
/// 64 ms at it.
pub const MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC: u64 = 1_000_000;

/// A token bucket over guest write bytes: a write that overdraws it completes late,
/// by the time the bucket needs to refill.
#[derive(Debug)]
pub struct WriteThrottle {
    pub bytes_per_sec: u64,
    tokens: f64,
    last: std::time::Instant,
    /// Total delay imposed so far.
    pub delayed: std::time::Duration,
}

impl WriteThrottle {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            tokens: 0.0,
            last: std::time::Instant::now(),
            delayed: std::time::Duration::ZERO,
        }
    }

    /// Takes `bytes`; returns how long the write must wait (at most 100 ms of burst).
    fn take(&mut self, bytes: usize) -> std::time::Duration {
        let rate = self.bytes_per_sec as f64;
        let now = std::time::Instant::now();
        self.tokens = (self.tokens + (now - self.last).as_secs_f64() * rate).min(rate * 0.1);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            return std::time::Duration::ZERO;
        }
        let wait = std::time::Duration::from_secs_f64(-self.tokens / rate);
        self.delayed += wait;
        wait
    }
}

/// Granularity of storage-migration dirty tracking and copying.
pub const COPY_BLOCK: u64 = 64 << 10;

/// Disk images opened for a VM; images this VM created are removed again if the VM
/// fails to start, so a failed start leaves nothing behind.
#[derive(Debug, Default)]
pub struct DiskSet {
    pub disks: Vec<Disk>,
    created: Vec<PathBuf>,
    committed: std::sync::atomic::AtomicBool,
}

impl DiskSet {
    pub fn open(configs: &[DiskConfig]) -> Result<Self, DiskError> {
        Self::open_with(configs, true)
    }

    /// Opens images that must already exist (a migration destination on shared storage).
    pub fn open_existing(configs: &[DiskConfig]) -> Result<Self, DiskError> {
        Self::open_with(configs, false)
    }

    fn open_with(configs: &[DiskConfig], create: bool) -> Result<Self, DiskError> {
        let mut set = DiskSet::default();
        for cfg in configs {
            if !create && !cfg.path.exists() {
                return Err(DiskError::Open {
                    id: cfg.id.clone(),
                    path: cfg.path.clone(),
                    source: std::io::ErrorKind::NotFound.into(),
                });
            }
            let (disk, created) = Disk::open(cfg)?;
            if created {
                set.created.push(cfg.path.clone());
            }
            set.disks.push(disk);
        }
        Ok(set)
    }

    /// The VM started: images it created are its own from now on.
    pub fn commit(&self) {
        self.committed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Caps (or frees) the guest's writes to every disk being copied, keeping what a
    /// cap already delayed.
    pub fn limit_writes(&self, bytes_per_sec: Option<u64>) {
        for d in &self.disks {
            if let Some(job) = d.job().as_mut() {
                let delayed = job
                    .throttle
                    .as_ref()
                    .map_or(std::time::Duration::ZERO, |t| t.delayed);
                job.throttle = bytes_per_sec.map(|b| {
                    let mut t = WriteThrottle::new(b);
                    t.delayed = delayed;
                    t
                });
            }
            // After the new cap is in place: a write that drew its wait from the old
            // one saw the epoch before this (see `write_from`) and stops waiting.
            let (epoch, changed) = &d.limit_changed;
            *epoch.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            changed.notify_all();
        }
    }

    /// Turns the active mirror of every disk being copied over the network on or
    /// off: on, each guest write goes to the copy before it completes.
    pub fn mirror_writes(&self, active: bool) {
        for d in &self.disks {
            if let Some(job) = d.job().as_mut()
                && job.mirror.is_some()
            {
                if active && !job.active {
                    job.activations += 1;
                }
                job.active = active;
            }
        }
    }

    pub fn flush_all(&self) -> Result<(), DiskError> {
        self.disks.iter().try_for_each(Disk::flush)
    }

    /// Hands the images' locks over (to a migration destination on shared storage), or
    /// takes them back; the files stay open either way.
    pub fn set_locked(&self, locked: bool) -> Result<(), DiskError> {
        for d in &self.disks {
            let op = if locked {
                libc::LOCK_EX | libc::LOCK_NB
            } else {
                libc::LOCK_UN
            };
            let b = d.backing();
            // SAFETY: flock on a file descriptor we own.
            if unsafe { libc::flock(b.file.as_raw_fd(), op) } != 0 {
                return Err(DiskError::Locked {
                    id: d.id.clone(),
                    path: b.path.clone(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for DiskSet {
    fn drop(&mut self) {
        if !self.committed.load(std::sync::atomic::Ordering::Acquire) {
            for path in &self.created {
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(log_path(path));
            }
        }
    }
}

impl Disk {
    /// Opens (creating sparse if missing) and locks an image; returns whether it was created.
    pub fn open(cfg: &DiskConfig) -> Result<(Self, bool), DiskError> {
        let size = cfg.size_mib << 20;
        let id = cfg.id.clone();
        let path = cfg.path.clone();
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
            && !parent.exists()
        {
            std::fs::create_dir_all(parent).map_err(|source| DiskError::Folder {
                id: id.clone(),
                path: parent.to_owned(),
                source,
            })?;
        }
        let existed = path.exists();
        let direct = cfg.cache == DiskCache::None;
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&path).map_err(|source| DiskError::Open {
            id: id.clone(),
            path: path.clone(),
            source,
        })?;
        let cleanup = |path: &Path| {
            if !existed {
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(log_path(path));
            }
        };
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            cleanup(&path);
            return Err(DiskError::Locked { id, path });
        }
        let io = |what, source| DiskError::Io {
            id: id.clone(),
            path: path.clone(),
            what,
            source,
        };
        if existed {
            let actual = file.metadata().map_err(|e| io("stat", e))?.len();
            if actual != size {
                return Err(DiskError::Size {
                    id,
                    path,
                    actual,
                    expected: size,
                });
            }
        } else if let Err(e) = file.set_len(size) {
            cleanup(&path);
            return Err(io("sizing the new image", e));
        }
        Ok((
            Self {
                id: cfg.id.clone(),
                size,
                direct,
                backing: std::sync::RwLock::new(Backing {
                    path: cfg.path.clone(),
                    log: if cfg.write_log {
                        Some(open_log(&cfg.path).map_err(|e| io("opening the write log", e))?)
                    } else {
                        None
                    },
                    file,
                }),
                job: std::sync::Mutex::new(None),
                limit_changed: Default::default(),
            },
            !existed,
        ))
    }

    pub fn flush(&self) -> Result<(), DiskError> {
        let b = self.backing();
        b.file.sync_data().map_err(|source| DiskError::Io {
            id: self.id.clone(),
            path: b.path.clone(),
            what: "flush",
            source,
        })
    }

    fn backing(&self) -> std::sync::RwLockReadGuard<'_, Backing> {
        self.backing.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether guest writes are logged beside the image.
    pub fn logs_writes(&self) -> bool {
        self.backing().log.is_some()
    }

    /// Opens (creating) the write log of `image`.
    pub fn open_log(image: &Path) -> std::io::Result<File> {
        open_log(image)
    }

    /// The image the VM uses now.
    pub fn path(&self) -> PathBuf {
        self.backing().path.clone()
    }

    /// A second handle on the image the VM uses now (for reading a copy of it).
    pub fn reopen_read(&self) -> std::io::Result<File> {
        self.backing().file.try_clone()
    }

    pub fn job(&self) -> std::sync::MutexGuard<'_, Option<CopyJob>> {
        self.job.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on the VM uses `file` at `path` (a complete, synced copy); the old
    /// image is unlocked and closed. Call with the vCPUs paused.
    pub fn switch_to(&self, path: PathBuf, file: File, log: Option<File>) {
        let mut b = self.backing.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut *b, Backing { path, file, log });
        // SAFETY: flock on a descriptor we own, about to be closed.
        unsafe { libc::flock(old.file.as_raw_fd(), libc::LOCK_UN) };
    }

    /// Reads `len` bytes at `offset` into host memory at `buf`; returns an errno on failure.
    ///
    /// # Safety
    /// `buf..buf+len` must be valid writable memory for the duration of the call.
    pub unsafe fn read_into(&self, offset: u64, buf: *mut u8, len: usize) -> Result<(), i32> {
        self.check(offset, len)?;
        let b = self.backing();
        let fd = b.file.as_raw_fd();
        transfer(offset, len, |at, done| {
            // SAFETY: the caller guarantees buf..buf+len is writable; `transfer` keeps
            // `done` below `len`.
            unsafe { libc::pread(fd, buf.add(done).cast(), len - done, at) }
        })
    }

    /// Writes `len` bytes from host memory at `buf` to `offset`; returns an errno on failure.
    ///
    /// # Safety
    /// `buf..buf+len` must be valid readable memory for the duration of the call.
    pub unsafe fn write_from(&self, offset: u64, buf: *const u8, len: usize) -> Result<(), i32> {
        self.check(offset, len)?;
        let mut job = self.job();
        let b = self.backing();
        let fd = b.file.as_raw_fd();
        transfer(offset, len, |at, done| {
            // SAFETY: the caller guarantees buf..buf+len is readable; `transfer` keeps
            // `done` below `len`.
            unsafe { libc::pwrite(fd, buf.add(done).cast(), len - done, at) }
        })?;
        if let Some(log) = &b.log
            && len >= 32
        {
            // SAFETY: the caller guarantees buf..buf+len is readable and len >= 32.
            let head = unsafe { std::slice::from_raw_parts(buf, 32) };
            let word = |i: usize| {
                u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap_or_default())
            };
            if word(0) as u32 == crate::guest::abi::BLOCK_MAGIC {
                let mut rec = [0u8; 16];
                rec[..8].copy_from_slice(&offset.to_le_bytes());
                rec[8..].copy_from_slice(&word(2).to_le_bytes());
                // One append: whole records even if the process dies mid-way.
                use std::io::Write;
                (&*log)
                    .write_all(&rec)
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            }
        }
        let mut wait = None;
        if let Some(job) = job.as_mut() {
            job.written += len as u64;
            let first = offset / COPY_BLOCK;
            let last = (offset + len as u64 - 1) / COPY_BLOCK;
            let mut fresh = 0u64;
            // Copy blocks already noted before this write: written earlier, not yet
            // copied, perhaps elsewhere in the block than this write.
            let mut noted = Vec::new();
            for block in first..=last {
                if job.dirty.set(block) {
                    fresh += 1;
                } else {
                    noted.push(block);
                }
            }
            if job.active {
                let t = std::time::Instant::now();
                let mirrored = if let Some(target) = job.target.as_ref() {
                    let tfd = target.as_raw_fd();
                    let copied = transfer(offset, len, |at, done| {
                        // SAFETY: as above, on the copy.
                        unsafe { libc::pwrite(tfd, buf.add(done).cast(), len - done, at) }
                    });
                    match copied {
                        Ok(()) => true,
                        Err(errno) => {
                            // The guest's write stands on its own image; only the copy
                            // missed it (its datastore full, say). The blocks stay
                            // noted: the copy steps carry them, or fail the storage
                            // migration on the same error while the VM runs on.
                            tracing::warn!(
                                "disk {}: writing a guest write to the copy failed ({}); \
                                 mirroring stops",
                                self.id,
                                std::io::Error::from_raw_os_error(errno)
                            );
                            job.active = false;
                            false
                        }
                    }
                } else if let Some(mirror) = job.mirror.clone() {
                    // SAFETY: the caller guarantees buf..buf+len is readable.
                    let data = unsafe { std::slice::from_raw_parts(buf, len) };
                    match mirror.write(offset, data) {
                        Ok(()) => true,
                        Err(e) => {
                            // The guest's write stands on this host; the blocks stay
                            // noted, so the migration sends them (or fails on its own
                            // broken stream). Mirroring stops for this disk.
                            tracing::warn!("disk {}: mirroring a write failed: {e}", self.id);
                            job.active = false;
                            job.mirror = None;
                            false
                        }
                    }
                } else {
                    false
                };
                if mirrored {
                    // Written to both: nothing of this write is left to copy. A block
                    // it covers only in part stays noted if it was already: the
                    // earlier write's bytes there reached neither copy nor mirror.
                    let end = offset + len as u64;
                    for block in first..=last {
                        let whole = offset <= block * COPY_BLOCK && (block + 1) * COPY_BLOCK <= end;
                        if whole || !noted.contains(&block) {
                            job.dirty.unset(block);
                        }
                    }
                    job.added_us
                        .push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            // A storage migration caps the guest's write bytes (the operator's
            // figure); a migration with its disks caps what the next round must
            // carry: blocks newly dirtied, whatever the writes' size.
            let charge = if job.target.is_some() {
                len
            } else {
                (fresh * COPY_BLOCK) as usize
            };
            // The cap's epoch is read with the wait it sets, under the job lock a change
            // of cap takes too: a change after this point ends the wait.
            wait = job.throttle.as_mut().map(|t| {
                let seen = *self
                    .limit_changed
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                (t.take(charge), seen)
            });
        }
        drop(b);
        drop(job);
        if let Some((wait, seen)) = wait {
            // The guest's vCPU waits here, with no lock held: its write completes late,
            // or as soon as the cap changes.
            let (epoch, changed) = &self.limit_changed;
            let guard = epoch.lock().unwrap_or_else(|e| e.into_inner());
            // Poisoning only means another waiter panicked; the wait is over either way.
            let _ = changed.wait_timeout_while(guard, wait, |e| *e == seen);
        }
        Ok(())
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), i32> {
        let end = offset.checked_add(len as u64).ok_or(libc::EINVAL)?;
        if len == 0 || end > self.size {
            return Err(libc::EINVAL);
        }
        // O_DIRECT needs sector-aligned offsets and lengths; refuse rather than let
        // the kernel fail half-way.
        if self.direct && (!offset.is_multiple_of(512) || !len.is_multiple_of(512)) {
            return Err(libc::EINVAL);
        }
        Ok(())
    }
}

/// Repeats a positional read or write until `len` bytes moved: `op(file offset, bytes
/// done so far)` returns what pread/pwrite return. Short transfers continue, EINTR
/// retries, end of file is EIO.
fn transfer(
    offset: u64,
    len: usize,
    mut op: impl FnMut(libc::off_t, usize) -> isize,
) -> Result<(), i32> {
    let mut done = 0;
    while done < len {
        match op((offset + done as u64) as libc::off_t, done) {
            n if n > 0 => done += n as usize,
            0 => return Err(libc::EIO),
            _ => match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                e => return Err(e.unwrap_or(libc::EIO)),
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, name: &str) -> DiskConfig {
        DiskConfig {
            id: name.into(),
            path: dir.join("sub").join(format!("{name}.img")),
            size_mib: 1,
            cache: DiskCache::Writeback,
            write_log: true,
        }
    }

    #[test]
    fn creates_sparse_locks_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("ferry-block-{}", std::process::id()));
        let c = cfg(&dir, "a");
        {
            let set = DiskSet::open(std::slice::from_ref(&c)).unwrap();
            assert_eq!(std::fs::metadata(&c.path).unwrap().len(), 1 << 20);
            let e = Disk::open(&c).unwrap_err();
            assert!(matches!(e, DiskError::Locked { .. }), "{e}");
            let data = vec![7u8; 4096];
            // SAFETY: `data` is a live 4 KiB buffer.
            unsafe { set.disks[0].write_from(4096, data.as_ptr(), 4096) }.unwrap();
            let mut back = vec![0u8; 4096];
            // SAFETY: `back` is a live 4 KiB buffer.
            unsafe { set.disks[0].read_into(4096, back.as_mut_ptr(), 4096) }.unwrap();
            assert_eq!(back, data);
            // SAFETY: `back` is a live 4 KiB buffer; the request is out of range.
            let e = unsafe { set.disks[0].read_into(1 << 20, back.as_mut_ptr(), 4096) };
            assert_eq!(e, Err(libc::EINVAL));
        }
        // Never committed: the image it created is gone.
        assert!(!c.path.exists());
        assert!(
            !log_path(&c.path).exists(),
            "the write log goes with the image"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_write_the_cap_holds_completes_when_the_cap_is_lifted() {
        let dir = std::env::temp_dir().join(format!("ferry-block-cap-{}", std::process::id()));
        let c = cfg(&dir, "a");
        let set = DiskSet::open(std::slice::from_ref(&c)).unwrap();
        let d = &set.disks[0];
        *d.job() = Some(CopyJob {
            target: None,
            dirty: crate::bitmap::Bitmap::new(16),
            active: false,
            added_us: Vec::new(),
            // One byte a second: the write would wait most of a day.
            throttle: Some(WriteThrottle::new(1)),
            mirror: None,
            written: 0,
            activations: 0,
        });
        let data = vec![7u8; 4096];
        std::thread::scope(|scope| {
            // SAFETY: `data` is a live 4 KiB buffer for the whole scope.
            let writer = scope.spawn(|| unsafe { d.write_from(0, data.as_ptr(), 4096) });
            // Held back: the cap charged it a delay.
            while d
                .job()
                .as_ref()
                .and_then(|j| j.throttle.as_ref())
                .map(|t| t.delayed)
                == Some(std::time::Duration::ZERO)
            {
                std::thread::yield_now();
            }
            // One lift lets it complete, wherever it is between its charge and its
            // wait: it read the cap's epoch with the charge.
            set.limit_writes(None);
            assert_eq!(writer.join().unwrap(), Ok(()));
        });
        drop(set);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Records what it is sent, or fails every write.
    #[derive(Debug, Default)]
    struct Recorder {
        fail: bool,
        got: std::sync::Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl Mirror for Recorder {
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            if self.fail {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.got.lock().unwrap().push((offset, data.to_vec()));
            Ok(())
        }
    }

    #[test]
    fn an_active_mirror_takes_each_write_and_a_failed_one_leaves_the_blocks_noted() {
        let dir = std::env::temp_dir().join(format!("ferry-block-mirror-{}", std::process::id()));
        let c = cfg(&dir, "a");
        let set = DiskSet::open(std::slice::from_ref(&c)).unwrap();
        let d = &set.disks[0];
        let job = |mirror: std::sync::Arc<Recorder>| CopyJob {
            target: None,
            dirty: crate::bitmap::Bitmap::new(16),
            active: false,
            added_us: Vec::new(),
            throttle: None,
            mirror: Some(mirror),
            written: 0,
            activations: 0,
        };
        let data = vec![7u8; 4096];
        let ok = std::sync::Arc::new(Recorder::default());
        *d.job() = Some(job(ok.clone()));
        // Background until turned on: the write is only noted.
        // SAFETY: `data` is a live 4 KiB buffer.
        unsafe { d.write_from(0, data.as_ptr(), 4096) }.unwrap();
        assert!(ok.got.lock().unwrap().is_empty());
        assert_eq!(d.job().as_ref().unwrap().dirty.count(), 1);
        set.mirror_writes(true);
        // SAFETY: as above.
        unsafe { d.write_from(COPY_BLOCK, data.as_ptr(), 4096) }.unwrap();
        assert_eq!(*ok.got.lock().unwrap(), vec![(COPY_BLOCK, data.clone())]);
        // The mirrored block needs no copy; the earlier one still does.
        assert_eq!(d.job().as_ref().unwrap().dirty.count(), 1);
        // A mirrored write to another part of that earlier block leaves it noted:
        // the first write's bytes reached neither the copy nor the mirror.
        // SAFETY: as above.
        unsafe { d.write_from(8192, data.as_ptr(), 4096) }.unwrap();
        assert_eq!(ok.got.lock().unwrap().len(), 2);
        assert!(
            d.job().as_ref().unwrap().dirty.is_set(0),
            "block 0 still noted"
        );
        // A write covering a noted block whole carries all of it.
        let whole = vec![9u8; COPY_BLOCK as usize];
        // SAFETY: `whole` is a live buffer of one copy block.
        unsafe { d.write_from(0, whole.as_ptr(), whole.len()) }.unwrap();
        assert_eq!(d.job().as_ref().unwrap().dirty.count(), 0);

        let broken = std::sync::Arc::new(Recorder {
            fail: true,
            ..Recorder::default()
        });
        *d.job() = Some(job(broken));
        set.mirror_writes(true);
        // The guest's write still succeeds on this host.
        // SAFETY: as above.
        unsafe { d.write_from(2 * COPY_BLOCK, data.as_ptr(), 4096) }.unwrap();
        {
            let j = d.job();
            let j = j.as_ref().unwrap();
            assert_eq!(j.dirty.count(), 1, "the block must still be sent");
            assert!(!j.active && j.mirror.is_none(), "mirroring stops");
        }
        drop(set);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_copy_that_refuses_a_mirrored_write_fails_the_copy_not_the_guest() {
        let dir = std::env::temp_dir().join(format!("ferry-block-target-{}", std::process::id()));
        let c = cfg(&dir, "a");
        let set = DiskSet::open(std::slice::from_ref(&c)).unwrap();
        let d = &set.disks[0];
        // A copy that takes no write (opened read-only), as a full datastore would.
        let copy = dir.join("copy.img");
        std::fs::write(&copy, vec![0u8; 4096]).unwrap();
        *d.job() = Some(CopyJob {
            target: Some(std::fs::File::open(&copy).unwrap()),
            dirty: crate::bitmap::Bitmap::new(16),
            active: true,
            added_us: Vec::new(),
            throttle: None,
            mirror: None,
            written: 0,
            activations: 0,
        });
        let data = vec![5u8; 4096];
        // SAFETY: `data` is a live 4 KiB buffer.
        unsafe { d.write_from(COPY_BLOCK, data.as_ptr(), 4096) }.unwrap();
        let mut back = vec![0u8; 4096];
        // SAFETY: `back` is a live 4 KiB buffer.
        unsafe { d.read_into(COPY_BLOCK, back.as_mut_ptr(), 4096) }.unwrap();
        assert_eq!(back, data, "the guest's write stands on its image");
        {
            let j = d.job();
            let j = j.as_ref().unwrap();
            assert!(j.dirty.is_set(1), "the block is left for the copy steps");
            assert!(!j.active, "mirroring stops");
        }
        drop(set);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
