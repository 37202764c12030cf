//! The guest's dirty rate over short windows, measured while the first pass runs.
//!
//! The dirty log shows pages new since its last harvest, and the first pass harvests
//! only at its end: a guest that keeps rewriting a hot set looks slower the longer the
//! pass runs, and its rate seen late in the pass says little about the short rounds at
//! the end of pre-copy, which set the downtime. So for the pass's first second the log
//! is re-armed every [`WINDOW`]: each window shows what the guest dirties in that long
//! (a round that long), and the windows together what it dirties over longer. Re-armed
//! pages stay owed (see [`crate::vmm::dirty::DirtyLog::rearm`]), so nothing changes in
//! what is sent. The cost: the guest takes one more write fault per page it rewrites,
//! per window, for that second.

use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use super::migratable::Migratable;
use crate::bitmap::Bitmap;
use crate::vmm::dirty::DirtyError;

pub const WINDOW: Duration = Duration::from_millis(250);
/// Windows per first pass at most: enough for the policy's first prediction (made
/// once a second has passed), few enough that the extra faults stay a blip.
pub const WINDOWS: u32 = 4;

pub use ferry_api::DirtyWindows;

/// Runs `pass` (the first pass) while a thread measures windows into the migration's
/// progress; a dirty log that failed to re-arm fails the pass (the log can no longer
/// be trusted to know what is owed).
pub(super) fn during<T, E: From<DirtyError>>(
    vm: &Migratable,
    pass: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let (stop, stopped) = channel::<()>();
    std::thread::scope(|s| {
        let sampler = std::thread::Builder::new()
            .name("dirty-windows".into())
            .spawn_scoped(s, || sample(vm, stopped));
        let result = pass();
        drop(stop);
        let sampled = match sampler {
            Ok(h) => h.join().unwrap_or(Ok(())),
            // No thread, no windows: the policy falls back on other signals.
            Err(_) => Ok(()),
        };
        let value = result?;
        sampled?;
        Ok(value)
    })
}

fn sample(vm: &Migratable, stop: Receiver<()>) -> Result<(), DirtyError> {
    let m = vm.movable();
    let pages = m.memory_bytes() / crate::guest::abi::PAGE_SIZE;
    let mut window = Bitmap::new(pages);
    let mut all = Bitmap::new(pages);
    let start = Instant::now();
    let mut w = DirtyWindows::default();
    let mut dirtied = 0u64;
    let mut rearm = std::time::Duration::ZERO;
    while w.windows < WINDOWS {
        match stop.recv_timeout(WINDOW) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => break,
        }
        let t = Instant::now();
        let n = m.rearm_dirty(&mut window)?;
        let now = Instant::now();
        rearm += now - t;
        w.windows += 1;
        dirtied += n;
        w.pages_per_window = dirtied as f64 / f64::from(w.windows);
        w.since_ms = (now - start).as_secs_f64() * 1e3;
        w.window_ms = w.since_ms / f64::from(w.windows);
        all.or_assign_words(window.words());
        w.distinct_pages = all.count();
        w.rearm_ms = rearm.as_secs_f64() * 1e3 / f64::from(w.windows);
        let mut guard = vm.progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = guard.as_mut() {
            p.dirty_windows = Some(w.clone());
        }
    }
    Ok(())
}
