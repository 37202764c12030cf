//! The fault-injection matrix (`ferry_tests::faults`): a representative subset on
//! every run; every cell with `cargo xtask faults`, which writes docs/RELIABILITY.md.

use ferry_tests::faults::{Bench, Cell, Fault, Phase, Verdict};
use ferry_tests::{require_kvm, require_root};

fn bench(tag: &str) -> Option<Bench> {
    if !require_kvm() || !require_root("network namespaces and a tmpfs datastore") {
        return None;
    }
    match Bench::new(tag) {
        Ok(b) => Some(b),
        Err(e) => {
            ferry_tests::missing("two network namespaces and a tmpfs", &e);
            None
        }
    }
}

fn run(bench: &Bench, fault: Fault, phase: Phase) -> Cell {
    eprintln!("cell {} × {} …", fault.name(), phase.name());
    let cell = bench.run(fault, phase);
    eprintln!(
        "cell {} × {}: {} in {:.1} s — {}",
        fault.name(),
        phase.name(),
        cell.verdict.word(),
        cell.secs,
        cell.note
    );
    cell
}

/// One cell of each kind of outcome: the source runs on, and the complete copies of
/// a destination killed before Commit do not block the next migration; a corrupted
/// Commit leaves a handover in doubt that is settled to one copy; a post-copy whose
/// link goes down recovers; a datastore filled under the disks' copy stops the VM
/// with its write held until there is room, and nothing is lost.
#[test]
fn a_representative_subset_of_the_fault_matrix_holds() {
    let Some(bench) = bench("faults") else {
        return;
    };
    let _host = ferry_tests::exclusive();
    let cells = [
        (Fault::KillDestinationVmm, Phase::AfterComplete),
        (Fault::CorruptPlain, Phase::AfterReady),
        (Fault::CutLink, Phase::Postcopy),
        (Fault::FillDatastore, Phase::DiskMirror),
    ];
    let failed: Vec<Cell> = cells
        .into_iter()
        .map(|(f, p)| run(&bench, f, p))
        .filter(|c| c.verdict == Verdict::Fail)
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

/// Every cell (or those `FERRY_FAULT_CELLS` names, `fault×phase` comma-separated),
/// one JSON line each into `FERRY_FAULTS_OUT`: `cargo xtask faults`.
#[test]
#[ignore = "the whole matrix takes minutes: cargo xtask faults"]
fn every_cell_of_the_fault_matrix() {
    let Some(bench) = bench("matrix") else {
        return;
    };
    let _host = ferry_tests::exclusive();
    let wanted: Option<Vec<(Fault, Phase)>> = std::env::var("FERRY_FAULT_CELLS").ok().map(|s| {
        s.split(',')
            .filter(|c| !c.trim().is_empty())
            .map(|c| {
                let (f, p) = c
                    .trim()
                    .split_once('×')
                    .or_else(|| c.trim().split_once('x'))
                    .unwrap_or_else(|| panic!("{c}: not fault×phase"));
                (
                    Fault::by_name(f).unwrap_or_else(|| panic!("no fault {f}")),
                    Phase::by_name(p).unwrap_or_else(|| panic!("no phase {p}")),
                )
            })
            .collect()
    });
    let out = std::env::var_os("FERRY_FAULTS_OUT");
    let mut file = out.map(|p| std::fs::File::create(p).expect("FERRY_FAULTS_OUT"));
    let mut failed = Vec::new();
    for phase in Phase::ALL {
        for fault in Fault::ALL {
            if wanted
                .as_ref()
                .is_some_and(|w| !w.contains(&(fault, phase)))
            {
                continue;
            }
            let cell = run(&bench, fault, phase);
            if let Some(f) = file.as_mut() {
                use std::io::Write;
                writeln!(f, "{}", cell.to_json()).expect("write a cell");
                f.flush().expect("flush");
            }
            if cell.verdict == Verdict::Fail {
                failed.push(format!("{} × {}", fault.name(), phase.name()));
            }
        }
    }
    assert!(failed.is_empty(), "cells failed: {failed:?}");
}
