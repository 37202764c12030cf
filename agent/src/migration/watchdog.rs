//! The source's watch on a destination that stops answering during pre-copy (a hung
//! host, a stopped process). Its socket goes on taking the stream for as long as
//! kernel buffers last (tens of megabytes on a fast link: many seconds), and a write
//! that trickles never times out; but a live destination answers at least every
//! quarter of the timeout while the stream flows. A thread of its own sees the
//! silence even while the sender is blocked in a write, and ends the connection.

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::time::Duration;

#[derive(Default)]
struct Shared {
    /// Watching at all (pre-copy only: later phases have their own rules).
    armed: AtomicBool,
    /// The longest silence allowed, milliseconds.
    limit_ms: AtomicU64,
    /// The limit the watch gave up at, milliseconds (0: it has not).
    fired_ms: AtomicU64,
}

pub struct Watchdog {
    shared: Arc<Shared>,
    /// Dropped to stop the watch at once: the migration's end never waits for it.
    stop: Option<Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Watches `sock` (a clone of the migration's connection); disarmed until
    /// [`set`](Self::set).
    pub fn start(sock: TcpStream) -> Self {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let (stop, stopped) = channel::<()>();
        let handle = std::thread::Builder::new()
            .name("migration-watch".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(Duration::from_millis(100))
                {
                    let limit = Duration::from_millis(s.limit_ms.load(Ordering::Acquire));
                    if s.armed.load(Ordering::Acquire)
                        && super::link::silent_for(&sock).is_some_and(|d| d > limit)
                    {
                        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
                        s.fired_ms.store(ms, Ordering::Release);
                        // Whatever the sender waits on fails now.
                        let _ = sock.shutdown(std::net::Shutdown::Both);
                        tracing::warn!(
                            "the destination has said nothing for over {limit:?}; giving up on it"
                        );
                        return;
                    }
                }
            })
            .ok();
        if handle.is_none() {
            tracing::warn!("no watch thread: a stopped destination is found out by timeouts");
        }
        Self {
            shared,
            stop: Some(stop),
            handle,
        }
    }

    /// Arms (or disarms) the watch with the longest silence to allow.
    pub fn set(&self, armed: bool, limit: Duration) {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        self.shared.limit_ms.store(ms, Ordering::Release);
        self.shared.armed.store(armed, Ordering::Release);
    }

    /// The watch ended the connection: after a silence over this long.
    pub fn fired(&self) -> Option<Duration> {
        match self.shared.fired_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
