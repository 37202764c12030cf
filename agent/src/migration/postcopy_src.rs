//! The source's half of post-copy. The VM is paused here for good once the
//! destination runs it; this side answers the destination's page requests on the
//! fault channel at once, and pushes every other missing page on the main
//! connection, starting next to the latest fault (a guest that touched a page is
//! likely to touch its neighbours next).
//!
//! A broken link is not the end: this side reconnects (`Recover`) for up to the
//! recovery window, learns from the destination which pages it still lacks, and
//! carries on. The source keeps all of guest memory until the destination reports
//! every page in, so nothing is lost however often the link breaks. Past the window it
//! waits for `ferry migrate --resume`.

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::codec::{Codec, Compressor};
use super::hot_pages::{HotPages, pause_budget, pause_split};
use super::protocol::{self, Message, PostcopyFigures, ProtocolError};
use super::secure::Conn;
use super::source::dial;
use super::source::{
    BATCH, Buffers, MigrateError, Params, Phase, Sender, Switch, bandwidth, encode, link_rate, lock,
};
use crate::bitmap::Bitmap;
use crate::guest::abi::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;
/// After the resume the push waits for a pause this long in the guest's faults...
const PUSH_QUIET: Duration = Duration::from_millis(2);
/// ...or this long at most.
const PUSH_HOLD_MAX: Duration = Duration::from_millis(50);
/// The background push's share of the link's measured rate: the rest keeps the
/// bottleneck's queue empty for fault answers.
const PUSH_PACE: f64 = 0.9;
const NO_HINT: u64 = u64::MAX;
/// Discard rounds stop once a round finds at most this many pages dirty: the pause
/// then has few enough left to send or drop.
const HOT_PAGES_MAX: u64 = 512;
/// Rounds of dropping stale pages on the destination before a post-copy pause: at
/// least two, so pages written in both are known to be hot.
const DISCARD_ROUNDS: u32 = 4;
/// The shortest such round after the first.
const DISCARD_ROUND_MIN: Duration = Duration::from_millis(25);
/// Pages the pause sends between flushes.
const PAUSE_FLUSH_PAGES: usize = 32;
/// Back-to-back rounds right before the pause, at most.
const TIGHT_ROUNDS: u32 = 2;
/// They stop once a round finds this few pages dirty: dropping that many in the pause
/// takes about 0.2 ms.
const LATE_PAGES_MAX: u64 = 128;

