//! The lab's three hosts on one machine: network namespaces `ferry-lab-a`, `-b` and
//! `-c` joined by a bridge in the root namespace, each host's link optionally shaped
//! with `tc tbf`; and a real Prometheus scraping the hosts' agents and a real
//! Alertmanager sending its alerts to them, both in the root namespace, which reaches
//! the hosts over the bridge.
//!
//! Everything made here is removed when the [`LabNet`] is dropped, also after Ctrl-C
//! (the story stops between steps, see [`interrupted`]) and after a failure, unless it
//! was [kept](LabNet::keep); [`LabNet::clean_up_leftovers`] then finds it all by name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_tests::agent::request;
use ferry_tests::alertmanager::{Timers, Webhook, duration};
use ferry_tests::free_port;
use ferry_tests::prometheus::Target;
use serde_json::Value;

use crate::util::{have_command, step};

/// The hosts' letters: host-a lives in namespace ferry-lab-a at 198.18.0.1, and so on.
const LETTERS: [char; 3] = ['a', 'b', 'c'];
const NS_PREFIX: &str = "ferry-lab-";
const BRIDGE: &str = "ferrylab0";
/// The root namespace's ends of the hosts' veth pairs, `ferrylab-a`, ... (bridge ports);
/// the other end is the host's `eth0`.
const PORT_PREFIX: &str = "ferrylab-";
/// From 198.18.0.0/15, which RFC 2544 sets aside for benchmarking and no real network
/// routes: nothing the lab sends can reach anyone else's hosts.
const SUBNET: &str = "198.18.0.";
pub(crate) const BRIDGE_IP: &str = "198.18.0.254";
const PREFIX_LEN: u8 = 24;
/// Where each host's agent listens, on the host's address.
pub(crate) const AGENT_PORT: u16 = 7070;
/// The source named by the lab's tmpfs mounts: how `create`, which does not know the
/// lab's folder, finds the mounts an earlier run left.
const TMPFS_SOURCE: &str = "ferry-lab";
/// Config file names no other Prometheus or Alertmanager here uses: leftovers are found
/// by them in /proc, which needs no pid file and cannot mistake a reused pid for them.
const PROMETHEUS_CONFIG: &str = "ferry-lab-prometheus.yml";
const ALERTMANAGER_CONFIG: &str = "ferry-lab-alertmanager.yml";
/// Between SIGTERM and SIGKILL: time for agents and VMMs to close their sockets and
/// flush their logs.
const GRACE: Duration = Duration::from_secs(5);
/// After SIGKILL, how long before a process still there is reported as not removed
/// (one in uninterruptible sleep on a slow disk may take a moment).
const KILL_WAIT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The speed of each host's link to the bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    Gbit1,
    Mbit200,
}

impl Link {
    pub(crate) fn mbit(self) -> u32 {
        match self {
            Link::Gbit1 => 1000,
            Link::Mbit200 => 200,
        }
    }
}

impl FromStr for Link {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "1gbit" => Ok(Link::Gbit1),
            "200mbit" => Ok(Link::Mbit200),
            _ => bail!("unknown link speed `{s}`: the lab's links are 1gbit or 200mbit"),
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Link::Gbit1 => "1gbit",
            Link::Mbit200 => "200mbit",
        })
    }
}

/// One of the lab's hosts: a network namespace with an `eth0` on the bridge.
#[derive(Clone, Debug)]
pub(crate) struct Host {
    /// "host-a": the agent's `name`, and the `host` label of its metrics and alerts.
    pub name: String,
    /// "ferry-lab-a"
    pub ns: String,
    /// "198.18.0.1"
    pub ip: String,
    port: String,
}

impl Host {
    /// Where the host's agent listens and Prometheus scrapes it: "198.18.0.1:7070".
    pub(crate) fn agent_addr(&self) -> String {
        format!("{}:{AGENT_PORT}", self.ip)
    }
}

/// The lab's network and everything started or mounted for it; removed on drop.
pub(crate) struct LabNet {
    pub hosts: Vec<Host>,
    made: Made,
    kept: bool,
}

