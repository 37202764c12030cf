//! The migration stream's connections: TLS 1.3 with both ends authenticated by
//! default, plain TCP only when the operator said `--insecure`.
//!
//! A [`Conn`] is used the way a `TcpStream` is: cloned handles, one reading while
//! others write (the migration thread, the vCPUs mirroring disk writes, the
//! keepalive), shut down from a watchdog, its kernel counters read for the link's
//! rate.
//!
//! rustls shakes hands (its unbuffered API) and then hands the traffic keys over;
//! records are sealed and opened by [`super::tls_record`], in place, in the buffers
//! that go to and come from the socket. The two directions share no lock: readers
//! take turns on the receiving key and buffer, writers on the sending ones, and
//! neither holds its lock for longer than one socket call's worth of records.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, UnbufferedConnectionCommon, UnbufferedStatus,
};
use rustls::{AlertDescription, ExtractedSecrets};
use rustls_pki_types::ServerName;

use super::protocol::Integrity;
use super::tls_record::{self as record, Key};
use crate::pki::MigrationTls;
use crate::sync::lock;

/// Bytes of records sealed before they go to the socket in one write (sixteen
/// records: small enough to stay in cache between sealing and sending).
const SEAL_CHUNK: usize = 16 * record::MAX_PLAINTEXT;
/// The receive buffer: many records per read from the socket.
const READ_BUF: usize = 256 << 10;
/// The label a ticket's proof is bound to the session with.
const TICKET_LABEL: &[u8] = b"ferry migration ticket";
/// A KeyUpdate handshake message that does not ask the peer to update its own.
const KEY_UPDATE: [u8; 5] = [24, 0, 0, 1, 0];

/// How this process speaks on the migration stream.
#[derive(Debug, Clone)]
pub enum Transport {
    Tls(Arc<MigrationTls>),
    /// Plain TCP: the operator said `--insecure`.
    Insecure,
}

