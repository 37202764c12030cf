//! The migration stream's sending side, shared: the migration thread writes pages and
//! control frames through it, and with an active disk mirror the guest's vCPU threads
//! write their disk writes through it too, each frame whole and in order.

use crate::migration::secure::Conn;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Frames from this size on are sealed in place rather than buffered.
const SEAL_IN_PLACE_FROM: usize = 256 << 10;

/// A buffered writer on the connection, behind a lock. Every `write` call writes all
/// of what it is given under the lock, so a frame written in one call is never split
/// by another writer's frame.
#[derive(Debug, Clone)]
pub struct Wire {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    w: Mutex<BufWriter<Conn>>,
    /// The same socket, for its options and counters (no lock needed to read them).
    sock: Conn,
    /// Bytes written by writers other than the migration thread, not yet counted by it.
    others: AtomicU64,
}

impl Wire {
    pub fn new(conn: Conn) -> std::io::Result<Self> {
        let sock = conn.try_clone()?;
        Ok(Self {
            shared: Arc::new(Shared {
                w: Mutex::new(BufWriter::with_capacity(1 << 20, conn)),
                sock,
                others: AtomicU64::new(0),
            }),
        })
    }

    pub fn get_ref(&self) -> &Conn {
        &self.shared.sock
    }

    fn lock(&self) -> MutexGuard<'_, BufWriter<Conn>> {
        // A writer that panicked mid-frame would have left the stream torn; the
        // receiver's checks then abort the migration, which is what must happen.
        self.shared.w.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes whole frames on behalf of another thread and sends them on at once: the
    /// caller waits until the connection has taken them (which paces it to the link).
    pub fn send_now(&self, frames: &[u8]) -> std::io::Result<()> {
        let mut w = self.lock();
        w.write_all(frames)?;
        w.flush()?;
        self.shared
            .others
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes whole frames the caller gives up (see [`Conn::write_sealing`]): over TLS
    /// large ones are sealed where they lie, not copied first. Small ones are buffered
    /// as any write is: in the pause the last pages, the device state and `Complete`
    /// then leave in one write, and the destination wakes once for them.
    pub fn write_sealing(&self, frames: &mut [u8]) -> std::io::Result<()> {
        let mut w = self.lock();
        if frames.len() < SEAL_IN_PLACE_FROM {
            return w.write_all(frames);
        }
        // What is buffered goes first: frames keep their order.
        w.flush()?;
        w.get_ref().write_sealing(frames)
    }

    /// Bytes other threads sent since the last call.
    pub fn take_others(&self) -> u64 {
        self.shared.others.swap(0, Ordering::Relaxed)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lock().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.lock().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn frames_from_two_threads_arrive_whole() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut all = Vec::new();
            c.read_to_end(&mut all).unwrap();
            all
        });
        let mut wire = Wire::new(Conn::plain(std::net::TcpStream::connect(addr).unwrap())).unwrap();
        let other = wire.clone();
        // Frames larger than the buffer, so a split would show.
        let a = vec![b'a'; 3 << 20];
        let b = vec![b'b'; 3 << 20];
        let t = std::thread::spawn(move || {
            for _ in 0..4 {
                other.send_now(&b).unwrap();
            }
        });
        for _ in 0..4 {
            wire.write_all(&a).unwrap();
        }
        t.join().unwrap();
        wire.flush().unwrap();
        assert_eq!(wire.take_others(), 4 * (3 << 20));
        drop(wire);
        let all = reader.join().unwrap();
        assert_eq!(all.len(), 8 * (3 << 20));
        for frame in all.chunks(3 << 20) {
            assert!(frame.iter().all(|&c| c == frame[0]), "a frame was split");
        }
    }
}
