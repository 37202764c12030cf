//! Reaching the destination: resolving and dialing it, the handshake, and the
//! connection's send and receive paths the rest of the source uses.

use super::*;
use crate::migration::secure::DialError;

/// A name for one migration, unique enough to tell two apart on one destination.
pub(super) fn migration_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: fills the 8-byte buffer it is given.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n == 8 {
        u64::from_le_bytes(b)
    } else {
        crate::clock::monotonic_ns() ^ u64::from(std::process::id()) << 32
    }
}

/// Resolves a HOST:PORT.
pub(in crate::migration) fn address(to: &str) -> Result<std::net::SocketAddr, MigrateError> {
    to.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| MigrateError::Resolve(to.to_owned()))
}

/// Resolves `to`, connects to it and (over TLS) checks who answers: done before a
/// migration is said to start, so a destination that cannot be reached or proved is
/// an answer, not a report later.
pub fn dial(transport: &Transport, to: &str, within: Duration) -> Result<Conn, MigrateError> {
    let addr = address(to)?;
    transport.dial(addr, to, within).map_err(|e| match e {
        DialError::Connect(source) => MigrateError::Connect {
            to: to.to_owned(),
            source,
        },
        DialError::Handshake(h) => MigrateError::Handshake(h),
    })
}

pub(super) fn connect<'a>(
    vm: &'a Migratable,
    params: &'a Params,
    t0: Instant,
    conn: Conn,
) -> Result<Sender<'a>, MigrateError> {
    let m = vm.movable();
    let _ = conn.set_nodelay(true);
    // A dead or silent peer shows as a read or write that times out.
    conn.set_read_timeout(Some(params.timeout))
        .map_err(ProtocolError::from)?;
    conn.set_write_timeout(Some(params.timeout))
        .map_err(ProtocolError::from)?;
    let conn_proof = conn.ticket_proof(&params.ticket);
    let r = conn.try_clone().map_err(ProtocolError::from)?;
    let watchdog = crate::migration::watchdog::Watchdog::start(
        conn.tcp().try_clone().map_err(ProtocolError::from)?,
    );
    let mut tx = Sender {
        vm,
        m,
        params,
        w: Wire::new(conn).map_err(ProtocolError::from)?,
        r,
        stats: new_stats(t0),
        compressor: Compressor::new(),
        bufs: Buffers::default(),
        bucket: Bucket {
            tokens: 0.0,
            last: Instant::now(),
        },
        settings: params.settings,
        last_publish: Instant::now(),
        watchdog,
        session: protocol::Session {
            id: migration_id(),
            secret: 0,
        },
        round_pages: Vec::new(),
        sent_upto: 0,
        copy_mark: None,
        dst_prepared: false,
        meter: Default::default(),
    };
    // As it runs now: its disks where they are (a storage migration may have moved
    // them).
    let mut cfg = m.config();
    tx.send(&Message::Hello(Hello {
        version: protocol::VERSION,
        name: cfg.name.clone(),
        memory_bytes: m.memory_bytes(),
        vcpus: cfg.vcpus,
        page_size: PAGE as u32,
        timeout_ms: params.timeout.as_millis().min(u128::from(u32::MAX)) as u32,
        id: tx.session.id,
        recover_ms: params.recover.as_millis().min(u128::from(u32::MAX)) as u32,
        ticket: if params.ticket.is_empty() {
            String::new()
        } else {
            conn_proof
        },
        traceparent: params.traceparent.clone(),
    }))?;
    tx.w.flush().map_err(ProtocolError::from)?;
    match protocol::recv(&mut tx.r, None)? {
        Message::HelloAck { version, secret } if version == protocol::VERSION => {
            tx.session.secret = secret;
            *lock(&vm.session) = Some(tx.session);
        }
        Message::HelloAck { version, .. } => {
            return Err(ProtocolError::Version {
                ours: protocol::VERSION,
                theirs: version,
            }
            .into());
        }
        Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
        _ => return Err(MigrateError::Unexpected("something other than HelloAck")),
    }
    // Disks travel as names: where they live there is the destination's to say.
    for d in &mut cfg.disks {
        d.path = d.path.file_name().map(PathBuf::from).unwrap_or_default();
    }
    tx.send(&Message::Config {
        toml: cfg.to_toml(),
    })?;
    Ok(tx)
}

