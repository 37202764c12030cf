//! `cargo xtask bench policy`: real lab migrations of a grid of guests and links, each
//! under the adaptive policy and under every peer preset, with the scenario's operator
//! limits; a row per (scenario, policy) in `bench.json`, the table and plots in
//! `bench.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_api::{MigrationReport, Outcome, RunState};
use serde_json::{Value, json};

use crate::util::{
    Vmm, build_ferry, cpu_seconds, median, num, root, stat_cpu_seconds, step, vcpu_tasks, vm_status,
};

/// The peer presets of `agent/src/policy/presets.rs` (xtask does not link the agent:
/// it has to build before `setup` installs the eBPF toolchain the agent needs).
const PRESETS: &[&str] = &[
    "qemu-default",
    "libvirt-default",
    "qemu-autoconverge",
    "libvirt-postcopy-after-precopy",
    "libvirt-copy-storage-sync",
    "kubevirt-default",
    "kubevirt-dynamic-downtime",
    "cloud-hypervisor",
];

/// A preset that, under a scenario's limits, is configured exactly as another and is
/// not run apart (`Preset::same_as` in `agent/src/policy/presets.rs`): KubeVirt's
/// downtime ramp starts at 150 ms, so a limit at or below it leaves the ramp nowhere to
/// go; libvirt's synchronous disk writes need disks that travel.
fn same_as(policy: &str, max_downtime_ms: f64, copy_storage: bool) -> Option<&'static str> {
    match policy {
        "kubevirt-dynamic-downtime" if max_downtime_ms <= 150.0 => Some("kubevirt-default"),
        "libvirt-copy-storage-sync" if !copy_storage => Some("libvirt-default"),
        _ => None,
    }
}

/// Unmeasured migrations before a scenario that copies its disks (see where it is used).
const WARM_UP_HOPS: u32 = 2;

/// One guest, link and set of limits from a scenario file.
struct Scenario {
    name: String,
    /// None: loopback; Some: a `tc tbf` rate between two network namespaces.
    link_mbit: Option<u32>,
    link: String,
    repeats: u32,
    copy_storage: bool,
    limits: toml::Table,
    max_downtime_ms: f64,
    max_total_secs: f64,
    allow_postcopy: bool,
    vm: toml::Table,
    /// A destination datastore on a deliberately slower device: its writes (the
    /// destination VMM's direct I/O) throttled to this many MB/s.
    dst_write_mbps: Option<u32>,
}

fn parse_link(s: &str) -> Result<Option<u32>> {
    if s == "loopback" {
        return Ok(None);
    }
    let lower = s.to_ascii_lowercase();
    let (num, scale) = if let Some(n) = lower.strip_suffix("gbit") {
        (n, 1000.0)
    } else if let Some(n) = lower.strip_suffix("mbit") {
        (n, 1.0)
    } else {
        bail!("link {s:?}: \"loopback\" or a rate such as \"200mbit\" or \"1gbit\"")
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("link {s:?}: {num:?} is not a number"))?;
    let mbit = (v * scale).round();
    if !(1.0..=100_000.0).contains(&mbit) {
        bail!("link {s:?}: between 1mbit and 100gbit");
    }
    Ok(Some(mbit as u32))
}