impl Transport {
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Connects to `addr` (which `to` names) within `within`, and shakes hands over
    /// TLS unless insecure: nothing of the migration is sent before the destination
    /// has proved who it is.
    pub fn dial(&self, addr: SocketAddr, to: &str, within: Duration) -> Result<Conn, DialError> {
        let tcp = TcpStream::connect_timeout(&addr, within).map_err(DialError::Connect)?;
        let _ = tcp.set_nodelay(true);
        match self {
            Transport::Insecure => Ok(Conn::plain(tcp)),
            Transport::Tls(tls) => Ok(Conn::client(tcp, tls, to, within)?),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Connect(io::Error),
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the TLS handshake with {peer} failed: {why}")]
    Failed { peer: String, why: String },
    #[error("{0:?} is not a name or address a certificate can be checked against")]
    Name(String),
    #[error("the TLS handshake: {0}")]
    Io(#[from] io::Error),
}

/// One connection of the migration stream; clones share it.
#[derive(Clone)]
pub struct Conn {
    tcp: Arc<TcpStream>,
    tls: Option<Arc<Tls>>,
}

struct Tls {
    /// rustls after the handshake: it derives each direction's next key.
    keys: Mutex<Keys>,
    /// Readers take turns here.
    rx: Mutex<Rx>,
    /// Writers take turns here, so records reach the socket in the order they were
    /// sealed.
    tx: Mutex<Tx>,
    /// The peer asked for a key update of ours; the next write makes it.
    update_tx: AtomicBool,
    /// A key only this session's two ends hold, for binding tickets to it.
    binder: ring::hmac::Key,
}

enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    fn next_tx(&mut self) -> Result<Key, rustls::Error> {
        let (seq, secrets) = match self {
            Keys::Client(k) => k.update_tx_secret()?,
            Keys::Server(k) => k.update_tx_secret()?,
        };
        Key::new(seq, &secrets)
    }

    fn next_rx(&mut self) -> Result<Key, rustls::Error> {
        let (seq, secrets) = match self {
            Keys::Client(k) => k.update_rx_secret()?,
            Keys::Server(k) => k.update_rx_secret()?,
        };
        Key::new(seq, &secrets)
    }

    /// Records one key may seal before it must be replaced: half the suite's
    /// confidentiality limit (AES-GCM's is 2^23 or 2^24 records, 128 GiB or more).
    fn rekey_after(&self) -> u64 {
        let suite = match self {
            Keys::Client(k) => k.negotiated_cipher_suite(),
            Keys::Server(k) => k.negotiated_cipher_suite(),
        };
        suite
            .tls13()
            .map_or(1 << 23, |s| s.common.confidentiality_limit)
            / 2
    }
}

struct Tx {
    key: Key,
    rekey_after: u64,
    /// The sealed records of one socket write.
    buf: Vec<u8>,
    /// Records sealed where their data lies: each one's header and tail.
    heads: Vec<[u8; record::HEADER]>,
    tails: Vec<[u8; 1 + record::TAG]>,
}

/// A piece of one vectored socket write of records sealed in place.
enum Part {
    /// Bytes in `Tx::buf` (a KeyUpdate, or a record sealed by copy).
    Sealed(Range<usize>),
    /// Record `i` of `Tx::heads` and `Tx::tails`, its body this range of the data.
    InPlace(usize, Range<usize>),
}

struct Rx {
    key: Key,
    /// What the socket gave: records, opened in place once whole.
    buf: Box<[u8]>,
    /// The unopened bytes in `buf`.
    start: usize,
    end: usize,
    /// An opened record's plaintext in `buf` not yet taken.
    plain: Range<usize>,
    /// The peer said close_notify: what it sent has all been read.
    closed: bool,
    /// The first record that failed: every later read fails the same way (the
    /// records after it cannot be opened in sequence anyway).
    failed: Option<rustls::Error>,
}

impl Rx {
    /// A whole record waits in the buffer (its header may be bad: opening says so).
    fn whole_record(&self) -> bool {
        let have = &self.buf[self.start..self.end];
        have.first_chunk::<{ record::HEADER }>().is_some_and(|h| {
            record::body_len(h).map_or(true, |len| have.len() >= record::HEADER + len)
        })
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The TLS error behind a failed read, if that is what failed it (a record that did
/// not authenticate, an alert from the peer).
pub fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

impl Conn {
    /// A plain TCP connection (`--insecure`).
    pub fn plain(tcp: TcpStream) -> Self {
        Self {
            tcp: Arc::new(tcp),
            tls: None,
        }
    }

    /// Shakes hands as the source, `to` being what the operator named the
    /// destination by (its certificate must name that host or address), within
    /// `within`.
    pub fn client(
        tcp: TcpStream,
        tls: &MigrationTls,
        to: &str,
        within: Duration,
    ) -> Result<Self, HandshakeError> {
        let name = server_name(to)?;
        let mut state = UnbufferedClientConnection::new(tls.client.clone(), name)
            .map_err(|e| failed(&tcp, e.to_string()))?;
        let deadline = Instant::now() + within;
        let mut hs = Handshake::new(tcp, within);
        hs.drive(
            &mut state,
            UnbufferedConnectionCommon::<ClientConnectionData>::process_tls_records,
        )?;
        let conn = match state.dangerous_into_kernel_connection() {
            Ok((secrets, kernel)) => hs.finish(secrets, Keys::Client(kernel))?,
            Err(e) => return Err(hs.failed(e.to_string())),
        };
        // TLS 1.3 lets a client finish its handshake before the server has judged its
        // certificate: the destination's first byte says it did and let us in, so
        // that a refusal is this call's answer, not a broken migration later.
        let left = deadline.saturating_duration_since(Instant::now());
        conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut word = [0u8; 1];
        let heard = (&conn).read_exact(&mut word);
        conn.set_read_timeout(None)?;
        match heard {
            Ok(()) if word[0] == ACCEPTED => Ok(conn),
            Ok(()) => Err(failed_at(
                &conn,
                "the destination answered something else".into(),
            )),
            Err(e) => Err(failed_at(
                &conn,
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        format!("no word from the destination within {} s", within.as_secs())
                    }
                    io::ErrorKind::UnexpectedEof => "the destination closed the connection".into(),
                    _ => format!("the destination refused this host's certificate: {e}"),
                },
            )),
        }
    }

    /// Shakes hands as the destination: the source must present a certificate the
    /// CA signed.
    pub fn server(
        tcp: TcpStream,
        tls: &MigrationTls,
        within: Duration,
    ) -> Result<Self, HandshakeError> {
        let mut state = UnbufferedServerConnection::new(tls.server.clone())
            .map_err(|e| failed(&tcp, e.to_string()))?;
        let mut hs = Handshake::new(tcp, within);
        hs.drive(
            &mut state,
            UnbufferedConnectionCommon::<ServerConnectionData>::process_tls_records,
        )?;
        let conn = match state.dangerous_into_kernel_connection() {
            Ok((secrets, kernel)) => hs.finish(secrets, Keys::Server(kernel))?,
            Err(e) => return Err(hs.failed(e.to_string())),
        };
        conn.set_write_timeout(Some(within))?;
        (&conn).write_all(&[ACCEPTED])?;
        conn.set_write_timeout(None)?;
        Ok(conn)
    }

    /// A buffered reader on this connection, of `capacity` bytes over plain TCP. Over
    /// TLS the connection holds what it read and opened already: a second buffer
    /// would only copy every byte once more.
    pub fn reader(self, capacity: usize) -> std::io::BufReader<Conn> {
        let capacity = if self.tls.is_some() { 0 } else { capacity };
        std::io::BufReader::with_capacity(capacity, self)
    }

    /// What guards a frame's bytes in flight on this connection.
    pub fn integrity(&self) -> Integrity {
        if self.tls.is_some() {
            Integrity::Transport
        } else {
            Integrity::Checksum
        }
    }

    /// The socket under the stream: its options and kernel counters.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Bytes of the stream already read from the socket and not yet taken: a poll
    /// on the socket would not see them.
    pub fn buffered(&self) -> bool {
        let Some(tls) = &self.tls else { return false };
        // A reader holds `rx`: whatever it has is its to deliver.
        let Ok(rx) = tls.rx.try_lock() else {
            return false;
        };
        // A torn record is not: the rest of it is what a poll would wait for.
        !rx.plain.is_empty() || rx.whole_record()
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(self.clone())
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nodelay(on)
    }

    /// Ends one or both directions. Ending ours over TLS first says so in the
    /// stream (close_notify), so the peer can tell an end from a cut.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if let (Some(tls), Shutdown::Write | Shutdown::Both) = (&self.tls, how) {
            // Never wait for a writer stuck on a full socket: that is what a
            // watchdog shuts a connection down to end.
            if let Ok(mut tx) = tls.tx.try_lock() {
                self.alert(&mut tx, 1, AlertDescription::CloseNotify);
            }
        }
        self.tcp.shutdown(how)
    }

    /// Replaces the sending key every `records` records from now on (tests: key
    /// updates otherwise come after billions of bytes).
    #[cfg(test)]
    fn rekey_every(&self, records: u64) {
        if let Some(tls) = &self.tls {
            lock(&tls.tx).rekey_after = records;
        }
    }

    /// What proves this side knows `ticket`, bound to this connection: over TLS,
    /// keying material exported from the session with the ticket as its context (a
    /// proof seen on the wire, which it is not, would be useless on any other
    /// connection, and the ticket itself never crosses it); over plain TCP, the
    /// ticket.
    pub fn ticket_proof(&self, ticket: &str) -> String {
        let Some(tls) = &self.tls else {
            return ticket.to_owned();
        };
        let out = ring::hmac::sign(&tls.binder, ticket.as_bytes());
        out.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One step of rustls's unbuffered handshake, client's or server's.
type Step<D> = for<'c, 'i> fn(
    &'c mut UnbufferedConnectionCommon<D>,
    &'i mut [u8],
) -> UnbufferedStatus<'c, 'i, D>;

/// A handshake under way: its socket, what was read from it, the time left.
struct Handshake {
    tcp: TcpStream,
    within: Duration,
    deadline: Instant,
    /// Named now: a peer that resets the connection has no address after.
    peer: String,
    incoming: Vec<u8>,
    used: usize,
    outgoing: Vec<u8>,
}

/// Most a peer may send during the handshake (its certificate chain, mostly).
const MAX_HANDSHAKE: usize = 1 << 20;

enum Next {
    More,
    Send,
    Receive,
    Done,
    Failed(rustls::Error),
}

fn encode<D>(data: &mut EncodeTlsData<'_, D>, out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + 4096, 0);
    loop {
        match data.encode(&mut out[at..]) {
            Ok(n) => return out.truncate(at + n),
            Err(EncodeError::InsufficientSize(e)) => out.resize(at + e.required_size, 0),
            Err(_) => return out.truncate(at),
        }
    }
}

impl Handshake {
    fn new(tcp: TcpStream, within: Duration) -> Self {
        let peer = tcp
            .peer_addr()
            .map_or_else(|_| "the peer".into(), |a| a.to_string());
        Self {
            tcp,
            within,
            deadline: Instant::now() + within,
            peer,
            incoming: vec![0; 16 << 10],
            used: 0,
            outgoing: Vec::new(),
        }
    }

    fn failed(&self, why: String) -> HandshakeError {
        HandshakeError::Failed {
            peer: self.peer.clone(),
            why,
        }
    }

    fn io_failed(&self, e: io::Error) -> HandshakeError {
        self.failed(match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("not done within {} s", self.within.as_secs())
            }
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                "the peer closed the connection (it may not speak TLS: started with \
                 --insecure?)"
                    .into()
            }
            _ => e.to_string(),
        })
    }

