//! The destination's half of post-copy: the guest runs here while some of its pages
//! are still on the source. Missing pages are registered with userfaultfd; a fault
//! thread asks the source for each page a vCPU touches, over the fault channel, while
//! the main connection brings the rest in the background. Every page is filled in
//! atomically (UFFDIO_COPY / ZEROPAGE), so a vCPU sees either nothing (and waits) or
//! the whole page.
//!
//! A broken link pauses the transfer, not the guest: vCPUs that touch a missing page
//! wait, the others run on. The source reconnects (`Recover`), learns which pages are
//! still missing, and the transfer continues. If it does not come back within the
//! recovery window, the vCPUs are stopped and the loss is reported: the guest never
//! runs on memory it does not have.

use crate::migration::secure::Conn;
use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::door::Routed;
use super::page_receiver::{PageReceiver, PageSink};
use super::priority;
use super::protocol::{self, Kind, Message, PostcopyFigures, ProtocolError, Session};
use crate::bitmap::Bitmap;
use crate::guest::abi::PAGE_SIZE;
use crate::sync::lock;
use crate::vmm::machine::Machine;
use crate::vmm::uffd::{Filled, Uffd, UffdError};

const PAGE: usize = PAGE_SIZE as usize;

#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("{0}")]
    Uffd(#[from] UffdError),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Codec(#[from] super::codec::CodecError),
    #[error("discarding stale pages before post-copy: {0}")]
    Discard(std::io::Error),
    #[error("the source did not open the fault channel within {0:?}")]
    NoFaultChannel(Duration),
    #[error("the source sent {0:?} during post-copy")]
    Unexpected(Kind),
}

pub use ferry_api::{PostcopyPhase, PostcopyStatus};

struct Inner {
    missing: Bitmap,
    remaining: u64,
    /// CRC32 of every page as it landed (the memory digest is built from these).
    crcs: Vec<u32>,
}

#[derive(Default)]
struct Faults {
    latencies_us: Vec<u32>,
    blocked_us: u64,
}

/// Guest memory during post-copy, shared by the receive loop, the fault thread and
/// `ferry status`.
pub struct Tracker {
    uffd: Uffd,
    base: usize,
    pages: u64,
    inner: Mutex<Inner>,
    faults: Mutex<Faults>,
    recoveries: AtomicU32,
    phase: Mutex<(PostcopyPhase, Option<String>)>,
    stop: AtomicBool,
    zero_crc: u32,
}

impl crate::vmm::machine::AbsentPages for Tracker {
    fn is_missing(&self, page: u64) -> bool {
        Tracker::is_missing(self, page)
    }
}

impl Tracker {
    /// Registers all of guest memory for missing-page faults; every page in `missing`
    /// must be absent already ([`discard`]). Call before any vCPU runs. `crcs` holds
    /// the CRCs of the pages that landed during pre-copy.
    pub fn prepare(
        base: usize,
        pages: u64,
        missing: Bitmap,
        crcs: Vec<u32>,
    ) -> Result<Self, PostcopyError> {
        let uffd = Uffd::new()?;
        uffd.register_missing(base, pages as usize * PAGE)?;
        let remaining = missing.count();
        Ok(Self {
            uffd,
            base,
            pages,
            inner: Mutex::new(Inner {
                missing,
                remaining,
                crcs,
            }),
            faults: Mutex::new(Faults::default()),
            recoveries: AtomicU32::new(0),
            phase: Mutex::new((PostcopyPhase::Running, None)),
            stop: AtomicBool::new(false),
            zero_crc: crc32fast::hash(&[0u8; PAGE]),
        })
    }

    pub fn is_missing(&self, page: u64) -> bool {
        lock(&self.inner).missing.is_set(page)
    }

    pub fn remaining(&self) -> u64 {
        lock(&self.inner).remaining
    }

    pub fn status(&self) -> PostcopyStatus {
        let (phase, error) = lock(&self.phase).clone();
        PostcopyStatus {
            phase,
            missing_pages: self.remaining(),
            faults: lock(&self.faults).latencies_us.len() as u64,
            recoveries: self.recoveries.load(Ordering::Relaxed),
            error,
        }
    }