impl LabNet {
    /// Removes what an earlier lab left (namespaces `ferry-lab-?`, links `ferrylab*`,
    /// the lab's tmpfs mounts, its Prometheus and Alertmanager), then makes the three
    /// hosts: namespaces ferry-lab-a/b/c with lo up and an `eth0` at 198.18.0.1/2/3/24,
    /// each the peer of a port on bridge `ferrylab0` (198.18.0.254/24, root namespace).
    /// With a `link`, both ends of every host's veth are shaped to its rate, so each
    /// host sends and receives at that rate. Catches Ctrl-C from here on (see
    /// [`interrupted`]). Needs root.
    pub(crate) fn create(link: Option<Link>) -> Result<LabNet> {
        catch_interrupts()?;
        for cmd in ["ip", "tc", "mount", "umount"] {
            if !have_command(cmd) {
                bail!("{cmd} is not installed: cargo xtask setup installs iproute2");
            }
        }
        let mut leftovers = Made::find(None)?;
        if !leftovers.is_empty() {
            step("removing what an earlier lab left");
            let failed = leftovers.remove();
            if failed > 0 {
                bail!("{failed} thing(s) an earlier lab left could not be removed (see above)");
            }
        }
        refuse_taken_subnet()?;
        step(&format!(
            "lab network: hosts a, b, c in namespaces on bridge {BRIDGE}{}",
            link.map_or_else(String::new, |l| format!(", every link shaped to {l}"))
        ));
        // Built up as it goes, so that a step failing drops it and removes the rest.
        let mut net = LabNet {
            hosts: Vec::new(),
            made: Made::default(),
            kept: false,
        };
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        net.made.links.push(BRIDGE.to_owned());
        ip(&[
            "addr",
            "add",
            &format!("{BRIDGE_IP}/{PREFIX_LEN}"),
            "dev",
            BRIDGE,
        ])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        println!("  bridge {BRIDGE}: {BRIDGE_IP}/{PREFIX_LEN} in the root namespace");
        for (i, letter) in LETTERS.iter().enumerate() {
            let host = Host {
                name: format!("host-{letter}"),
                ns: format!("{NS_PREFIX}{letter}"),
                ip: format!("{SUBNET}{}", i + 1),
                port: format!("{PORT_PREFIX}{letter}"),
            };
            ip(&["netns", "add", &host.ns])?;
            net.made.namespaces.push(host.ns.clone());
            ip(&[
                "link", "add", &host.port, "type", "veth", "peer", "name", "eth0", "netns",
                &host.ns,
            ])?;
            net.made.links.push(host.port.clone());
            ip(&["link", "set", &host.port, "master", BRIDGE, "up"])?;
            let cidr = format!("{}/{PREFIX_LEN}", host.ip);
            ip(&["-n", &host.ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &host.ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &host.ns, "link", "set", "lo", "up"])?;
            // A qdisc shapes what leaves an interface: eth0 carries what the host sends,
            // its bridge port what it receives.
            if let Some(link) = link {
                tbf(None, &host.port, link)?;
                tbf(Some(&host.ns), "eth0", link)?;
            }
            println!(
                "  {}: namespace {}, eth0 {cidr}, bridge port {}{}",
                host.name,
                host.ns,
                host.port,
                link.map_or_else(String::new, |l| format!(", tbf {l} both ways"))
            );
            net.hosts.push(host);
        }
        check_interrupted()?;
        Ok(net)
    }

    /// `program` run inside `host`'s network namespace (`ip netns exec` execs it: the
    /// child's pid is the program's).
    pub(crate) fn command(&self, host: &Host, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host.ns]).arg(program);
        c
    }

    /// Mounts a tmpfs of `mib` MiB at `path` (made if missing), unmounted on clean-up.
    pub(crate) fn mount_tmpfs(&mut self, path: &Path, mib: u64) -> Result<()> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let path = path
            .canonicalize()
            .with_context(|| format!("resolving {}", path.display()))?;
        output_of(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), TMPFS_SOURCE])
                .arg(&path),
        )?;
        self.made.mounts.push(path.clone());
        println!("  tmpfs of {mib} MiB at {}", path.display());
        Ok(())
    }

    /// For `--keep`: dropping the lab then leaves it all running.
    pub(crate) fn keep(&mut self) {
        self.kept = true;
    }

    /// Stops every process in the lab's namespaces (SIGTERM, SIGKILL after a grace
    /// period) and the lab's Prometheus and Alertmanager, unmounts its tmpfs mounts,
    /// deletes its links, bridge and namespaces; says what it removed. Does nothing the
    /// second time; never panics.
    pub(crate) fn clean_up(&mut self) {
        if self.made.is_empty() {
            return;
        }
        step("removing the lab: processes, monitoring, mounts, links, namespaces");
        let failed = self.made.remove();
        if failed > 0 {
            eprintln!(
                "  {failed} thing(s) could not be removed (see above); cargo xtask lab --stop \
                 tries again"
            );
        }
    }

    /// `cargo xtask lab --stop`, after a lab run with `--keep`: removes what the lab
    /// left, found by name: namespaces `ferry-lab-?`, links `ferrylab*`, tmpfs mounts
    /// under `lab_dir` (or of the lab's own), and the Prometheus and Alertmanager
    /// running on the lab's config files. Fails if something could not be removed.
    pub(crate) fn clean_up_leftovers(lab_dir: &Path) -> Result<()> {
        let mut left = Made::find(Some(lab_dir))?;
        if left.is_empty() {
            println!("nothing of a lab is left");
            return Ok(());
        }
        step("removing what the lab left");
        let failed = left.remove();
        if failed > 0 {
            bail!("{failed} thing(s) the lab left could not be removed (see above)");
        }
        Ok(())
    }
}

