//! What the kernel's TCP knows about the migration link.
//!
//! Bytes written over the time spent writing overstates the link while the sender is
//! at times busy elsewhere (compressing, harvesting): the socket drains meanwhile and
//! the next writes find room. The kernel counts what the peer acknowledged and how
//! long the connection had data in flight: their ratio is what the link carries while
//! kept busy. Unless the peer's window (or our own send buffer) held the data back
//! most of that time: a peer too slow to read (a destination writing disk blocks into
//! its images) is not a slow link, and compressing would not help it; then no rate is
//! given.
//!
//! The counters run from the connection's start; [`Meter`] reads them over a recent
//! window instead, so a phase that ends (the disks' first copy into a slow datastore)
//! stops speaking for the one after it (the memory, which the same destination takes
//! in at the link's rate).

use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// What the kernel measured on a connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Bytes the peer acknowledged over the seconds data was in flight, over the
    /// window; None until that was long enough to tell, or while the peer (not the
    /// link) was most of the limit.
    pub delivery_rate: Option<f64>,
    /// Smoothed round trip of data to its acknowledgement, queues on the way
    /// included: what a round's closing acknowledgement waits for beyond its bytes.
    pub rtt_ms: f64,
    /// The peer's receive window held the data back most of the time the connection
    /// was busy: the destination takes the stream in slower than the link carries it.
    pub peer_limited: bool,
}

/// Time in flight before a delivery rate counts, microseconds.
const LINK_EVIDENCE_US: u64 = 20_000;
/// Busy time after which a window starts afresh, microseconds: each reading then
/// covers between one and two of these.
const WINDOW_US: u64 = 250_000;

/// The kernel's cumulative counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counters {
    bytes_acked: u64,
    busy_us: u64,
    rwnd_limited_us: u64,
    sndbuf_limited_us: u64,
    rtt_us: u32,
}

impl Counters {
    fn since(&self, base: &Counters) -> Counters {
        Counters {
            bytes_acked: self.bytes_acked.saturating_sub(base.bytes_acked),
            busy_us: self.busy_us.saturating_sub(base.busy_us),
            rwnd_limited_us: self.rwnd_limited_us.saturating_sub(base.rwnd_limited_us),
            sndbuf_limited_us: self
                .sndbuf_limited_us
                .saturating_sub(base.sndbuf_limited_us),
            rtt_us: self.rtt_us,
        }
    }

    fn measured(&self) -> Option<Measured> {
        if self.busy_us == 0 {
            return None;
        }
        let busy = self.busy_us;
        let held_back = self.rwnd_limited_us.saturating_add(self.sndbuf_limited_us);
        Some(Measured {
            delivery_rate: (busy >= LINK_EVIDENCE_US && held_back <= busy / 2)
                .then(|| self.bytes_acked as f64 / (busy as f64 / 1e6)),
            rtt_ms: f64::from(self.rtt_us) / 1e3,
            peer_limited: busy >= LINK_EVIDENCE_US && self.rwnd_limited_us > busy / 2,
        })
    }
}

/// Reads a connection's counters over a recent window (see the module's comment).
#[derive(Debug, Default)]
pub struct Meter {
    /// Where the current window began, and the one before it.
    base: Counters,
    previous: Counters,
}

impl Meter {
    /// What the connection did over the last one to two windows of busy time (since
    /// it opened, until it has been busy that long).
    pub fn read(&mut self, stream: &TcpStream) -> Option<Measured> {
        let now = counters(stream)?;
        if now.busy_us.saturating_sub(self.base.busy_us) >= WINDOW_US {
            self.previous = self.base;
            self.base = now;
        }
        now.since(&self.previous).measured()
    }
}

/// How long since the peer last sent data on `stream` (None: the kernel does not
/// say).
pub fn silent_for(stream: &TcpStream) -> Option<std::time::Duration> {
    let info = tcp_info(stream)?;
    Some(std::time::Duration::from_millis(u64::from(
        info.tcpi_last_data_recv,
    )))
}

fn tcp_info(stream: &TcpStream) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; zeroes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    let limited_end = std::mem::offset_of!(libc::tcp_info, tcpi_sndbuf_limited) + 8;
    (rc == 0 && (len as usize) >= limited_end).then_some(info)
}

/// None where the kernel does not report busy time (before Linux 4.10) or nothing was
/// in flight yet.
fn counters(stream: &TcpStream) -> Option<Counters> {
    let info = tcp_info(stream)?;
    if info.tcpi_busy_time == 0 {
        return None;
    }
    Some(Counters {
        bytes_acked: info.tcpi_bytes_acked,
        busy_us: info.tcpi_busy_time,
        rwnd_limited_us: info.tcpi_rwnd_limited,
        sndbuf_limited_us: info.tcpi_sndbuf_limited,
        rtt_us: info.tcpi_rtt,
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    #[test]
    fn a_busy_connection_reports_what_it_delivered() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0usize;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        });
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let mut meter = super::Meter::default();
        assert_eq!(meter.read(&s), None, "nothing sent yet");
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..64 {
            s.write_all(&chunk).unwrap();
        }
        let m = meter
            .read(&s)
            .expect("the kernel reports TCP_INFO busy time");
        if let Some(rate) = m.delivery_rate {
            assert!(rate > 1e6, "{m:?} over loopback");
        }
        assert!(m.rtt_ms > 0.0 && m.rtt_ms < 1000.0, "{m:?} over loopback");
        drop(s);
        assert_eq!(reader.join().unwrap(), 64 << 20);
    }

    #[test]
    fn a_window_forgets_a_phase_that_ended() {
        use super::Counters;
        // A peer that held the stream back for a whole second, then a phase at the
        // link's rate: the window speaks for the second phase alone.
        let slow = Counters {
            bytes_acked: 40_000_000,
            busy_us: 1_000_000,
            rwnd_limited_us: 900_000,
            sndbuf_limited_us: 0,
            rtt_us: 100,
        };
        assert!(slow.measured().unwrap().peer_limited);
        assert_eq!(slow.measured().unwrap().delivery_rate, None);
        let later = Counters {
            bytes_acked: 40_000_000 + 100_000_000,
            busy_us: 1_000_000 + 500_000,
            rwnd_limited_us: 900_000 + 10_000,
            ..slow
        };
        assert!(
            later.measured().unwrap().peer_limited,
            "cumulative: still held back"
        );
        let window = later.since(&slow).measured().unwrap();
        assert!(!window.peer_limited);
        assert_eq!(window.delivery_rate, Some(200e6));
    }
}