    fn left(&self) -> Result<Duration, HandshakeError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.io_failed(io::ErrorKind::TimedOut.into()));
        }
        Ok(left)
    }

    fn send(&mut self) -> Result<(), HandshakeError> {
        self.tcp.set_write_timeout(Some(self.left()?))?;
        let sent = self.tcp.write_all(&self.outgoing);
        self.outgoing.clear();
        sent.map_err(|e| self.io_failed(e))
    }

    fn receive(&mut self) -> Result<(), HandshakeError> {
        self.tcp.set_read_timeout(Some(self.left()?))?;
        if self.used == self.incoming.len() {
            if self.used >= MAX_HANDSHAKE {
                return Err(self.failed("the peer's handshake is too large".into()));
            }
            self.incoming.resize(self.used * 2, 0);
        }
        match self.tcp.read(&mut self.incoming[self.used..]) {
            Ok(0) => Err(self.io_failed(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => {
                self.used += n;
                Ok(())
            }
            Err(e) => Err(self.io_failed(e)),
        }
    }

    /// Runs the handshake until both ends are authenticated and the keys are set.
    fn drive<D>(
        &mut self,
        conn: &mut UnbufferedConnectionCommon<D>,
        step: Step<D>,
    ) -> Result<(), HandshakeError> {
        loop {
            let status = step(conn, &mut self.incoming[..self.used]);
            let discard = status.discard;
            let next = match status.state {
                Err(e) => Next::Failed(e),
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut data, &mut self.outgoing);
                    Next::More
                }
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    Next::Send
                }
                Ok(ConnectionState::BlockedHandshake) => Next::Receive,
                Ok(ConnectionState::WriteTraffic(_)) => Next::Done,
                Ok(_) => Next::Failed(rustls::Error::General(
                    "the peer sent data before the handshake was over".into(),
                )),
            };
            self.incoming.copy_within(discard..self.used, 0);
            self.used -= discard;
            match next {
                Next::More => {}
                Next::Send => self.send()?,
                Next::Receive => self.receive()?,
                // A server may send once its own Finished is out, before the client's
                // certificate has been checked: not done yet.
                Next::Done if conn.is_handshaking() => self.receive()?,
                Next::Done => return Ok(()),
                Next::Failed(e) => {
                    self.alert(conn, step);
                    return Err(self.failed(e.to_string()));
                }
            }
        }
    }

    /// Sends the alert rustls queued on failing, so the peer can say why too.
    fn alert<D>(&mut self, conn: &mut UnbufferedConnectionCommon<D>, step: Step<D>) {
        self.outgoing.clear();
        for _ in 0..4 {
            // The same buffer as before: rustls's handshake state points into it.
            let status = step(conn, &mut self.incoming[..self.used]);
            let discard = status.discard;
            let more = match status.state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut data, &mut self.outgoing);
                    true
                }
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    false
                }
                _ => false,
            };
            self.incoming.copy_within(discard..self.used, 0);
            self.used -= discard;
            if !more {
                break;
            }
        }
        let _ = self.tcp.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = self.tcp.write_all(&self.outgoing);
    }

    /// The stream, from the keys rustls handed over.
    fn finish(self, secrets: ExtractedSecrets, keys: Keys) -> Result<Conn, HandshakeError> {
        let bad = |e: rustls::Error| self.failed(e.to_string());
        let ((tx_seq, tx), (rx_seq, rx)) = (secrets.tx, secrets.rx);
        // Both ends bind tickets with the same key: the client's direction first.
        let (first, second) = match keys {
            Keys::Client(_) => (&tx, &rx),
            Keys::Server(_) => (&rx, &tx),
        };
        let material = [
            record::material(first).map_err(bad)?,
            record::material(second).map_err(bad)?,
        ]
        .concat();
        let extract = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, TICKET_LABEL);
        let binder = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            ring::hmac::sign(&extract, &material).as_ref(),
        );
        // What came after the handshake's last record is the stream's first.
        let mut buf = vec![0u8; READ_BUF.max(self.used)].into_boxed_slice();
        buf[..self.used].copy_from_slice(&self.incoming[..self.used]);
        let rx = Rx {
            key: Key::new(rx_seq, &rx).map_err(bad)?,
            buf,
            start: 0,
            end: self.used,
            plain: 0..0,
            closed: false,
            failed: None,
        };
        let tx = Tx {
            key: Key::new(tx_seq, &tx).map_err(bad)?,
            rekey_after: keys.rekey_after(),
            buf: Vec::with_capacity(
                SEAL_CHUNK + SEAL_CHUNK / record::MAX_PLAINTEXT * record::OVERHEAD,
            ),
            heads: Vec::new(),
            tails: Vec::new(),
        };
        self.tcp.set_read_timeout(None)?;
        self.tcp.set_write_timeout(None)?;
        Ok(Conn {
            tcp: Arc::new(self.tcp),
            tls: Some(Arc::new(Tls {
                keys: Mutex::new(keys),
                rx: Mutex::new(rx),
                tx: Mutex::new(tx),
                update_tx: AtomicBool::new(false),
                binder,
            })),
        })
    }
}