fn parse_scenarios(text: &str, origin: &Path) -> Result<Vec<Scenario>> {
    let doc: toml::Table =
        toml::from_str(text).with_context(|| format!("scenario file {}", origin.display()))?;
    let list = doc
        .get("scenario")
        .and_then(toml::Value::as_array)
        .with_context(|| format!("{}: no [[scenario]] tables", origin.display()))?;
    let mut out = Vec::new();
    for (i, s) in list.iter().enumerate() {
        let t = s
            .as_table()
            .with_context(|| format!("scenario {i} is not a table"))?;
        let name = t
            .get("name")
            .and_then(toml::Value::as_str)
            .with_context(|| format!("scenario {i}: name missing"))?
            .to_string();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("scenario {name:?}: names are letters, digits and dashes");
        }
        let ctx = |what: &str| format!("scenario {name}: {what}");
        for key in t.keys() {
            if ![
                "name",
                "link",
                "repeats",
                "copy_storage",
                "limits",
                "vm",
                "dst_write_mbps",
            ]
            .contains(&key.as_str())
            {
                bail!(ctx(&format!("unknown key {key:?}")));
            }
        }
        let link = t
            .get("link")
            .and_then(toml::Value::as_str)
            .unwrap_or("loopback")
            .to_string();
        let repeats = t
            .get("repeats")
            .map(|v| v.as_integer().filter(|n| (1..=20).contains(n)))
            .unwrap_or(Some(3))
            .with_context(|| ctx("repeats is 1 to 20"))? as u32;
        let copy_storage = t
            .get("copy_storage")
            .map(toml::Value::as_bool)
            .unwrap_or(Some(false))
            .with_context(|| ctx("copy_storage is true or false"))?;
        let limits = t
            .get("limits")
            .map(|v| v.as_table().cloned())
            .unwrap_or_default()
            .with_context(|| ctx("[scenario.limits] is a table"))?;
        let vm = t
            .get("vm")
            .and_then(toml::Value::as_table)
            .cloned()
            .with_context(|| ctx("[scenario.vm] missing"))?;
        // `ferry migrate --limits` checks every key; the bench needs these to judge.
        let limit = |k: &str| {
            limits
                .get(k)
                .and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
        };
        let max_downtime_ms = limit("max_downtime_ms").unwrap_or(300.0);
        let Some(max_total_secs) = limit("max_total_secs") else {
            bail!(ctx(
                "limits.max_total_secs is needed (a run that does not converge stops there)"
            ));
        };
        if !(max_downtime_ms > 0.0 && max_total_secs >= 1.0) {
            bail!(ctx("limits: max_downtime_ms > 0 and max_total_secs >= 1"));
        }
        let dst_write_mbps = match t.get("dst_write_mbps") {
            None => None,
            Some(v) => Some(
                v.as_integer()
                    .filter(|n| (1..=10_000).contains(n))
                    .with_context(|| ctx("dst_write_mbps is 1 to 10000 (MB/s)"))?
                    as u32,
            ),
        };
        if dst_write_mbps.is_some() && !copy_storage {
            bail!(ctx(
                "dst_write_mbps slows the destination's datastore: it needs copy_storage = true"
            ));
        }
        let allow_postcopy = match limits.get("allow_postcopy") {
            None => false,
            Some(v) => v
                .as_bool()
                .with_context(|| ctx("limits.allow_postcopy is true or false"))?,
        };
        out.push(Scenario {
            link_mbit: parse_link(&link).with_context(|| ctx("link"))?,
            link,
            repeats,
            copy_storage,
            max_downtime_ms,
            max_total_secs,
            allow_postcopy,
            limits,
            vm,
            dst_write_mbps,
            name,
        });
    }
    if out.is_empty() {
        bail!("{}: no scenarios", origin.display());
    }
    Ok(out)
}

struct Options {
    scenarios: PathBuf,
    policies: Vec<String>,
    out: PathBuf,
}

fn options(args: &[&str]) -> Result<Options> {
    let mut o = Options {
        scenarios: root().join("xtask/scenarios/grid.toml"),
        policies: std::iter::once("adaptive")
            .chain(PRESETS.iter().copied())
            .map(String::from)
            .collect(),
        out: root().join("target/bench/policy"),
    };
    let mut it = args.iter();
    while let Some(&a) = it.next() {
        let mut value = || {
            it.next()
                .map(|v| v.to_string())
                .with_context(|| format!("{a} needs a value"))
        };
        match a {
            "--scenarios" => o.scenarios = PathBuf::from(value()?),
            "--out" => o.out = PathBuf::from(value()?),
            "--policies" => {
                o.policies = value()?.split(',').map(|p| p.trim().to_string()).collect();
                for p in &o.policies {
                    if p != "adaptive" && !PRESETS.contains(&p.as_str()) {
                        bail!(
                            "unknown policy {p:?}: adaptive or a preset ({})",
                            PRESETS.join(", ")
                        );
                    }
                }
            }
            other => bail!(
                "unknown option {other:?}\nusage: cargo xtask bench policy \
                 [--scenarios FILE] [--policies LIST] [--out DIR]"
            ),
        }
    }
    Ok(o)
}

/// Where one VMM runs: its network namespace (None: the host's) and the address an
/// incoming migration listens on there.
#[derive(Clone)]
struct Side {
    ns: Option<String>,
    host: &'static str,
}

struct Lab {
    ferry: PathBuf,
    dir: PathBuf,
    _link: Option<ferry_tests::netns::LinkPair>,
    sides: [Side; 2],
    port: u16,
    vm: Vmm,
    /// Which side the VM runs on now.
    at: usize,
    /// A slower device the destinations' datastores live on (see `SlowStore`).
    slow: Option<SlowStore>,
    /// With --copy-storage, the datastore the VM's disks are in now (None: the
    /// scenario's own folder).
    datastore: Option<PathBuf>,
    hops: u32,
}

