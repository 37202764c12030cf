//! eBPF probes: load Ferry's programs, attach them to every tracepoint they know,
//! watch VMM processes, and read each VM's counters (see [`signals`] for what the
//! counters become).
//!
//! Which tracepoints deliver depends on the host: `kvm:kvm_exit` and
//! `kvm:kvm_page_fault` are the main sources on VMX/SVM hosts and silent on others,
//! where the MMU's own tracepoints see the faults. So everything attaches, a
//! tracepoint missing from this kernel is noted rather than fatal, and the data decide
//! which source a figure comes from.

pub mod follow;
pub mod signals;
mod workset;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use ferry_ebpf::{
    BlockKey, DirtySource, ExitKey, IO_OPS, IoStats, MAX_VMS, VmCounts, WS_NONE, Watch,
};

use signals::add;
pub use signals::{DeviceIo, Reading, Signals};
use workset::WorkingSetBitmap;

const TRACEFS: &str = "/sys/kernel/tracing";

/// (program, tracepoint category, tracepoint name).
const PROGRAMS: &[(&str, &str, &str)] = &[
    ("dirty_ring_push", "kvm", "kvm_dirty_ring_push"),
    ("page_fault", "kvm", "kvm_page_fault"),
    ("mmu_walk", "kvmmmu", "kvm_mmu_pagetable_walk"),
    ("mmu_set_spte", "kvmmmu", "kvm_mmu_set_spte"),
    ("ioctl", "syscalls", "sys_enter_ioctl"),
    ("kvm_exit", "kvm", "kvm_exit"),
    ("userspace_exit", "kvm", "kvm_userspace_exit"),
    ("pio", "kvm", "kvm_pio"),
    ("enter_pread64", "syscalls", "sys_enter_pread64"),
    ("exit_pread64", "syscalls", "sys_exit_pread64"),
    ("enter_preadv", "syscalls", "sys_enter_preadv"),
    ("exit_preadv", "syscalls", "sys_exit_preadv"),
    ("enter_preadv2", "syscalls", "sys_enter_preadv2"),
    ("exit_preadv2", "syscalls", "sys_exit_preadv2"),
    ("enter_pwrite64", "syscalls", "sys_enter_pwrite64"),
    ("exit_pwrite64", "syscalls", "sys_exit_pwrite64"),
    ("enter_pwritev", "syscalls", "sys_enter_pwritev"),
    ("exit_pwritev", "syscalls", "sys_exit_pwritev"),
    ("enter_pwritev2", "syscalls", "sys_enter_pwritev2"),
    ("exit_pwritev2", "syscalls", "sys_exit_pwritev2"),
    ("enter_fsync", "syscalls", "sys_enter_fsync"),
    ("exit_fsync", "syscalls", "sys_exit_fsync"),
    ("enter_fdatasync", "syscalls", "sys_enter_fdatasync"),
    ("exit_fdatasync", "syscalls", "sys_exit_fdatasync"),
    ("rq_issue", "block", "block_rq_issue"),
    ("rq_complete", "block", "block_rq_complete"),
];

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("loading eBPF programs needs root (or CAP_BPF and CAP_PERFMON): run ferry as root")]
    NotRoot,
    #[error(
        "tracefs is not mounted at {TRACEFS}: mount it with \
         `mount -t tracefs tracefs {TRACEFS}` (cargo xtask setup does)"
    )]
    NoTracefs,
    #[error(
        "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing), which the probes' \
         CO-RE relocations need: use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error("loading the eBPF object: {0}")]
    Load(String),
    #[error("no eBPF program could attach; the first failure: {0}")]
    NothingAttached(String),
    #[error("eBPF map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("process {pid} does not exist")]
    NoProcess { pid: u32 },
    #[error("cannot read /proc/{pid}/fd: {message}")]
    Proc { pid: u32, message: String },
    #[error(
        "process {pid} ({comm}) is not a KVM VMM: it holds no KVM VM file descriptor \
         (anon_inode:kvm-vm)"
    )]
    NotKvm { pid: u32, comm: String },
    #[error("already watching {MAX_VMS} VMs, the most the probes hold at once")]
    Full,
    #[error("process {pid} is not being watched")]
    NotWatched { pid: u32 },
}

fn missing(map: &'static str) -> ProbeError {
    ProbeError::Map {
        map,
        message: "not in the object".into(),
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> ProbeError {
    move |e| ProbeError::Map {
        map,
        message: e.to_string(),
    }
}

/// One tracepoint and whether its program is on it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attachment {
    pub tracepoint: String,
    /// Why not, when not (e.g. a tracepoint this kernel lacks).
    pub error: Option<String>,
}

struct Watched {
    slot: u32,
    ws_source: u32,
}

pub struct Probes {
    bpf: Ebpf,
    pub attachments: Vec<Attachment>,
    watched: HashMap<u32, Watched>,
    workset: WorkingSetBitmap,
    /// Keeps the kernel's per-program run-time statistics on while held.
    _stats: Option<std::os::fd::OwnedFd>,
}

/// Checks what loading needs, with an error that says how to fix each lack.
pub fn check_prerequisites() -> Result<(), ProbeError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ProbeError::NotRoot);
    }
    if !Path::new(TRACEFS).join("events").is_dir() {
        return Err(ProbeError::NoTracefs);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(ProbeError::NoBtf);
    }
    Ok(())
}

