//! The migration stream's connections: TLS 1.3 with both ends authenticated by
//! default, plain TCP only when the operator said `--insecure`.
//!
//! A [`Conn`] is used the way a `TcpStream` is: cloned handles, one reading while
//! others write (the migration thread, the vCPUs mirroring disk writes, the
//! keepalive), shut down from a watchdog, its kernel counters read for the link's
//! rate. So the TLS state is shared between the handles. Its lock is held only to
//! decrypt what was read or to encrypt what is to be sent, never across a blocking
//! socket call: two ends that both write while neither reads could otherwise each
//! hold their lock in a full socket and wait forever for the other's reader.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::ServerName;

use crate::pki::MigrationTls;
use crate::sync::lock;

/// A TLS record's header and tag, at most: what sealing adds to each 16 KiB.
const RECORD_OVERHEAD: usize = 5 + 16 + 1;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 << 10;
/// The label of the keying material a ticket is bound to the session with.
const TICKET_LABEL: &[u8] = b"EXPORTER-ferry-migration-ticket";

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
    state: Mutex<rustls::Connection>,
    /// Readers take turns here; it holds bytes read from the socket that the TLS
    /// state could not take yet.
    rx: Mutex<Rx>,
    /// Writers take turns here, so records reach the socket in the order they were
    /// sealed; it holds the sealed bytes of one write.
    tx: Mutex<Vec<u8>>,
}

struct Rx {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
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
        let conn = rustls::ClientConnection::new(tls.client.clone(), name)
            .map_err(|e| failed(&tcp, e.to_string()))?;
        let deadline = std::time::Instant::now() + within;
        let conn = Self::handshake(tcp, conn.into(), within)?;
        // TLS 1.3 lets a client finish its handshake before the server has judged its
        // certificate: the destination's first byte says it did and let us in, so
        // that a refusal is this call's answer, not a broken migration later.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
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
        let conn = rustls::ServerConnection::new(tls.server.clone())
            .map_err(|e| failed(&tcp, e.to_string()))?;
        let conn = Self::handshake(tcp, conn.into(), within)?;
        conn.set_write_timeout(Some(within))?;
        (&conn).write_all(&[ACCEPTED])?;
        conn.set_write_timeout(None)?;
        Ok(conn)
    }

    fn handshake(
        mut tcp: TcpStream,
        mut state: rustls::Connection,
        within: Duration,
    ) -> Result<Self, HandshakeError> {
        let deadline = std::time::Instant::now() + within;
        // Named now: a peer that resets the connection has no address after.
        let peer = tcp
            .peer_addr()
            .map_or_else(|_| "the peer".into(), |a| a.to_string());
        let failed = |_: &TcpStream, why: String| HandshakeError::Failed {
            peer: peer.clone(),
            why,
        };
        state.set_buffer_limit(None);
        while state.is_handshaking() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(failed(
                    &tcp,
                    format!("not done within {} s", within.as_secs()),
                ));
            }
            tcp.set_read_timeout(Some(left))?;
            tcp.set_write_timeout(Some(left))?;
            if let Err(e) = state.complete_io(&mut tcp) {
                // Tell the peer why, if rustls has an alert for it.
                let _ = state.write_tls(&mut tcp);
                let why = match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        format!("not done within {} s", within.as_secs())
                    }
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                        "the peer closed the connection (it may not speak TLS: started with \
                         --insecure?)"
                            .into()
                    }
                    _ => e.to_string(),
                };
                return Err(failed(&tcp, why));
            }
        }
        tcp.set_read_timeout(None)?;
        tcp.set_write_timeout(None)?;
        Ok(Self {
            tcp: Arc::new(tcp),
            tls: Some(Arc::new(Tls {
                state: Mutex::new(state),
                rx: Mutex::new(Rx {
                    buf: vec![0; READ_CHUNK].into_boxed_slice(),
                    start: 0,
                    end: 0,
                }),
                tx: Mutex::new(Vec::new()),
            })),
        })
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
        if rx.start < rx.end {
            return true;
        }
        let mut st = lock(&tls.state);
        st.process_new_packets()
            .is_ok_and(|io| io.plaintext_bytes_to_read() > 0)
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
            if let Ok(mut out) = tls.tx.try_lock() {
                out.clear();
                {
                    let mut st = lock(&tls.state);
                    st.send_close_notify();
                    while st.wants_write() {
                        if st.write_tls(&mut *out).is_err() {
                            break;
                        }
                    }
                }
                let _ = self.tcp.set_write_timeout(Some(Duration::from_millis(100)));
                let _ = (&*self.tcp).write_all(&out);
            }
        }
        self.tcp.shutdown(how)
    }

    /// What proves this side knows `ticket`, bound to this connection: over TLS,
    /// keying material exported from the session with the ticket as its context (a
    /// proof seen on the wire, which it is not, would be useless on any other
    /// connection, and the ticket itself never crosses it); over plain TCP, the
    /// ticket.
    pub fn ticket_proof(&self, ticket: &str) -> Result<String, rustls::Error> {
        let Some(tls) = &self.tls else {
            return Ok(ticket.to_owned());
        };
        let st = lock(&tls.state);
        let out = st.export_keying_material([0u8; 32], TICKET_LABEL, Some(ticket.as_bytes()))?;
        Ok(out.iter().map(|b| format!("{b:02x}")).collect())
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
    /// A record that did not authenticate (or any TLS error reading): tell the peer
    /// with the alert rustls queued for it, so its side can say why too.
    fn fail(&self, st: &mut rustls::Connection, e: rustls::Error) -> io::Error {
        let mut alert = Vec::new();
        while st.wants_write() && st.write_tls(&mut alert).is_ok_and(|n| n > 0) {}
        let _ = self.tcp.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = (&*self.tcp).write_all(&alert);
        invalid(e)
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return (&*self.tcp).read(buf);
        };
        let mut rx = lock(&tls.rx);
        loop {
            {
                let mut st = lock(&tls.state);
                // What the state could not take last time (its plaintext was full).
                while rx.start < rx.end {
                    let Rx { buf, start, end } = &mut *rx;
                    let mut pending = &buf[*start..*end];
                    match st.read_tls(&mut pending) {
                        Ok(n) => *start += n,
                        Err(_) => break,
                    }
                    if let Err(e) = st.process_new_packets() {
                        return Err(self.fail(&mut st, e));
                    }
                }
                match st.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if rx.start < rx.end {
                return Err(io::Error::other("the TLS state takes no more input"));
            }
            let n = (&*self.tcp).read(&mut rx.buf)?;
            if n == 0 {
                // Cut without a close_notify: a frame in flight shows torn to the
                // framing above, which checks every length and checksum.
                return Ok(0);
            }
            rx.start = 0;
            rx.end = n;
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return (&*self.tcp).write(buf);
        };
        let mut out = lock(&tls.tx);
        out.clear();
        out.reserve(buf.len() + buf.len().div_ceil(16 << 10) * RECORD_OVERHEAD);
        {
            let mut st = lock(&tls.state);
            st.writer().write_all(buf)?;
            while st.wants_write() {
                st.write_tls(&mut *out)?;
            }
        }
        (&*self.tcp).write_all(&out)?;
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
        assert_eq!(
            c.ticket_proof("t-1").unwrap(),
            s.ticket_proof("t-1").unwrap()
        );
        assert_ne!(
            c.ticket_proof("t-1").unwrap(),
            s.ticket_proof("t-2").unwrap()
        );
        assert!(!c.ticket_proof("t-1").unwrap().contains("t-1"));
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