fn spawn_on(ferry: &Path, dir: &Path, side: &Side, args: &[&str], name: &str) -> Result<Vmm> {
    crate::util::vmm_in(side.ns.as_deref(), ferry, dir, args, name)
}

impl Lab {
    fn start(ferry: &Path, dir: &Path, s: &Scenario) -> Result<Self> {
        let link = match s.link_mbit {
            Some(mbit) => Some(
                ferry_tests::netns::LinkPair::new("pb", Some(mbit))
                    .map_err(|e| anyhow::anyhow!("a shaped link needs network namespaces: {e}"))?,
            ),
            None => None,
        };
        let sides = match &link {
            Some(l) => [
                Side {
                    ns: Some(l.source_ns.clone()),
                    host: ferry_tests::netns::SOURCE_ADDR,
                },
                Side {
                    ns: Some(l.dest_ns.clone()),
                    host: ferry_tests::netns::DEST_ADDR,
                },
            ],
            None => [
                Side {
                    ns: None,
                    host: "127.0.0.1",
                },
                Side {
                    ns: None,
                    host: "127.0.0.1",
                },
            ],
        };
        let mut vm_table = s.vm.clone();
        vm_table.insert("name".into(), toml::Value::String(s.name.clone()));
        let cfg = dir.join(format!("{}.toml", s.name));
        std::fs::write(&cfg, toml::to_string(&vm_table)?)?;
        fill_disks(dir, &vm_table)?;
        let vm = spawn_on(
            ferry,
            dir,
            &sides[0],
            &["--config", cfg.to_str().unwrap_or_default()],
            &format!("{}-0", s.name),
        )?;
        Ok(Self {
            ferry: ferry.to_owned(),
            dir: dir.to_owned(),
            _link: link,
            sides,
            port: 47100,
            vm,
            at: 0,
            slow: match s.dst_write_mbps {
                Some(mbps) => Some(SlowStore::new(dir, mbps, &s.vm)?),
                None => None,
            },
            datastore: None,
            hops: 0,
        })
    }