impl Drop for LabNet {
    fn drop(&mut self) {
        if !self.kept {
            self.clean_up();
        }
    }
}

/// What the lab made; [`Made::remove`] removes it in an order that works: processes
/// first (a namespace outlives its name while a process is in it, and a mount in use
/// cannot be unmounted), then mounts, links, namespaces.
#[derive(Default)]
struct Made {
    daemons: Vec<Daemon>,
    namespaces: Vec<String>,
    mounts: Vec<PathBuf>,
    /// In the order made; removed in reverse.
    links: Vec<String>,
}

/// A Prometheus or Alertmanager of the lab's: our child, or one a kept lab left.
struct Daemon {
    pid: u32,
    child: Option<Child>,
}

impl Daemon {
    fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => running(self.pid),
        }
    }
}

impl Made {
    fn is_empty(&self) -> bool {
        self.daemons.is_empty()
            && self.namespaces.is_empty()
            && self.mounts.is_empty()
            && self.links.is_empty()
    }

    /// The lab's things that exist now, found by name; with `lab_dir`, also every tmpfs
    /// mounted under it.
    fn find(lab_dir: Option<&Path>) -> Result<Made> {
        let mut made = Made::default();
        for pid in proc_pids()? {
            let argv = cmdline(pid);
            let ours = argv.iter().any(|a| {
                a.strip_prefix("--config.file=")
                    .and_then(|f| Path::new(f).file_name())
                    .is_some_and(|n| n == PROMETHEUS_CONFIG || n == ALERTMANAGER_CONFIG)
            });
            if ours && running(pid) {
                made.daemons.push(Daemon { pid, child: None });
            }
        }
        made.namespaces = names_in(Path::new(NETNS_DIR), is_lab_ns)?;
        let lab_dir = match lab_dir {
            Some(d) => Some(absolute(d)?),
            None => None,
        };
        made.mounts = mounts()?
            .into_iter()
            .filter(|m| {
                m.fstype == "tmpfs"
                    && (m.source == TMPFS_SOURCE
                        || lab_dir.as_ref().is_some_and(|d| m.point.starts_with(d)))
            })
            .map(|m| m.point)
            .collect();
        let mut links = names_in(Path::new("/sys/class/net"), is_lab_link)?;
        // Made before its ports, so removed after them.
        links.sort_by_key(|l| l != BRIDGE);
        made.links = links;
        Ok(made)
    }

