//! Locking that outlives a panic.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking it over if a thread panicked while holding it: a panicking vCPU
/// or migration thread must not take the control plane down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
