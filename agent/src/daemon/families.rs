//! Metric families built at each scrape from what the sampler keeps: the VMs' dirty
//! rates, and the probes' cumulative counters and log2 latency histograms, which are
//! already counters and buckets (copying them into the prometheus crate's own types
//! would keep every value twice).

use ferry_api::agent::{VmInfo, VmPresence};
use ferry_ebpf::{HIST_BUCKETS, IoOp, IoStats};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

use super::sampler::Observed;
use crate::probes::signals::{add, exit_label};

/// Latency bucket bounds, as powers of two of nanoseconds: 4.1 µs, 16 µs, … 1.07 s.
/// The probes count in log2 buckets (bucket i holds [2^i, 2^(i+1)) ns), so every
/// bound here is exact.
const LATENCY_POWERS: &[u32] = &[12, 14, 16, 18, 20, 22, 24, 26, 28, 30];

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    let mut v: Vec<LabelPair> = pairs
        .iter()
        .map(|(k, val)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_owned());
            l.set_value((*val).to_owned());
            l
        })
        .collect();
    // As the crate's own vectors encode them: by name.
    v.sort_by(|a, b| a.name().cmp(b.name()));
    v
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_label(labels(pairs));
    m.set_gauge(g);
    m
}

fn counter(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

/// A log2 histogram of nanoseconds as a Prometheus histogram of seconds.
fn latency(pairs: &[(&str, &str)], s: &IoStats) -> Metric {
    let mut buckets = Vec::with_capacity(LATENCY_POWERS.len());
    for &k in LATENCY_POWERS {
        let below: u64 = s.hist[..(k as usize).min(HIST_BUCKETS)].iter().sum();
        let mut b = Bucket::default();
        b.set_upper_bound((1u64 << k) as f64 / 1e9);
        b.set_cumulative_count(below);
        buckets.push(b);
    }
    let mut h = Histogram::default();
    h.set_bucket(buckets);
    h.set_sample_count(s.hist.iter().sum());
    h.set_sample_sum(s.latency_ns as f64 / 1e9);
    let mut m = Metric::from_label(labels(pairs));
    m.set_histogram(h);
    m
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

/// The sampler's families for the VMs running here now (`present`: the sampler
/// may not have seen one leave yet); a family with no series is left out (the text
/// format has no way to say it).
pub fn observed(o: &Observed, present: &[VmInfo]) -> Vec<MetricFamily> {
    let (mut dirty, mut ws, mut exits, mut bytes, mut lat) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let here = |vm: &str| {
        present
            .iter()
            .any(|v| v.name == vm && v.presence == VmPresence::Running)
    };
    for (vm, s) in o.vms.iter().filter(|(vm, _)| here(vm)) {
        for (source, rate) in &s.dirty_pages_per_sec {
            dirty.push(gauge(&[("vm", vm), ("source", source)], *rate));
        }
        if let Some(n) = s.working_set_pages {
            ws.push(gauge(&[("vm", vm)], n as f64));
        }
        let Some(r) = &s.reading else { continue };
        for (&(kind, reason), &n) in &r.exits {
            exits.push(counter(
                &[("vm", vm), ("kind", &exit_label(kind, reason))],
                n as f64,
            ));
        }
        for (op, i) in [("read", IoOp::Read), ("write", IoOp::Write)] {
            bytes.push(counter(
                &[("vm", vm), ("op", op)],
                r.io[i as usize].bytes as f64,
            ));
        }
        let mut rw = r.io[IoOp::Read as usize];
        add(&mut rw, &r.io[IoOp::Write as usize]);
        lat.push(latency(&[("vm", vm)], &rw));
    }
    let devices: Vec<Metric> = o
        .devices
        .iter()
        .map(|(dev, s)| {
            let device = format!("{}:{}", dev >> 20, dev & 0xfffff);
            latency(&[("device", &device)], s)
        })
        .collect();
    let p = &o.probes;
    let families = [
        family(
            "ferry_vm_dirty_pages_per_second",
            "Pages the VM dirtied per second in its last sample, by source: kvm_dirty_log (the VMM's own dirty log, distinct pages) or the tracepoint the eBPF probes saw the writes on.",
            MetricType::GAUGE,
            dirty,
        ),
        family(
            "ferry_vm_working_set_pages",
            "Distinct pages the VM wrote during its last sample.",
            MetricType::GAUGE,
            ws,
        ),
        family(
            "ferry_vm_exits_total",
            "The VM's vCPU exits seen by the eBPF probes, by kind and reason (kvm_exit:REASON, userspace:io, pio:PORT: a VMM's few device ports).",
            MetricType::COUNTER,
            exits,
        ),
        family(
            "ferry_vm_disk_bytes_total",
            "Bytes the VM's VMM read from or wrote to its disk images.",
            MetricType::COUNTER,
            bytes,
        ),
        family(
            "ferry_vm_disk_latency_seconds",
            "Latency of the VM's VMM's disk reads and writes (system calls).",
            MetricType::HISTOGRAM,
            lat,
        ),
        family(
            "ferry_host_disk_latency_seconds",
            "Latency of the host's block requests, by device (major:minor), all submitters.",
            MetricType::HISTOGRAM,
            devices,
        ),
        family(
            "ferry_probe_sources_attached",
            "Tracepoints an eBPF program of the agent is attached to (0: the probes are not loaded).",
            MetricType::GAUGE,
            vec![gauge(&[], p.attached as f64)],
        ),
        family(
            "ferry_probe_sources_live",
            "Tracepoints that delivered events for some VM during its last sample.",
            MetricType::GAUGE,
            vec![gauge(&[], p.live as f64)],
        ),
        family(
            "ferry_probe_load_errors_total",
            "Failed attempts to load the eBPF probes (retried every minute).",
            MetricType::COUNTER,
            vec![counter(&[], p.load_errors as f64)],
        ),
    ];
    families
        .into_iter()
        .filter(|f| !f.get_metric().is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::sampler::VmSignals;
    use crate::probes::signals::Reading;

    fn encode(o: &Observed, present: &[VmInfo]) -> String {
        use prometheus::Encoder as _;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&observed(o, present), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    fn running(name: &str) -> VmInfo {
        let mut v = VmInfo::new(name, format!("{name}.toml"));
        v.presence = VmPresence::Running;
        v
    }

    #[test]
    fn log2_buckets_become_exact_cumulative_seconds_and_a_gone_vm_has_no_series() {
        let mut r = Reading::default();
        // 3 reads in [4096, 8192) ns, 1 write in [2^20, 2^21) ns, 1 sync (not counted).
        r.io[IoOp::Read as usize].hist[12] = 3;
        r.io[IoOp::Read as usize].bytes = 3 * 4096;
        r.io[IoOp::Read as usize].latency_ns = 3 * 5000;
        r.io[IoOp::Write as usize].hist[20] = 1;
        r.io[IoOp::Write as usize].latency_ns = 1_500_000;
        r.io[IoOp::Sync as usize].hist[25] = 1;
        r.exits.insert((1, 2), 7);
        let mut o = Observed::default();
        o.vms.insert(
            "web-1".into(),
            VmSignals {
                dirty_pages_per_sec: vec![("kvm_dirty_log".into(), 500.0)],
                working_set_pages: Some(480),
                sources_live: vec![],
                reading: Some(r),
            },
        );
        let text = encode(&o, &[running("web-1")]);
        for line in [
            r#"ferry_vm_disk_latency_seconds_bucket{vm="web-1",le="0.000004096"} 0"#,
            r#"ferry_vm_disk_latency_seconds_bucket{vm="web-1",le="0.000016384"} 3"#,
            r#"ferry_vm_disk_latency_seconds_bucket{vm="web-1",le="0.001048576"} 3"#,
            r#"ferry_vm_disk_latency_seconds_bucket{vm="web-1",le="0.004194304"} 4"#,
            r#"ferry_vm_disk_latency_seconds_bucket{vm="web-1",le="+Inf"} 4"#,
            r#"ferry_vm_disk_latency_seconds_sum{vm="web-1"} 0.001515"#,
            r#"ferry_vm_disk_bytes_total{op="read",vm="web-1"} 12288"#,
            r#"ferry_vm_exits_total{kind="userspace:io",vm="web-1"} 7"#,
            r#"ferry_vm_dirty_pages_per_second{source="kvm_dirty_log",vm="web-1"} 500"#,
            r#"ferry_vm_working_set_pages{vm="web-1"} 480"#,
            "ferry_probe_sources_attached 0",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        let text = encode(&o, &[]);
        assert!(!text.contains("web-1"), "{text}");
        assert!(text.contains("ferry_probe_load_errors_total 0"), "{text}");
    }
}