    /// Removes everything, saying what; returns how many things could not be removed.
    fn remove(&mut self) -> usize {
        let mut failed = 0;
        let ids: Vec<(u64, u64)> = self
            .namespaces
            .iter()
            .filter_map(|ns| ns_identity(ns))
            .collect();
        if !self.namespaces.is_empty() {
            let names = &self.namespaces;
            failed += stop_processes("in the lab's namespaces", || pids_in(&ids, names));
        }
        let daemons = &mut self.daemons;
        if !daemons.is_empty() {
            failed += stop_processes("of monitoring", || {
                daemons
                    .iter_mut()
                    .filter_map(|d| d.alive().then_some(d.pid))
                    .collect()
            });
        }
        self.daemons.clear();

        // Deepest first: a mount inside another goes before it.
        let mut points = std::mem::take(&mut self.mounts);
        points.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in points {
            if !mounts()
                .unwrap_or_default()
                .iter()
                .any(|e| e.point == m && e.fstype == "tmpfs")
            {
                continue;
            }
            match output_of(Command::new("umount").arg(&m)) {
                Ok(_) => println!("  unmounted tmpfs {}", m.display()),
                // Still busy (something holds a file open that was not found above): it
                // goes once the last user does.
                Err(e) => match output_of(Command::new("umount").arg("-l").arg(&m)) {
                    Ok(_) => println!("  unmounted tmpfs {} lazily ({e:#})", m.display()),
                    Err(e) => {
                        eprintln!("  could not unmount {}: {e:#}", m.display());
                        failed += 1;
                    }
                },
            }
        }

        // Deleting a veth's root end deletes its peer at once; deleting a namespace
        // deletes its interfaces only later, in the kernel's own time.
        let mut removed = Vec::new();
        for link in std::mem::take(&mut self.links).iter().rev() {
            if !Path::new("/sys/class/net").join(link).exists() {
                continue;
            }
            match ip(&["link", "del", link]) {
                Ok(_) => removed.push(link.clone()),
                Err(e) => {
                    eprintln!("  could not delete link {link}: {e:#}");
                    failed += 1;
                }
            }
        }
        if !removed.is_empty() {
            println!("  deleted links {}", removed.join(", "));
        }

        let names = std::mem::take(&mut self.namespaces);
        let mut removed = Vec::new();
        for ns in names.iter().cloned() {
            if !Path::new(NETNS_DIR).join(&ns).exists() {
                continue;
            }
            match ip(&["netns", "del", &ns]) {
                Ok(_) => removed.push(ns),
                Err(e) => {
                    eprintln!("  could not delete namespace {ns}: {e:#}");
                    failed += 1;
                }
            }
        }
        if !removed.is_empty() {
            println!("  deleted namespaces {}", removed.join(", "));
        }
        // A process that opened a namespace's name before it went (one `ip netns exec`
        // started as the search above ended) may still enter it; no later one can.
        if !ids.is_empty() {
            failed += stop_processes("that entered the namespaces meanwhile", || {
                pids_in(&ids, &names)
            });
        }
        failed
    }
}

/// Sends SIGTERM to every process `find` returns, asking again until none is left (so
/// that a process started meanwhile, e.g. a VMM an agent was starting, is caught too),
/// and SIGKILL to those still there after [`GRACE`]. Prints what it stopped; returns
/// how many processes it could not.
fn stop_processes(what: &str, mut find: impl FnMut() -> Vec<u32>) -> usize {
    let t0 = Instant::now();
    let me = std::process::id();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    let mut killed: BTreeSet<u32> = BTreeSet::new();
    loop {
        let pids: Vec<u32> = find().into_iter().filter(|&p| p != me).collect();
        if pids.is_empty() {
            break;
        }
        if t0.elapsed() > GRACE + KILL_WAIT {
            let shown: Vec<String> = pids.iter().take(10).map(u32::to_string).collect();
            eprintln!(
                "  {} process(es) {what} still there after SIGKILL: pids {}{}",
                pids.len(),
                shown.join(", "),
                if pids.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            );
            return pids.len();
        }
        let late = t0.elapsed() >= GRACE;
        for pid in pids {
            names.entry(pid).or_insert_with(|| {
                let name = program_name(pid);
                signal(pid, libc::SIGTERM);
                name
            });
            if late && killed.insert(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !names.is_empty() {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for n in names.values() {
            *counts.entry(n).or_default() += 1;
        }
        let list: Vec<String> = counts
            .iter()
            .map(|(n, c)| {
                if *c > 1 {
                    format!("{n} x{c}")
                } else {
                    (*n).to_owned()
                }
            })
            .collect();
        let forced = if killed.is_empty() {
            String::new()
        } else {
            format!("; {} needed SIGKILL", killed.len())
        };
        println!(
            "  stopped {} process(es) {what}: {}{forced}",
            names.len(),
            list.join(", ")
        );
    }
    0
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill has no memory effects; the pid is a positive one read from /proc.
    unsafe { libc::kill(pid, sig) };
}

/// A process is there and not a zombie (a zombie holds no namespace and no file).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

fn proc_pids() -> Result<Vec<u32>> {
    Ok(std::fs::read_dir("/proc")
        .context("reading /proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The program a process runs, as its argv[0] names it ("prometheus-alertmanager", where
/// `comm` would cut it to 15 bytes).
fn program_name(pid: u32) -> String {
    cmdline(pid)
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("pid {pid}"))
}

/// Where `ip netns` keeps its namespaces' names (bind mounts of their nsfs files).
const NETNS_DIR: &str = "/var/run/netns";

/// A named namespace's device and inode: what /proc/PID/ns/net of each of its
/// processes resolves to (how `ip netns pids` finds them).
fn ns_identity(ns: &str) -> Option<(u64, u64)> {
    let m = std::fs::metadata(Path::new(NETNS_DIR).join(ns)).ok()?;
    Some((m.dev(), m.ino()))
}

/// The processes in any of the namespaces `ids`, and those on their way into one of
/// `names` (`ip netns exec NAME`, not yet moved): one of those would otherwise enter
/// after the namespace was searched, keep it alive past its name, and be found by
/// nothing.
fn pids_in(ids: &[(u64, u64)], names: &[String]) -> Vec<u32> {
    proc_pids()
        .unwrap_or_default()
        .into_iter()
        .filter(|pid| {
            let inside = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| ids.contains(&(m.dev(), m.ino())));
            inside || {
                let argv = cmdline(*pid);
                argv.len() > 3
                    && Path::new(&argv[0]).file_name().is_some_and(|n| n == "ip")
                    && argv[1..3] == ["netns", "exec"]
                    && names.contains(&argv[3])
            }
        })
        .collect()
}

fn is_lab_ns(name: &str) -> bool {
    one_letter_after(name, NS_PREFIX)
}

fn is_lab_link(name: &str) -> bool {
    name == BRIDGE || one_letter_after(name, PORT_PREFIX)
}

/// `prefix` and one lowercase letter: the lab's names exactly, never a test's
/// namespaces (`ferry-<tag>-<pid>-<n>-s`) however it is tagged.
fn one_letter_after(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|r| r.len() == 1 && r.bytes().all(|b| b.is_ascii_lowercase()))
}

/// The entries of `dir` whose names pass `keep` (none if `dir` does not exist).
fn names_in(dir: &Path, keep: fn(&str) -> bool) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| keep(n))
        .collect();
    names.sort();
    Ok(names)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Ok(c);
    }
    Ok(std::env::current_dir()
        .context("the current folder")?
        .join(p))
}

