//! `cargo xtask`: Ferry's workflows — setup, test, lab, bench.

mod bench;
mod bench_agent;
mod bench_line;
mod bench_policy;
mod bench_policy_report;
mod bench_probes;
mod bench_telemetry;
mod bench_tls;
mod faults;
mod fuzz;
mod lab;
mod lab_net;
mod lab_report;
mod setup;
mod soak;
mod util;

use std::process::ExitCode;

use anyhow::Result;

const USAGE: &str = "usage: cargo xtask <command> [--help]

commands:
  setup          install what Ferry needs that is missing (Debian packages, tracefs)
  test [ARGS]    setup, then fmt/clippy checks and every test (unit, integration, end-to-end);
                 ARGS go to cargo test
  lab [ARGS]     setup, then the whole system on this machine: three hosts, agents,
                 Prometheus, Alertmanager, a live VM migrated through the API and
                 evacuated by an alert; a summary and target/lab/report.html
  bench <area>   measure an area's figures (areas: vmm, precopy, postcopy, storage, probes,
                 agent, telemetry, tls)
  bench policy [--scenarios FILE] [--policies LIST] [--out DIR]
                 real migrations of a grid of guests and links under the adaptive
                 policy and every peer preset; writes DIR/bench.json and bench.md
                 (default grid xtask/scenarios/grid.toml, DIR target/bench/policy)
  faults [--cells LIST]
                 the fault-injection matrix (every fault at every point of a
                 migration, real processes); writes docs/RELIABILITY.md
  fuzz [--secs N] [TARGET...]
                 every cargo-fuzz target (nightly) for N seconds each
  soak [--minutes N] [--insecure]
                 one VM migrated back and forth for N minutes, every hop checked
  help [command] this text, or a command's usage

`cargo xtask <command> --help` (or -h) shows a command's usage.";

const SETUP_USAGE: &str = "usage: cargo xtask setup

Checks that /dev/kvm is there, installs the Debian packages Ferry's build, tests and
lab use that are missing (iproute2, clang-19, libbpf-dev, bpftool, prometheus,
prometheus-alertmanager, nodejs, npm, chromium; apt-get, as root)
and mounts tracefs at /sys/kernel/tracing if it is not mounted. Says what it does.
test, lab and bench run it first.";

const TEST_USAGE: &str = "usage: cargo xtask test [ARGS]

Setup, then cargo fmt --all --check, cargo clippy --workspace --all-targets --release
-- -D warnings, one release build of the tests and the ferry binary (cargo test
--workspace --release --no-run), and cargo test --workspace --release with FERRY_BIN
pointing at that binary (unless FERRY_BIN is set): unit, integration and end-to-end
tests (real KVM, eBPF, sockets and network namespaces: run as root).

ARGS go to cargo test as they are, e.g.
  cargo xtask test --test probes
  cargo xtask test -- --nocapture
--help and -h before a `--` show this text; after it they go to cargo test too.";

const BENCH_USAGE: &str = "usage: cargo xtask bench <area>
       cargo xtask bench policy [--scenarios FILE] [--policies LIST] [--out DIR]

Setup, then measures an area's figures and prints them beside their goals; the areas
but policy also save them as JSON in target/bench/<area>.json. Needs root and KVM.

areas:
  vmm        process start, dirty-set harvest, state save/restore, guest write rate, idle CPU
  precopy    loopback TCP against pre-copy migrations: idle and busy guests, codecs
  postcopy   post-copy downtime and fault latency, 1 and 2 vCPUs, over a shaped link
  storage    the disk copy of a storage migration against dd, and its convergence modes
  probes     what the eBPF signals cost the guest, and how fast they show a rate change
  agent      the host agent's API latency during migrations, and its idle cost with 10 VMs
  telemetry  migrations with full telemetry against none; /metrics for 1000 VMs; sampling's cost
  tls        the migration stream over TLS against plain TCP: throughput and downtime
  policy     the adaptive policy against the peer presets over a grid of scenarios

`cargo xtask bench <area> --help` shows what an area measures.";

const BENCH_VMM_USAGE: &str = "usage: cargo xtask bench vmm

A 1 GiB guest's process start to first heartbeat (5 runs), the harvest of a dirty set
that is the whole guest, state save and restore into a fresh process, pages the guest
writes per second unpaced, and the host CPU an idle guest uses.
Results: target/bench/vmm.json.";