    fn set_phase(&self, phase: PostcopyPhase, error: Option<String>) {
        *lock(&self.phase) = (phase, error);
    }

    /// Fills a missing page with `data` (one page); a page that is no longer missing
    /// is left alone. Returns whether this call filled it.
    fn fill(&self, page: u64, data: &[u8]) -> Result<bool, PostcopyError> {
        let mut inner = lock(&self.inner);
        if !inner.missing.is_set(page) {
            return Ok(false);
        }
        let at = self.base + page as usize * PAGE;
        // SAFETY: `page` is inside guest memory (checked by the frame parser) and
        // registered; `data` is one page. The copy is atomic for the guest.
        let filled = unsafe { self.uffd.copy(at, data) }?;
        inner.crcs[page as usize] = crc32fast::hash(data);
        inner.missing.unset(page);
        inner.remaining -= 1;
        Ok(filled == Filled::Now)
    }

    fn fill_zero(&self, page: u64) -> Result<(), PostcopyError> {
        let mut inner = lock(&self.inner);
        if !inner.missing.is_set(page) {
            return Ok(());
        }
        self.uffd.zero(self.base + page as usize * PAGE, PAGE)?;
        inner.crcs[page as usize] = self.zero_crc;
        inner.missing.unset(page);
        inner.remaining -= 1;
        Ok(())
    }

    /// A fault on a page that is not missing is on a page known to be zero that was
    /// never touched here: it is filled locally, without asking the source.
    fn resolve_locally(&self, page: u64) -> Result<bool, PostcopyError> {
        let inner = lock(&self.inner);
        if inner.missing.is_set(page) {
            return Ok(false);
        }
        drop(inner);
        self.uffd.zero(self.base + page as usize * PAGE, PAGE)?;
        Ok(true)
    }

    fn missing_words(&self) -> Vec<u64> {
        lock(&self.inner).missing.words().to_vec()
    }

    pub fn digest(&self) -> u32 {
        protocol::digest(&lock(&self.inner).crcs)
    }

    fn figures(&self) -> PostcopyFigures {
        let f = lock(&self.faults);
        let mut l = f.latencies_us.clone();
        l.sort_unstable();
        let pct = |q: f64| {
            if l.is_empty() {
                0
            } else {
                u64::from(l[((l.len() - 1) as f64 * q).round() as usize])
            }
        };
        PostcopyFigures {
            faults: l.len() as u64,
            latency_p50_us: pct(0.5),
            latency_p99_us: pct(0.99),
            blocked_us: f.blocked_us,
        }
    }

    fn record_fault(&self, waited: Duration) {
        let us = waited.as_micros().min(u128::from(u32::MAX)) as u32;
        let mut f = lock(&self.faults);
        f.latencies_us.push(us);
        f.blocked_us += u64::from(us);
    }
}

/// Post-copy's page sink: a running guest's memory, where a page appears whole and
/// at once, and only if it is still missing. Records the pages a frame covered (the
/// fault thread matches them to the faults it waits on).
struct Filling<'a> {
    tracker: &'a Tracker,
    covered: &'a mut Vec<u64>,
}

impl<'a> Filling<'a> {
    fn new(tracker: &'a Tracker, covered: &'a mut Vec<u64>) -> Self {
        covered.clear();
        Self { tracker, covered }
    }
}

impl PageSink for Filling<'_> {
    type Error = PostcopyError;

    fn memory(&mut self) -> Option<&mut [u8]> {
        None
    }

    fn wrote(&mut self, _page: u64, _crc: u32) -> Result<(), PostcopyError> {
        Err(PostcopyError::Unexpected(Kind::Pages))
    }

    fn fill(&mut self, page: u64, data: &[u8]) -> Result<(), PostcopyError> {
        self.tracker.fill(page, data)?;
        self.covered.push(page);
        Ok(())
    }

    fn zeros(&mut self, first: u64, count: u64) -> Result<(), PostcopyError> {
        for page in first..first + count {
            self.tracker.fill_zero(page)?;
            self.covered.push(page);
        }
        Ok(())
    }
}