struct MountEntry {
    point: PathBuf,
    fstype: String,
    source: String,
}

fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo).collect())
}

/// One line of /proc/PID/mountinfo: `ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS...] - FSTYPE
/// SOURCE SUPEROPTS`.
fn parse_mountinfo(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let point = left.split(' ').nth(4)?;
    let mut right = right.split(' ');
    Some(MountEntry {
        point: PathBuf::from(unescape_octal(point)),
        fstype: right.next()?.to_owned(),
        source: unescape_octal(right.next()?),
    })
}

/// The kernel writes space, tab, newline and backslash in mount paths as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && (b'0'..=b'3').contains(&b[i + 1])
            && b[i + 2..i + 4].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An address of the lab's subnet already on an interface that is not the lab's would
/// make the root namespace's route to the hosts ambiguous.
fn refuse_taken_subnet() -> Result<()> {
    let out = ip(&["-o", "-4", "addr", "show"])?;
    for line in out.lines() {
        let mut f = line.split_whitespace();
        let dev = f.nth(1).unwrap_or("?");
        if line.contains(&format!(" {SUBNET}")) && !is_lab_link(dev) {
            bail!(
                "interface {dev} already has an address in {SUBNET}0/{PREFIX_LEN}, the lab's \
                 subnet: {}",
                line.split('\\').next().unwrap_or(line).trim()
            );
        }
    }
    Ok(())
}

fn tbf(ns: Option<&str>, dev: &str, link: Link) -> Result<()> {
    let mut c = Command::new("tc");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    c.args(["qdisc", "add", "dev", dev, "root", "tbf", "rate"])
        .arg(format!("{}mbit", link.mbit()))
        // As tests/src/netns.rs shapes its links. A 256 KiB bucket is 2 ms at 1 Gbit/s,
        // still enough: one TCP stream host to host measured 193 Mbit/s at 200mbit and
        // 954 Mbit/s at 1gbit here.
        .args(["burst", "256kb", "latency", "50ms"]);
    output_of(&mut c).map(drop)
}

/// `cmd` as a shell would show it, for error messages.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to its end; its stdout, or an error naming it with what it printed.
fn output_of(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        // promtool and amtool say what is wrong on stdout, ip and tc on stderr.
        let said: Vec<String> = [&stdout, &String::from_utf8_lossy(&out.stderr).into_owned()]
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        bail!("{what}: {} ({})", said.join("\n"), out.status);
    }
    Ok(stdout)
}

fn ip(args: &[&str]) -> Result<String> {
    output_of(Command::new("ip").args(args))
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ctrl-C (SIGINT) or SIGTERM arrived since [`LabNet::create`]: the story stops at its
/// next step and drops the lab, which removes everything. A second one ends the
/// process at once (`cargo xtask lab --stop` removes what it left).
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error to return with `?` between the story's steps once [`interrupted`].
pub(crate) fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

extern "C" fn on_interrupt(sig: libc::c_int) {
    // Only async-signal-safe work here (signal-safety(7)): a lock-free atomic, write,
    // signal and raise.
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: signal and raise are async-signal-safe; the default action ends the
        // process once this handler returns and unblocks `sig`.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    let msg = b"\ninterrupted: the lab stops after this step and removes what it made \
                (interrupt again to quit at once, then cargo xtask lab --stop)\n";
    // SAFETY: write is async-signal-safe and reads only `msg`, a static; errno is put
    // back, as the code this interrupted may be about to read it.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(2, msg.as_ptr().cast(), msg.len());
        *libc::__errno_location() = errno;
    }
}