const BENCH_TLS_USAGE: &str = "usage: cargo xtask bench tls

What TLS costs the migration stream on loopback: an idle 1 GiB guest of incompressible
pages migrated without a codec, and a guest writing 20k pages/s with --max-downtime-ms
50, each 5 times over TLS and 5 times over plain TCP (--insecure), in turns; median
throughput and downtime of each. Results: target/bench/tls.json.";

const BENCH_PRECOPY_USAGE: &str = "usage: cargo xtask bench precopy

Raw loopback TCP throughput, then pre-copy migrations over loopback: an idle 1 GiB
guest without a codec and with lz4, a guest writing 20k pages/s with --max-downtime-ms 50
(downtime over 10 migrations), and text pages under zstd:1 (bytes on the wire against
the pages' size). Results: target/bench/precopy.json.";

const BENCH_POSTCOPY_USAGE: &str = "usage: cargo xtask bench postcopy

Post-copy of a 1 GiB guest writing 20k and 100k pages/s, with 1 and 2 vCPUs, from the
start and after one pre-copy pass (5 migrations each): downtime and fault latency; then
post-copy over a 200 Mbit/s link between two network namespaces.
Results: target/bench/postcopy.json.";

const BENCH_STORAGE_USAGE: &str = "usage: cargo xtask bench storage

The bulk copy of a storage migration of a 512 MiB image full of data against dd of
the same image on the same file system (O_DIRECT, the copy's 512 KiB step as block
size), then background, active and auto mode with the guest writing at half and at
all of the copy speed: rounds, switchover, added write latency.
Results: target/bench/storage.json.";

const BENCH_PROBES_USAGE: &str = "usage: cargo xtask bench probes

What `ferry signals` costs the guest (vCPU time and pages written, with and without
the probes, whole-tick and sampled logging, at several dirty rates and unpaced), and
how long a step in the guest's dirty rate takes to show in the signals, idle and
during a migration. Results: target/bench/probes.json.";

const BENCH_AGENT_USAGE: &str = "usage: cargo xtask bench agent

Two host agents on loopback, 10 paced VMs on the first. The agent's CPU and memory
while it idles with them (20 s); then one VM migrated back and forth 4 times through
the API, first without load, then while GET /v1/vms is asked 200 times a second (a
new connection each): the API's latency (p50, p99, max) and the migrations' downtime
in both runs. Results: target/bench/agent.json.";

const BENCH_TELEMETRY_USAGE: &str = "usage: cargo xtask bench telemetry

What Ferry's telemetry costs. Migrations (capped at 400 Mbit/s) of a busy 256 MiB guest between two agents
with full telemetry (a real Prometheus scraping both every second, every span
exported over OTLP gRPC to a receiver, dirty rates sampled) and with none, 4 runs
there and back each, interleaved: total time and downtime, medians and spread.
/metrics for 1000 VMs: render time and the memory their series take. The guest's
cost of the default dirty-rate sampling (1 s of logging every 60 s): an unpaced
guest's write rate in 60 s windows with and without it, interleaved.
Results: target/bench/telemetry.json.";

const BENCH_POLICY_USAGE: &str =
    "usage: cargo xtask bench policy [--scenarios FILE] [--policies LIST] [--out DIR]

Real migrations of a grid of guests and links, each under the adaptive policy and
under every peer preset, with the scenario's operator limits; a row per (scenario,
policy) in DIR/bench.json, the table and plots in DIR/bench.md, each run's full
report under DIR/runs.

  --scenarios FILE   the grid (default xtask/scenarios/grid.toml)
  --policies LIST    comma-separated: adaptive and presets (default: all of them)
  --out DIR          where results go (default target/bench/policy)";

