//! `ferry plan`: what the policy would choose for this VM now, predicted, with reasons.
//! Nothing moves: the VMM logs dirty pages for a second and samples its pages' codecs.

use std::path::Path;
use std::process::ExitCode;

use serde_json::{Value, json};

use ferry_api::{CodecSamples, DirtySample, Request};

use crate::client::call;
use crate::driver::Backend;
use crate::driver::ferry_vmm::FerryVmm;
use crate::driver::observe::codec_perfs;
use crate::policy::{Limits, Observation, Policy};

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
    let out = json!({
        "policy": policy.name(),
        "limits": limits,
        "observation": obs,
        "settings": d.settings,
        "predicted_total_ms": d.prediction.total_ms.is_finite().then_some(d.prediction.total_ms),
        "predicted_downtime_ms": d.prediction.downtime_ms.is_finite().then_some(d.prediction.downtime_ms),
        "converges": d.prediction.converges,
        "reasons": d.reasons,
    });
    if as_json {
        println!("{out}");
    } else {
        print_plan(&out);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plan(p: &Value) {
    let o = &p["observation"];
    println!(
        "guest: {} MiB, dirtying {:.0} pages/s ({:.0} distinct in a second), {:.0}% zero; link {:.0} Mbit/s",
        o["memory_pages"].as_f64().unwrap_or(0.0) / 256.0,
        o["dirty_pages_per_sec"].as_f64().unwrap_or(0.0),
        o["working_set_pages"].as_f64().unwrap_or(0.0),
        o["zero_fraction"].as_f64().unwrap_or(0.0) * 100.0,
        o["link_bytes_per_sec"].as_f64().unwrap_or(0.0) * 8.0 / 1e6,
    );
    let s = &p["settings"];
    println!(
        "plan ({}): codec {}, throttle {}%, post-copy {}",
        p["policy"].as_str().unwrap_or("-"),
        s["codec"].as_str().unwrap_or("-"),
        s["throttle_pct"],
        s["postcopy"],
    );
    match (
        p["predicted_total_ms"].as_f64(),
        p["predicted_downtime_ms"].as_f64(),
    ) {
        (Some(t), Some(d)) => println!("predicted: total {:.1} s, downtime {d:.0} ms", t / 1e3),
        _ => println!("predicted: does not converge within the limits"),
    }
    for r in p["reasons"].as_array().into_iter().flatten() {
        println!(
            "  {:<13} {:<8} {}",
            r["setting"].as_str().unwrap_or(""),
            r["value"].as_str().unwrap_or(""),
            r["why"].as_str().unwrap_or("")
        );
    }
}