fn catch_interrupts() -> Result<()> {
    for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        // SAFETY: an all-zero sigaction is a valid value (no flags, empty mask) that
        // the lines below fill in.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // Blocking calls elsewhere carry on rather than fail with EINTR.
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: sigemptyset and sigaction only read and write the structs passed.
        let r = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            bail!(
                "installing a {name} handler: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The lab's Prometheus and Alertmanager (in the root namespace).
pub(crate) struct Monitoring {
    /// "127.0.0.1:PORT"
    pub prometheus: String,
    /// "127.0.0.1:PORT"
    pub alertmanager: String,
}

/// Starts, in the root namespace, which reaches the hosts over the bridge:
/// * Alertmanager (`prometheus-alertmanager`, clustering off) on a free loopback port,
///   whose one route sends every alert, grouped by alertname, host and vm (first after
///   `group_wait`, changes after 5 s, again every minute while firing, and resolved
///   ones), to every host's agent: `http://IP:7070/v1/alerts` with `Authorization:
///   Bearer` and the token in `webhook_token_file`;
/// * Prometheus, scraping every host's agent at IP:7070 every second as job `ferry`,
///   each target labelled `host` with its host's name (so its alerts carry it), with
///   the rule file `rules` evaluated every second and its alerts sent to Alertmanager.
///
/// Both configs, and `rules`, are checked (amtool, promtool) before anything starts.
/// Waits until both are ready; their configs, logs (`prometheus.log`,
/// `alertmanager.log`) and data are in `dir`. Both are stopped by the lab's clean-up.
pub(crate) fn start_monitoring(
    net: &mut LabNet,
    dir: &Path,
    rules: &Path,
    webhook_token_file: &Path,
    ca: &Path,
    group_wait: Duration,
) -> Result<Monitoring> {
    for (cmd, package) in [
        ("prometheus", "prometheus"),
        ("promtool", "prometheus"),
        ("prometheus-alertmanager", "prometheus-alertmanager"),
        ("amtool", "prometheus-alertmanager"),
    ] {
        if !have_command(cmd) {
            bail!("{cmd} is not installed: cargo xtask setup installs it (Debian's {package})");
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let rules = rules
        .canonicalize()
        .with_context(|| format!("the rule file {}", rules.display()))?;
    // Alertmanager reads the token at each notification and would only log a missing
    // one: better to fail here, naming it.
    let token = webhook_token_file
        .canonicalize()
        .with_context(|| format!("the webhook token file {}", webhook_token_file.display()))?;
    let text = std::fs::read_to_string(&token)
        .with_context(|| format!("reading the webhook token file {}", token.display()))?;
    if text.trim().is_empty() {
        bail!("the webhook token file {} is empty", token.display());
    }

    // The configs name these paths; YAML (or JSON) holds text only.
    let utf8 = |p: &Path| -> Result<String> {
        p.to_str()
            .map(str::to_owned)
            .with_context(|| format!("{} is not UTF-8, which a config cannot name", p.display()))
    };
    let (rules_text, token_text) = (utf8(&rules)?, utf8(&token)?);
    let ca = &ca
        .canonicalize()
        .with_context(|| format!("the lab CA {}", ca.display()))?;
    // Data of an earlier run in the same folder would carry its silences, its
    // notification log (Alertmanager would not notify again what it notified then) and
    // its series.
    for data in ["alertmanager-data", "prometheus-data"] {
        let data = dir.join(data);
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("removing {}", data.display()))?;
        }
    }

    step("monitoring: Alertmanager and Prometheus in the root namespace");
    output_of(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules),
    )
    .with_context(|| format!("the alerting rules {} do not check", rules.display()))?;

    let am_addr = format!("127.0.0.1:{}", free_port());
    let prom_addr = loop {
        let a = format!("127.0.0.1:{}", free_port());
        if a != am_addr {
            break a;
        }
    };

    let am_config = dir.join(ALERTMANAGER_CONFIG);
    write_config(
        &am_config,
        &alertmanager_config(&net.hosts, &token_text, ca, group_wait),
    )?;
    output_of(Command::new("amtool").arg("check-config").arg(&am_config))
        .context("the lab's Alertmanager config does not check")?;
    let prom_config = dir.join(PROMETHEUS_CONFIG);
    write_config(
        &prom_config,
        &prometheus_config(&net.hosts, &rules_text, ca, &am_addr),
    )?;
    output_of(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(&prom_config),
    )
    .context("the lab's Prometheus config does not check")?;

    let alertmanager_log = dir.join("alertmanager.log");
    let mut am = Command::new("prometheus-alertmanager");
    am.arg(format!("--config.file={}", am_config.display()))
        .arg(format!(
            "--storage.path={}",
            dir.join("alertmanager-data").display()
        ))
        .arg(format!("--web.listen-address={am_addr}"))
        // Empty: no cluster, so no gossip port and no peers to wait for.
        .arg("--cluster.listen-address=");
    spawn_daemon(net, am, &alertmanager_log, &am_addr, "Alertmanager")?;
    println!(
        "  Alertmanager http://{am_addr}: every alert to {} (HTTPS, Bearer token from {}), group_wait {}",
        net.hosts
            .iter()
            .map(|h| format!("{}'s agent", h.name))
            .collect::<Vec<_>>()
            .join(", "),
        token.display(),
        duration(group_wait)
    );

    let prometheus_log = dir.join("prometheus.log");
    let mut prom = Command::new("prometheus");
    prom.arg(format!("--config.file={}", prom_config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("prometheus-data").display()
        ))
        .arg(format!("--web.listen-address={prom_addr}"));
    spawn_daemon(net, prom, &prometheus_log, &prom_addr, "Prometheus")?;
    println!(
        "  Prometheus http://{prom_addr}: job ferry scrapes {} over HTTPS every 1 s; rules {}",
        net.hosts
            .iter()
            .map(|h| format!("{} {}", h.name, h.agent_addr()))
            .collect::<Vec<_>>()
            .join(", "),
        rules.display()
    );
    println!("  configs and logs in {}", dir.display());
    Ok(Monitoring {
        prometheus: prom_addr,
        alertmanager: am_addr,
    })
}

/// A config as YAML: written as JSON, which YAML parsers read as it is and which keeps
/// any path safely quoted.
fn write_config(path: &Path, config: &Value) -> Result<()> {
    let text = format!(
        "# Written by cargo xtask lab (xtask/src/lab_net.rs); YAML in its JSON form.\n{}\n",
        serde_json::to_string_pretty(config)?
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn alertmanager_config(hosts: &[Host], token_file: &str, ca: &Path, group_wait: Duration) -> Value {
    let webhooks: Vec<Webhook> = hosts
        .iter()
        .map(|h| Webhook {
            url: format!("https://{}/v1/alerts", h.agent_addr()),
            token_file: PathBuf::from(token_file),
            ca_file: Some(ca.to_owned()),
        })
        .collect();
    ferry_tests::alertmanager::config(
        &webhooks,
        &Timers {
            group_wait,
            group_interval: Duration::from_secs(5),
            repeat_interval: Duration::from_secs(60),
        },
    )
}

fn prometheus_config(hosts: &[Host], rules: &str, ca: &Path, alertmanager: &str) -> Value {
    let targets: Vec<Target> = hosts
        .iter()
        .map(|h| Target::host(&h.agent_addr(), &h.name))
        .collect();
    ferry_tests::prometheus::over_tls(
        ferry_tests::prometheus::config(&targets, &[Path::new(rules)], Some(alertmanager)),
        ca,
    )
}

/// Starts a daemon in a process group of its own (a Ctrl-C at the terminal leaves it to
/// the clean-up, and a kept lab's outlives the terminal), registered with the lab
/// before anything can fail; waits until it answers `/-/ready`.
fn spawn_daemon(
    net: &mut LabNet,
    mut cmd: Command,
    log: &Path,
    addr: &str,
    what: &str,
) -> Result<()> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    let pid = child.id();
    net.made.daemons.push(Daemon {
        pid,
        child: Some(child),
    });
    let t0 = Instant::now();
    loop {
        if let Some(d) = net.made.daemons.iter_mut().find(|d| d.pid == pid)
            && !d.alive()
        {
            bail!("{what} exited at start; {}:\n{}", log.display(), tail(log));
        }
        if request(addr, "GET", "/-/ready", None, None).is_some_and(|a| a.status == 200) {
            return Ok(());
        }
        check_interrupted()?;
        if t0.elapsed() > READY_TIMEOUT {
            bail!(
                "{what} is not ready after {READY_TIMEOUT:?}; {}:\n{}",
                log.display(),
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_link_speeds_parse_and_anything_else_names_them() {
        assert_eq!("1gbit".parse::<Link>().unwrap(), Link::Gbit1);
        assert_eq!(" 200Mbit ".parse::<Link>().unwrap(), Link::Mbit200);
        assert_eq!(Link::Gbit1.mbit(), 1000);
        assert_eq!(Link::Mbit200.mbit(), 200);
        assert_eq!(Link::Mbit200.to_string(), "200mbit");
        let e = "100mbit".parse::<Link>().unwrap_err().to_string();
        assert!(
            e.contains("100mbit") && e.contains("1gbit or 200mbit"),
            "{e}"
        );
    }

    #[test]
    fn durations_are_written_as_prometheus_reads_them() {
        assert_eq!(duration(Duration::from_secs(5)), "5s");
        assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration(Duration::ZERO), "0s");
    }

    #[test]
    fn mountinfo_lines_are_read_with_their_escapes() {
        let line = "36 35 0:31 / /work/target/lab/my\\040disks rw,relatime shared:1 - tmpfs \
                    ferry-lab rw,size=65536k";
        let m = parse_mountinfo(line).unwrap();
        assert_eq!(m.point, Path::new("/work/target/lab/my disks"));
        assert_eq!(m.fstype, "tmpfs");
        assert_eq!(m.source, "ferry-lab");
        assert_eq!(unescape_octal("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape_octal("trailing\\04"), "trailing\\04");
        assert_eq!(unescape_octal("\\777"), "\\777");
    }

    #[test]
    fn only_the_labs_own_names_count_as_leftovers() {
        for ns in ["ferry-lab-a", "ferry-lab-c"] {
            assert!(is_lab_ns(ns), "{ns}");
        }
        // The tests' namespaces, whatever their tag.
        for ns in [
            "ferry-lab-123-0-s",
            "ferry-agents-9-1-d",
            "ferry-lab-",
            "ferry-lab-A",
        ] {
            assert!(!is_lab_ns(ns), "{ns}");
        }
        assert!(is_lab_link("ferrylab0") && is_lab_link("ferrylab-b"));
        assert!(!is_lab_link("ferrylab1") && !is_lab_link("fv123-0") && !is_lab_link("eth0"));
    }

    fn hosts() -> Vec<Host> {
        LETTERS
            .iter()
            .enumerate()
            .map(|(i, l)| Host {
                name: format!("host-{l}"),
                ns: format!("{NS_PREFIX}{l}"),
                ip: format!("{SUBNET}{}", i + 1),
                port: format!("{PORT_PREFIX}{l}"),
            })
            .collect()
    }

    #[test]
    fn every_agent_gets_every_alert_with_the_webhook_token() {
        let c = alertmanager_config(
            &hosts(),
            "/t/hook",
            Path::new("/t/ca.pem"),
            Duration::from_secs(2),
        );
        assert_eq!(c["route"]["group_wait"], "2s");
        assert_eq!(c["route"]["receiver"], "ferry-agents");
        let hooks = c["receivers"][0]["webhook_configs"].as_array().unwrap();
        let urls: Vec<&str> = hooks.iter().map(|h| h["url"].as_str().unwrap()).collect();
        assert_eq!(
            urls,
            [
                "https://198.18.0.1:7070/v1/alerts",
                "https://198.18.0.2:7070/v1/alerts",
                "https://198.18.0.3:7070/v1/alerts"
            ]
        );
        for h in hooks {
            assert_eq!(h["send_resolved"], true);
            assert_eq!(h["http_config"]["authorization"]["type"], "Bearer");
            assert_eq!(h["http_config"]["tls_config"]["ca_file"], "/t/ca.pem");
            assert_eq!(
                h["http_config"]["authorization"]["credentials_file"],
                "/t/hook"
            );
        }
    }

    #[test]
    fn every_target_carries_its_hosts_name() {
        let c = prometheus_config(&hosts(), "/r.yml", Path::new("/t/ca.pem"), "127.0.0.1:9");
        assert_eq!(c["scrape_configs"][0]["scheme"], "https");
        assert_eq!(c["scrape_configs"][0]["tls_config"]["ca_file"], "/t/ca.pem");
        let sc = c["scrape_configs"][0]["static_configs"].as_array().unwrap();
        assert_eq!(sc.len(), 3);
        assert_eq!(sc[1]["targets"][0], "198.18.0.2:7070");
        assert_eq!(sc[1]["labels"]["host"], "host-b");
        assert_eq!(
            c["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0],
            "127.0.0.1:9"
        );
    }
}
