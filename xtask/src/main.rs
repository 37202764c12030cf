//! `cargo xtask`: Ferry's workflows — setup, test, lab, bench.

mod bench;
mod bench_policy;
mod bench_policy_report;
mod bench_probes;
mod lab;
mod setup;
mod util;

use anyhow::{Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup          install what Ferry needs that is missing (Debian packages, tracefs)
  test           setup, then fmt/clippy checks and every test (unit, integration, end-to-end)
  lab            setup, then run the lab: a live VM, its status, a snapshot, a restore
  bench <area>   measure an area's figures (areas: vmm, precopy, postcopy, storage, probes)
  bench policy [--scenarios FILE] [--policies LIST] [--out DIR]
                 real migrations of a grid of guests and links under the adaptive
                 policy and every peer preset; writes DIR/bench.json and bench.md
                 (default grid xtask/scenarios/grid.toml, DIR target/bench/policy)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["setup"] => setup::run(),
        ["test", rest @ ..] => {
            setup::run()?;
            util::test(rest)
        }
        ["lab"] => {
            setup::run()?;
            lab::run()
        }
        ["bench", "policy", rest @ ..] => {
            setup::run()?;
            bench_policy::run(rest)
        }
        ["bench", area] => {
            setup::run()?;
            bench::run(area)
        }
        ["help" | "--help" | "-h"] | [] => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}
