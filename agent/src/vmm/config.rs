//! The VM configuration file: TOML, parsed once into typed, validated values.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest guest Ferry maps as one flat region. Above 3 GiB the region would
/// reach the x86 MMIO hole (LAPIC/IOAPIC), which the lab machine model keeps free.
pub const MAX_MEMORY_MIB: u64 = 3072;
pub use crate::guest::layout::MAX_VCPUS;
pub const MAX_DISKS: usize = 4;
/// The lab block device moves one request per exit through a bounce area of this size.
pub const MAX_BLOCK_KIB: u32 = 64;
/// The largest disk image: 16 TiB (its byte count and block numbers stay far from
/// 64-bit overflow).
pub const MAX_DISK_MIB: u64 = 16 << 20;
/// The lab guest's page-write rate at most, over all vCPUs: well past what one vCPU
/// can write (about a million pages/s on fast hardware), so any real load fits.
pub const MAX_DIRTY_PAGES_PER_SEC: u64 = 100_000_000;
/// The lab guest's disk writes per second at most, over all vCPUs (each is an exit
/// to the VMM and a host write; no host does a million of them per second).
pub const MAX_DISK_WRITE_OPS_PER_SEC: u64 = 1_000_000;
/// The guest's re-check of what it wrote runs at least once an hour.
pub const MAX_VERIFY_INTERVAL_MS: u64 = 3_600_000;

/// Checks a page-write rate wherever one enters (a config, `set-workload`).
pub fn check_dirty_rate(pages_per_sec: u64) -> Result<(), String> {
    if pages_per_sec > MAX_DIRTY_PAGES_PER_SEC {
        return Err(format!(
            "dirty_pages_per_sec = {pages_per_sec} is over the {MAX_DIRTY_PAGES_PER_SEC} the \
             lab guest can be asked for (0 = as fast as it can)"
        ));
    }
    Ok(())
}

/// A name that is safe as a file name part: a VM's name, a disk's id.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DirtyTracking {
    #[default]
    Bitmap,
    Ring,
}

/// How the lab guest is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Entry {
    /// The VMM sets up long mode and enters the workload at CPL3 directly.
    #[default]
    Direct,
    /// Through the guest's own 32-bit entry stub (as a multiboot loader would start
    /// it): it builds its page tables, enters long mode and drops to CPL3 itself.
    Stub32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    Sequential,
    #[default]
    Random,
    Hotcold,
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    Zero,
    #[default]
    Text,
    Random,
    Mixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// Buffered I/O through the host page cache.
    #[default]
    Writeback,
    /// O_DIRECT, as production VMMs open images.
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub dirty_tracking: DirtyTracking,
    #[serde(default)]
    pub entry: Entry,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Bumped each time Ferry rewrites this file (a storage migration moved a disk).
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// 0 (the default): half of `memory_mib`.
    pub working_set_mib: u64,
    pub dirty_pages_per_sec: u64,
    pub pattern: Pattern,
    pub hot_fraction: f64,
    pub content: Content,
    pub verify_interval_ms: u64,
    pub fill: bool,
    pub disk: DiskWorkload,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            working_set_mib: 0,
            dirty_pages_per_sec: 10_000,
            pattern: Pattern::Random,
            hot_fraction: 0.1,
            content: Content::Text,
            verify_interval_ms: 100,
            fill: true,
            disk: DiskWorkload::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskWorkload {
    pub write_ops_per_sec: u64,
    pub block_kib: u32,
}

