//! Where an evacuated VM goes: among the configured peers, the healthy one with the
//! most free memory that is not itself alerting; the policy's predicted total time
//! breaks ties. No scheduler of its own beyond this: what a fleet scheduler would
//! weigh (affinity, spread, cost) is the operator's, through the peers it configures.
//! Pure: the evacuation gathers what each peer said and what the policy predicts.

use ferry_api::agent::Health;

/// Peers whose free memory is within this share of the best are equally good: a
/// few hundred MiB either way says nothing about which host suits the VM, the
/// predicted migration time does.
pub const TIE_SHARE: f64 = 0.10;

/// One peer, as seen just now.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    /// Its `/healthz`, or why it did not answer.
    pub health: Result<Health, String>,
    /// The alert naming it that fires now, if any (from the alerts this agent was sent).
    pub alerting: Option<String>,
    /// The policy's predicted total for this VM to it (None: no link measured to it
    /// and no bandwidth limit to plan with).
    pub predicted_total_ms: Option<f64>,
}

/// The choice and why, in words an operator reads in the record and the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub peer: String,
    pub reason: String,
}

fn mib(m: u64) -> String {
    if m >= 10 * 1024 {
        format!("{:.1} GiB", m as f64 / 1024.0)
    } else {
        format!("{m} MiB")
    }
}

fn secs(ms: Option<f64>) -> String {
    ms.map_or("no prediction".into(), |t| {
        format!("predicted {:.1} s", t / 1e3)
    })
}

