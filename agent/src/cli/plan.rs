//! `ferry plan`: what the policy would choose for this VM now, predicted, with reasons.
//! Nothing moves: the VMM logs dirty pages for a second and samples its pages' codecs.

use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;

use ferry_api::{CodecSamples, DirtySample, Request};

use crate::client::call;
use crate::driver::Backend;
use crate::driver::ferry_vmm::FerryVmm;
use crate::driver::observe::codec_perfs;
use crate::policy::{Decision, Limits, Observation, Policy, Settings};

pub fn run(
    control: &Path,
    mut policy: Box<dyn Policy>,
    limits: &Limits,
    link_mbit: Option<f64>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let link = link_mbit.or(limits.bandwidth_mbit).ok_or_else(|| {
        anyhow::anyhow!(
            "the plan needs the link's speed: give --link-mbit (what the path to the \
             destination carries) or --bandwidth-mbit (the cap the migration will use)"
        )
    })?;
    let mut vmm = FerryVmm::new(control);
    let vm = vmm.vm()?;
    let mechanics = vmm.mechanics()?;
    // A second of the VMM's own dirty log: distinct pages against the guest's writes
    // tell how fast it dirties and within how much.
    let sample: DirtySample = call(
        control,
        &Request::DirtySample {
            duration_ms: Some(1000),
        },
    )?;
    let secs = sample.elapsed_ms / 1e3;
    let distinct = sample.dirty_pages as f64 / secs.max(1e-3);
    let written = sample.guest_pages_written as f64 / secs.max(1e-3);
    let codecs: CodecSamples = call(control, &Request::CodecSample {})?;
    let obs = Observation {
        dirty_pages_per_sec: written.max(distinct),
        working_set_pages: Some(distinct as u64),
        link_bytes_per_sec: Some(link * 1e6 / 8.0),
        zero_fraction: codecs.zero_fraction,
        codecs: codec_perfs(&codecs.codec_samples),
        ..Observation::before_start(vm.memory_pages, 0.0, mechanics)
    };
    let d = policy.decide(&obs, limits);
    let finite = |v: f64| v.is_finite().then_some(v);
    let plan = Plan {
        policy: policy.name(),
        limits,
        observation: &obs,
        settings: &d.settings,
        postcopy: d.postcopy,
        predicted_total_ms: finite(d.prediction.total_ms),
        predicted_downtime_ms: finite(d.prediction.downtime_ms),
        converges: d.prediction.converges,
        reasons: &d.reasons,
    };
    if as_json {
        println!("{}", serde_json::to_string(&plan)?);
    } else {
        print_plan(&plan);
    }
    Ok(ExitCode::SUCCESS)
}

/// What `ferry plan` prints, and its `--json` form.
#[derive(Serialize)]
struct Plan<'a> {
    policy: &'a str,
    limits: &'a Limits,
    observation: &'a Observation,
    settings: &'a Settings,
    /// Post-copy from the start (or once the first pass is done).
    postcopy: bool,
    /// None: no prediction (the policy does not converge within the limits).
    predicted_total_ms: Option<f64>,
    predicted_downtime_ms: Option<f64>,
    converges: bool,
    reasons: &'a [Decision],
}

fn print_plan(p: &Plan) {
    let o = p.observation;
    println!(
        "guest: {} MiB, dirtying {:.0} pages/s ({:.0} distinct in a second), {:.0}% zero; link {:.0} Mbit/s",
        o.memory_pages / 256,
        o.dirty_pages_per_sec,
        o.working_set_pages.unwrap_or(0),
        o.zero_fraction * 100.0,
        o.link_bytes_per_sec.unwrap_or(0.0) * 8.0 / 1e6,
    );
    let s = p.settings;
    println!(
        "plan ({}): codec {}, throttle {}%, post-copy {}",
        p.policy, s.codec, s.throttle_pct, p.postcopy,
    );
    match (p.predicted_total_ms, p.predicted_downtime_ms) {
        (Some(t), Some(d)) => println!("predicted: total {:.1} s, downtime {d:.0} ms", t / 1e3),
        _ => println!("predicted: does not converge within the limits"),
    }
    for r in p.reasons {
        println!("  {:<13} {:<8} {}", r.setting, r.value, r.reason);
    }
}
