//! A handover in doubt, settled with the destination afterwards.

use super::*;

/// Why a handover in doubt stays in doubt.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no migration to resolve")]
    NoMigration,
    #[error("the last migration never completed its handshake: nothing to resolve")]
    NoSession,
    #[error("{0}")]
    Address(MigrateError),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("the destination answered {0:?}")]
    Unexpected(protocol::Kind),
    /// Cannot happen by construction (the destination runs only on Commit); never
    /// papered over.
    #[error("inconsistent handover: committed here = {committed}, running there = {running}")]
    Inconsistent { committed: bool, running: bool },
}

/// `ferry migrate --resolve`: settles a handover in doubt by asking the destination
/// what it did, telling it whether this side committed. Updates the report.
pub fn resolve(vm: &Migratable) -> Result<ferry_api::Resolution, ResolveError> {
    let to = lock(&vm.progress)
        .as_ref()
        .map(|p| p.to.clone())
        .ok_or(ResolveError::NoMigration)?;
    // Without the destination's secret there is nothing it would answer to.
    let session = (*lock(&vm.session)).ok_or(ResolveError::NoSession)?;
    let committed = vm.movable().handed_over();
    let transport = lock(&vm.transport).clone().ok_or(ResolveError::NoSession)?;
    let mut conn = dial(&transport, &to, Duration::from_secs(5)).map_err(ResolveError::Address)?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    protocol::send(&mut conn, &Message::Resolve { session, committed })?;
    let running = match protocol::recv(&mut conn, None)? {
        Message::Resolved { running } => running,
        other => return Err(ResolveError::Unexpected(other.kind())),
    };
    if running != committed {
        return Err(ResolveError::Inconsistent { committed, running });
    }
    let mut guard = lock(&vm.progress);
    if let Some(p) = guard.as_mut()
        && let Some(r) = p.report.as_mut()
    {
        if committed {
            r.core.outcome = Outcome::Completed;
            r.core.error = None;
            p.phase = Phase::Completed;
        } else {
            r.core.error = Some(format!(
                "{}; resolved: the destination discarded its copy, the VM runs here",
                r.core.error.clone().unwrap_or_default()
            ));
        }
    }
    Ok(ferry_api::Resolution {
        committed,
        destination_running: running,
        vm_runs_on: if running { "destination" } else { "source" }.into(),
    })
}