type Channel = (BufReader<Conn>, Conn);

/// Drops the pages set in `pages` from guest memory at `base`: the next touch finds
/// them absent. Adjacent pages go as one range, and ranges go to the kernel a thousand
/// at a time (`process_madvise`), which costs a fraction of one `madvise` per range.
pub fn discard(base: usize, pages: &Bitmap) -> Result<(), PostcopyError> {
    let runs: Vec<libc::iovec> = pages
        .runs()
        .into_iter()
        .map(|(first, count)| libc::iovec {
            iov_base: (base + first as usize * PAGE) as *mut libc::c_void,
            iov_len: count as usize * PAGE,
        })
        .collect();
    if runs.is_empty() {
        return Ok(());
    }
    // SAFETY: plain syscall; the descriptor is checked and closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as i32;
    let mut batched = pidfd >= 0;
    for chunk in runs.chunks(1024) {
        if batched {
            // SAFETY: every range lies inside guest memory, which no vCPU runs on yet
            // and no reference reads; dropping pages only makes them read as absent.
            let done = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    pidfd,
                    chunk.as_ptr(),
                    chunk.len(),
                    libc::MADV_DONTNEED,
                    0,
                )
            };
            let total: usize = chunk.iter().map(|r| r.iov_len).sum();
            if done >= 0 && done as usize == total {
                continue;
            }
            // Kernels before 6.x refuse MADV_DONTNEED here: one call per range then.
            batched = false;
        }
        for r in chunk {
            // SAFETY: as above, one range at a time.
            if unsafe { libc::madvise(r.iov_base, r.iov_len, libc::MADV_DONTNEED) } != 0 {
                return Err(PostcopyError::Discard(std::io::Error::last_os_error()));
            }
        }
    }
    if pidfd >= 0 {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(pidfd) };
    }
    Ok(())
}

