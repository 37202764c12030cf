//! The agent's own metrics, in Prometheus' text format: its API's requests and their
//! latency, and the VMs it holds. (Migration and guest metrics come with telemetry.)

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use ferry_api::agent::{VmInfo, VmPresence};

use crate::sync::lock;

/// Request latency buckets, in seconds: the API answers from memory, so the
/// interesting range is a millisecond to a few tens.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Labels are bounded: `route` is the route's template (never the path asked for),
/// `code` one of the few statuses the API answers with.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
}

impl Metrics {
    pub fn request(&self, route: &'static str, method: &'static str, code: u16, secs: f64) {
        *lock(&self.requests)
            .entry((route, method, code))
            .or_default() += 1;
        let mut l = lock(&self.latency);
        let h = l.entry(route).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn render(&self, host: &str, vms: &[VmInfo]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP ferry_agent_info The agent: its host name and version.\n\
             # TYPE ferry_agent_info gauge\n\
             ferry_agent_info{{host=\"{}\",version=\"{}\"}} 1",
            escape(host),
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "# HELP ferry_agent_vms VMs of this host's inventory, by presence.\n\
             # TYPE ferry_agent_vms gauge"
        );
        for &p in VmPresence::ALL {
            let n = vms.iter().filter(|v| v.presence == p).count();
            let _ = writeln!(out, "ferry_agent_vms{{presence=\"{p}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP ferry_agent_http_requests_total API requests answered, by route, method and status.\n\
             # TYPE ferry_agent_http_requests_total counter"
        );
        for ((route, method, code), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "ferry_agent_http_requests_total{{route=\"{route}\",method=\"{method}\",code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferry_agent_http_request_duration_seconds Time to answer an API request, by route.\n\
             # TYPE ferry_agent_http_request_duration_seconds histogram"
        );
        for (route, h) in lock(&self.latency).iter() {
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "ferry_agent_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                out,
                "ferry_agent_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\n\
                 ferry_agent_http_request_duration_seconds_sum{{route=\"{route}\"}} {}\n\
                 ferry_agent_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        out
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_labels_bounded() {
        let m = Metrics::default();
        m.request("/v1/vms", "GET", 200, 0.0007);
        m.request("/v1/vms", "GET", 200, 0.02);
        m.request("/v1/vms/{name}", "GET", 404, 0.0001);
        let text = m.render("host \"a\"", &[]);
        assert!(
            text.contains(r#"ferry_agent_info{host="host \"a\"","#),
            "{text}"
        );
        assert!(text.contains(
            r#"ferry_agent_http_requests_total{route="/v1/vms",method="GET",code="200"} 2"#
        ));
        assert!(text.contains(
            r#"ferry_agent_http_request_duration_seconds_bucket{route="/v1/vms",le="0.0005"} 0"#
        ));
        assert!(text.contains(
            r#"ferry_agent_http_request_duration_seconds_bucket{route="/v1/vms",le="0.001"} 1"#
        ));
        assert!(text.contains(
            r#"ferry_agent_http_request_duration_seconds_bucket{route="/v1/vms",le="0.025"} 2"#
        ));
        assert!(text.contains(r#"ferry_agent_vms{presence="running"} 0"#));
    }
}