/// Whether `pid` is a KVM VMM: it holds a KVM VM file descriptor.
pub fn check_kvm_process(pid: u32) -> Result<(), ProbeError> {
    let proc = Path::new("/proc").join(pid.to_string());
    if !proc.exists() {
        return Err(ProbeError::NoProcess { pid });
    }
    let fds = std::fs::read_dir(proc.join("fd")).map_err(|e| ProbeError::Proc {
        pid,
        message: e.to_string(),
    })?;
    let kvm = fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:kvm-vm")
    });
    if kvm {
        Ok(())
    } else {
        let comm = std::fs::read_to_string(proc.join("comm")).unwrap_or_default();
        Err(ProbeError::NotKvm {
            pid,
            comm: comm.trim().to_owned(),
        })
    }
}

impl Probes {
    /// Loads and attaches every program; a tracepoint this kernel lacks is recorded in
    /// [`Probes::attachments`], not an error.
    pub fn load() -> Result<Self, ProbeError> {
        check_prerequisites()?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let mut bpf = EbpfLoader::new()
            .load(ferry_ebpf::object())
            .map_err(|e| ProbeError::Load(e.to_string()))?;
        let mut attachments = Vec::new();
        for &(prog, category, name) in PROGRAMS {
            let tracepoint = format!("{category}:{name}");
            let result = (|| -> Result<(), String> {
                let p: &mut TracePoint = bpf
                    .program_mut(prog)
                    .ok_or_else(|| format!("program {prog} is not in the object"))?
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| e.to_string())?;
                if !Path::new(TRACEFS)
                    .join("events")
                    .join(category)
                    .join(name)
                    .exists()
                {
                    return Err("this kernel has no such tracepoint".into());
                }
                p.load().map_err(|e| e.to_string())?;
                p.attach(category, name).map_err(|e| e.to_string())?;
                Ok(())
            })();
            attachments.push(Attachment {
                tracepoint,
                error: result.err(),
            });
        }
        if attachments.iter().all(|a| a.error.is_some()) {
            let first = attachments
                .first()
                .and_then(|a| a.error.clone())
                .unwrap_or_default();
            return Err(ProbeError::NothingAttached(first));
        }
        let workset = match bpf.map("WS_BITMAP") {
            Some(Map::Array(data)) => WorkingSetBitmap::map(data)?,
            _ => {
                return Err(ProbeError::Map {
                    map: "WS_BITMAP",
                    message: "not an array in the object".into(),
                });
            }
        };
        Ok(Self {
            bpf,
            attachments,
            watched: HashMap::new(),
            workset,
            _stats: stats,
        })
    }

    /// Starts counting for process `pid` (a VMM); returns a first reading.
    pub fn watch(&mut self, pid: u32) -> Result<Reading, ProbeError> {
        if !self.watched.contains_key(&pid) {
            let used: Vec<u32> = self.watched.values().map(|w| w.slot).collect();
            let slot = (0..MAX_VMS)
                .find(|s| !used.contains(s))
                .ok_or(ProbeError::Full)?;
            self.workset.take(slot);
            self.watched.insert(
                pid,
                Watched {
                    slot,
                    ws_source: WS_NONE,
                },
            );
            self.write_watch(pid)?;
        }
        self.read(pid)
    }

    pub fn unwatch(&mut self, pid: u32) {
        if self.watched.remove(&pid).is_some()
            && let Some(map) = self.bpf.map_mut("WATCH")
            && let Ok(mut m) = BpfHashMap::<&mut MapData, u32, Watch>::try_from(map)
        {
            let _ = m.remove(&pid);
        }
    }

    fn write_watch(&mut self, pid: u32) -> Result<(), ProbeError> {
        let w = self
            .watched
            .get(&pid)
            .ok_or(ProbeError::NotWatched { pid })?;
        let value = Watch {
            slot: w.slot,
            ws_source: w.ws_source,
        };
        let map = self.bpf.map_mut("WATCH").ok_or(missing("WATCH"))?;
        let mut m =
            BpfHashMap::<&mut MapData, u32, Watch>::try_from(map).map_err(map_err("WATCH"))?;
        m.insert(pid, value, 0).map_err(map_err("WATCH"))
    }

    /// Cumulative counters of a watched VM, and the distinct pages its working-set
    /// bitmap gathered since the previous reading (which this one clears).
    pub fn read(&mut self, pid: u32) -> Result<Reading, ProbeError> {
        let slot = self
            .watched
            .get(&pid)
            .ok_or(ProbeError::NotWatched { pid })?
            .slot;
        let at_ns = crate::clock::monotonic_ns();
        let map = |name: &'static str| self.bpf.map(name).ok_or(missing(name));
        let counts_map = PerCpuArray::<&MapData, VmCounts>::try_from(map("VM_COUNTS")?)
            .map_err(map_err("VM_COUNTS"))?;
        let mut counts = VmCounts::default();
        for v in counts_map
            .get(&slot, 0)
            .map_err(map_err("VM_COUNTS"))?
            .iter()
        {
            for i in 0..counts.dirty.len() {
                counts.dirty[i] += v.dirty[i];
            }
            counts.read_walks += v.read_walks;
            counts.readonly_sptes += v.readonly_sptes;
            counts.harvests += v.harvests;
            // The newest memslot update of any CPU is the VM's logging state.
            if v.memslot_ns > counts.memslot_ns {
                counts.memslot_ns = v.memslot_ns;
                counts.memslot_logging = v.memslot_logging;
            }
        }
        let exits_map = PerCpuHashMap::<&MapData, ExitKey, u64>::try_from(map("EXITS")?)
            .map_err(map_err("EXITS"))?;
        let mut exits = BTreeMap::new();
        for item in exits_map.iter() {
            let (k, per_cpu) = item.map_err(map_err("EXITS"))?;
            if k.slot == slot {
                *exits.entry((k.kind, k.reason)).or_insert(0) += per_cpu.iter().sum::<u64>();
            }
        }
        let io_map =
            PerCpuArray::<&MapData, IoStats>::try_from(map("IO")?).map_err(map_err("IO"))?;
        let mut io = [IoStats::default(); 3];
        for (op, slot_io) in io.iter_mut().enumerate() {
            let index = slot * IO_OPS + op as u32;
            for v in io_map.get(&index, 0).map_err(map_err("IO"))?.iter() {
                add(slot_io, v);
            }
        }
        let mut block = IoStats::default();
        for ((_, s), stats) in self.block_by(|k| (k.dev, k.slot))? {
            if s == slot {
                add(&mut block, &stats);
            }
        }
        let ws_pages = self.workset.take(slot);
        Ok(Reading {
            at_ns,
            counts,
            exits,
            io,
            block,
            ws_pages,
        })
    }

    /// Block-layer stats of every device, all submitters: device → cumulative stats.
    pub fn devices(&self) -> Result<BTreeMap<u32, IoStats>, ProbeError> {
        Ok(self
            .block_by(|k| (k.dev, 0))?
            .into_iter()
            .map(|((dev, _), s)| (dev, s))
            .collect())
    }

    fn block_by(
        &self,
        key: impl Fn(&BlockKey) -> (u32, u32),
    ) -> Result<BTreeMap<(u32, u32), IoStats>, ProbeError> {
        let map = self.bpf.map("BLOCK").ok_or(missing("BLOCK"))?;
        let m = PerCpuHashMap::<&MapData, BlockKey, IoStats>::try_from(map)
            .map_err(map_err("BLOCK"))?;
        let mut out = BTreeMap::new();
        for item in m.iter() {
            let (k, per_cpu) = item.map_err(map_err("BLOCK"))?;
            let e = out.entry(key(&k)).or_insert_with(IoStats::default);
            for v in per_cpu.iter() {
                add(e, v);
            }
        }
        Ok(out)
    }

    /// Points a VM's working-set bitmap at the source that will feed it (the best one
    /// that gives page addresses and has delivered events).
    pub fn feed_working_set(&mut self, pid: u32, source: DirtySource) -> Result<(), ProbeError> {
        let w = self
            .watched
            .get_mut(&pid)
            .ok_or(ProbeError::NotWatched { pid })?;
        if w.ws_source == source as u32 {
            return Ok(());
        }
        w.ws_source = source as u32;
        self.write_watch(pid)?;
        let slot = self.watched.get(&pid).map_or(0, |w| w.slot);
        self.workset.take(slot);
        Ok(())
    }

    /// Feeds a VM's working-set bitmap from the source its dirty rate comes from (see
    /// [`DirtySource::PREFERENCE`]), judged by the events each delivered between two
    /// readings, so the rate and the working set count the same pages.
    pub fn follow_working_set(
        &mut self,
        pid: u32,
        prev: &Reading,
        now: &Reading,
    ) -> Result<(), ProbeError> {
        let delivered =
            |s: DirtySource| now.counts.dirty[s as usize] > prev.counts.dirty[s as usize];
        match DirtySource::PREFERENCE.into_iter().find(|&s| delivered(s)) {
            Some(source) => self.feed_working_set(pid, source),
            None => Ok(()),
        }
    }

    /// Time the kernel spent in Ferry's programs since they loaded, and how many runs.
    pub fn cpu_cost(&self) -> (std::time::Duration, u64) {
        self.bpf
            .programs()
            .filter_map(|(_, p)| p.info().ok())
            .fold((std::time::Duration::ZERO, 0), |(t, n), i| {
                (t + i.run_time(), n + i.run_count())
            })
    }
}
