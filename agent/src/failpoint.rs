//! Failpoints: named points of a migration where a test build can stop the process,
//! drop its connection or crash it, so fault tests reach an exact point rather than
//! race for it with a timer.
//!
//! Compiled in only with the `failpoints` feature (the workspace's test build turns
//! it on; `cargo build -p ferry` and packages do not): without it every point is an
//! empty inline function and the environment is never read.
//!
//! `FERRY_FAILPOINTS="point=action[,point=action…]"` arms points in one process:
//! * `hold`: creates `$FERRY_FAILPOINT_DIR/<point>` (holding this pid) and waits,
//!   doing nothing else, until the file is gone: the test injects its fault
//!   meanwhile (kills a process, cuts a link, fills a disk), then removes the file.
//!   A hold nobody releases ends after [`HOLD_AT_MOST`], so a broken test cannot
//!   leave a VM paused forever.
//! * `drop`: the caller shuts its connection as a network failure would.
//! * `crash`: the process ends on the spot (`_exit`), as in a power cut.
//!
//! Each point fires once per process (the first time it is reached).

/// What an armed point does, for the callers that act themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Hold,
    Drop,
    Crash,
}

/// The longest a hold waits for its release.
#[cfg(feature = "failpoints")]
pub const HOLD_AT_MOST: std::time::Duration = std::time::Duration::from_secs(120);

/// Reached `point`: holds or crashes here if that is what it was armed with;
/// returns `Some(Action::Drop)` for the caller to drop its connection.
#[cfg(feature = "failpoints")]
pub fn reach(point: &str) -> Option<Action> {
    use std::collections::BTreeSet;
    use std::sync::{Mutex, OnceLock};
    static FIRED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    // Read once: points sit on per-batch paths, and the environment does not change.
    static SPEC: OnceLock<Option<String>> = OnceLock::new();

    let spec = SPEC.get_or_init(|| std::env::var("FERRY_FAILPOINTS").ok());
    let action = armed(spec.as_deref()?, point)?;
    if !crate::sync::lock(&FIRED).insert(point.to_owned()) {
        return None;
    }
    match action {
        Action::Hold => {
            hold(point);
            None
        }
        Action::Crash => {
            tracing::error!("failpoint {point}: crashing");
            // SAFETY: ends the process at once, skipping every destructor, as a crash
            // does (without leaving a core file behind).
            unsafe { libc::_exit(137) }
        }
        Action::Drop => {
            tracing::warn!("failpoint {point}: dropping the connection");
            Some(Action::Drop)
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn reach(_point: &str) -> Option<Action> {
    None
}

/// The action `spec` arms `point` with.
#[cfg(any(feature = "failpoints", test))]
fn armed(spec: &str, point: &str) -> Option<Action> {
    spec.split(',').find_map(|item| {
        let (p, action) = item.trim().split_once('=')?;
        (p == point).then_some(())?;
        match action {
            "hold" => Some(Action::Hold),
            "drop" => Some(Action::Drop),
            "crash" => Some(Action::Crash),
            _ => None,
        }
    })
}

#[cfg(feature = "failpoints")]
fn hold(point: &str) {
    let dir = std::env::var_os("FERRY_FAILPOINT_DIR").unwrap_or_else(|| "/tmp".into());
    let file = std::path::Path::new(&dir).join(point);
    if let Err(e) = std::fs::write(&file, std::process::id().to_string()) {
        tracing::error!("failpoint {point}: cannot create {}: {e}", file.display());
        return;
    }
    tracing::warn!(
        "failpoint {point}: holding until {} is removed",
        file.display()
    );
    let t0 = std::time::Instant::now();
    while file.exists() && t0.elapsed() < HOLD_AT_MOST {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    tracing::warn!("failpoint {point}: released");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_arms_only_its_points_with_known_actions() {
        let spec = "source.setup=hold, destination.after-commit=drop,x=crash,y=explode";
        assert_eq!(armed(spec, "source.setup"), Some(Action::Hold));
        assert_eq!(armed(spec, "destination.after-commit"), Some(Action::Drop));
        assert_eq!(armed(spec, "x"), Some(Action::Crash));
        assert_eq!(armed(spec, "y"), None);
        assert_eq!(armed(spec, "source"), None);
        assert_eq!(armed("", "source.setup"), None);
    }
}
