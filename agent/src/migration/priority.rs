//! Thread priorities during post-copy, on both sides: the threads that answer faults
//! go first, the bulk transfer last, so a vCPU waiting for a page waits for nothing
//! else; and the threads that carry the handover run first while it lasts.

/// Real-time priority of the threads that serve faults: above every ordinary thread,
/// low among real-time ones.
const FAULT_RT_PRIORITY: libc::c_int = 10;
/// Nice value of the background push and its receiver during post-copy.
const BACKGROUND_NICE: libc::c_int = 10;

/// A vCPU waits on every fault: the threads that serve faults must not wait for a
/// core behind the bulk transfer. A real-time priority wakes them at once (they block
/// on the socket between requests, so they cannot hog a core); without
/// CAP_SYS_NICE they try a raised nice value, and without that they run as usual.
pub(super) fn raise_priority() {
    if real_time(libc::SCHED_FIFO) {
        return;
    }
    // SAFETY: changes this thread's nice value only.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10) };
    if rc != 0 {
        tracing::debug!(
            "fault thread keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Puts the calling thread under `policy` at [`FAULT_RT_PRIORITY`]; false if refused
/// (no CAP_SYS_NICE).
fn real_time(policy: libc::c_int) -> bool {
    let param = libc::sched_param {
        sched_priority: FAULT_RT_PRIORITY,
    };
    // SAFETY: changes the calling thread's scheduling policy only.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

/// The bulk of post-copy (the background push, and receiving it) yields to the guest's
/// vCPUs for as long as this lives: right after the resume, a vCPU that waited for a
/// page otherwise waits again for a core.
pub(super) struct Background {
    nice: libc::c_int,
}

impl Background {
    pub(super) fn enter() -> Self {
        // SAFETY: reads this thread's id and nice value only.
        let (tid, nice) = unsafe {
            let tid = libc::gettid() as libc::id_t;
            (tid, libc::getpriority(libc::PRIO_PROCESS, tid))
        };
        // SAFETY: as above.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE.max(nice)) };
        Self { nice }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // SAFETY: restores this thread's nice value (raising it back needs
        // CAP_SYS_NICE; without it the thread stays at the lower priority).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, self.nice) };
    }
}

/// The threads that carry a post-copy handover run at the fault threads' real-time
/// priority for as long as this lives: every microsecond of the pause is downtime.
/// Ordinary wakeups over loopback are "sync": the woken reader is queued on the
/// writer's core, behind a writer that keeps writing, while the other core idles
/// (measured: up to a millisecond per message). A real-time thread is woken on a core
/// where it runs at once. Both threads mostly wait on their sockets, so they cannot
/// hog a core; without CAP_SYS_NICE nothing changes.
pub(super) struct Urgent {
    raised: bool,
}

impl Urgent {
    pub(super) fn enter() -> Self {
        // Reset on fork: threads started meanwhile (the destination's vCPUs) must
        // not inherit the real-time policy.
        Self {
            raised: real_time(libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK),
        }
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        if self.raised {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: puts the calling thread back to the ordinary policy.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
        }
    }
}
