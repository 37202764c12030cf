//! Two network namespaces joined by a veth pair, the link optionally shaped with
//! `tc tbf`: a real network link between a source and a destination on one machine,
//! which can be slowed down or taken down. Removed on drop.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The source side's and the destination side's addresses on the link: from
/// 198.18.0.0/15, the range RFC 2544 sets aside for benchmarking, which no real network
/// routes, so nothing a test sends can reach anyone else's hosts.
pub const SOURCE_ADDR: &str = "198.18.0.1";
pub const DEST_ADDR: &str = "198.18.0.2";
/// The link's prefix length: a /24 inside 198.18.0.0/15.
pub const PREFIX_LEN: u8 = 24;

pub struct LinkPair {
    pub source_ns: String,
    pub dest_ns: String,
    veth: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl LinkPair {
    /// Creates the namespaces and the link; `rate_mbit` shapes both directions.
    /// Needs root (CAP_NET_ADMIN), veth and, when shaping, sch_tbf.
    pub fn new(tag: &str, rate_mbit: Option<u32>) -> Result<Self, String> {
        // Unique per pair: tests of one binary run at once and may each make one,
        // and test binaries and benchmarks run side by side (each has its own pid).
        static PAIRS: AtomicU32 = AtomicU32::new(0);
        let n = PAIRS.fetch_add(1, Ordering::Relaxed) % 10_000;
        let pid = std::process::id();
        let pair = Self {
            source_ns: format!("ferry-{tag}-{pid}-{n}-s"),
            dest_ns: format!("ferry-{tag}-{pid}-{n}-d"),
            // An interface name holds 15 bytes: "fv" and a pid (7 digits at most, as
            // pid_max allows) and "-" and 4 digits, and the peer's "p".
            veth: format!("fv{pid}-{n}"),
        };
        let (s, d, v) = (&pair.source_ns, &pair.dest_ns, &pair.veth);
        let peer = format!("{v}p");
        ip(&["netns", "add", s])?;
        ip(&["netns", "add", d])?;
        ip(&[
            "link", "add", v, "netns", s, "type", "veth", "peer", "name", &peer, "netns", d,
        ])?;
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{SOURCE_ADDR}/{PREFIX_LEN}"),
            "dev",
            v,
        ])?;
        ip(&[
            "-n",
            d,
            "addr",
            "add",
            &format!("{DEST_ADDR}/{PREFIX_LEN}"),
            "dev",
            &peer,
        ])?;
        for (ns, dev) in [(s, v.as_str()), (d, peer.as_str())] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            if let Some(rate) = rate_mbit {
                let out = Command::new("ip")
                    .args([
                        "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    ])
                    .args([
                        "rate",
                        &format!("{rate}mbit"),
                        "burst",
                        "256kb",
                        "latency",
                        "50ms",
                    ])
                    .output()
                    .map_err(|e| format!("cannot run tc: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "tc tbf on {dev}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
        }
        Ok(pair)
    }

    /// `program` run inside network namespace `ns` (the process keeps its pid).
    pub fn command(ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Takes the link down (as a pulled cable) or brings it back.
    pub fn set_up(&self, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.source_ns, "link", "set", &self.veth, state])
    }
}

impl Drop for LinkPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and with it the pair.
        let _ = ip(&["netns", "del", &self.source_ns]);
        let _ = ip(&["netns", "del", &self.dest_ns]);
    }
}

#[cfg(test)]
mod tests {
    /// Tests of one binary run at once: two pairs made at the same moment in one
    /// process get names of their own, within what an interface name may hold.
    #[test]
    fn two_pairs_in_one_process_do_not_collide() {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| crate::require_link("nt", Some(100)));
            let b = s.spawn(|| crate::require_link("nt", Some(100)));
            (a.join().unwrap(), b.join().unwrap())
        });
        let (Some(a), Some(b)) = (a, b) else {
            return;
        };
        assert_ne!(a.source_ns, b.source_ns);
        assert_ne!(a.dest_ns, b.dest_ns);
        assert_ne!(a.veth, b.veth);
        for pair in [&a, &b] {
            assert!(pair.veth.len() < 15, "{} and its peer's p", pair.veth);
        }
    }
}
