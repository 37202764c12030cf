//! Disks travelling with a migration (`--copy-storage`), for hosts that share no
//! storage. The source sends every disk's data once (holes stay holes), then with each
//! pre-copy round the blocks the guest wrote meanwhile (the VMM sees every write), and
//! the last ones while the VM is paused. The destination writes them into images of
//! its own under `DATASTORE/<vm name>/`, and at the end a config there that names them.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::protocol::Message;
use super::source::{MigrateError, Sender};
use super::storage::{Aligned, RUN_BLOCKS, data_blocks, steps};
use crate::vmm::block::{COPY_BLOCK, CopyJob, log_path};
use crate::vmm::config::VmConfig;
use crate::vmm::dirty::DirtyBitmap;

impl Sender<'_> {
    /// Announces the disks, starts noting guest writes, and sends every block that
    /// holds data.
    pub(super) fn disks_start(&mut self) -> Result<(), MigrateError> {
        let disks = &self.m.disks.disks;
        self.send(&Message::Disks {
            disks: disks.iter().map(|d| (d.id.clone(), d.size)).collect(),
        })?;
        let mut todo = Vec::new();
        for d in disks {
            let blocks = d.size.div_ceil(COPY_BLOCK);
            // Noting writes first, then looking for data: a write into a hole during
            // the scan is caught either way.
            *d.job() = Some(CopyJob {
                target: None,
                dirty: DirtyBitmap::new(blocks),
                active: false,
                added_us: Vec::new(),
                throttle: None,
            });
            let file = d
                .reopen_read()
                .map_err(|e| MigrateError::Vm(format!("disk {}: {e}", d.id)))?;
            let mut set = DirtyBitmap::new(blocks);
            for b in data_blocks(&file, d.size) {
                set.set(b);
            }
            todo.push(set);
        }
        self.disks_send(todo)
    }

    /// Blocks written since they were last sent, summed over the disks.
    pub(super) fn disks_dirty_bytes(&self) -> u64 {
        self.m
            .disks
            .disks
            .iter()
            .map(|d| d.job().as_ref().map_or(0, |j| j.dirty.count()) * COPY_BLOCK)
            .sum()
    }

    /// Sends what the guest wrote since the last call (or, with the VM paused, the
    /// last of it; `last` also ends the noting).
    pub(super) fn disks_round(&mut self, last: bool) -> Result<(), MigrateError> {
        let mut todo = Vec::new();
        for d in &self.m.disks.disks {
            let mut job = d.job();
            let set = match job.as_mut() {
                Some(j) => {
                    let blocks = j.dirty.pages();
                    std::mem::replace(&mut j.dirty, DirtyBitmap::new(blocks))
                }
                None => DirtyBitmap::new(d.size.div_ceil(COPY_BLOCK)),
            };
            if last {
                *job = None;
            }
            todo.push(set);
        }
        self.disks_send(todo)
    }

    fn disks_send(&mut self, todo: Vec<DirtyBitmap>) -> Result<(), MigrateError> {
        let mut buf = Aligned::new();
        for (i, set) in todo.iter().enumerate() {
            let d = &self.m.disks.disks[i];
            let file = d
                .reopen_read()
                .map_err(|e| MigrateError::Vm(format!("disk {}: {e}", d.id)))?;
            for (first, count) in steps(set) {
                let at = first * COPY_BLOCK;
                let len = (count.min(RUN_BLOCKS) * COPY_BLOCK).min(d.size - at) as usize;
                {
                    // Read under the job lock: a guest write lands before this read
                    // (and is in it) or after (and is noted for the next round).
                    let mut job = d.job();
                    file.read_exact_at(buf.get(len), at)
                        .map_err(|e| MigrateError::Vm(format!("reading disk {}: {e}", d.id)))?;
                    if let Some(j) = job.as_mut() {
                        for b in first..first + count {
                            j.dirty.unset(b);
                        }
                    }
                }
                self.send(&Message::DiskData {
                    disk: i as u32,
                    offset: at,
                    data: buf.get(len).to_vec(),
                })?;
                self.stats.disk_bytes += len as u64;
            }
        }
        Ok(())
    }

    /// Paused: each disk's write log, compacted to the last acknowledged generation
    /// per block, so `ferry disk-check` works on the destination's copies too.
    pub(super) fn disks_logs(&mut self) -> Result<(), MigrateError> {
        for (i, d) in self.m.disks.disks.iter().enumerate() {
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
        for d in &self.m.disks.disks {
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
    #[error("disk data outside disk {disk}: {len} bytes at {offset}")]
    OutOfRange { disk: u32, offset: u64, len: usize },
}

/// The destination's copies of a migrating VM's disks, in `DATASTORE/<name>/`. Removed
/// again unless [`DiskStore::finish`] ran.
pub struct DiskStore {
    folder: PathBuf,
    disks: Vec<(PathBuf, File, u64)>,
    kept: bool,
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
        let folder = datastore.join(&cfg.name);
        if folder.exists() {
            return Err(DiskStoreError::Exists { path: folder });
        }
        std::fs::create_dir_all(&folder).map_err(io("creating", &folder))?;
        let mut store = Self {
            folder,
            disks: Vec::new(),
            kept: false,
        };
        for c in &cfg.disks {
            let path = store.folder.join(format!("{}-{}.img", cfg.name, c.id));
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
        Ok(store)
    }

    pub fn write(&self, disk: u32, offset: u64, data: &[u8]) -> Result<(), DiskStoreError> {
        let (path, file, size) =
            self.disks
                .get(disk as usize)
                .ok_or(DiskStoreError::OutOfRange {
                    disk,
                    offset,
                    len: data.len(),
                })?;
        if offset.saturating_add(data.len() as u64) > *size {
            return Err(DiskStoreError::OutOfRange {
                disk,
                offset,
                len: data.len(),
            });
        }
        // O_DIRECT wants aligned memory: the frame buffer may not be.
        let mut buf = Aligned::new();
        for (i, chunk) in data.chunks((RUN_BLOCKS * COPY_BLOCK) as usize).enumerate() {
            let at = offset + (i as u64) * RUN_BLOCKS * COPY_BLOCK;
            let b = buf.get(chunk.len());
            b.copy_from_slice(chunk);
            file.write_all_at(b, at)
                .map_err(|source| DiskStoreError::Io {
                    what: "writing",
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(())
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
    pub fn finish(mut self, cfg: &VmConfig) -> Result<VmConfig, DiskStoreError> {
        let mut cfg = cfg.clone();
        for ((path, file, _), c) in self.disks.iter().zip(cfg.disks.iter_mut()) {
            file.sync_all().map_err(|source| DiskStoreError::Io {
                what: "syncing",
                path: path.clone(),
                source,
            })?;
            c.path = path.clone();
        }
        let config = self.folder.join(format!("{}.toml", cfg.name));
        cfg.write_atomic(&config)
            .map_err(|source| DiskStoreError::Io {
                what: "writing",
                path: config.clone(),
                source,
            })?;
        self.kept = true;
        Ok(cfg)
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_dir_all(&self.folder);
        }
    }
}