/// Chooses a peer for a VM of `memory_mib`; Err says why none can take it.
pub fn choose(memory_mib: u64, candidates: &[Candidate]) -> Result<Placement, String> {
    let mut excluded = Vec::new();
    let mut eligible = Vec::new();
    for c in candidates {
        let why_not = match (&c.health, &c.alerting) {
            (Err(e), _) => Some(format!("unreachable ({e})")),
            (_, Some(alert)) => Some(format!("alerting ({alert})")),
            (Ok(h), None) if h.status != "ok" => Some(format!("status {}", h.status)),
            (Ok(h), None) if h.evacuating => Some("being evacuated".into()),
            (Ok(h), None) => match &h.capacity {
                None => Some("says nothing of its capacity (an older agent)".into()),
                Some(cap) if cap.inbound >= cap.max_inbound => Some(format!(
                    "receiving {} migrations already (its max_inbound)",
                    cap.inbound
                )),
                Some(cap) if cap.free_memory_mib() < memory_mib => Some(format!(
                    "{} free, the VM needs {}",
                    mib(cap.free_memory_mib()),
                    mib(memory_mib)
                )),
                Some(cap) => {
                    eligible.push((c, cap.free_memory_mib()));
                    None
                }
            },
        };
        if let Some(w) = why_not {
            excluded.push(format!("{}: {w}", c.name));
        }
    }
    let Some(best_free) = eligible.iter().map(|(_, f)| *f).max() else {
        return Err(format!(
            "no peer can take it: {}",
            if excluded.is_empty() {
                "this agent has no peers".into()
            } else {
                excluded.join("; ")
            }
        ));
    };
    let floor = best_free as f64 * (1.0 - TIE_SHARE);
    let (mut tied, rest): (Vec<_>, Vec<_>) = eligible.iter().partition(|(_, f)| *f as f64 >= floor);
    // The shortest predicted migration first; one without a prediction after those
    // with one; then the most free memory, then the name, so the choice is stable.
    tied.sort_by(|(a, fa), (b, fb)| {
        let t = |c: &Candidate| c.predicted_total_ms.unwrap_or(f64::INFINITY);
        t(a).total_cmp(&t(b))
            .then(fb.cmp(fa))
            .then(a.name.cmp(&b.name))
    });
    let (chosen, free) = tied[0];
    let mut reason = format!(
        "{}: {} free, the most of the healthy peers not alerting",
        chosen.name,
        mib(free)
    );
    if tied.len() > 1 {
        reason = format!(
            "{}: {} free and {}, the shortest of the peers within {:.0}% of the most free \
             memory",
            chosen.name,
            mib(free),
            secs(chosen.predicted_total_ms),
            TIE_SHARE * 100.0
        );
    } else {
        reason.push_str(&format!(" ({})", secs(chosen.predicted_total_ms)));
    }
    let others: Vec<String> = tied[1..]
        .iter()
        .chain(rest.iter())
        .map(|(c, f)| {
            format!(
                "{}: {} free, {}",
                c.name,
                mib(*f),
                secs(c.predicted_total_ms)
            )
        })
        .collect();
    if !others.is_empty() {
        reason.push_str(&format!("; also {}", others.join("; ")));
    }
    if !excluded.is_empty() {
        reason.push_str(&format!("; not {}", excluded.join("; ")));
    }
    Ok(Placement {
        peer: chosen.name.clone(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use ferry_api::agent::Capacity;

    use super::*;

    fn peer(name: &str, free: u64, predicted: Option<f64>) -> Candidate {
        Candidate {
            name: name.into(),
            health: Ok(Health {
                status: "ok".into(),
                name: name.into(),
                version: "0".into(),
                vms: 1,
                evacuating: false,
                links: Vec::new(),
                capacity: Some(Capacity {
                    memory_mib: 8192,
                    vms_memory_mib: 8192 - free,
                    max_inbound: 2,
                    inbound: 0,
                }),
            }),
            alerting: None,
            predicted_total_ms: predicted,
        }
    }

    #[test]
    fn the_most_free_memory_wins() {
        let p = choose(
            256,
            &[peer("a", 4000, Some(9000.0)), peer("c", 1000, Some(1000.0))],
        )
        .unwrap();
        assert_eq!(p.peer, "a");
        assert!(
            p.reason.contains("a: 4000 MiB free, the most"),
            "{}",
            p.reason
        );
        assert!(p.reason.contains("also c: 1000 MiB free"), "{}", p.reason);
    }

    #[test]
    fn a_tie_goes_to_the_shortest_predicted_migration() {
        let p = choose(
            256,
            &[peer("a", 4000, Some(9000.0)), peer("c", 3900, Some(2000.0))],
        )
        .unwrap();
        assert_eq!(p.peer, "c");
        assert!(
            p.reason.contains("predicted 2.0 s, the shortest"),
            "{}",
            p.reason
        );
        let unknown = choose(256, &[peer("a", 4000, None), peer("c", 3900, Some(2000.0))]).unwrap();
        assert_eq!(unknown.peer, "c", "a prediction beats none");
    }

    #[test]
    fn unhealthy_alerting_full_or_evacuating_peers_are_not_chosen() {
        let mut down = peer("d", 8000, None);
        down.health = Err("connection refused".into());
        let mut alerting = peer("e", 8000, None);
        alerting.alerting = Some("FerryDatastoreFilling".into());
        let mut evac = peer("f", 8000, None);
        if let Ok(h) = &mut evac.health {
            h.evacuating = true;
        }
        let mut busy = peer("g", 8000, None);
        if let Ok(Health {
            capacity: Some(c), ..
        }) = &mut busy.health
        {
            c.inbound = 2;
        }
        let small = peer("h", 100, None);
        let all = [down, alerting, evac, busy, small, peer("a", 1000, None)];
        let p = choose(256, &all).unwrap();
        assert_eq!(p.peer, "a");
        for why in [
            "d: unreachable",
            "e: alerting (FerryDatastoreFilling)",
            "f: being evacuated",
            "g: receiving 2",
            "h: 100 MiB free, the VM needs 256 MiB",
        ] {
            assert!(p.reason.contains(why), "{why} in {}", p.reason);
        }
        let none = choose(256, &all[..5]).unwrap_err();
        assert!(none.starts_with("no peer can take it"), "{none}");
        assert!(choose(256, &[]).unwrap_err().contains("no peers"));
    }
}