/// The usage of the command named by `words` (the command line without its flags),
/// or why there is none.
fn usage(words: &[&str]) -> Result<&'static str, String> {
    Ok(match words {
        [] | ["help"] => USAGE,
        ["setup", ..] => SETUP_USAGE,
        ["test", ..] => TEST_USAGE,
        ["lab", ..] => lab::USAGE,
        ["fuzz", ..] => fuzz::USAGE,
        ["faults", ..] => faults::USAGE,
        ["soak", ..] => soak::USAGE,
        ["bench"] => BENCH_USAGE,
        ["bench", area, ..] => match *area {
            "vmm" => BENCH_VMM_USAGE,
            "precopy" => BENCH_PRECOPY_USAGE,
            "postcopy" => BENCH_POSTCOPY_USAGE,
            "storage" => BENCH_STORAGE_USAGE,
            "probes" => BENCH_PROBES_USAGE,
            "agent" => BENCH_AGENT_USAGE,
            "telemetry" => BENCH_TELEMETRY_USAGE,
            "tls" => BENCH_TLS_USAGE,
            "policy" => BENCH_POLICY_USAGE,
            other => return Err(format!("unknown bench area {other:?}\n\n{BENCH_USAGE}")),
        },
        [other, ..] => return Err(format!("unknown command {other:?}\n\n{USAGE}")),
    })
}

/// What the command line asks for.
enum Request<'a> {
    Help(&'static str),
    Setup,
    Test(&'a [&'a str]),
    Lab(&'a [&'a str]),
    Bench(&'a str),
    BenchPolicy(&'a [&'a str]),
    Fuzz(&'a [&'a str]),
    Faults(&'a [&'a str]),
    Soak(&'a [&'a str]),
}

fn parse<'a>(args: &'a [&'a str]) -> Result<Request<'a>, String> {
    // --help or -h anywhere before a `--` (after it, arguments belong to cargo test).
    let flags_end = args.iter().position(|&a| a == "--").unwrap_or(args.len());
    if args[..flags_end]
        .iter()
        .any(|&a| a == "--help" || a == "-h")
    {
        let words: Vec<&str> = args[..flags_end]
            .iter()
            .copied()
            .filter(|a| !a.starts_with('-'))
            .collect();
        // `cargo xtask help bench -h` is as good as `cargo xtask help bench`.
        let words = words.strip_prefix(&["help"]).unwrap_or(&words);
        return usage(words).map(Request::Help);
    }
    Ok(match args {
        [] => Request::Help(USAGE),
        ["help", command @ ..] => Request::Help(usage(command)?),
        ["setup"] => Request::Setup,
        ["test", rest @ ..] => Request::Test(rest),
        ["lab", rest @ ..] => Request::Lab(rest),
        ["fuzz", rest @ ..] => Request::Fuzz(rest),
        ["faults", rest @ ..] => Request::Faults(rest),
        ["soak", rest @ ..] => Request::Soak(rest),
        ["bench", "policy", rest @ ..] => Request::BenchPolicy(rest),
        ["bench", area] => {
            usage(&["bench", area])?;
            Request::Bench(area)
        }
        ["bench"] => return Err(format!("bench needs an area\n\n{BENCH_USAGE}")),
        ["bench", area, extra, ..] => {
            let text = usage(&["bench", area])?;
            return Err(format!("unexpected argument {extra:?}\n\n{text}"));
        }
        [command @ "setup", extra, ..] => {
            let text = usage(&[command])?;
            return Err(format!("unexpected argument {extra:?}\n\n{text}"));
        }
        [other, ..] => return Err(format!("unknown command {other:?}\n\n{USAGE}")),
    })
}

fn run(request: Request) -> Result<()> {
    match request {
        Request::Help(text) => {
            println!("{text}");
            Ok(())
        }
        Request::Setup => setup::run(),
        Request::Test(rest) => {
            setup::run()?;
            util::test(rest)
        }
        Request::Lab(rest) => {
            let args: Vec<String> = rest.iter().map(|a| (*a).to_owned()).collect();
            // --stop only removes what a kept lab left: nothing to install for that.
            if !rest.contains(&"--stop") {
                setup::run()?;
            }
            lab::run(&args)
        }
        Request::Bench(area) => {
            setup::run()?;
            bench::run(area)
        }
        Request::BenchPolicy(rest) => {
            setup::run()?;
            bench_policy::run(rest)
        }
        Request::Fuzz(rest) => fuzz::run_fuzz(rest),
        Request::Faults(rest) => {
            setup::run()?;
            faults::run_faults(rest)
        }
        Request::Soak(rest) => {
            setup::run()?;
            soak::run(rest)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let request = match parse(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(request) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes on one line, without a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
