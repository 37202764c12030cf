//! `cargo xtask faults`: the fault-injection matrix on real processes (the ignored
//! test `every_cell_of_the_fault_matrix` of tests/tests/faults.rs), written up as
//! docs/RELIABILITY.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use ferry_tests::faults::{Fault, Phase};
use serde_json::Value;

use crate::util::{cargo, root, run, step, target_dir};

pub const USAGE: &str = "usage: cargo xtask faults [--cells LIST] [--out FILE]

Runs the fault-injection matrix: each fault (VMMs and agents killed, the link cut,
the destination's datastore filled, the destination stopped, a frame corrupted over
TLS and over plain TCP) at each point of a migration (setup, first pass, a later
round, after Complete, after Ready, after Commit, post-copy, the disks' copy, a
storage migration's config rewrite), reached by failpoints compiled into the test
build. Writes FILE (default docs/RELIABILITY.md): one cell per fault × phase, pass,
FAIL, inherent or n/a, with what was seen, and the totals. Fails if a cell fails.

  --cells LIST   only these cells, comma-separated fault×phase (e.g.
                 cut-link×postcopy); the document then holds only them

Needs root, KVM, network namespaces and tmpfs; takes about 15 minutes.";

pub fn run_faults(args: &[&str]) -> Result<()> {
    let mut cells = None;
    let mut out = root().join("docs/RELIABILITY.md");
    let mut it = args.iter();
    while let Some(&a) = it.next() {
        match a {
            "--cells" => cells = Some(it.next().context("--cells needs a list")?.to_string()),
            "--out" => out = root().join(it.next().context("--out needs a file")?),
            other => bail!("unexpected argument {other:?}\n\n{USAGE}"),
        }
    }
    // The workspace's test build: it alone turns failpoints on in ferry.
    step("building the tests and ferry with failpoints (release)");
    let mut c = cargo();
    c.args(["test", "--workspace", "--release", "--no-run"]);
    run(c, "cargo test --no-run")?;
    let results = target_dir().join("faults.jsonl");
    let _ = std::fs::remove_file(&results);
    step("running the matrix (each cell's verdict is printed as it ends)");
    let mut c = cargo();
    c.args([
        "test",
        "--workspace",
        "--release",
        "--test",
        "faults",
        "--",
        "--ignored",
        "--nocapture",
        "--exact",
        "every_cell_of_the_fault_matrix",
    ])
    .env("FERRY_BIN", target_dir().join("release/ferry"))
    .env("FERRY_FAULTS_OUT", &results);
    if let Some(cells) = &cells {
        c.env("FERRY_FAULT_CELLS", cells);
    }
    let ran = run(c, "the fault matrix");
    let text = std::fs::read_to_string(&results)
        .with_context(|| format!("reading {}", results.display()))?;
    let cells: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a cell's line is not JSON")?;
    let doc = document(&cells);
    std::fs::write(&out, &doc).with_context(|| format!("writing {}", out.display()))?;
    step(&format!(
        "{} written: {}",
        out.display(),
        doc.lines().last().unwrap_or("")
    ));
    ran
}

/// The matrix as Markdown: a table of verdicts, then what each cell saw.
fn document(cells: &[Value]) -> String {
    let key = |c: &Value| {
        (
            c["phase"].as_str().unwrap_or("").to_owned(),
            c["fault"].as_str().unwrap_or("").to_owned(),
        )
    };
    let by: BTreeMap<(String, String), &Value> = cells.iter().map(|c| (key(c), c)).collect();
    let mut d = String::new();
    d.push_str(
        "# Reliability: the fault-injection matrix\n\n\
         Written by `cargo xtask faults` (tests/src/faults.rs); do not edit by hand.\n\n\
         Each cell is one migration of the lab guest (64 MiB writing 3,000 pages/s; a 16 MiB \
         disk it writes 300 times a second, sent along with `--copy-storage`; post-copy cells \
         move memory only) between two VMMs in two network namespaces joined by a veth \
         (agents' cells: two agents and their API). A failpoint compiled into the test build \
         holds the VMM at the cell's point; the fault is injected while it waits there. \
         Afterwards exactly one copy of the VM must run and verify clean (memory digests \
         equal where the migration completed, zero guest integrity errors, every disk block \
         re-checked by the guest), or one copy must be paused holding every page, waiting \
         to be settled; where the migration failed the source runs on and the destination \
         kept nothing (a killed destination's leftovers must not stop the next migration, \
         which is run and must complete). `inherent`: the fault destroys the only copy of \
         something, as it would under any VMM; what is checked then is that no copy runs on \
         missing or stale memory and that the survivor says why.\n\n",
    );
    d.push_str("## Phases\n\n| phase | where the fault lands |\n|---|---|\n");
    for p in Phase::ALL {
        let _ = writeln!(d, "| `{}` | {} |", p.name(), p.point().1);
    }
    d.push_str("\n## Faults\n\n| fault | what it does |\n|---|---|\n");
    for f in Fault::ALL {
        let _ = writeln!(d, "| `{}` | {} |", f.name(), f.describe());
    }
    d.push_str("\n## Matrix\n\n| phase |");
    for f in Fault::ALL {
        let _ = write!(d, " {} |", f.name());
    }
    d.push_str("\n|---|");
    for _ in Fault::ALL {
        d.push_str("---|");
    }
    d.push('\n');
    for p in Phase::ALL.map(Phase::name) {
        let _ = write!(d, "| `{p}` |");
        for f in Fault::ALL.map(Fault::name) {
            let cell = by
                .get(&(p.to_owned(), f.to_owned()))
                .map_or("–", |c| c["result"].as_str().unwrap_or("?"));
            let _ = write!(d, " {cell} |");
        }
        d.push('\n');
    }
    d.push_str("\n## What each cell saw\n\n");
    for p in Phase::ALL.map(Phase::name) {
        for f in Fault::ALL.map(Fault::name) {
            if let Some(c) = by.get(&(p.to_owned(), f.to_owned())) {
                let _ = writeln!(
                    d,
                    "* **{f} × {p}** — {} ({:.1} s): {}",
                    c["result"].as_str().unwrap_or("?"),
                    c["secs"].as_f64().unwrap_or(0.0),
                    one_line(c["note"].as_str().unwrap_or(""))
                );
            }
        }
    }
    let count = |r: &str| cells.iter().filter(|c| c["result"] == r).count();
    let _ = write!(
        d,
        "\ncells: {}, pass: {}, FAIL: {}, inherent: {}, n/a: {}\n",
        cells.len(),
        count("pass"),
        count("FAIL"),
        count("inherent"),
        count("n/a")
    );
    d
}

/// A note on one line, cut short: a failure's full log is in the test's output.
fn one_line(note: &str) -> String {
    let flat: String = note.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 600 {
        format!("{}…", flat.chars().take(600).collect::<String>())
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_ends_with_the_totals_and_places_each_cell() {
        let cells: Vec<Value> = [
            r#"{"fault":"cut-link","phase":"postcopy","result":"pass","note":"ok","secs":3.0}"#,
            r#"{"fault":"kill-source-vmm","phase":"postcopy","result":"inherent","note":"x","secs":1.0}"#,
            r#"{"fault":"cut-link","phase":"config-rewrite","result":"n/a","note":"y","secs":0.0}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        let d = document(&cells);
        assert!(
            d.ends_with("cells: 3, pass: 1, FAIL: 0, inherent: 1, n/a: 1\n"),
            "{d}"
        );
        assert!(
            d.contains("| `postcopy` | inherent | – | – | – | pass |"),
            "{d}"
        );
    }
}