fn failed_at(conn: &Conn, why: String) -> HandshakeError {
    failed(&conn.tcp, why)
}

fn failed(tcp: &TcpStream, why: String) -> HandshakeError {
    HandshakeError::Failed {
        peer: tcp
            .peer_addr()
            .map_or_else(|_| "the peer".into(), |a| a.to_string()),
        why,
    }
}

/// The name a destination's certificate must carry: the host part of HOST:PORT (an
/// address or a DNS name).
pub fn server_name(to: &str) -> Result<ServerName<'static>, HandshakeError> {
    let host = match to.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => to,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_owned()).map_err(|_| HandshakeError::Name(to.to_owned()))
}

impl Conn {
    /// Seals an alert and sends it at once, never waiting long on a full socket (the
    /// peer may have stopped reading).
    fn alert(&self, tx: &mut Tx, level: u8, what: AlertDescription) {
        tx.buf.clear();
        if tx
            .key
            .seal(record::ALERT, &[level, u8::from(what)], &mut tx.buf)
            .is_ok()
        {
            // Other handles write on this socket too: their timeout comes back after.
            let before = self.tcp.write_timeout().ok().flatten();
            let _ = self.tcp.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = (&*self.tcp).write_all(&tx.buf);
            let _ = self.tcp.set_write_timeout(before);
        }
    }