impl Default for DiskWorkload {
    fn default() -> Self {
        Self {
            write_ops_per_sec: 0,
            block_kib: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub id: String,
    /// Relative paths are taken from the config file's folder.
    pub path: PathBuf,
    pub size_mib: u64,
    #[serde(default)]
    pub cache: DiskCache,
    /// Keep `<image>.wlog` beside the image: every completed guest write's block and
    /// generation, so `ferry disk-check` can tell whether an acknowledged write is
    /// missing. It survives a VMM crash (the records reach the kernel before the guest
    /// is told the write is done), not a host power cut.
    #[serde(default = "default_true")]
    pub write_log: bool,
}

fn default_true() -> bool {
    true
}

fn default_vcpus() -> u32 {
    1
}

impl VmConfig {
    /// Reads, parses and validates a config file; disk paths come back absolute.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, path, &base)
    }

    /// Parses config text; `origin` names it in errors, `base` anchors relative disk paths.
    pub fn parse(text: &str, origin: &Path, base: &Path) -> Result<Self, ConfigError> {
        let mut cfg = Self::parse_unresolved(text, origin)?;
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_owned());
        for disk in &mut cfg.disks {
            if disk.path.is_relative() {
                disk.path = base.join(&disk.path);
            }
        }
        Ok(cfg)
    }