/// Answers page requests on the fault channel until it breaks or `stop` is set.
fn serve_requests(memory: &[u8], conn: Conn, shared: &Served, stop: &AtomicBool) {
    super::priority::raise_priority();
    let pages = (memory.len() / PAGE) as u64;
    let Ok(w) = conn.try_clone() else { return };
    let mut w = BufWriter::with_capacity(64 << 10, w);
    // Short reads so `stop` is seen; requests are tiny and arrive whole.
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let integrity = conn.integrity();
    let mut r = conn.reader(64 << 10);
    let mut compressor = Compressor::new();
    let mut bufs = Buffers::default();
    while !stop.load(Ordering::Relaxed) {
        match protocol::recv(&mut r, Some(pages)) {
            Ok(Message::PageRequest { page }) => {
                shared.requested();
                shared.hint.store(page, Ordering::Relaxed);
                // Latency matters more than bytes here: no compression.
                let Ok(e) = encode(
                    memory,
                    &[page],
                    Codec::None,
                    &mut compressor,
                    &mut bufs,
                    integrity,
                ) else {
                    return;
                };
                if w.write_all(&e.frames).and_then(|()| w.flush()).is_err() {
                    return;
                }
                shared.mark(page);
                shared
                    .bytes
                    .fetch_add(e.frames.len() as u64, Ordering::Relaxed);
                shared.pages.fetch_add(e.pages_sent, Ordering::Relaxed);
                shared.zero_pages.fetch_add(e.zero_pages, Ordering::Relaxed);
                bufs.spare_frames.push(e.frames);
            }
            Err(ProtocolError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Ok(other) => {
                tracing::warn!("post-copy fault channel: unexpected {:?}", other.kind());
                return;
            }
            Err(_) => return,
        }
    }
}

/// What the fault-request server shares with the pusher: the latest request (the push
/// continues next to it), the pages it already answered (the push skips them), and
/// its counters.
struct Served {
    /// When the server started, and the latest request since then (microseconds).
    since: Instant,
    last_request_us: AtomicU64,
    hint: AtomicU64,
    answered: Vec<AtomicU64>,
    bytes: AtomicU64,
    pages: AtomicU64,
    zero_pages: AtomicU64,
}

impl Served {
    fn new(pages: u64) -> Self {
        Self {
            since: Instant::now(),
            last_request_us: AtomicU64::new(0),
            hint: AtomicU64::new(NO_HINT),
            answered: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            bytes: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
        }
    }

    fn requested(&self) {
        let us = self.since.elapsed().as_micros().max(1) as u64;
        self.last_request_us.store(us, Ordering::Relaxed);
    }

    /// Right after the resume the guest faults on page after page before it is back
    /// at work; the push would put its bytes (and its CPU) in front of each answer.
    /// So it waits until the faults pause for a moment, or for at most
    /// [`PUSH_HOLD_MAX`] while they keep coming.
    fn hold_push(&self) {
        let start = Instant::now();
        while start.elapsed() < PUSH_HOLD_MAX {
            let last = self.last_request_us.load(Ordering::Relaxed);
            let now = self.since.elapsed().as_micros() as u64;
            let quiet_since = if last == 0 {
                start.duration_since(self.since).as_micros() as u64
            } else {
                last
            };
            if now.saturating_sub(quiet_since) >= PUSH_QUIET.as_micros() as u64 {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn mark(&self, page: u64) {
        if let Some(w) = self.answered.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// The destination said what it lacks: that, not what was answered, is the truth
    /// (an answer may have been lost with a broken link).
    fn forget_answers(&self) {
        for w in &self.answered {
            w.store(0, Ordering::Relaxed);
        }
    }

    fn answered(&self, page: u64) -> bool {
        self.answered
            .get((page / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }
}

/// The background push paced just under the link's measured rate for as long as
/// this lives. Unpaced, TCP keeps the bottleneck's queue full, and every fault answer
/// on the other connection waits behind it: on a shaped 1 Gbit/s link that is
/// milliseconds per fault. Paced (TCP's own pacing, smooth at the microsecond
/// scale), the queue stays near empty.
struct Paced {
    /// The same socket (a duplicate descriptor).
    conn: Conn,
}

impl Paced {
    fn below(conn: &Conn, link_bytes_per_sec: f64) -> Option<Self> {
        if !(link_bytes_per_sec.is_finite() && link_bytes_per_sec > 0.0) {
            return None;
        }
        let conn = conn.try_clone().ok()?;
        let rate = (link_bytes_per_sec * PUSH_PACE) as u64;
        set_pacing(&conn, rate).then_some(Self { conn })
    }
}

impl Drop for Paced {
    fn drop(&mut self) {
        set_pacing(&self.conn, u64::MAX);
    }
}

fn set_pacing(conn: &Conn, bytes_per_sec: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a socket option on our own socket, with a u64 value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            conn.tcp().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&bytes_per_sec as *const u64).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "the post-copy push is not paced: {}",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}

/// Opens the fault channel of migration `session`.
fn open_fault_channel(params: &Params, session: protocol::Session) -> Result<Conn, MigrateError> {
    let timeout = params.timeout;
    let mut conn = dial(
        &params.transport,
        &params.to,
        timeout.min(Duration::from_secs(5)),
    )?;
    conn.set_write_timeout(Some(timeout))
        .map_err(ProtocolError::from)?;
    protocol::send(&mut conn, &Message::FaultChannel { session })?;
    Ok(conn)
}

impl Sender<'_> {
    /// Pauses the VM and hands it over with `need` (plus whatever the guest dirtied
    /// since the last harvest, when the dirty log runs) still to send; then runs
    /// post-copy to its end.
    pub(super) fn switch_postcopy(
        &mut self,
        mut need: Bitmap,
        dirty_log_running: bool,
        switch: &mut Switch,
    ) -> Result<(), MigrateError> {
        // The request that brought us here is served; nothing may switch twice.
        self.vm.postcopy_requested.store(false, Ordering::Release);
        let pages = need.pages();
        let mut hot = HotPages::new(pages);
        if dirty_log_running {
            // While the guest still runs here: tell the destination what is stale so
            // far, and wait until it has dropped those pages, so the pause only has
            // to deal with what the guest dirties from now on. Dropping is far faster
            // than sending, so a few such rounds shrink what is left to a handful of
            // hot pages, which are held back for the pause.
            let mut never_sent = Some(need.clone());
            let mut round_start = Instant::now();
            for round in 0..DISCARD_ROUNDS {
                // A round long enough for the guest to come back to what it keeps
                // rewriting, so that shows up as hot.
                if round > 0 {
                    std::thread::sleep(DISCARD_ROUND_MIN.saturating_sub(round_start.elapsed()));
                }
                round_start = Instant::now();
                let fresh = self.discard_round(&mut need, |dirty| {
                    let mut stale = hot.round(dirty);
                    if let Some(n) = never_sent.take() {
                        stale.or_assign_words(n.words());
                        stale.and_not_assign(hot.held());
                    }
                    stale
                })?;
                if round > 0 && fresh <= HOT_PAGES_MAX {
                    break;
                }
            }
        }
        self.wait_prepared()?;
        if !dirty_log_running {
            // Nothing was sent: all of memory is missing there. Said (and acknowledged)
            // now, the destination's bookkeeping for it stays out of the pause; the
            // pages the pause sends are current when they land.
            self.drop_there(&need)?;
        }
        // Connecting costs a round trip or two: not in the pause. The destination
        // takes the connection once the handover reaches it.
        let fault = open_fault_channel(self.params, self.session)?;
        if dirty_log_running {
            // What the guest dirtied during the last round is stale too, hundreds of
            // pages at a high rate, and dropping them in the pause would cost it. Short
            // rounds right before the pause leave only what the guest dirties in one
            // round trip; the held pages stay held. Few: each takes CPU time the guest
            // would rather have (on a shared host, its heartbeats show it).
            let mut previous = u64::MAX;
            for _ in 0..TIGHT_ROUNDS {
                let fresh = self.discard_round(&mut need, |dirty| {
                    let mut stale = dirty.clone();
                    stale.and_not_assign(hot.held());
                    stale
                })?;
                if fresh <= LATE_PAGES_MAX || fresh >= previous {
                    break;
                }
                previous = fresh;
            }
        }
        self.publish(Phase::Switchover);
        // Both ends of the handover run first from here (see `priority::Urgent`); the
        // destination's receiver is told now, while the pause itself takes its time.
        self.send(&Message::Pausing)?;
        self.w.flush().map_err(ProtocolError::from)?;
        let urgent = super::priority::Urgent::enter();
        let t_pause = Instant::now();
        let mut lap = super::Lap::new();
        self.m.pause()?;
        lap.mark("paused");
        let last_heartbeats = self.m.last_heartbeats_ns();
        // Everything in `need` if nothing was sent yet; else what the guest dirtied
        // since the last round, and the pages held back from it.
        let mut late = Bitmap::new(pages);
        if dirty_log_running {
            self.m.fetch_dirty(&mut late)?;
            need.or_assign_words(late.words());
        } else {
            late.or_assign_words(need.words());
        }
        lap.mark("dirty log fetched");
        // The device state first: the destination restores it while the pages below
        // are still on their way, instead of after them.
        self.m.disks().flush_all()?;
        let saved = self.m.save_state()?;
        // What each vCPU touches first when it runs again (its code, stack, page
        // tables...): if stale there, sent below ahead of everything else, else every
        // one of them is a fault in a row before the guest does anything.
        let m = self.m;
        // SAFETY: the VM is paused: nothing writes its memory.
        let memory = unsafe { m.memory() };
        let mut first = Vec::new();
        for v in &saved.vcpus {
            for p in super::vcpu_pages::pages(&v.regs, &v.sregs, memory) {
                if need.is_set(p) && !first.contains(&p) {
                    first.push(p);
                }
            }
        }
        let state = saved
            .encode()
            .map_err(|e| MigrateError::Vm(format!("state could not be encoded: {e}")))?;
        self.send(&Message::DeviceState { blob: state })?;
        self.w.flush().map_err(ProtocolError::from)?;
        lap.mark("device state sent");
        // Then a few of the pages the guest kept rewriting up to the pause, hottest
        // first: sent now they cost microseconds each instead of a fault each. The
        // rest the destination drops, and fetches on demand.
        let budget = if dirty_log_running {
            pause_budget(bandwidth(&self.stats))
        } else {
            0
        };
        let (hot_send, mut rest) = pause_split(&hot, &late, budget);
        for &p in &first {
            rest.unset(p);
        }
        let send: Vec<u64> = first
            .iter()
            .copied()
            .chain(hot_send.into_iter().filter(|p| !first.contains(p)))
            .collect();
        if !send.is_empty() {
            // Uncapped in the pause (it is downtime), capped again after it.
            let cap = self.settings.bandwidth_bytes_per_sec.take();
            // Flushed a few at a time: the destination lands them while the rest are
            // encoded, instead of all of them afterwards.
            for chunk in send.chunks(PAUSE_FLUSH_PAGES) {
                self.send_pages(chunk.iter().copied())?;
                self.w.flush().map_err(ProtocolError::from)?;
            }
            self.settings.bandwidth_bytes_per_sec = cap;
            lap.mark(&format!(
                "{} pages queued ({} held, {} dirtied since the last round, budget {budget})",
                send.len(),
                hot.held().count(),
                late.count()
            ));
            for &p in &send {
                need.unset(p);
            }
        }
        // Without a pass the destination was told before the pause.
        if dirty_log_running && rest.count() > 0 {
            self.send(&Message::Postcopy {
                missing: rest.words().to_vec(),
            })?;
        }
        self.stats.remaining = need.count();
        self.m.disks().set_locked(false)?;
        self.send(&Message::Complete {
            pages_sent: self.stats.pages_sent,
        })?;
        self.w.flush().map_err(ProtocolError::from)?;
        lap.mark("complete sent");
        // The bandwidth cap stays: post-copy shares the link with whatever else runs.
        let figures = self.postcopy(need, fault, switch, (t_pause, lap, urgent))?;
        switch.postcopy = Some(figures);
        self.measure_handover(switch, &last_heartbeats);
        Ok(())
    }

    /// One round of dropping stale pages on the destination while the guest runs: the
    /// pages dirtied since the last round join `need`, `pick` chooses which of them
    /// to drop now, and the round ends when the destination has dropped them. Returns
    /// how many pages were dirty.
    fn discard_round(
        &mut self,
        need: &mut Bitmap,
        pick: impl FnOnce(&Bitmap) -> Bitmap,
    ) -> Result<u64, MigrateError> {
        let pages = need.pages();
        let mut dirty = Bitmap::new(pages);
        self.m.fetch_dirty(&mut dirty)?;
        self.m.clear_dirty(0, pages)?;
        need.or_assign_words(dirty.words());
        self.drop_there(&pick(&dirty))?;
        Ok(dirty.count())
    }

    /// Has the destination drop `stale` (or note it missing, where nothing landed)
    /// and waits until it has.
    fn drop_there(&mut self, stale: &Bitmap) -> Result<(), MigrateError> {
        self.send(&Message::Postcopy {
            missing: stale.words().to_vec(),
        })?;
        self.send(&Message::RoundEnd { round: u32::MAX })?;
        self.w.flush().map_err(ProtocolError::from)?;
        match self.recv()? {
            Message::RoundAck { round: u32::MAX } => Ok(()),
            Message::Abort { reason } => Err(MigrateError::Refused(reason)),
            _ => Err(MigrateError::Unexpected("something other than RoundAck")),
        }
    }

    /// Sends every page in `need` while answering requests; survives broken links.
    fn postcopy(
        &mut self,
        mut need: Bitmap,
        fault: Conn,
        switch: &mut Switch,
        handover: (Instant, super::Lap, super::priority::Urgent),
    ) -> Result<PostcopyFigures, MigrateError> {
        // SAFETY: the VM is paused and handed over: nothing writes its memory again.
        let memory = unsafe { self.m.memory() };
        let shared = Served::new(need.pages());
        let mut fault = Some(fault);
        let mut handover = Some(handover);
        std::thread::scope(|s| {
            loop {
                let stop = std::sync::Arc::new(AtomicBool::new(false));
                let server = fault.take().map(|conn| {
                    let closer = conn.try_clone().ok();
                    let (shared, stop) = (&shared, stop.clone());
                    let handle = std::thread::Builder::new()
                        .name("postcopy-requests".into())
                        .spawn_scoped(s, move || serve_requests(memory, conn, shared, &stop));
                    (handle, closer)
                });
                // The handover first (no recovery before it completes: a failure there is
                // a pre-copy failure or a handover in doubt); then the push, where
                // `Missing` after `PostcopyEnd` means push again, same channels.
                let result = match handover
                    .take()
                    .map(|(t, lap, _urgent)| self.commit(switch, (t, lap)))
                {
                    Some(Err(e)) => Err((e, false)),
                    Some(Ok(())) => {
                        shared.hold_push();
                        Ok(())
                    }
                    None => Ok(()),
                };
                let result = match result {
                    Err(e) => Err(e),
                    Ok(()) => loop {
                        match self.push(memory, &mut need, &shared) {
                            Ok(None) => shared.forget_answers(),
                            Ok(Some(f)) => break Ok(f),
                            Err(e) => break Err((e, true)),
                        }
                    },
                };
                stop.store(true, Ordering::Relaxed);
                if let Some((handle, closer)) = server {
                    if let Some(c) = closer {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }
                    if let Ok(h) = handle {
                        let _ = h.join();
                    }
                }
                let pages = shared.pages.swap(0, Ordering::Relaxed);
                self.stats.bytes_on_wire += shared.bytes.swap(0, Ordering::Relaxed);
                self.stats.pages_sent += pages;
                self.stats.raw_bytes += pages * PAGE as u64;
                self.stats.zero_pages += shared.zero_pages.swap(0, Ordering::Relaxed);
                match result {
                    Ok(figures) => return Ok(figures),
                    Err((e, false)) => return Err(e),
                    Err((e, true)) => {
                        tracing::warn!("post-copy link lost: {e}; reconnecting");
                        let (missing, conn) = self.recover(&e.to_string())?;
                        need = missing;
                        shared.forget_answers();
                        fault = Some(conn);
                        switch.recoveries += 1;
                        self.set_recoveries(switch.recoveries);
                    }
                }
            }
        })
    }

    fn set_recoveries(&self, n: u32) {
        if let Some(p) = lock(&self.vm.progress).as_mut() {
            p.recoveries = n;
        }
    }

    fn publish_postcopy(&mut self, phase: Phase, left: u64) {
        self.stats.remaining = left;
        self.publish(phase);
        if let Some(p) = lock(&self.vm.progress).as_mut() {
            p.postcopy_pages_left = Some(left);
        }
    }

    /// Pushes `need`, then asks whether anything is missing. `Some` when the
    /// destination has every page; `None` when it named pages it still lacks (now in
    /// `need`).
    fn push(
        &mut self,
        memory: &[u8],
        need: &mut Bitmap,
        served: &Served,
    ) -> Result<Option<PostcopyFigures>, MigrateError> {
        let mut left = need.count();
        let mut cursor = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        let mut last_publish = Instant::now();
        let _background = super::priority::Background::enter();
        // Only acknowledged rounds say what the link carries (a post-copy from the
        // start has none: its push goes unpaced).
        let _paced = link_rate(&self.stats).and_then(|bw| Paced::below(self.w.get_ref(), bw));
        self.publish_postcopy(Phase::Postcopy, left);
        while left > 0 {
            if let Some(live) = lock(&self.vm.live).as_ref() {
                self.settings = live.settings;
            }
            let h = served.hint.swap(NO_HINT, Ordering::Relaxed);
            if h != NO_HINT {
                cursor = h + 1;
            }
            // Under a cap, a batch stays well under the peer's timeout.
            let size = self
                .settings
                .bandwidth_bytes_per_sec
                .map_or(BATCH, |b| (b as usize / 10 / PAGE).clamp(1, BATCH));
            batch.clear();
            while batch.len() < size {
                let Some(p) = need.next_set_wrapping(cursor) else {
                    break;
                };
                need.unset(p);
                left -= 1;
                cursor = p + 1;
                // Answered on the fault channel already; a page the destination
                // still lacks after all is named by Missing at the end.
                if !served.answered(p) {
                    batch.push(p);
                }
            }
            if batch.is_empty() {
                continue;
            }
            let codec = self.settings.codec;
            let mut bufs = std::mem::take(&mut self.bufs);
            let integrity = self.w.get_ref().integrity();
            let encoded = encode(
                memory,
                &batch,
                codec,
                &mut self.compressor,
                &mut bufs,
                integrity,
            );
            self.bufs = bufs;
            let mut e = encoded?;
            self.write_wire_owned(&mut e.frames)?;
            self.count_pages(&e);
            self.bufs.spare_frames.push(e.frames);
            self.fault("source.postcopy")?;
            if last_publish.elapsed() >= Duration::from_millis(100) {
                last_publish = Instant::now();
                self.publish_postcopy(Phase::Postcopy, left);
            }
        }
        self.send(&Message::PostcopyEnd)?;
        self.w.flush().map_err(ProtocolError::from)?;
        self.publish_postcopy(Phase::Postcopy, 0);
        loop {
            match self.recv()? {
                Message::PostcopyDone(f) => return Ok(Some(f)),
                Message::Missing { missing } => {
                    *need = Bitmap::from_words(need.pages(), &missing);
                    return Ok(None);
                }
                Message::Keepalive => {}
                _ => {
                    return Err(MigrateError::Unexpected(
                        "something other than PostcopyDone",
                    ));
                }
            }
        }
    }

    /// Reconnects to the destination; returns the pages it still lacks and a new
    /// fault channel. Retries for the recovery window, then waits for `--resume`.
    fn recover(&mut self, why: &str) -> Result<(Bitmap, Conn), MigrateError> {
        let pages = self.m.memory_bytes() / PAGE as u64;
        let _ = self.w.get_ref().shutdown(std::net::Shutdown::Both);
        let mut deadline = Instant::now() + self.params.recover;
        loop {
            if Instant::now() >= deadline {
                let left = self.stats.remaining;
                self.publish_postcopy(Phase::PostcopyPaused, left);
                tracing::error!(
                    "post-copy link still down after {:?} ({why}); waiting for `ferry migrate --resume`",
                    self.params.recover
                );
                while !self.vm.resume.swap(false, Ordering::AcqRel) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                deadline = Instant::now() + self.params.recover;
                self.publish_postcopy(Phase::Postcopy, left);
            }
            std::thread::sleep(Duration::from_millis(200));
            match self.reconnect(pages) {
                Ok(r) => {
                    tracing::info!("post-copy link restored");
                    return Ok(r);
                }
                Err(e) => tracing::debug!("post-copy reconnect failed: {e}"),
            }
        }
    }

    fn reconnect(&mut self, pages: u64) -> Result<(Bitmap, Conn), MigrateError> {
        let conn = dial(
            &self.params.transport,
            &self.params.to,
            Duration::from_secs(2),
        )?;
        conn.set_read_timeout(Some(self.params.timeout))
            .map_err(ProtocolError::from)?;
        conn.set_write_timeout(Some(self.params.timeout))
            .map_err(ProtocolError::from)?;
        let mut r = conn.try_clone().map_err(ProtocolError::from)?;
        let mut w = conn;
        protocol::send(
            &mut w,
            &Message::Recover {
                session: self.session,
            },
        )?;
        let missing = match protocol::recv(&mut r, Some(pages))? {
            Message::Missing { missing } => Bitmap::from_words(pages, &missing),
            Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
            _ => return Err(MigrateError::Unexpected("something other than Missing")),
        };
        let fault = open_fault_channel(self.params, self.session)?;
        self.w = super::wire::Wire::new(w).map_err(ProtocolError::from)?;
        self.r = r;
        Ok((missing, fault))
    }
}
