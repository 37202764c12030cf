//! `/metrics` for a host with many VMs: the time to render it and the memory its
//! series take. Every VM has what a sampled, probed VM has (two dirty-rate sources,
//! a working set, exits of four kinds, disk bytes and a latency histogram, its
//! heartbeat gap); one in ten is migrating. Prints one JSON object.
//!
//! `cargo bench -p ferry --bench metrics_render [-- VMS]` (cargo xtask bench telemetry
//! runs it).

use std::time::Instant;

use ferry::daemon::metrics::{Metrics, Scrape};
use ferry::daemon::sampler::{Observed, VmSignals};
use ferry::probes::signals::Reading;
use ferry_api::agent::{MigrationInfo, VmInfo, VmPresence};
use ferry_api::{MigrationProgress, RunState};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let vms: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let before = rss_kib();
    let metrics = Metrics::default();
    let mut infos = Vec::with_capacity(vms);
    let mut observed = Observed::default();
    let mut live = Vec::new();
    for i in 0..vms {
        let name = format!("vm-{i:04}");
        let mut v = VmInfo::new(&name, format!("/var/lib/ferry/vms/{name}.toml"));
        v.presence = VmPresence::Running;
        v.state = Some(RunState::Running);
        v.max_heartbeat_gap_ms = Some(2.0 + i as f64 % 7.0);
        infos.push(v);
        let mut r = Reading::default();
        for (kind, reason) in [(1, 2), (1, 6), (2, 3840), (2, 3843)] {
            r.exits.insert((kind, reason), 1000 + i as u64);
        }
        for op in 0..2 {
            r.io[op].bytes = 4096 * (i as u64 + 1);
            r.io[op].calls = 100;
            r.io[op].latency_ns = 100 * 20_000;
            r.io[op].hist[14] = 60;
            r.io[op].hist[16] = 40;
        }
        observed.vms.insert(
            name.clone(),
            VmSignals {
                dirty_pages_per_sec: vec![
                    ("kvm_dirty_log".into(), 400.0 + i as f64),
                    ("kvmmmu:kvm_mmu_set_spte".into(), 410.0 + i as f64),
                ],
                working_set_pages: Some(2048),
                sources_live: vec!["kvmmmu:kvm_mmu_set_spte"],
                reading: Some(r),
            },
        );
        if i % 10 == 0 {
            let mut m =
                MigrationInfo::new(format!("m{i}"), &name, "host-a", "host-b", "adaptive", 0);
            m.progress = Some(MigrationProgress::setup("198.18.0.2:7000"));
            live.push(m);
        }
    }
    let scrape = Scrape {
        host: "host-a",
        vms: &infos,
        live: &live,
        arriving: 0,
        datastores: &[],
        observed: &observed,
        spans: (0, 0),
    };
    let first = metrics.render(&scrape);
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let text = metrics.render(&scrape);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(text.len(), first.len());
    }
    let after = rss_kib();
    times.sort_by(f64::total_cmp);
    let series = first.lines().filter(|l| !l.starts_with('#')).count();
    println!(
        "{}",
        serde_json::json!({
            "vms": vms,
            "series": series,
            "bytes": first.len(),
            "render_ms": {"min": times[0], "median": times[times.len() / 2], "max": times[times.len() - 1]},
            "rss_kib_before": before,
            "rss_kib_after": after,
            "memory_mib": (after.saturating_sub(before)) as f64 / 1024.0,
        })
    );
}
