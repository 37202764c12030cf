//! A handover in doubt, settled with the destination afterwards.

use super::*;

/// `ferry migrate --resolve`: settles a handover in doubt by asking the destination
/// what it did, telling it whether this side committed. Updates the report.
pub fn resolve(vm: &Migratable) -> Result<ferry_api::Resolution, String> {
    let m = &vm.machine;
    let to = lock(&vm.progress)
        .as_ref()
        .map(|p| p.to.clone())
        .ok_or("no migration to resolve")?;
    let session = *lock(&vm.session);
    // Without the destination's secret there is nothing it would answer to.
    let session =
        session.ok_or("the last migration never completed its handshake: nothing to resolve")?;
    let committed = m.handed_over.load(Ordering::Acquire);
    let addr = address(&to).map_err(|e| e.to_string())?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("cannot reach the destination {to}: {e}; the VM stays as it is"))?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    protocol::send(&mut conn, &Message::Resolve { session, committed })
        .map_err(|e| e.to_string())?;
    let running = match protocol::recv(&mut conn, None).map_err(|e| e.to_string())? {
        Message::Resolved { running } => running,
        other => return Err(format!("the destination answered {:?}", other.kind())),
    };
    if running != committed {
        // Cannot happen by construction (the destination runs only on Commit); never
        // paper over it.
        return Err(format!(
            "inconsistent handover: committed here = {committed}, running there = {running}"
        ));
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