/// The fault thread: turns userfaultfd faults into page requests on the fault channel
/// and fills pages in as the answers come. A new channel (after a recovery) arrives on
/// `channels`; requests still unanswered are sent again on it.
fn serve_faults(t: &Tracker, first: Channel, channels: mpsc::Receiver<Channel>) {
    priority::raise_priority();
    let mut chan = Some(first);
    // Page → when its first fault was read.
    let mut pending: HashMap<u64, Instant> = HashMap::new();
    let mut receiver = PageReceiver::new(t.pages);
    let mut covered = Vec::new();
    let mut frame = protocol::Frame {
        kind: Kind::Keepalive,
        payload: Vec::new(),
    };
    let fail = |why: String| {
        tracing::error!("post-copy fault thread: {why}");
    };
    while !t.stop.load(Ordering::Relaxed) {
        if let Ok(mut c) = channels.try_recv() {
            let resend = pending
                .keys()
                .try_for_each(|&page| protocol::send(&mut c.1, &Message::PageRequest { page }));
            if resend.is_ok() {
                chan = Some(c);
            }
        }
        let mut fds = [
            libc::pollfd {
                fd: t.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: chan.as_ref().map_or(-1, |c| c.1.tcp().as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Over TLS, answers may wait decrypted where a poll of the socket cannot see them.
        let buffered = chan
            .as_ref()
            .is_some_and(|c| !c.0.buffer().is_empty() || c.1.buffered());
        if !buffered {
            // SAFETY: two valid pollfd entries (a negative fd is ignored by poll).
            unsafe { libc::poll(fds.as_mut_ptr(), 2, 20) };
        }
        loop {
            let addr = match t.uffd.next_fault() {
                Ok(Some(a)) => a,
                Ok(None) => break,
                Err(e) => {
                    fail(format!("reading faults: {e}"));
                    return;
                }
            };
            let page = (addr.saturating_sub(t.base) / PAGE) as u64;
            if page >= t.pages {
                continue;
            }
            let t0 = Instant::now();
            match t.resolve_locally(page) {
                Ok(true) => {
                    t.record_fault(t0.elapsed());
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    fail(e.to_string());
                    return;
                }
            }
            if pending.contains_key(&page) {
                continue;
            }
            pending.insert(page, t0);
            if let Some(c) = chan.as_mut()
                && protocol::send(&mut c.1, &Message::PageRequest { page }).is_err()
            {
                chan = None;
            }
        }
        let readable = fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        if !(readable || buffered) {
            continue;
        }
        let Some(c) = chan.as_mut() else { continue };
        // Answers come whole and fast; read what is there.
        loop {
            let integrity = c.1.integrity();
            match protocol::read_frame_as(&mut c.0, &mut frame.payload, integrity) {
                Ok(kind) => frame.kind = kind,
                Err(_) => {
                    // The main connection notices too and runs the recovery.
                    chan = None;
                    break;
                }
            }
            match receiver.apply(&frame, &mut Filling::new(t, &mut covered)) {
                Ok(true) => {}
                Ok(false) => {
                    fail(PostcopyError::Unexpected(frame.kind).to_string());
                    chan = None;
                    break;
                }
                Err(e) => {
                    fail(e.to_string());
                    chan = None;
                    break;
                }
            }
            for page in &covered {
                if let Some(t0) = pending.remove(page) {
                    t.record_fault(t0.elapsed());
                }
            }
            if c.0.buffer().is_empty() && !c.1.buffered() {
                break;
            }
        }
    }
}

/// Waits up to `wait` for the fault channel of migration `session` (the incoming
/// port routes it here).
pub fn wait_fault_channel(
    routed: &mpsc::Receiver<Routed>,
    session: Session,
    wait: Duration,
) -> Result<Channel, PostcopyError> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Routed { first, conn }) = routed.recv_timeout(left) else {
            return Err(PostcopyError::NoFaultChannel(wait));
        };
        match first {
            Message::FaultChannel { session: got } if got == session => {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(w) = conn.try_clone() else { continue };
                // Only read when poll says an answer is there; the timeout only bounds
                // a frame that stops half-way.
                return Ok((conn.reader(1 << 16), w));
            }
            _ => tracing::warn!("ignoring a connection that is not this migration's fault channel"),
        }
    }
}

/// The fault thread, started before the guest may run so its first fault is served
/// at once. Stopped and joined on drop.
pub struct FaultThread {
    tracker: Arc<Tracker>,
    handle: Option<std::thread::JoinHandle<()>>,
    channels: mpsc::Sender<Channel>,
}

impl FaultThread {
    pub fn start(tracker: Arc<Tracker>, first: Channel) -> std::io::Result<Self> {
        let (channels, rx) = mpsc::channel();
        let t = tracker.clone();
        let handle = std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || serve_faults(&t, first, rx))?;
        Ok(Self {
            tracker,
            handle: Some(handle),
            channels,
        })
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.tracker.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Everything the receive loop needs to run post-copy to its end.
pub struct Incoming<'a> {
    pub tracker: Arc<Tracker>,
    pub machine: &'a Machine,
    pub routed: &'a mpsc::Receiver<Routed>,
    pub session: Session,
    pub timeout: Duration,
    pub recover: Duration,
}

