//! Two network namespaces joined by a veth pair, the link optionally shaped with
//! `tc tbf`: a real network link between a source and a destination on one machine,
//! which can be slowed down or taken down. Removed on drop.

use std::path::Path;
use std::process::Command;

/// The source side's and the destination side's addresses on the link.
pub const SOURCE_ADDR: &str = "10.77.0.1";
pub const DEST_ADDR: &str = "10.77.0.2";

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
        let id = format!("{}{}", tag, std::process::id() % 100_000);
        let pair = Self {
            source_ns: format!("ferry-{id}-s"),
            dest_ns: format!("ferry-{id}-d"),
            veth: format!("fv{}", std::process::id() % 100_000),
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
            &format!("{SOURCE_ADDR}/24"),
            "dev",
            v,
        ])?;
        ip(&[
            "-n",
            d,
            "addr",
            "add",
            &format!("{DEST_ADDR}/24"),
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
