//! `cargo xtask fuzz`: every cargo-fuzz target of `fuzz/` for a while each, from its
//! committed seeds, and what it found.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::util::{root, run, step};

pub const USAGE: &str = "usage: cargo xtask fuzz [--secs N] [TARGET...]

Runs each cargo-fuzz target of fuzz/fuzz_targets (all of them unless named) for N
seconds (default 60), starting from its seeds in fuzz/seeds/TARGET, with libFuzzer's
limits: 10 s per input, 2048 MiB of memory. Prints executions, executions per second
and peak memory per target, and fails on any crash, hang or out-of-memory, naming the
input that caused it (target/fuzz/artifacts/TARGET/). Results: target/fuzz/summary.json.

cargo-fuzz needs a nightly toolchain and installs with cargo; the command says so if
either is missing. The same decoders have stable property tests in cargo xtask test.";

/// What one target did.
struct Outcome {
    target: String,
    execs: u64,
    execs_per_sec: u64,
    peak_rss_mb: u64,
    corpus: usize,
    failure: Option<String>,
}

pub fn run_fuzz(args: &[&str]) -> Result<()> {
    let mut secs = 60u64;
    let mut wanted = Vec::new();
    let mut it = args.iter();
    while let Some(&a) = it.next() {
        match a {
            "--secs" => {
                let v = it.next().context("--secs needs a number of seconds")?;
                secs = v.parse().ok().filter(|&s| s > 0).with_context(|| {
                    format!("--secs {v:?}: a whole number of seconds, at least 1")
                })?;
            }
            flag if flag.starts_with('-') => bail!("unknown flag {flag:?}\n\n{USAGE}"),
            target => wanted.push(target.to_owned()),
        }
    }
    let dir = root().join("fuzz");
    let all = targets(&dir)?;
    for t in &wanted {
        if !all.contains(t) {
            bail!("no fuzz target {t:?} (targets: {})", all.join(", "));
        }
    }
    let targets = if wanted.is_empty() { all } else { wanted };
    toolchain()?;
    let mut outcomes = Vec::new();
    for t in &targets {
        step(&format!("fuzzing {t} for {secs} s"));
        let o = fuzz_one(&dir, t, secs)?;
        match &o.failure {
            None => println!(
                "  {} executions, {}/s, peak {} MiB, corpus {} inputs: nothing found",
                o.execs, o.execs_per_sec, o.peak_rss_mb, o.corpus
            ),
            Some(f) => println!("  FOUND: {f}"),
        }
        outcomes.push(o);
    }
    let summary: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            json!({"target": o.target, "secs": secs, "execs": o.execs,
                   "execs_per_sec": o.execs_per_sec, "peak_rss_mb": o.peak_rss_mb,
                   "corpus": o.corpus, "failure": o.failure})
        })
        .collect();
    let out = root().join("target/fuzz/summary.json");
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(&out, serde_json::to_string_pretty(&summary)?)?;
    step(&format!("results saved to {}", out.display()));
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    if !failed.is_empty() {
        bail!(
            "{} target(s) found a failure: {}",
            failed.len(),
            failed
                .iter()
                .map(|o| o.target.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The targets: one per file in `fuzz/fuzz_targets`.
fn targets(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("fuzz_targets"))
        .with_context(|| format!("reading {}", dir.join("fuzz_targets").display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();
    Ok(names)
}

/// A nightly toolchain, and cargo-fuzz installed for it (installed if missing).
fn toolchain() -> Result<()> {
    let nightly = Command::new("cargo")
        .args(["+nightly", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        bail!(
            "cargo-fuzz needs a nightly Rust toolchain (for its sanitizer flags), and there \
             is none: `rustup toolchain install nightly` adds one. The decoders' property \
             tests run on stable in cargo xtask test regardless."
        );
    }
    let fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !fuzz {
        step("installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        let mut c = Command::new("cargo");
        c.args(["install", "cargo-fuzz", "--locked"]);
        run(c, "cargo install cargo-fuzz")?;
    }
    Ok(())
}

fn fuzz_one(dir: &Path, target: &str, secs: u64) -> Result<Outcome> {
    let work = root().join("target/fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    for d in [&corpus, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let seeds: PathBuf = dir.join("seeds").join(target);
    let log = work.join(format!("{target}.log"));
    let logf =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    // New inputs go to the working corpus under target/; the committed seeds are only
    // read.
    let status = Command::new("cargo")
        .current_dir(dir)
        .args(["+nightly", "fuzz", "run", "--release", target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-malloc_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .status()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let stat = |key: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("stat::{key}:")))
            .filter_map(|v| v.trim().parse().ok())
            .next_back()
            .unwrap_or(0)
    };
    let failure = (!status.success()).then(|| {
        let why = text
            .lines()
            .find(|l| {
                l.contains("ERROR: libFuzzer")
                    || l.contains("ERROR: AddressSanitizer")
                    || l.contains("panicked at")
            })
            .unwrap_or("cargo fuzz run failed")
            .trim()
            .to_owned();
        let input = text
            .lines()
            .find_map(|l| l.split("Test unit written to ").nth(1))
            .map(|p| format!("; input {}", p.trim()))
            .unwrap_or_default();
        format!("{why}{input} (log {})", log.display())
    });
    Ok(Outcome {
        target: target.to_owned(),
        execs: stat("number_of_executed_units"),
        execs_per_sec: stat("average_exec_per_sec"),
        peak_rss_mb: stat("peak_rss_mb"),
        corpus: std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0),
        failure,
    })
}
