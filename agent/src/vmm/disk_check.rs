//! `ferry disk-check`: checks, offline, every block of the images a config names
//! against what the guest wrote and what the VMM acknowledged (the write log beside
//! each image). A block must be whole (magic, its own block number, checksum) and no
//! older than the last write the guest was told had completed; a block the log says
//! was written must not read back as never written.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::block::log_path;
use super::config::VmConfig;
use crate::guest::abi::{BLOCK_MAGIC, block_checksum};

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub disk: String,
    pub block: u64,
    pub what: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub disks: usize,
    pub blocks_checked: u64,
    pub blocks_written: u64,
    pub acknowledged_writes: u64,
    pub errors: u64,
    /// The first problems found (at most 20).
    pub problems: Vec<Problem>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Config(#[from] super::config::ConfigError),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn check(config: &Path) -> Result<Report, CheckError> {
    let cfg = VmConfig::load(config)?;
    let block = u64::from(cfg.workload.disk.block_kib) * 1024;
    let mut report = Report {
        disks: cfg.disks.len(),
        ..Report::default()
    };
    for d in &cfg.disks {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CheckError::Io { path, source }
        };
        // Last acknowledged generation per block offset.
        let mut acked: HashMap<u64, u64> = HashMap::new();
        let log = log_path(&d.path);
        if let Ok(bytes) = std::fs::read(&log) {
            for rec in bytes.chunks_exact(16) {
                let offset = u64::from_le_bytes(rec[..8].try_into().unwrap_or_default());
                let generation = u64::from_le_bytes(rec[8..].try_into().unwrap_or_default());
                let e = acked.entry(offset).or_insert(0);
                *e = (*e).max(generation);
                report.acknowledged_writes += 1;
            }
        }
        let mut f = std::fs::File::open(&d.path).map_err(io(&d.path))?;
        let mut buf = vec![0u8; block as usize];
        let mut offset = 0u64;
        let size = d.size_mib << 20;
        let problem = |report: &mut Report, offset: u64, what: String| {
            report.errors += 1;
            if report.problems.len() < 20 {
                report.problems.push(Problem {
                    disk: d.id.clone(),
                    block: offset / block,
                    what,
                });
            }
        };
        while offset + block <= size {
            f.read_exact(&mut buf).map_err(io(&d.path))?;
            report.blocks_checked += 1;
            let word =
                |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or_default());
            let want = acked.get(&offset).copied();
            if buf.iter().all(|&b| b == 0) {
                if let Some(g) = want {
                    problem(
                        &mut report,
                        offset,
                        format!("reads as never written, but generation {g} was acknowledged"),
                    );
                }
            } else {
                report.blocks_written += 1;
                let (magic, number, generation, sum) = (word(0), word(1), word(2), word(3));
                if magic as u32 != BLOCK_MAGIC {
                    problem(
                        &mut report,
                        offset,
                        "is not a Ferry block (bad magic)".into(),
                    );
                } else if number != offset / block {
                    problem(&mut report, offset, format!("holds block {number}"));
                } else if sum != block_checksum(number, generation, &buf[32..]) {
                    problem(
                        &mut report,
                        offset,
                        "fails its checksum (torn or corrupt)".into(),
                    );
                } else if let Some(g) = want.filter(|&g| generation < g) {
                    problem(
                        &mut report,
                        offset,
                        format!("is generation {generation}, older than acknowledged {g}"),
                    );
                }
            }
            offset += block;
        }
    }
    Ok(report)
}