    /// As [`parse`](Self::parse), with disk paths left as written (a config from the
    /// migration stream, whose disk paths are names the receiver places itself).
    pub fn parse_unresolved(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let mut cfg: VmConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.message().trim().replace('\n', "; ")
                + &e.span()
                    .map(|s| {
                        let before = &text[..s.start.min(text.len())];
                        let line = before.matches('\n').count() + 1;
                        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                        format!(" (line {line}, column {col})")
                    })
                    .unwrap_or_default(),
        })?;
        if cfg.workload.working_set_mib == 0 {
            cfg.workload.working_set_mib = cfg.memory_mib / 2;
        }
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "name {:?} must be 1-64 characters of letters, digits, '-', '_' or '.' \
                 (and not \".\" or \"..\")",
                self.name
            ));
        }
        if self.memory_mib < 16 || self.memory_mib > MAX_MEMORY_MIB {
            return Err(format!(
                "memory_mib = {} is outside 16..={MAX_MEMORY_MIB}",
                self.memory_mib
            ));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(format!("vcpus = {} is outside 1..={MAX_VCPUS}", self.vcpus));
        }
        if self.entry == Entry::Stub32 && self.vcpus != 1 {
            return Err(format!(
                "entry = \"stub32\" starts only the bootstrap processor; set vcpus = 1 (not {})",
                self.vcpus
            ));
        }
        let w = &self.workload;
        if !(w.hot_fraction > 0.0 && w.hot_fraction < 1.0) {
            return Err(format!(
                "workload.hot_fraction = {} must be between 0 and 1 (exclusive)",
                w.hot_fraction
            ));
        }
        if w.verify_interval_ms == 0 || w.verify_interval_ms > MAX_VERIFY_INTERVAL_MS {
            return Err(format!(
                "workload.verify_interval_ms = {} is outside 1..={MAX_VERIFY_INTERVAL_MS}",
                w.verify_interval_ms
            ));
        }
        check_dirty_rate(w.dirty_pages_per_sec).map_err(|e| format!("workload.{e}"))?;
        if w.disk.write_ops_per_sec > MAX_DISK_WRITE_OPS_PER_SEC {
            return Err(format!(
                "workload.disk.write_ops_per_sec = {} is over {MAX_DISK_WRITE_OPS_PER_SEC}",
                w.disk.write_ops_per_sec
            ));
        }
        let bk = w.disk.block_kib;
        if bk == 0 || bk > MAX_BLOCK_KIB || !bk.is_power_of_two() {
            return Err(format!(
                "workload.disk.block_kib = {bk} must be a power of two in 1..={MAX_BLOCK_KIB}"
            ));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(format!(
                "{} disks configured; at most {MAX_DISKS} are supported",
                self.disks.len()
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if !valid_name(&d.id) {
                return Err(format!(
                    "disk id {:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                    d.id
                ));
            }
            if self.disks[..i].iter().any(|o| o.id == d.id) {
                return Err(format!("disk id {:?} is not unique", d.id));
            }
            if d.size_mib == 0 || d.size_mib > MAX_DISK_MIB {
                return Err(format!(
                    "disk {:?}: size_mib = {} is outside 1..={MAX_DISK_MIB} (16 TiB)",
                    d.id, d.size_mib
                ));
            }
            if d.size_mib * 1024 < u64::from(bk) {
                return Err(format!(
                    "disk {:?}: size_mib = {} is smaller than one {bk} KiB block",
                    d.id, d.size_mib
                ));
            }
        }
        if w.disk.write_ops_per_sec > 0 && self.disks.is_empty() {
            return Err("workload.disk.write_ops_per_sec > 0 needs at least one [[disks]]".into());
        }
        // The layout check (working set plus Ferry's reserved area fits in memory) needs
        // the guest layout; it is done there so the two never disagree.
        self.layout()?;
        Ok(())
    }

    /// Where everything lives in the lab guest's memory.
    pub fn layout(&self) -> Result<crate::guest::layout::Layout, String> {
        crate::guest::layout::Layout::new(
            self.memory_mib,
            self.workload.working_set_mib,
            self.workload_disk_blocks(),
        )
    }

    /// Blocks the guest's disk workload writes on the first disk (the one it exercises).
    pub fn workload_disk_blocks(&self) -> u64 {
        match self.disks.first() {
            Some(d) if self.workload.disk.write_ops_per_sec > 0 => {
                d.size_mib * 1024 / u64::from(self.workload.disk.block_kib)
            }
            _ => 0,
        }
    }

    pub fn to_toml(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// Replaces the file at `path` with this config so that a crash at any moment
    /// leaves either the old file or the new one, whole: a temporary file beside it,
    /// synced, renamed over it, and the folder synced.
    pub fn write_atomic(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("config"),
            std::process::id()
        ));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.to_toml().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::parse(text, Path::new("t.toml"), Path::new("/srv/vms"))
    }

    #[test]
    fn full_example_parses() {
        let cfg = parse(
            r#"
name = "lab1"
memory_mib = 1024
vcpus = 2
dirty_tracking = "ring"
[workload]
working_set_mib = 512
dirty_pages_per_sec = 20000
pattern = "hotcold"
hot_fraction = 0.1
content = "mixed"
verify_interval_ms = 100
fill = true
[workload.disk]
write_ops_per_sec = 200
block_kib = 4
[[disks]]
id = "root"
path = "disks/lab1-root.img"
size_mib = 256
cache = "none"
"#,
        )
        .unwrap();
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.dirty_tracking, DirtyTracking::Ring);
        assert_eq!(cfg.workload.pattern, Pattern::Hotcold);
        assert_eq!(
            cfg.disks[0].path,
            PathBuf::from("/srv/vms/disks/lab1-root.img")
        );
        assert_eq!(cfg.disks[0].cache, DiskCache::None);
        assert_eq!(cfg.workload_disk_blocks(), 256 * 256);
        let again = VmConfig::parse(&cfg.to_toml(), Path::new("x"), Path::new("/")).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("name = \"a\"\nmemory_mib = 64\nmemroy = 3\n").unwrap_err();
        assert!(e.to_string().contains("memroy"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, needle) in [
            ("name = \"a\"\nmemory_mib = 8", "memory_mib"),
            ("name = \"a\"\nmemory_mib = 64\nvcpus = 0", "vcpus"),
            ("name = \"a b\"\nmemory_mib = 64", "name"),
            (
                "name = \"a\"\nmemory_mib = 64\n[workload]\nworking_set_mib = 64",
                "working_set_mib",
            ),
            (
                "name = \"a\"\nmemory_mib = 64\n[workload]\npattern = \"zigzag\"",
                "zigzag",
            ),
            (
                "name = \"a\"\nmemory_mib = 64\n[workload.disk]\nwrite_ops_per_sec = 5",
                "disks",
            ),
            // Numbers that wrapped or overflowed the guest's arithmetic, refused where
            // they enter and named with their bound.
            (
                "name = \"a\"\nmemory_mib = 64\n[workload]\ndirty_pages_per_sec = 9223372036854775807",
                "workload.dirty_pages_per_sec = 9223372036854775807 is over the 100000000",
            ),
            (
                "name = \"a\"\nmemory_mib = 64\n[workload]\nverify_interval_ms = 9223372036854775807",
                "verify_interval_ms = 9223372036854775807 is outside 1..=3600000",
            ),
            (
                "name = \"a\"\nmemory_mib = 64\n[workload.disk]\nwrite_ops_per_sec = 4294967296\n\
                 [[disks]]\nid = \"r\"\npath = \"r.img\"\nsize_mib = 1",
                "write_ops_per_sec = 4294967296 is over 1000000",
            ),
            (
                "name = \"a\"\nmemory_mib = 64\n[[disks]]\nid = \"r\"\npath = \"r.img\"\n\
                 size_mib = 18014398509481984",
                "size_mib = 18014398509481984 is outside 1..=16777216",
            ),
            ("name = \"..\"\nmemory_mib = 64", "name \"..\""),
            (
                "name = \"a\"\nmemory_mib = 64\n[[disks]]\nid = \"../x\"\npath = \"r.img\"\nsize_mib = 1",
                "disk id \"../x\"",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?} gave {e}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_config() -> impl Strategy<Value = VmConfig> {
            (
                "[a-z][a-z0-9-]{0,12}",
                16u64..=MAX_MEMORY_MIB,
                1u32..4,
                0u64..2048,
                0u64..1_000_000,
                prop_oneof![
                    Just(Pattern::Sequential),
                    Just(Pattern::Random),
                    Just(Pattern::Hotcold),
                    Just(Pattern::Idle)
                ],
                proptest::collection::vec(("[a-z]{1,6}", 1u64..64, any::<bool>()), 0..3),
            )
                .prop_map(|(name, memory_mib, vcpus, ws, rate, pattern, disks)| {
                    VmConfig {
                        name,
                        memory_mib,
                        vcpus,
                        dirty_tracking: Default::default(),
                        entry: Default::default(),
                        workload: Workload {
                            // Up to half the memory (the lab guest keeps some for
                            // itself); 0 would mean "half" and read back as that.
                            working_set_mib: 1 + ws % (memory_mib / 2),
                            dirty_pages_per_sec: rate,
                            pattern,
                            ..Workload::default()
                        },
                        disks: disks
                            .into_iter()
                            .enumerate()
                            .map(|(i, (id, size_mib, write_log))| DiskConfig {
                                path: PathBuf::from(format!("/srv/vms/{id}.img")),
                                id: format!("{id}{i}"),
                                size_mib,
                                cache: Default::default(),
                                write_log,
                            })
                            .collect(),
                        generation: 0,
                    }
                })
        }

        proptest! {
            // What a source sends (`to_toml`) reads back the same at the destination.
            #[test]
            fn a_config_round_trips_through_its_text(cfg in arb_config()) {
                let back = VmConfig::parse_unresolved(&cfg.to_toml(), Path::new("t.toml"));
                prop_assert_eq!(back.map_err(|e| e.to_string()), Ok(cfg));
            }

            #[test]
            fn random_text_never_panics(text in "\\PC{0,400}") {
                let _ = VmConfig::parse_unresolved(&text, Path::new("t.toml"));
            }

            #[test]
            fn random_tomlish_text_never_panics(
                lines in proptest::collection::vec(
                    ("(name|memory_mib|vcpus|working_set_mib|dirty_pages_per_sec|pattern|size_mib|\\[workload\\]|\\[\\[disks\\]\\])",
                     "( = )?(-?[0-9]{1,20}|\"[a-z]{0,8}\"|true|1e308)?"),
                    0..12,
                ),
            ) {
                let text: String = lines.iter().map(|(k, v)| format!("{k}{v}\n")).collect();
                let _ = VmConfig::parse_unresolved(&text, Path::new("t.toml"));
            }
        }
    }
}