    /// Waits until the guest has written its working set once and runs at its pace.
    fn settle(&self, s: &Scenario) -> Result<()> {
        let workload = s.vm.get("workload").and_then(toml::Value::as_table);
        let int = |k: &str| {
            workload
                .and_then(|w| w.get(k))
                .and_then(toml::Value::as_integer)
        };
        let fill = workload
            .and_then(|w| w.get("fill"))
            .and_then(toml::Value::as_bool)
            .unwrap_or(true);
        let ws_pages = int("working_set_mib").unwrap_or(0) as f64 * 256.0;
        let t0 = Instant::now();
        loop {
            let st = vm_status(&self.ferry, &self.vm.control)?;
            if !fill || st.machine.guest_pages_written as f64 >= ws_pages {
                break;
            }
            if t0.elapsed() > Duration::from_secs(180) {
                bail!("the guest did not write its working set within 180 s: {st:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // A moment at its steady pace, so the policy measures that and not the fill.
        std::thread::sleep(Duration::from_secs(2));
        Ok(())
    }

    /// One migration to the other side under `policy`; on success the VM lives there.
    fn migrate(&mut self, s: &Scenario, policy: &str, limits_file: &Path) -> Result<Run> {
        let to = 1 - self.at;
        self.port += 1;
        let addr = format!("{}:{}", self.sides[to].host, self.port);
        self.hops += 1;
        let name = format!("{}-{}", s.name, self.hops);
        let base = self.slow.as_ref().map_or(&self.dir, |slow| &slow.mount);
        let datastore = s
            .copy_storage
            .then(|| base.join(format!("ds-{}", self.hops)));
        let mut args = vec!["--incoming".to_string(), addr.clone()];
        if let Some(ds) = &datastore {
            std::fs::create_dir_all(ds)?;
            args.push("--datastore".into());
            args.push(ds.to_string_lossy().into_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dst = spawn_on(&self.ferry, &self.dir, &self.sides[to], &args, &name)?;
        if let Some(slow) = &self.slow {
            slow.enter(dst.child.id())?;
        }
        let (src_pid, dst_pid) = (self.vm.child.id(), dst.child.id());
        let cpu0 = migration_cpu(src_pid)? + migration_cpu(dst_pid)?;
        let client0 = children_cpu();
        let mut cmd = Command::new(&self.ferry);
        cmd.args(["migrate", "--json", "--to", &addr, "--policy", policy])
            .args(ferry_tests::pki::test_pki().args())
            .arg("--limits")
            .arg(limits_file)
            .arg("--control")
            .arg(&self.vm.control);
        if s.copy_storage {
            cmd.arg("--copy-storage");
        }
        let out = cmd.output().context("running ferry migrate")?;
        let cpu =
            migration_cpu(src_pid)? + migration_cpu(dst_pid)? - cpu0 + children_cpu() - client0;
        let report: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow::anyhow!(
                "ferry migrate gave no report ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let typed: MigrationReport = serde_json::from_value(report.clone()).map_err(|e| {
            anyhow::anyhow!("{policy}: the report does not read as ferry-api's ({e}): {report}")
        })?;
        let completed = typed.core.outcome == Outcome::Completed;
        if completed {
            if typed.memory_verified != Some(true) || typed.guest_integrity_errors != 0 {
                bail!("{policy}: the guest did not arrive intact: {report}");
            }
            let old = std::mem::replace(&mut self.vm, dst);
            old.quit(&self.ferry)?;
            // Only a migration's destination writes slowly: the guest's own disk
            // writes, now from this VMM, keep the scenario's pace.
            if let Some(slow) = &self.slow {
                slow.leave(self.vm.child.id())?;
            }
            self.at = to;
            if let Some(ds) = std::mem::replace(&mut self.datastore, datastore) {
                let _ = std::fs::remove_dir_all(ds);
            }
        } else {
            drop(dst);
            if let Some(ds) = datastore {
                let _ = std::fs::remove_dir_all(ds);
            }
            // The guest stays on the source, running.
            let st = vm_status(&self.ferry, &self.vm.control)?;
            if st.machine.state != RunState::Running {
                bail!("{policy}: after a failed migration the source is not running: {st:?}");
            }
        }
        // The next run starts on a quiet host: this one's deleted datastore and
        // written pages reach the storage now, not under the next policy's run.
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        std::thread::sleep(Duration::from_millis(300));
        Ok(Run::judge(s, typed, report, cpu * 1e3))
    }
}

/// A destination datastore on a slower device: an ext4 file system on a loop device
/// whose writes the block cgroup (v1 `blkio.throttle.write_bps_device`) holds to a
/// rate, for the processes put in its group. The throttle holds for direct I/O, so
/// the scenario's disks use `cache = "none"` (the destination writes its copies as
/// the config says). Unmounted, detached and removed on drop.
struct SlowStore {
    mount: PathBuf,
    loop_dev: String,
    cgroup: PathBuf,
}

const BLKIO: &str = "/sys/fs/cgroup/blkio";

impl SlowStore {
    fn new(dir: &Path, mbps: u32, vm: &toml::Table) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let disks = vm.get("disks").and_then(toml::Value::as_array);
        let direct = disks
            .into_iter()
            .flatten()
            .all(|d| d.get("cache").and_then(toml::Value::as_str) == Some("none"));
        if !direct {
            bail!(
                "dst_write_mbps throttles direct I/O only: give every disk of the scenario \
                 cache = \"none\""
            );
        }
        if !Path::new(BLKIO)
            .join("blkio.throttle.write_bps_device")
            .exists()
        {
            bail!(
                "a slower datastore needs the cgroup v1 blkio controller ({BLKIO}) with \
                 write throttling"
            );
        }
        // Room for two copies of every disk at once (the hop's and the last one's).
        let disk_mib: i64 = disks
            .into_iter()
            .flatten()
            .filter_map(|d| d.get("size_mib").and_then(toml::Value::as_integer))
            .sum();
        let image = dir.join("slow-datastore.img");
        std::fs::File::create(&image)?.set_len(((disk_mib * 3 + 256) as u64) << 20)?;
        let out = |mut c: Command, what: &str| -> Result<String> {
            let o = c.output().with_context(|| format!("running {what}"))?;
            if !o.status.success() {
                bail!("{what}: {}", String::from_utf8_lossy(&o.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let mut c = Command::new("mkfs.ext4");
        c.args(["-q", "-F"]).arg(&image);
        out(c, "mkfs.ext4")?;
        let mut c = Command::new("losetup");
        c.args(["--find", "--show"]).arg(&image);
        let loop_dev = out(c, "losetup")?;
        let mount = dir.join("slow-datastore");
        let cgroup = Path::new(BLKIO).join(format!("ferry-bench-{}", std::process::id()));
        // From here on Drop undoes what was done.
        let store = Self {
            mount,
            loop_dev,
            cgroup,
        };
        std::fs::create_dir_all(&store.mount)?;
        let mut c = Command::new("mount");
        c.arg(&store.loop_dev).arg(&store.mount);
        out(c, "mount")?;
        std::fs::create_dir_all(&store.cgroup)
            .with_context(|| format!("creating {}", store.cgroup.display()))?;
        let rdev = std::fs::metadata(&store.loop_dev)?.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        std::fs::write(
            store.cgroup.join("blkio.throttle.write_bps_device"),
            format!("{major}:{minor} {}", u64::from(mbps) * 1_000_000),
        )
        .context("setting the write throttle")?;
        step(&format!(
            "destination datastores on {} ({}), writes throttled to {mbps} MB/s",
            store.loop_dev,
            store.mount.display()
        ));
        Ok(store)
    }

    /// Puts a process (all its threads, and those it starts) under the throttle.
    fn enter(&self, pid: u32) -> Result<()> {
        std::fs::write(self.cgroup.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.cgroup.display()))
    }

    /// Takes a process out from under the throttle.
    fn leave(&self, pid: u32) -> Result<()> {
        std::fs::write(Path::new(BLKIO).join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} out of {}", self.cgroup.display()))
    }
}

impl Drop for SlowStore {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(Path::new(BLKIO).join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .status();
    }
}

/// Writes every disk of the VM whole before it boots. A new image is sparse and the
/// guest's random writes fill it as the runs go by, so without this each policy would
/// copy a different amount of disk (the first one the least) and the comparison would
/// measure the order the policies ran in. Full images are also what a datastore holds.
/// The contents follow the workload's `content`, so disk compression means what it does
/// on the guest's own writes.
fn fill_disks(dir: &Path, vm: &toml::Table) -> Result<()> {
    use std::io::Write;
    let random = vm
        .get("workload")
        .and_then(|w| w.get("content"))
        .and_then(toml::Value::as_str)
        == Some("random");
    let disks = vm.get("disks").and_then(toml::Value::as_array);
    for d in disks.into_iter().flatten() {
        let (Some(path), Some(mib)) = (
            d.get("path").and_then(toml::Value::as_str),
            d.get("size_mib").and_then(toml::Value::as_integer),
        ) else {
            continue;
        };
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        step(&format!(
            "writing the {mib} MiB disk {} whole ({})",
            path.display(),
            if random { "random" } else { "text" }
        ));
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            fill_block(&mut block, &mut state, random);
            out.write_all(&block)?;
        }
        // On disk before the guest boots: writeback of half a gigabyte would otherwise
        // run under the first migrations and slow whichever policy comes first.
        out.into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
            .with_context(|| format!("syncing {}", path.display()))?;
    }
    Ok(())
}

/// One MiB of disk contents: random bytes, or text: seven words in ten common ones,
/// the rest made of random syllables, which compresses as the guest's own text does
/// (zstd:3 about 2.6x, lz4 1.6x; a few common words alone compress several times
/// more and would set the ratio the disks' first copy measures). The words are not
/// the guest's corpus (`agent/src/guest/corpus.rs`): xtask does not link the agent.
fn fill_block(block: &mut [u8], state: &mut u64, random: bool) {
    const WORDS: &[&str] = &[
        "the",
        "of",
        "and",
        "to",
        "in",
        "a",
        "is",
        "that",
        "for",
        "it",
        "as",
        "was",
        "with",
        "be",
        "by",
        "on",
        "not",
        "this",
        "are",
        "or",
        "from",
        "at",
        "which",
        "but",
        "have",
        "migration",
        "memory",
        "disk",
        "page",
        "guest",
        "host",
        "link",
        "round",
        "block",
    ];
    const CONSONANTS: &[u8] = b"bcdfghjklmnprstv";
    const VOWELS: &[u8] = b"aeiou";
    let mut next = || {
        // xorshift64*: fast, and plenty for filler.
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    if random {
        for chunk in block.chunks_mut(8) {
            let v = next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        return;
    }
    let mut word = Vec::with_capacity(16);
    let mut at = 0;
    let mut count = 0u32;
    while at < block.len() {
        word.clear();
        let r = next();
        if r % 10 < 7 {
            word.extend_from_slice(WORDS[((r >> 8) % WORDS.len() as u64) as usize].as_bytes());
        } else {
            for _ in 0..=(r >> 8) % 3 {
                let s = next();
                word.push(CONSONANTS[(s % CONSONANTS.len() as u64) as usize]);
                word.push(VOWELS[((s >> 8) % VOWELS.len() as u64) as usize]);
            }
        }
        count += 1;
        word.extend_from_slice(if count.is_multiple_of(12) {
            b". "
        } else {
            b" "
        });
        let n = word.len().min(block.len() - at);
        block[at..at + n].copy_from_slice(&word[..n]);
        at += n;
    }
}

/// CPU time of a VMM process that is not its vCPUs' (the guest's own work), seconds:
/// what migrating costs on that host.
fn migration_cpu(pid: u32) -> Result<f64> {
    let mut vcpu = 0.0;
    for task in vcpu_tasks(pid)? {
        vcpu += stat_cpu_seconds(&std::fs::read_to_string(task.join("stat")).unwrap_or_default());
    }
    Ok(cpu_seconds(pid)? - vcpu)
}

/// CPU time of this process's waited-for children (the `ferry migrate` client).
fn children_cpu() -> f64 {
    // SAFETY: rusage is plain integers, for which all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// What a run's policy did, as the VMM recorded it: each setting it applied, in order
/// (times and reasons left out: two presets whose runs apply the same settings in the
/// same order behaved identically, whatever their names).
fn behaviour(report: &Value) -> Vec<String> {
    let mut v: Vec<String> = report["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| format!("{}={}", d["setting"], d["value"]))
        .collect();
    v.push(format!("mode={}", report["mode"]));
    v
}

/// Marks the preset rows of one scenario whose runs behaved identically
/// (`behaved_as`: the other presets whose every run applied the same settings).
fn mark_identical(rows: &mut [Value], runs: &[Vec<Run>], running: &[&str]) {
    use std::collections::BTreeSet;
    let sig = |at: usize| -> BTreeSet<Vec<String>> {
        runs[at].iter().map(|r| behaviour(&r.report)).collect()
    };
    for row in rows.iter_mut() {
        let Some(policy) = row["policy"].as_str().map(str::to_string) else {
            continue;
        };
        let Some(at) = running.iter().position(|p| *p == policy) else {
            continue;
        };
        if policy == "adaptive" || runs[at].is_empty() {
            continue;
        }
        let same: Vec<&str> = running
            .iter()
            .enumerate()
            .filter(|&(j, p)| {
                j != at && *p != "adaptive" && !runs[j].is_empty() && sig(j) == sig(at)
            })
            .map(|(_, p)| *p)
            .collect();
        if !same.is_empty() {
            row["behaved_as"] = json!(same);
        }
    }
}

/// One migration's figures and whether it kept the scenario's limits.
struct Run {
    outcome: String,
    /// The report through ferry-api's type,
    typed: MigrationReport,
    /// and as printed: the driver's additions (decisions' reasons, predictions) too.
    report: Value,
    cpu_ms: f64,
}

impl Run {
    fn judge(s: &Scenario, typed: MigrationReport, report: Value, cpu_ms: f64) -> Self {
        let total = typed.core.total_ms;
        let down = typed.downtime_ms.unwrap_or(f64::NAN);
        let postcopy = typed.postcopy_faults.is_some();
        let outcome = if typed.core.outcome != Outcome::Completed {
            format!(
                "{}: {}",
                typed.core.outcome,
                typed.core.error.as_deref().unwrap_or("")
            )
        } else if total > s.max_total_secs * 1e3 {
            format!(
                "over limits: {:.1} s > max_total_secs {}",
                total / 1e3,
                s.max_total_secs
            )
        } else if down > s.max_downtime_ms {
            format!(
                "over limits: downtime {down:.1} ms > max_downtime_ms {}",
                s.max_downtime_ms
            )
        } else if postcopy && !s.allow_postcopy {
            "over limits: post-copy not allowed".to_string()
        } else {
            "completed".to_string()
        };
        Self {
            outcome,
            typed,
            report,
            cpu_ms,
        }
    }

    fn ok(&self) -> bool {
        self.outcome == "completed"
    }
}

fn med(runs: &[Run], f: impl Fn(&Run) -> f64) -> Value {
    let v: Vec<f64> = runs.iter().map(f).filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        Value::Null
    } else {
        json!((median(v) * 10.0).round() / 10.0)
    }
}

fn row(s: &Scenario, policy: &str, runs: &[Run]) -> Value {
    let outcome = runs
        .iter()
        .find(|r| !r.ok())
        .map_or("completed".to_string(), |r| r.outcome.clone());
    json!({
        "scenario": s.name,
        "link": s.link,
        "policy": policy,
        "runs": runs.len(),
        "outcome": outcome,
        "total_ms": med(runs, |r| r.typed.core.total_ms),
        "downtime_ms": med(runs, |r| r.typed.downtime_ms.unwrap_or(f64::NAN)),
        "bytes_on_wire": med(runs, |r| r.typed.bytes_on_wire as f64),
        "cpu_ms": med(runs, |r| r.cpu_ms),
        "predicted_total_ms": med(runs, |r| num(&r.report, "predicted_total_ms")),
        "predicted_downtime_ms": med(runs, |r| num(&r.report, "predicted_downtime_ms")),
        "max_downtime_ms": s.max_downtime_ms,
        "max_total_secs": s.max_total_secs,
        "throttle_max_pct": med(runs, |r| f64::from(r.typed.throttle_max_pct)),
        "postcopy": runs.iter().any(|r| r.typed.postcopy_faults.is_some()),
        "codec": runs.last().map(|r| r.typed.codec.to_string()),
    })
}

pub fn run(args: &[&str]) -> Result<()> {
    let o = options(args)?;
    let text = std::fs::read_to_string(&o.scenarios)
        .with_context(|| format!("reading {}", o.scenarios.display()))?;
    let scenarios = parse_scenarios(&text, &o.scenarios)?;
    let ferry = build_ferry()?;
    // Each run's full report (decisions and their reasons included) goes here.
    let runs_dir = o.out.join("runs");
    let _ = std::fs::remove_dir_all(&runs_dir);
    std::fs::create_dir_all(&runs_dir)?;
    let work = crate::util::work_dir("bench-policy")?;
    let mut rows = Vec::new();
    let started = Instant::now();
    for (si, s) in scenarios.iter().enumerate() {
        step(&format!(
            "{}: link {}, {} run(s) per policy{}; limits: downtime {} ms, total {} s, \
             post-copy {}",
            s.name,
            s.link,
            s.repeats,
            if s.copy_storage {
                ", disks streamed"
            } else {
                ""
            },
            s.max_downtime_ms,
            s.max_total_secs,
            if s.allow_postcopy {
                "allowed"
            } else {
                "not allowed"
            },
        ));
        let dir = work.join(&s.name);
        std::fs::create_dir_all(&dir)?;
        let limits_file = dir.join("limits.toml");
        std::fs::write(
            &limits_file,
            toml::to_string(&toml::Table::from_iter([(
                "limits".to_string(),
                toml::Value::Table(s.limits.clone()),
            )]))?,
        )?;
        // Who runs here: a preset whose peer cannot move this guest within the limits
        // at all (post-copy forbidden) is "n/a", and one configured exactly as another
        // is that other's row, not a result of its own.
        let na = |p: &str| p == "libvirt-postcopy-after-precopy" && !s.allow_postcopy;
        let twin = |p: &str| same_as(p, s.max_downtime_ms, s.copy_storage);
        let running: Vec<&str> = o
            .policies
            .iter()
            .map(String::as_str)
            .filter(|p| !na(p) && twin(p).is_none_or(|t| !o.policies.iter().any(|q| q == t)))
            .collect();
        let n = running.len();
        let mut lab = Lab::start(&ferry, &dir, s)?;
        lab.settle(s)?;
        if s.copy_storage {
            // The first copies land on blocks the host's storage has never backed, which
            // this lab's thin disk writes at a fifth of the speed of blocks it has (2.6 s
            // vs 0.5 s for 512 MiB): two hops, before the copies start reusing freed
            // space. Not measured, so no policy is charged with the lab's own warm-up;
            // they go to the policies in turn (scenario by scenario), so no policy is
            // always the one that warms the lab up.
            for i in 1..=WARM_UP_HOPS {
                let policy = running[(si + i as usize) % n];
                let r = lab.migrate(s, policy, &limits_file)?;
                println!(
                    "  warm-up hop {i}/{WARM_UP_HOPS} under {policy} (not measured): {}, total \
                     {:.0} ms",
                    r.outcome, r.typed.core.total_ms
                );
            }
        }
        // Round robin over the policies, so that a slow spell of this shared host falls
        // on every policy's runs alike rather than on whichever ran through it; each
        // round, the first included, starts one policy later than the one before (and
        // each scenario one later than the last), so that no policy always runs first
        // or always follows the same one (a preset that rewrites the disk for 30 s
        // leaves a different disk behind than one that finishes in 5).
        let mut runs: Vec<Vec<Run>> = running.iter().map(|_| Vec::new()).collect();
        for i in 0..s.repeats {
            for k in 0..n {
                let at = (k + i as usize + si) % n;
                let (policy, runs) = (running[at], &mut runs[at]);
                // A row is completed only if every run is: one miss decides it.
                if runs.iter().any(|r| !r.ok()) {
                    continue;
                }
                let r = lab.migrate(s, policy, &limits_file)?;
                println!(
                    "  {policy:<31} run {}/{}: {:<9} total {:>6.0} ms, downtime {:>6.1} ms, \
                     {:>5.0} MB on the wire, CPU {:>5.0} ms; predicted {:>6.0} ms / {:>5.1} ms{}",
                    i + 1,
                    s.repeats,
                    if r.ok() { "ok" } else { "NOT OK" },
                    r.typed.core.total_ms,
                    r.typed.downtime_ms.unwrap_or(f64::NAN),
                    r.typed.bytes_on_wire as f64 / 1e6,
                    r.cpu_ms,
                    num(&r.report, "predicted_total_ms"),
                    num(&r.report, "predicted_downtime_ms"),
                    if r.ok() {
                        String::new()
                    } else {
                        format!(" ({})", r.outcome)
                    },
                );
                std::fs::write(
                    runs_dir.join(format!("{}-{policy}-{}.json", s.name, i + 1)),
                    serde_json::to_string_pretty(&r.report)?,
                )?;
                runs.push(r);
            }
        }
        let mut mine: Vec<Value> = Vec::new();
        for policy in &o.policies {
            let row = if na(policy) {
                println!("  {policy:<31} n/a: post-copy is outside this scenario's limits");
                json!({
                    "scenario": s.name, "link": s.link, "policy": policy, "runs": 0,
                    "outcome": "n/a: post-copy not allowed", "na": true,
                    "max_downtime_ms": s.max_downtime_ms, "max_total_secs": s.max_total_secs,
                })
            } else if let Some(at) = running.iter().position(|p| p == policy) {
                row(s, policy, &runs[at])
            } else {
                continue;
            };
            mine.push(row);
        }
        // Twins copy the row of the preset they are configured as.
        for policy in &o.policies {
            if let Some(t) = twin(policy).filter(|_| !running.contains(&policy.as_str()))
                && let Some(of) = mine.iter().find(|r| r["policy"] == t).cloned()
            {
                println!("  {policy:<31} configured as {t} here: its row is {t}'s");
                let mut r = of;
                r["policy"] = json!(policy);
                r["same_as"] = json!(t);
                r["runs"] = json!(0);
                mine.push(r);
            }
        }
        mark_identical(&mut mine, &runs, &running);
        rows.extend(mine);
        lab.vm.quit(&ferry)?;
    }
    let summary = crate::bench_policy_report::summarize(&rows);
    let json_path = o.out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&rows)?)?;
    crate::bench_policy_report::write_markdown(&o.out, &rows, &summary)?;
    step(&format!(
        "{} scenario(s) in {:.0} s; {} and {} written",
        scenarios.len(),
        started.elapsed().as_secs_f64(),
        json_path.display(),
        o.out.join("bench.md").display()
    ));
    for line in &summary {
        println!("  {line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_link("loopback").unwrap(), None);
        assert_eq!(parse_link("1gbit").unwrap(), Some(1000));
        assert_eq!(parse_link("200mbit").unwrap(), Some(200));
        assert!(
            parse_link("fast")
                .unwrap_err()
                .to_string()
                .contains("200mbit")
        );
        assert!(parse_link("0mbit").is_err());
    }

    #[test]
    fn the_built_in_grid_parses_and_covers_the_links() {
        let path = root().join("xtask/scenarios/grid.toml");
        let s = parse_scenarios(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
        let links: Vec<Option<u32>> = s.iter().map(|s| s.link_mbit).collect();
        for l in [None, Some(1000), Some(200)] {
            assert!(links.contains(&l), "{l:?} missing");
        }
        assert!(s.iter().any(|s| s.copy_storage));
    }

    #[test]
    fn a_scenario_with_a_bad_limit_or_key_names_it() {
        let text = "[[scenario]]\nname = \"x\"\n[scenario.limits]\nmax_total_secs = 10\n\
                    max_downtime_ms = 0\n[scenario.vm]\nmemory_mib = 64\n";
        let e = parse_scenarios(text, Path::new("f.toml"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("max_downtime_ms"), "{e}");
        let text = "[[scenario]]\nname = \"x\"\nspeed = 3\n[scenario.vm]\n";
        let e = parse_scenarios(text, Path::new("f.toml"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("speed"), "{e}");
    }
}