impl Incoming<'_> {
    /// Runs post-copy until every page is here; the guest already runs. Returns the
    /// main connection (for the closing messages).
    pub fn run(
        &self,
        mut r: BufReader<Conn>,
        mut w: Conn,
        faults: FaultThread,
    ) -> (BufReader<Conn>, Conn) {
        let chan_tx = faults.channels.clone();
        {
            let _background = priority::Background::enter();
            let t = &*self.tracker;
            let mut receiver = PageReceiver::new(t.pages);
            let mut covered = Vec::new();
            let mut frame = protocol::Frame {
                kind: Kind::Keepalive,
                payload: Vec::new(),
            };
            loop {
                let step = (|| -> Result<bool, PostcopyError> {
                    let integrity = r.get_ref().integrity();
                    frame.kind = protocol::read_frame_as(&mut r, &mut frame.payload, integrity)?;
                    if receiver.apply(&frame, &mut Filling::new(t, &mut covered))? {
                        return Ok(false);
                    }
                    match frame.kind {
                        Kind::Keepalive => Ok(false),
                        Kind::PostcopyEnd if t.remaining() == 0 => Ok(true),
                        Kind::PostcopyEnd => {
                            // Should not happen; ask again rather than leave a hole.
                            protocol::send(
                                &mut w,
                                &Message::Missing {
                                    missing: t.missing_words(),
                                },
                            )?;
                            w.flush().map_err(ProtocolError::from)?;
                            Ok(false)
                        }
                        other => Err(PostcopyError::Unexpected(other)),
                    }
                })();
                match step {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!("post-copy link lost: {e}; waiting for the source");
                        let (nr, nw) = self.recover(&e.to_string(), &chan_tx);
                        r = nr;
                        w = nw;
                    }
                }
            }
        }
        drop(faults);
        // Every page is here. Pages known to be zero that nobody touched are still
        // absent: with the fault thread gone they must fault the ordinary way, or the
        // next touch (a guest access, a later migration reading memory) would wait
        // forever.
        if let Err(e) = self
            .tracker
            .uffd
            .unregister(self.tracker.base, self.tracker.pages as usize * PAGE)
        {
            tracing::error!("{e}; untouched zero pages may block whoever touches them");
        }
        self.tracker.set_phase(PostcopyPhase::Completed, None);
        (r, w)
    }

    /// Waits for the source to come back; stops the vCPUs if the recovery window
    /// passes, and keeps waiting (`ferry migrate --resume` on the source).
    fn recover(&self, why: &str, channels: &mpsc::Sender<Channel>) -> (BufReader<Conn>, Conn) {
        let t = &self.tracker;
        t.set_phase(PostcopyPhase::Recovering, Some(why.to_owned()));
        let lost_at = Instant::now() + self.recover;
        let mut stopped = false;
        loop {
            if !stopped && Instant::now() >= lost_at {
                stopped = true;
                let missing = t.remaining();
                let msg = format!(
                    "the source did not come back within {:?} after the post-copy link broke ({why}); \
                     {missing} pages are still missing, so the vCPUs are stopped",
                    self.recover
                );
                tracing::error!("{msg}");
                t.set_phase(PostcopyPhase::Lost, Some(msg));
                self.machine.request_pause();
            }
            let conn = match self.routed.recv_timeout(Duration::from_millis(500)) {
                Ok(Routed {
                    first: Message::Recover { session },
                    conn,
                }) if session == self.session => conn,
                Ok(_) => {
                    tracing::warn!("ignoring a connection that is not this migration's recovery");
                    continue;
                }
                Err(_) => continue,
            };
            match self.reconnect(conn) {
                Ok((r, w, fault)) => {
                    if channels.send(fault).is_err() {
                        tracing::error!("the post-copy fault thread is gone");
                    }
                    t.recoveries.fetch_add(1, Ordering::Relaxed);
                    t.set_phase(PostcopyPhase::Running, None);
                    if stopped && let Err(e) = self.machine.resume() {
                        tracing::error!("cannot resume the vCPUs after recovery: {e}");
                    }
                    tracing::info!("post-copy link restored");
                    return (r, w);
                }
                Err(e) => tracing::warn!("post-copy recovery attempt failed: {e}"),
            }
        }
    }

    fn reconnect(&self, conn: Conn) -> Result<(BufReader<Conn>, Conn, Channel), PostcopyError> {
        conn.set_read_timeout(Some(self.timeout))
            .map_err(ProtocolError::from)?;
        let mut w = conn.try_clone().map_err(ProtocolError::from)?;
        let r = conn.reader(1 << 20);
        protocol::send(
            &mut w,
            &Message::Missing {
                missing: self.tracker.missing_words(),
            },
        )?;
        w.flush().map_err(ProtocolError::from)?;
        let fault = wait_fault_channel(self.routed, self.session, Duration::from_secs(10))?;
        Ok((r, w, fault))
    }

    pub fn figures(&self) -> PostcopyFigures {
        self.tracker.figures()
    }
}
