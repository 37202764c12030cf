//! The migration stream against the raw TCP stream it runs on (`cargo xtask bench
//! precopy`, its line-rate step), and the measured migration both that and `bench tls`
//! run: a fresh destination started before the migration as an orchestrator starts
//! it, each end's CPU time taken around the migration.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ferry_api::{MigrationReport, Outcome};
use serde_json::{Value, json};

use crate::bench::{Report, config, start, wait_for};
use crate::util::{Vmm, cpu_seconds, median, step};

/// CPU seconds each end's VMM spent on one migration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cpu {
    pub(crate) source: f64,
    pub(crate) destination: f64,
}

/// How the destination of a measured migration is started.
pub(crate) struct Destination<'a> {
    /// Plain TCP (`--insecure` on both ends) or TLS.
    pub(crate) tls: bool,
    /// Guest memory to preallocate (`--memory-mib`), waited for before the
    /// migration starts, as an agent's destination has it by then.
    pub(crate) prealloc_mib: Option<u64>,
    /// Arguments to `ferry migrate` beyond the destination and the transport.
    pub(crate) args: &'a [&'a str],
}

/// Migrates `vm` to a fresh incoming VMM; returns the report, the new VMM, and the
/// CPU time each end spent on it. A migration that fails or is not verified fails
/// the bench.
pub(crate) fn migrate(
    ferry: &Path,
    dir: &Path,
    vm: &Vmm,
    name: &str,
    d: &Destination,
) -> Result<(MigrationReport, Vmm, Cpu)> {
    let insecure: &[&str] = if d.tls { &[] } else { &["--insecure"] };
    let mib = d.prealloc_mib.map(|m| m.to_string());
    let mut extra = insecure.to_vec();
    if let Some(m) = &mib {
        extra.extend(["--memory-mib", m.as_str()]);
    }
    let (dst, addr) = crate::util::incoming(ferry, dir, name, &extra)?;
    if mib.is_some() {
        wait_preallocated(&dst)?;
    }
    let cpu = || -> Result<Cpu> {
        Ok(Cpu {
            source: cpu_seconds(vm.child.id())?,
            destination: cpu_seconds(dst.child.id())?,
        })
    };
    let before = cpu()?;
    let mut full = vec!["migrate", "--to", &addr, "--json"];
    full.extend_from_slice(d.args);
    full.extend_from_slice(insecure);
    full.extend(["--control", vm.control.to_str().unwrap_or_default()]);
    let out = std::process::Command::new(ferry)
        .args(ferry_tests::pki::secured(&full))
        .output()?;
    let after = cpu()?;
    let report = Report::<MigrationReport>::parse(&out)?.typed;
    if report.core.outcome != Outcome::Completed || report.memory_verified != Some(true) {
        bail!("migration failed or unverified: {report:?}");
    }
    if report.tls != d.tls {
        bail!("asked for tls = {}, the report says {}", d.tls, report.tls);
    }
    let spent = Cpu {
        source: after.source - before.source,
        destination: after.destination - before.destination,
    };
    Ok((report, dst, spent))
}

/// Waits until an incoming VMM says its memory is faulted in.
fn wait_preallocated(dst: &Vmm) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let log = std::fs::read_to_string(&dst.log).unwrap_or_default();
        if log.contains("preallocated ") {
            return Ok(());
        }
        if log.contains("cannot preallocate") || log.contains("preallocating guest memory stopped")
        {
            bail!(
                "the destination could not preallocate: see {}",
                dst.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the destination did not finish preallocating in 30 s: see {}",
        dst.log.display()
    )
}

/// Raw loopback TCP throughput in bytes/s: one writer, one reader, 1 MiB writes.
pub(crate) fn loopback_bytes_per_sec(total: usize) -> Result<f64> {
    raw_bytes_per_sec(total, None)
}

