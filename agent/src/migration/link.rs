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

use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// What the kernel measured on a connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Bytes the peer acknowledged over the seconds data was in flight, since the
    /// connection opened; None until that was long enough to tell, or while the peer
    /// (not the link) was most of the limit.
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

/// None where the kernel does not report busy time (before Linux 4.10) or nothing was
/// in flight yet.
pub fn measure(stream: &TcpStream) -> Option<Measured> {
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
    if rc != 0 || (len as usize) < limited_end || info.tcpi_busy_time == 0 {
        return None;
    }
    let busy = info.tcpi_busy_time;
    let held_back = info
        .tcpi_rwnd_limited
        .saturating_add(info.tcpi_sndbuf_limited);
    Some(Measured {
        delivery_rate: (busy >= LINK_EVIDENCE_US && held_back <= busy / 2)
            .then(|| info.tcpi_bytes_acked as f64 / (busy as f64 / 1e6)),
        rtt_ms: f64::from(info.tcpi_rtt) / 1e3,
        peer_limited: busy >= LINK_EVIDENCE_US && info.tcpi_rwnd_limited > busy / 2,
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
        assert_eq!(super::measure(&s), None, "nothing sent yet");
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..64 {
            s.write_all(&chunk).unwrap();
        }
        let m = super::measure(&s).expect("the kernel reports TCP_INFO busy time");
        if let Some(rate) = m.delivery_rate {
            assert!(rate > 1e6, "{m:?} over loopback");
        }
        assert!(m.rtt_ms > 0.0 && m.rtt_ms < 1000.0, "{m:?} over loopback");
        drop(s);
        assert_eq!(reader.join().unwrap(), 64 << 20);
    }
}
