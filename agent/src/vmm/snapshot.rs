//! Point-in-time snapshots: `ferry snapshot` writes one, `ferry vmm --restore` starts a
//! new process from it. Also Ferry's backup format.
//!
//! ```text
//! DIR/manifest.json   format, version, sizes and CRC32 of every file's logical content
//! DIR/config.toml     the VM config as it was (disk paths as the VM had them)
//! DIR/state.bin       vCPU, irqchip, clock and device state (versioned blob with CRC)
//! DIR/memory.bin      guest memory, sparse: zero pages are holes
//! DIR/disks/ID.img    sparse copy of each disk image, taken while the VM was paused
//! ```
//! A snapshot is written into a temporary folder beside DIR and renamed into place
//! only when complete, so a failed snapshot leaves nothing behind.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::blob::{self, BlobKind};
use super::config::{DiskConfig, VmConfig};
use super::machine::{Machine, RunState};
use super::state::{StateError, VcpuState, VmState};

pub const FORMAT: &str = "ferry-snapshot";
pub const VERSION: u32 = 1;
const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0} already exists; choose a new folder for the snapshot")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a Ferry snapshot (no manifest.json)")]
    NotSnapshot(PathBuf),
    #[error("{path}: malformed manifest: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error(
        "{path}: snapshot format version {found} is not supported (this ferry reads version {VERSION})"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is corrupted: CRC32 {computed:#010x}, manifest says {expected:#010x}")]
    Corrupt {
        path: PathBuf,
        expected: u32,
        computed: u32,
    },
    #[error("{path} has {actual} bytes, manifest says {expected}")]
    Length {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("{path}: {source}")]
    Blob {
        path: PathBuf,
        source: blob::BlobError,
    },
    #[error("saving VM state: {0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Pause(#[from] super::machine::PauseError),
    #[error("{0}")]
    Resume(#[from] super::machine::ResumeError),
    #[error("disk {0:?} of the snapshot is missing from its config")]
    UnknownDisk(String),
    #[error("{0}")]
    Config(#[from] super::config::ConfigError),
    #[error("{0}")]
    Disk(#[from] super::block::DiskError),
    #[error("the VM has crashed; a snapshot of it would not restore")]
    Crashed,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Everything but guest memory and disk contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceState,
}

/// The lab devices' state: the guest's TSC rate and seed it was booted with (the block
/// device holds no state between requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub tsc_hz: u64,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub created_unix_ms: u64,
    pub memory_bytes: u64,
    pub memory_crc32: u32,
    pub disks: Vec<DiskEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    pub id: String,
    pub file: String,
    pub size_bytes: u64,
    pub crc32: u32,
}

pub use ferry_api::SnapshotReport;

impl MachineState {
    /// Reads the state of a paused machine.
    pub fn save(m: &Machine) -> Result<Self, SnapshotError> {
        let vm = VmState::save(&m.vm.fd, false)?;
        let mut vcpus = Vec::with_capacity(m.vcpus.len());
        for (i, fd) in m.vcpus.iter().enumerate() {
            let fd = fd.lock().unwrap_or_else(|e| e.into_inner());
            let vcpu = match m.msr_lists.get(i) {
                Some(msrs) => VcpuState::save(&fd, msrs)?,
                None => VcpuState::save(&fd, &super::state::probe_msrs(&m.vm.kvm, &fd)?)?,
            };
            vcpus.push(vcpu);
        }
        Ok(Self {
            vm,
            vcpus,
            devices: DeviceState {
                tsc_hz: m.tsc_hz,
                seed: m.seed,
            },
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, blob::BlobError> {
        blob::encode(BlobKind::MachineState, self)
    }

    /// Writes the state into a fresh VM's vCPUs (one state each, in order) and the VM.
    pub fn restore(
        &self,
        vm: &kvm_ioctls::VmFd,
        vcpus: &[kvm_ioctls::VcpuFd],
    ) -> Result<(), StateError> {
        for (fd, state) in vcpus.iter().zip(&self.vcpus) {
            state.restore(fd)?;
        }
        self.vm.restore(vm)
    }
}

/// Pauses the VM, writes a complete snapshot into `out`, and resumes it if it was running.
pub fn take(m: &Machine, out: &Path) -> Result<SnapshotReport, SnapshotError> {
    if out.exists() {
        return Err(SnapshotError::Exists(out.to_owned()));
    }
    let was = m.state();
    if was == RunState::Crashed {
        return Err(SnapshotError::Crashed);
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let t0 = Instant::now();
    m.pause()?;
    let written = write_paused(m, &tmp);
    let pause_ms = t0.elapsed().as_secs_f64() * 1e3;
    if was == RunState::Running {
        m.resume()?;
    }
    // The copy is complete in the page cache; making it durable need not keep the
    // guest paused.
    let result = written.and_then(|mut report| {
        sync_files(&tmp)?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
        if let Some(parent) = out.parent() {
            sync_dir(parent);
        }
        report.path = out.to_owned();
        report.pause_ms = pause_ms;
        Ok(report)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_paused(m: &Machine, dir: &Path) -> Result<SnapshotReport, SnapshotError> {
    std::fs::create_dir_all(dir.join("disks")).map_err(io(dir))?;
    m.disks.flush_all()?;
    let counters = m.status();
    let t0 = Instant::now();
    let state = MachineState::save(m)?
        .encode()
        .map_err(|source| SnapshotError::Blob {
            path: dir.join("state.bin"),
            source,
        })?;
    let state_save_ms = t0.elapsed().as_secs_f64() * 1e3;
    write_file(&dir.join("state.bin"), &state)?;
    write_file(
        &dir.join("config.toml"),
        m.current_config().to_toml().as_bytes(),
    )?;

    // SAFETY: every vCPU is parked, and the VMM itself writes guest memory only from
    // vCPU threads at exits, so nothing changes it while it is copied.
    let memory = unsafe { m.memory_slice() };
    let (memory_crc32, memory_bytes_written) =
        write_sparse_memory(&dir.join("memory.bin"), memory)?;

    let mut disks = Vec::new();
    let mut disk_bytes_copied = 0;
    for disk in &m.disks.disks {
        let file = format!("disks/{}.img", disk.id);
        let path = disk.path();
        let src = File::open(&path).map_err(io(&path))?;
        let dst_path = dir.join(&file);
        let dst = File::create(&dst_path).map_err(io(&dst_path))?;
        let (crc32, copied) = copy_sparse(&src, &path, &dst, &dst_path, disk.size)?;
        disk_bytes_copied += copied;
        disks.push(DiskEntry {
            id: disk.id.clone(),
            file,
            size_bytes: disk.size,
            crc32,
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        name: m.cfg.name.clone(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        memory_bytes: memory.len() as u64,
        memory_crc32,
        disks,
    };
    let text = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    write_file(&dir.join("manifest.json"), &text)?;
    Ok(SnapshotReport {
        path: dir.to_owned(),
        pause_ms: 0.0,
        memory_bytes: memory.len() as u64,
        memory_bytes_written,
        disk_bytes_copied,
        state_bytes: state.len() as u64,
        state_save_ms,
        heartbeats: counters.heartbeats,
        guest_pages_written: counters.guest_pages_written,
        disk_writes: counters.disk_writes,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

/// fsyncs every file of a snapshot folder, then the folders.
fn sync_files(dir: &Path) -> Result<(), SnapshotError> {
    for sub in [dir.to_path_buf(), dir.join("disks")] {
        for entry in std::fs::read_dir(&sub).map_err(io(&sub))? {
            let path = entry.map_err(io(&sub))?.path();
            if path.is_file() {
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io(&path))?;
            }
        }
        sync_dir(&sub);
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Whether a page (or any buffer) is all zero: zero pages are holes in a snapshot and
/// runs on the migration wire.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to handles alignment.
    let (pre, words, post) = unsafe { b.align_to::<u64>() };
    pre.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0)
}

/// Writes non-zero pages at their offsets (zero pages become holes); returns the CRC32
/// of the whole logical content and the bytes actually written.
fn write_sparse_memory(path: &Path, memory: &[u8]) -> Result<(u32, u64), SnapshotError> {
    let file = File::create(path).map_err(io(path))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(memory);
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let flush = |start: usize, end: usize| -> Result<u64, SnapshotError> {
        file.write_all_at(&memory[start..end], start as u64)
            .map_err(io(path))?;
        Ok((end - start) as u64)
    };
    for (i, page) in memory.chunks(PAGE).enumerate() {
        let off = i * PAGE;
        match (is_zero(page), run_start) {
            (false, None) => run_start = Some(off),
            (true, Some(s)) => {
                written += flush(s, off)?;
                run_start = None;
            }
            (false, Some(s)) if off - s >= CHUNK => {
                written += flush(s, off)?;
                run_start = Some(off);
            }
            _ => {}
        }
    }
    if let Some(s) = run_start {
        written += flush(s, memory.len())?;
    }
    file.set_len(memory.len() as u64).map_err(io(path))?;
    Ok((crc.finalize(), written))
}

/// Data extents of a file: (offset, len), via SEEK_DATA/SEEK_HOLE.
fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an fd we own; no memory is involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            len as i64
        } else {
            hole.min(len as i64)
        };
        if end > data {
            out.push((data as u64, (end - data) as u64));
        }
        pos = end;
    }
    out
}

/// Copies `len` logical bytes, skipping holes and zero pages; returns (CRC32 of the
/// logical content, bytes written).
fn copy_sparse(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    len: u64,
) -> Result<(u32, u64), SnapshotError> {
    dst.set_len(len).map_err(io(dst_path))?;
    let mut crc = crc32fast::Hasher::new();
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    let mut written = 0u64;
    let feed_zeros = |crc: &mut crc32fast::Hasher, mut n: u64| {
        while n > 0 {
            let k = n.min(CHUNK as u64) as usize;
            crc.update(&zeros[..k]);
            n -= k as u64;
        }
    };
    for (start, extent) in data_extents(src, len) {
        feed_zeros(&mut crc, start - pos);
        let mut off = start;
        while off < start + extent {
            let k = ((start + extent - off) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..k], off)
                .map_err(io(src_path))?;
            crc.update(&buf[..k]);
            for (j, page) in buf[..k].chunks(PAGE).enumerate() {
                if !is_zero(page) {
                    dst.write_all_at(page, off + (j * PAGE) as u64)
                        .map_err(io(dst_path))?;
                    written += page.len() as u64;
                }
            }
            off += k as u64;
        }
        pos = start + extent;
    }
    feed_zeros(&mut crc, len - pos);
    Ok((crc.finalize(), written))
}

/// A snapshot opened for restore, checked against its manifest.
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub config: VmConfig,
    pub state: MachineState,
}

impl Snapshot {
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let mpath = dir.join("manifest.json");
        if !mpath.exists() {
            return Err(SnapshotError::NotSnapshot(dir.to_owned()));
        }
        let text = std::fs::read(&mpath).map_err(io(&mpath))?;
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| SnapshotError::Manifest {
                path: mpath.clone(),
                message: e.to_string(),
            })?;
        if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT) {
            return Err(SnapshotError::NotSnapshot(dir.to_owned()));
        }
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != u64::from(VERSION) {
            return Err(SnapshotError::Version {
                path: mpath,
                found: version.min(u64::from(u32::MAX)) as u32,
            });
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| SnapshotError::Manifest {
                path: mpath.clone(),
                message: e.to_string(),
            })?;
        let config = VmConfig::load(&dir.join("config.toml"))?;
        if config.memory_mib << 20 != manifest.memory_bytes {
            return Err(SnapshotError::Manifest {
                path: mpath,
                message: format!(
                    "memory_bytes {} does not match the config's memory_mib {}",
                    manifest.memory_bytes, config.memory_mib
                ),
            });
        }
        let spath = dir.join("state.bin");
        let bytes = std::fs::read(&spath).map_err(io(&spath))?;
        let state: MachineState =
            blob::decode(BlobKind::MachineState, &bytes).map_err(|source| SnapshotError::Blob {
                path: spath.clone(),
                source,
            })?;
        if state.vcpus.len() != config.vcpus as usize {
            return Err(SnapshotError::Manifest {
                path: spath,
                message: format!(
                    "{} vCPU states for a {}-vCPU config",
                    state.vcpus.len(),
                    config.vcpus
                ),
            });
        }
        for d in &manifest.disks {
            if !config.disks.iter().any(|c| c.id == d.id) {
                return Err(SnapshotError::UnknownDisk(d.id.clone()));
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
            config,
            state,
        })
    }

    /// Loads guest memory into `memory` (zeroed, `memory_bytes` long) and checks its CRC.
    pub fn load_memory(&self, memory: &mut [u8]) -> Result<(), SnapshotError> {
        let path = self.dir.join("memory.bin");
        let file = File::open(&path).map_err(io(&path))?;
        let actual = file.metadata().map_err(io(&path))?.len();
        if actual != self.manifest.memory_bytes || memory.len() as u64 != actual {
            return Err(SnapshotError::Length {
                path,
                actual,
                expected: self.manifest.memory_bytes,
            });
        }
        for (start, len) in data_extents(&file, actual) {
            let range = start as usize..(start + len) as usize;
            file.read_exact_at(&mut memory[range], start)
                .map_err(io(&path))?;
        }
        let computed = crc32fast::hash(memory);
        if computed != self.manifest.memory_crc32 {
            return Err(SnapshotError::Corrupt {
                path,
                expected: self.manifest.memory_crc32,
                computed,
            });
        }
        Ok(())
    }

    /// Copies the snapshot's disk images to where the restored VM will use them (the
    /// original paths, or `disk_dir/ID.img`) and returns the disk configs to open.
    /// Refuses to overwrite an image another VM holds locked.
    pub fn restore_disks(&self, disk_dir: Option<&Path>) -> Result<Vec<DiskConfig>, SnapshotError> {
        let mut out = Vec::new();
        for entry in &self.manifest.disks {
            let mut cfg = self
                .config
                .disks
                .iter()
                .find(|c| c.id == entry.id)
                .cloned()
                .ok_or_else(|| SnapshotError::UnknownDisk(entry.id.clone()))?;
            if let Some(d) = disk_dir {
                cfg.path = d.join(format!("{}.img", entry.id));
            }
            let src_path = self.dir.join(&entry.file);
            let src = File::open(&src_path).map_err(io(&src_path))?;
            let actual = src.metadata().map_err(io(&src_path))?.len();
            if actual != entry.size_bytes {
                return Err(SnapshotError::Length {
                    path: src_path,
                    actual,
                    expected: entry.size_bytes,
                });
            }
            if let Some(parent) = cfg.path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let dst = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&cfg.path)
                .map_err(io(&cfg.path))?;
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(dst.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Err(super::block::DiskError::Locked {
                    id: entry.id.clone(),
                    path: cfg.path.clone(),
                }
                .into());
            }
            // Start from an empty sparse file so no block of the old image survives,
            // and so does its write log: the image's history restarts at the snapshot.
            dst.set_len(0).map_err(io(&cfg.path))?;
            let _ = std::fs::remove_file(super::block::log_path(&cfg.path));
            let (crc, _) = copy_sparse(&src, &src_path, &dst, &cfg.path, entry.size_bytes)?;
            if crc != entry.crc32 {
                return Err(SnapshotError::Corrupt {
                    path: src_path,
                    expected: entry.crc32,
                    computed: crc,
                });
            }
            dst.sync_all().map_err(io(&cfg.path))?;
            out.push(cfg);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = std::env::temp_dir().join(format!("ferry-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let src = File::create(&a).unwrap();
        src.set_len(8 << 20).unwrap();
        src.write_all_at(&[5u8; 4096], 3 << 20).unwrap();
        src.write_all_at(&[0u8; 4096], 5 << 20).unwrap();
        let src = File::open(&a).unwrap();
        let dst = File::create(&b).unwrap();
        let (crc, written) = copy_sparse(&src, &a, &dst, &b, 8 << 20).unwrap();
        assert_eq!(written, 4096);
        assert_eq!(crc, crc32fast::hash(&std::fs::read(&a).unwrap()));
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sparse_memory_round_trip() {
        let dir = std::env::temp_dir().join(format!("ferry-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut mem = vec![0u8; 64 * PAGE];
        mem[5 * PAGE + 7] = 1;
        mem[40 * PAGE..42 * PAGE].fill(9);
        let path = dir.join("m");
        let (crc, written) = write_sparse_memory(&path, &mem).unwrap();
        assert_eq!(written, 3 * PAGE as u64);
        assert_eq!(crc, crc32fast::hash(&mem));
        assert_eq!(std::fs::read(&path).unwrap(), mem);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