/// Moves the calling thread into network namespace `ns` (its sockets live there).
fn enter_netns(ns: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: setns only reads the descriptor, which lives across the call; it changes
    // this thread's network namespace and nothing in this process's memory.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raw TCP throughput in bytes/s: one writer, one reader, 1 MiB writes; over
/// loopback, or from the first namespace of `link` to its address in the second.
fn raw_bytes_per_sec(total: usize, link: Option<(&str, &str, &str)>) -> Result<f64> {
    use std::io::{Read, Write};
    let (reader_ns, writer_ns, host) = match link {
        Some((w, r, host)) => (Some(r.to_owned()), Some(w.to_owned()), host.to_owned()),
        None => (None, None, "127.0.0.1".to_owned()),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        if let Some(ns) = &reader_ns {
            enter_netns(ns)?;
        }
        let listener = std::net::TcpListener::bind((host.as_str(), 0));
        let listener = match listener {
            Ok(l) => {
                let _ = tx.send(l.local_addr());
                l
            }
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                return Err(e);
            }
        };
        let (mut conn, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        loop {
            match conn.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    });
    let addr = rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the reader thread ended before it listened"))??;
    let writer = std::thread::spawn(move || -> std::io::Result<Instant> {
        if let Some(ns) = &writer_ns {
            enter_netns(ns)?;
        }
        let mut conn = std::net::TcpStream::connect(addr)?;
        let chunk = vec![0x5au8; 1 << 20];
        let t0 = Instant::now();
        let mut sent = 0;
        while sent < total {
            conn.write_all(&chunk)?;
            sent += chunk.len();
        }
        Ok(t0)
    });
    let t0 = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    Ok(got as f64 / t0.elapsed().as_secs_f64())
}

/// Migrations of each kind.
const RUNS: usize = 5;

/// The bulk guest these benches move: 1 GiB, idle once its 768 MiB working set is
/// written with random (incompressible, non-zero) pages.
pub(crate) fn bulk_guest(name: &str) -> String {
    config(
        name,
        1024,
        1,
        "working_set_mib = 768\npattern = \"idle\"\ncontent = \"random\"\n",
    )
}

/// Waits until the bulk guest `vm` has written its working set (196,608 pages).
pub(crate) fn wait_filled(ferry: &Path, vm: &Vmm) -> Result<()> {
    wait_for(ferry, vm, Duration::from_secs(120), |s| {
        s.machine.guest_pages_written >= 196_608
    })?;
    Ok(())
}

/// The line-rate step of `bench precopy`: a filled, idle 1 GiB guest whose 768 MiB
/// working set is random (incompressible, non-zero) pages, codec none, plain TCP,
/// loopback; the destination preallocated and not, in turns, each migration next to
/// a raw TCP stream of 1 GiB measured just before it.
pub(crate) fn line_rate(ferry: &Path, dir: &Path) -> Result<Value> {
    step(&format!(
        "line rate: an idle 1 GiB guest, 768 MiB of random pages, codec none, plain TCP; \
         {RUNS} migrations each with the destination's memory preallocated and without, \
         in turns, each next to a raw TCP stream"
    ));
    let mut vm = start(ferry, dir, "line", &bulk_guest("line"))?;
    vm.wait_ready(ferry)?;
    wait_filled(ferry, &vm)?;
    // [without, with] preallocation.
    let mut share: [Vec<f64>; 2] = Default::default();
    let mut rate: [Vec<f64>; 2] = Default::default();
    let mut raw_all = Vec::new();
    let mut src_cpu: [Vec<f64>; 2] = Default::default();
    let mut dst_cpu: [Vec<f64>; 2] = Default::default();
    for i in 0..2 * RUNS {
        let pre = i % 2 == 0;
        let raw = loopback_bytes_per_sec(1 << 30)?;
        let (r, dst, cpu) = migrate(
            ferry,
            dir,
            &vm,
            &format!("line{i}"),
            &Destination {
                tls: false,
                prealloc_mib: pre.then_some(1024),
                args: &["--compression", "none", "--policy", "static"],
            },
        )?;
        let bytes_per_sec = r.bytes_on_wire as f64 / (r.core.total_ms / 1e3);
        let gb = r.bytes_on_wire as f64 / 1e9;
        let k = usize::from(pre);
        println!(
            "  {:<13} raw TCP {:.2} GB/s; migration total {:.0} ms, {:.2} GB/s ({:.0}% of raw), \
             downtime {:.2} ms, CPU per GB: source {:.2} s, destination {:.2} s",
            if pre { "preallocated" } else { "fresh memory" },
            raw / 1e9,
            r.core.total_ms,
            bytes_per_sec / 1e9,
            bytes_per_sec / raw * 100.0,
            r.downtime_ms.unwrap_or(f64::NAN),
            cpu.source / gb,
            cpu.destination / gb
        );
        raw_all.push(raw);
        share[k].push(bytes_per_sec / raw * 100.0);
        rate[k].push(bytes_per_sec);
        src_cpu[k].push(cpu.source / gb);
        dst_cpu[k].push(cpu.destination / gb);
        vm.quit(ferry)?;
        vm = dst;
    }
    vm.quit(ferry)?;
    let mut out = serde_json::Map::new();
    out.insert("raw_tcp_bytes_per_sec".into(), json!(raw_all));
    for (k, name) in [(1, "preallocated"), (0, "fresh_memory")] {
        let m = |v: &Vec<f64>| median(v.clone());
        println!(
            "  median, {}: {:.2} GB/s, {:.0}% of raw TCP (goal >= 80%); CPU per GB: source \
             {:.2} s, destination {:.2} s (both ends share this host's cores)",
            name.replace('_', " "),
            m(&rate[k]) / 1e9,
            m(&share[k]),
            m(&src_cpu[k]),
            m(&dst_cpu[k])
        );
        out.insert(
            name.into(),
            json!({"bytes_per_sec": rate[k], "percent_of_raw": share[k],
                   "median_percent_of_raw": m(&share[k]),
                   "source_cpu_secs_per_gb": src_cpu[k],
                   "destination_cpu_secs_per_gb": dst_cpu[k]}),
        );
    }
    Ok(Value::Object(out))
}

/// Migrations over the shaped link.
const LINK_RUNS: usize = 3;
/// The shaped link's rate.
const LINK_MBIT: u32 = 1000;

/// The line-rate step's second half: the same guest over a veth shaped to 1 Gbit/s
/// (`tc tbf`, both directions) between two network namespaces, back and forth; the
/// share of the link's rate the migration's bytes on the wire take.
pub(crate) fn shaped_link(ferry: &Path, dir: &Path) -> Result<Value> {
    use ferry_tests::netns::{DEST_ADDR, LinkPair, SOURCE_ADDR};
    step(&format!(
        "line rate over a {LINK_MBIT} Mbit/s shaped veth: the same guest, codec none, plain \
         TCP, the destination preallocated; {LINK_RUNS} migrations back and forth"
    ));
    let link = LinkPair::new("lr", Some(LINK_MBIT))
        .map_err(|e| anyhow::anyhow!("a shaped link needs network namespaces: {e}"))?;
    let sides = [
        (link.source_ns.clone(), SOURCE_ADDR),
        (link.dest_ns.clone(), DEST_ADDR),
    ];
    let spawn = |side: usize, args: &[&str], name: &str| {
        crate::util::vmm_in(Some(&sides[side].0), ferry, dir, args, name)
    };
    let cfg = dir.join("link.toml");
    std::fs::write(&cfg, bulk_guest("link"))?;
    let mut vm = spawn(0, &["--config", cfg.to_str().unwrap_or_default()], "link-0")?;
    wait_filled(ferry, &vm)?;
    let mut shares = Vec::new();
    let mut raw_shares = Vec::new();
    for i in 0..LINK_RUNS {
        // The link's goodput for one TCP stream (its headers, and tbf counting them,
        // take some of the nominal rate), measured each way as the migration goes.
        let (from, to_ns) = (&sides[i % 2].0, &sides[(i + 1) % 2].0);
        let raw = raw_bytes_per_sec(256 << 20, Some((from, to_ns, sides[(i + 1) % 2].1)))?;
        let to = (i + 1) % 2;
        let addr = format!("{}:{}", sides[to].1, 47300 + i);
        let dst = spawn(
            to,
            &["--incoming", &addr, "--insecure", "--memory-mib", "1024"],
            &format!("link-{}", i + 1),
        )?;
        wait_preallocated(&dst)?;
        let out = std::process::Command::new(ferry)
            .args([
                "migrate",
                "--to",
                &addr,
                "--json",
                "--insecure",
                "--compression",
                "none",
                "--policy",
                "static",
                "--control",
                vm.control.to_str().unwrap_or_default(),
            ])
            .output()?;
        let r = Report::<MigrationReport>::parse(&out)?.typed;
        if r.core.outcome != Outcome::Completed || r.memory_verified != Some(true) {
            bail!("migration failed or unverified: {r:?}");
        }
        let bits_per_sec = r.bytes_on_wire as f64 * 8.0 / (r.core.total_ms / 1e3);
        let share = bits_per_sec / (f64::from(LINK_MBIT) * 1e6) * 100.0;
        let of_raw = bits_per_sec / (raw * 8.0) * 100.0;
        println!(
            "  raw TCP {:.0} Mbit/s; migration total {:.0} ms, {:.0} Mbit/s on the wire: \
             {share:.1}% of the link's rate, {of_raw:.1}% of raw TCP on it; downtime {:.2} ms",
            raw * 8.0 / 1e6,
            r.core.total_ms,
            bits_per_sec / 1e6,
            r.downtime_ms.unwrap_or(f64::NAN)
        );
        shares.push(share);
        raw_shares.push(of_raw);
        vm.quit(ferry)?;
        vm = dst;
    }
    vm.quit(ferry)?;
    let (m, r) = (median(shares.clone()), median(raw_shares.clone()));
    println!(
        "  median {m:.1}% of the {LINK_MBIT} Mbit/s link's rate (goal >= 95%), {r:.1}% of raw \
         TCP on it"
    );
    Ok(
        json!({"link_mbit": LINK_MBIT, "percent_of_link": shares, "median_percent": m,
              "percent_of_raw_tcp": raw_shares, "median_percent_of_raw_tcp": r}),
    )
}