    /// A record that did not authenticate (or any TLS error reading): tell the peer
    /// with an alert, so its side can say why too.
    fn fail(&self, tls: &Tls, e: rustls::Error) -> io::Error {
        let what = match e {
            // The peer's own alert ended it: no answer.
            rustls::Error::AlertReceived(_) => None,
            rustls::Error::DecryptError => Some(AlertDescription::BadRecordMac),
            rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooLarge) => {
                Some(AlertDescription::RecordOverflow)
            }
            rustls::Error::InvalidMessage(_) => Some(AlertDescription::DecodeError),
            _ => Some(AlertDescription::UnexpectedMessage),
        };
        if let Some(what) = what
            && let Ok(mut tx) = tls.tx.try_lock()
        {
            self.alert(&mut tx, 2, what);
        }
        invalid(e)
    }

    /// Post-handshake messages in an opened record: key updates (ours are sent when a
    /// key has sealed its share of records; the peer's are followed). Ferry's peers
    /// send nothing else here: session tickets are off on both ends.
    fn post_handshake(
        &self,
        tls: &Tls,
        rx: &mut Rx,
        msgs: Range<usize>,
    ) -> Result<(), rustls::Error> {
        if msgs.is_empty() {
            return Err(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::MessageTooShort,
            ));
        }
        let mut at = msgs.start;
        while at < msgs.end {
            let m = &rx.buf[at..msgs.end];
            if m.len() < 4 {
                return Err(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::MessageTooShort,
                ));
            }
            let len = usize::from(m[1]) << 16 | usize::from(m[2]) << 8 | usize::from(m[3]);
            if m.len() < 4 + len {
                return Err(rustls::Error::General(
                    "a post-handshake message split across records".into(),
                ));
            }
            match (m[0], len, m.get(4)) {
                (24, 1, Some(&requested @ (0 | 1))) => {
                    // The old key's last record (RFC 8446 §5.1).
                    if at + 4 + len != msgs.end {
                        return Err(rustls::Error::General(
                            "a KeyUpdate that does not end its record".into(),
                        ));
                    }
                    rx.key = lock(&tls.keys).next_rx()?;
                    if requested == 1 {
                        tls.update_tx.store(true, Ordering::Release);
                    }
                }
                (kind, ..) => {
                    return Err(rustls::Error::General(format!(
                        "an unexpected post-handshake message (type {kind})"
                    )));
                }
            }
            at += 4 + len;
        }
        Ok(())
    }

    /// Opens the next whole record in `rx`, if there is one; false if more bytes must
    /// be read first.
    fn open_next(&self, tls: &Tls, rx: &mut Rx) -> Result<bool, rustls::Error> {
        let have = &rx.buf[rx.start..rx.end];
        let Some(header) = have.first_chunk::<{ record::HEADER }>().copied() else {
            return Ok(false);
        };
        let len = record::body_len(&header)?;
        if have.len() < record::HEADER + len {
            return Ok(false);
        }
        let body = rx.start + record::HEADER..rx.start + record::HEADER + len;
        rx.start = body.end;
        let (kind, n) = rx.key.open(header, &mut rx.buf[body.clone()])?;
        let content = body.start..body.start + n;
        match kind {
            record::APPLICATION_DATA => rx.plain = content,
            record::ALERT => match <[u8; 2]>::try_from(&rx.buf[content]) {
                Ok([_, 0u8]) => rx.closed = true,
                Ok([_, what]) => return Err(rustls::Error::AlertReceived(what.into())),
                Err(_) => {
                    return Err(rustls::Error::InvalidMessage(
                        rustls::InvalidMessage::MessageTooShort,
                    ));
                }
            },
            record::HANDSHAKE => self.post_handshake(tls, rx, content)?,
            _ => {
                return Err(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                ));
            }
        }
        Ok(true)
    }

    /// Sends `buf`, which the caller gives up: over TLS its records are sealed where
    /// the data lies (it is left as ciphertext), so the data is not copied to be
    /// sealed; over plain TCP it is written as it is.
    pub fn write_sealing(&self, buf: &mut [u8]) -> io::Result<()> {
        match &self.tls {
            None => (&*self.tcp).write_all(buf),
            Some(tls) => self.seal_in_place_and_send(tls, buf),
        }
    }

    /// Seals `buf` into records in place, a few at a time, and sends each group with
    /// one vectored write: every record's header, its body where it lies in `buf`,
    /// and its tail (the sealed content type and the tag). A record's content type
    /// is sealed right after its data, so each record borrows the first byte of the
    /// next and gives it back; the last record of `buf`, with no byte after it, is
    /// sealed by copy.
    fn seal_in_place_and_send(&self, tls: &Tls, buf: &mut [u8]) -> io::Result<()> {
        let mut tx = lock(&tls.tx);
        let tx = &mut *tx;
        let mut parts = Vec::with_capacity(2 * SEAL_CHUNK / record::MAX_PLAINTEXT);
        let mut start = 0;
        while start < buf.len() {
            let group_end = (start + SEAL_CHUNK).min(buf.len());
            tx.buf.clear();
            tx.heads.clear();
            tx.tails.clear();
            parts.clear();
            while start < group_end {
                let asked = tls.update_tx.swap(false, Ordering::AcqRel);
                if asked || tx.key.seq() >= tx.rekey_after {
                    let at = tx.buf.len();
                    tx.key
                        .seal(record::HANDSHAKE, &KEY_UPDATE, &mut tx.buf)
                        .map_err(invalid)?;
                    parts.push(Part::Sealed(at..tx.buf.len()));
                    tx.key = lock(&tls.keys).next_tx().map_err(invalid)?;
                }
                let end = (start + record::MAX_PLAINTEXT).min(group_end);
                if end < buf.len() {
                    let borrowed = buf[end];
                    let sealed = tx
                        .key
                        .seal_in_place(record::APPLICATION_DATA, &mut buf[start..=end]);
                    buf[end] = borrowed;
                    let (head, tail) = sealed.map_err(invalid)?;
                    parts.push(Part::InPlace(tx.heads.len(), start..end));
                    tx.heads.push(head);
                    tx.tails.push(tail);
                } else {
                    let at = tx.buf.len();
                    tx.key
                        .seal(record::APPLICATION_DATA, &buf[start..end], &mut tx.buf)
                        .map_err(invalid)?;
                    parts.push(Part::Sealed(at..tx.buf.len()));
                }
                start = end;
            }
            let mut slices = Vec::with_capacity(3 * parts.len());
            for p in &parts {
                match p {
                    Part::Sealed(r) => slices.push(io::IoSlice::new(&tx.buf[r.clone()])),
                    Part::InPlace(i, body) => {
                        slices.push(io::IoSlice::new(&tx.heads[*i]));
                        slices.push(io::IoSlice::new(&buf[body.clone()]));
                        slices.push(io::IoSlice::new(&tx.tails[*i]));
                    }
                }
            }
            write_all_vectored(&self.tcp, &mut slices)?;
        }
        Ok(())
    }

    /// Seals `buf` into records and sends them, a few at a time.
    fn seal_and_send(&self, tls: &Tls, buf: &[u8]) -> io::Result<()> {
        let mut tx = lock(&tls.tx);
        let tx = &mut *tx;
        for piece in buf.chunks(SEAL_CHUNK) {
            tx.buf.clear();
            for data in piece.chunks(record::MAX_PLAINTEXT) {
                let asked = tls.update_tx.swap(false, Ordering::AcqRel);
                if asked || tx.key.seq() >= tx.rekey_after {
                    // The update goes under the old key; what follows, under the new.
                    tx.key
                        .seal(record::HANDSHAKE, &KEY_UPDATE, &mut tx.buf)
                        .map_err(invalid)?;
                    tx.key = lock(&tls.keys).next_tx().map_err(invalid)?;
                }
                tx.key
                    .seal(record::APPLICATION_DATA, data, &mut tx.buf)
                    .map_err(invalid)?;
            }
            (&*self.tcp).write_all(&tx.buf)?;
        }
        Ok(())
    }
}