impl Sender<'_> {
    /// The destination's next message; `Prepared` (which may come any time before the
    /// handover) is noted on the way.
    pub(in crate::migration) fn recv(&mut self) -> Result<Message, ProtocolError> {
        loop {
            match protocol::recv(&mut self.r, None)? {
                Message::Prepared => self.dst_prepared = true,
                Message::Keepalive => {}
                Message::DiskSynced { us } => {
                    self.stats.dst_disk_sync = Some(Duration::from_micros(u64::from(us)))
                }
                other => return Ok(other),
            }
        }
    }

    /// Ends the stream so that the destination reads the Abort: closing a socket
    /// with unread input (say, an unread `Prepared`) resets the connection, and a
    /// reset can overtake the Abort. So: end our side, then read until the
    /// destination closes (briefly).
    pub(super) fn close_after_abort(&mut self) {
        let _ = self.w.get_ref().shutdown(std::net::Shutdown::Write);
        let _ = self.r.set_read_timeout(Some(Duration::from_millis(500)));
        let mut sink = [0u8; 64 << 10];
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match std::io::Read::read(&mut self.r, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Waits until the destination has built the VM, so the pause that follows is
    /// not spent waiting for it.
    pub(in crate::migration) fn wait_prepared(&mut self) -> Result<(), MigrateError> {
        // The config may still sit in the send buffer.
        self.w.flush().map_err(ProtocolError::from)?;
        while !self.dst_prepared {
            match protocol::recv(&mut self.r, None)? {
                Message::Prepared => self.dst_prepared = true,
                Message::Keepalive => {}
                Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
                _ => return Err(MigrateError::Unexpected("something other than Prepared")),
            }
        }
        Ok(())
    }

    pub(in crate::migration) fn send(&mut self, msg: &Message) -> Result<(), MigrateError> {
        let mut frame = Vec::new();
        protocol::send(&mut frame, msg)?;
        self.write_wire(&frame)
    }

    /// Every byte of the stream goes through here: the bandwidth cap and the counters.
    pub(in crate::migration) fn write_wire(&mut self, frames: &[u8]) -> Result<(), MigrateError> {
        self.write_counted(frames.len(), |w| w.write_all(frames))
    }

    /// As [`Self::write_wire`], for frames the caller gives up: over TLS they are
    /// sealed where they lie (a page batch's megabyte is not copied to be sealed).
    pub(in crate::migration) fn write_wire_owned(
        &mut self,
        frames: &mut [u8],
    ) -> Result<(), MigrateError> {
        self.write_counted(frames.len(), |w| w.write_sealing(frames))
    }

    fn write_counted(
        &mut self,
        len: usize,
        write: impl FnOnce(&mut Wire) -> std::io::Result<()>,
    ) -> Result<(), MigrateError> {
        // Time spent waiting for the cap counts: the measured bandwidth is what the
        // stream achieves, which is what predictions need.
        let t = Instant::now();
        self.bucket.take(self.settings.bandwidth_bytes_per_sec, len);
        write(&mut self.w).map_err(ProtocolError::from)?;
        self.stats.send_time += t.elapsed();
        // With the guest's disk writes mirrored, its vCPUs write on the stream too.
        self.stats.bytes_on_wire += len as u64 + self.w.take_others();
        Ok(())
    }

    /// A stream that broke while sending often broke because the destination refused
    /// something and said why: prefer its reason to "broken pipe".
    pub(super) fn peer_reason(&mut self, e: MigrateError) -> MigrateError {
        if !matches!(e, MigrateError::Protocol(ProtocolError::Io(_))) {
            return e;
        }
        let _ = self.r.set_read_timeout(Some(Duration::from_millis(500)));
        loop {
            match self.recv() {
                Ok(Message::Abort { reason }) => return MigrateError::Refused(reason),
                Ok(_) => continue,
                // The destination's TLS found a record it could not authenticate and
                // said so with an alert.
                Err(ProtocolError::Io(io)) => {
                    return match crate::migration::secure::tls_error(&io) {
                        Some(tls) => MigrateError::Tls(tls.to_string()),
                        None => gone(e),
                    };
                }
                Err(_) => return gone(e),
            }
        }
    }

    /// Ends a round and waits until the destination has taken all of it in; the round's
    /// wall time then measures the whole pipeline.
    pub(super) fn end_round(&mut self, round: u32, started: Instant) -> Result<(), MigrateError> {
        self.send(&Message::RoundEnd { round })?;
        self.w.flush().map_err(ProtocolError::from)?;
        match self.recv()? {
            Message::RoundAck { round: r } if r == round => {}
            Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
            _ => return Err(MigrateError::Unexpected("something other than RoundAck")),
        }
        self.stats.wall_send_time += started.elapsed();
        self.stats.acked_bytes = self.stats.bytes_on_wire;
        Ok(())
    }

    /// The stream's round trip with nothing queued: right after a round's
    /// acknowledgement, the least of a few pings.
    pub(super) fn measure_idle_rtt(&mut self) -> Result<(), MigrateError> {
        const PINGS: u32 = 3;
        for seq in 0..PINGS {
            let t = Instant::now();
            self.send(&Message::Ping { seq })?;
            self.w.flush().map_err(ProtocolError::from)?;
            match self.recv()? {
                Message::Pong { seq: s } if s == seq => {}
                Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
                _ => return Err(MigrateError::Unexpected("something other than Pong")),
            }
            let rtt = t.elapsed();
            self.stats.idle_rtt = Some(self.stats.idle_rtt.map_or(rtt, |r| r.min(rtt)));
        }
        Ok(())
    }
}

/// A connection the destination reset or closed without an Abort, said as such (an
/// operator reads "broken pipe" as a bug of Ferry's, not as a stopped peer).
fn gone(e: MigrateError) -> MigrateError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e {
        MigrateError::Protocol(ProtocolError::Io(io))
            if matches!(
                io.kind(),
                BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
            ) =>
        {
            MigrateError::Gone(io)
        }
        other => other,
    }
}