/// Writes `slices` whole, however the socket splits them.
fn write_all_vectored(tcp: &TcpStream, mut slices: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match (&*tcp).write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return (&*self.tcp).read(buf);
        };
        let mut rx = lock(&tls.rx);
        let rx = &mut *rx;
        loop {
            if !rx.plain.is_empty() {
                let n = buf.len().min(rx.plain.len());
                buf[..n].copy_from_slice(&rx.buf[rx.plain.start..rx.plain.start + n]);
                rx.plain.start += n;
                return Ok(n);
            }
            if rx.closed {
                return Ok(0);
            }
            if let Some(e) = &rx.failed {
                return Err(invalid(e.clone()));
            }
            match self.open_next(tls, rx) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    rx.failed = Some(e.clone());
                    return Err(self.fail(tls, e));
                }
            }
            // Room for a whole record after what is left of a torn one.
            if rx.start == rx.end {
                (rx.start, rx.end) = (0, 0);
            } else if rx.buf.len() - rx.end < record::HEADER + record::MAX_BODY {
                rx.buf.copy_within(rx.start..rx.end, 0);
                (rx.start, rx.end) = (0, rx.end - rx.start);
            }
            let n = (&*self.tcp).read(&mut rx.buf[rx.end..])?;
            if n == 0 {
                if rx.start < rx.end {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                // Cut between records without a close_notify: a frame in flight
                // shows torn to the framing above, which checks every length.
                return Ok(0);
            }
            rx.end += n;
        }
    }

    /// Over plain TCP one `readv` straight into every buffer (pages land in guest
    /// memory this way); over TLS what the next record holds, into the first.
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        if self.tls.is_none() {
            return (&*self.tcp).read_vectored(bufs);
        }
        match bufs.iter_mut().find(|b| !b.is_empty()) {
            Some(b) => self.read(b),
            None => Ok(0),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return (&*self.tcp).write(buf);
        };
        self.seal_and_send(tls, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The destination's first byte over TLS: the handshake is done and its certificate
/// checks let the source in.
const ACCEPTED: u8 = 1;

/// The first byte of a TLS handshake record.
pub const TLS_HANDSHAKE: u8 = 0x16;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    struct Pki {
        ca: rcgen::CertifiedKey,
    }

    fn ca(name: &str) -> rcgen::CertifiedKey {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        rcgen::CertifiedKey {
            cert,
            key_pair: key,
        }
    }

    impl Pki {
        fn new(name: &str) -> Self {
            Self { ca: ca(name) }
        }

        fn host(&self, names: &[&str]) -> MigrationTls {
            let key = rcgen::KeyPair::generate().unwrap();
            let p = rcgen::CertificateParams::new(
                names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            let cert = p.signed_by(&key, &self.ca.cert, &self.ca.key_pair).unwrap();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.cert.der().clone()).unwrap();
            MigrationTls::new(
                crate::pki::Identity {
                    certs: vec![cert.der().clone()],
                    key: rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                },
                roots,
            )
            .unwrap()
        }
    }

    /// A connected pair: (client side, server side).
    fn pair(
        client: &MigrationTls,
        server: &MigrationTls,
        to: &str,
    ) -> (Result<Conn, HandshakeError>, Result<Conn, HandshakeError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = server.clone();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            Conn::server(s, &server, Duration::from_secs(5))
        });
        let c = TcpStream::connect(addr).unwrap();
        let to = to.replace("PORT", &addr.port().to_string());
        let c = Conn::client(c, client, &to, Duration::from_secs(5));
        if c.is_err() {
            // The server may wait for the rest of a handshake that will not come.
        }
        (c, t.join().unwrap())
    }

    #[test]
    fn both_ends_authenticated_carry_bytes_each_way_and_bind_a_ticket() {
        let pki = Pki::new("ca");
        let (a, b) = (pki.host(&["127.0.0.1"]), pki.host(&["127.0.0.1"]));
        let (c, s) = pair(&a, &b, "127.0.0.1:PORT");
        let (c, s) = (c.unwrap(), s.unwrap());
        // A writer on one clone, a reader on another, both ways at once, far more
        // than the sockets buffer.
        let big: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        // Keys updated every 50 records (800 KiB) each way, mid-stream.
        c.rekey_every(50);
        s.rekey_every(50);
        let (c2, s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        let (b1, b2) = (big.clone(), big.clone());
        let w1 = std::thread::spawn(move || (&c2).write_all(&b1).unwrap());
        let w2 = std::thread::spawn(move || (&s2).write_all(&b2).unwrap());
        let mut got_s = vec![0u8; big.len()];
        let mut got_c = vec![0u8; big.len()];
        let r = {
            let s = s.clone();
            std::thread::spawn(move || {
                (&s).read_exact(&mut got_s).unwrap();
                got_s
            })
        };
        (&c).read_exact(&mut got_c).unwrap();
        let got_s = r.join().unwrap();
        w1.join().unwrap();
        w2.join().unwrap();
        assert!(got_s == big && got_c == big);
        assert_eq!(c.ticket_proof("t-1"), s.ticket_proof("t-1"));
        assert_ne!(c.ticket_proof("t-1"), s.ticket_proof("t-2"));
        assert!(!c.ticket_proof("t-1").contains("t-1"));
        // An end said is an end read, not a cut.
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        (&s).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn a_peer_of_another_ca_or_the_wrong_name_is_refused_before_any_byte() {
        let (ours, theirs) = (Pki::new("ours"), Pki::new("theirs"));
        let host = ours.host(&["127.0.0.1", "dst.example"]);
        // A stranger dialing in: the destination refuses its certificate.
        let (c, s) = pair(&theirs.host(&["127.0.0.1"]), &host, "127.0.0.1:PORT");
        assert!(c.is_err() || s.is_err());
        let s = s.unwrap_err().to_string();
        assert!(s.contains("TLS handshake"), "{s}");
        // A destination that is not who was asked for.
        let (c, _) = pair(&ours.host(&["127.0.0.1"]), &host, "other.example:PORT");
        let c = c.unwrap_err().to_string();
        assert!(c.contains("NotValidForName") || c.contains("name"), "{c}");
    }

    #[test]
    fn a_plain_client_at_a_tls_port_and_the_reverse_fail_with_a_reason() {
        let pki = Pki::new("ca");
        let host = pki.host(&["127.0.0.1"]);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
            drop(s);
            b[0]
        });
        let c = Conn::client(
            TcpStream::connect(addr).unwrap(),
            &host,
            &addr.to_string(),
            Duration::from_secs(5),
        );
        assert_eq!(t.join().unwrap(), TLS_HANDSHAKE);
        let e = c.unwrap_err().to_string();
        assert!(e.contains("--insecure"), "{e}");
    }

    #[test]
    fn names_and_addresses_become_server_names() {
        assert!(matches!(
            server_name("198.18.0.2:7100").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:7100").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("host-b:7100").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad name:1").is_err());
    }
}
