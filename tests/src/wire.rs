//! A scripted migration peer: Ferry's wire protocol written from docs/PROTOCOL.md,
//! independently of the implementation, so tests can send what a real source never
//! would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::crc32;

/// The protocol version the handshake must name.
pub const VERSION: u16 = 11;

pub const HELLO: u8 = 1;
pub const HELLO_ACK: u8 = 2;
pub const CONFIG: u8 = 3;
pub const PAGES: u8 = 4;
pub const ZERO_PAGES: u8 = 5;
pub const ABORT: u8 = 13;
pub const RESOLVE: u8 = 17;
pub const RESOLVED: u8 = 18;
pub const PREPARED: u8 = 26;

/// One frame: magic, kind, three zero bytes, payload length, CRC-32 of the header's
/// first 12 bytes and the payload, then the payload.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = b"FRYM".to_vec();
    f.extend_from_slice(&[kind, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc_input = f.clone();
    crc_input.extend_from_slice(payload);
    f.extend_from_slice(&crc32(&crc_input).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// A length-prefixed string.
pub fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

/// A `Hello` payload.
pub fn hello(version: u16, memory_bytes: u64, id: u64, name: &str) -> Vec<u8> {
    let mut p = version.to_le_bytes().to_vec();
    p.extend_from_slice(&4096u32.to_le_bytes());
    p.extend_from_slice(&memory_bytes.to_le_bytes());
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&5000u32.to_le_bytes());
    p.extend_from_slice(&id.to_le_bytes());
    p.extend_from_slice(&60_000u32.to_le_bytes());
    p.extend_from_slice(&string(name));
    // No ticket, no trace context.
    p.extend_from_slice(&string(""));
    p.extend_from_slice(&string(""));
    p
}

/// A `Hello` presenting a one-time `ticket`.
pub fn hello_with_ticket(memory_bytes: u64, name: &str, ticket: &str) -> Vec<u8> {
    let mut p = hello(VERSION, memory_bytes, 7, name);
    p.truncate(p.len() - 8);
    p.extend_from_slice(&string(ticket));
    p.extend_from_slice(&string(""));
    p
}

/// A `Resolve` payload: the session (id, 128-bit secret) and whether the source
/// committed.
pub fn resolve(id: u64, secret: u128, committed: bool) -> Vec<u8> {
    let mut p = id.to_le_bytes().to_vec();
    p.extend_from_slice(&secret.to_le_bytes());
    p.push(u8::from(committed));
    p
}

/// A batch of one raw page numbered `page`.
pub fn one_page(page: u64) -> Vec<u8> {
    let mut p = vec![0u8, 0, 0, 0];
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&page.to_le_bytes());
    p.extend_from_slice(&(4096u32 | 1 << 31).to_le_bytes());
    p.extend_from_slice(&[0x5a; 4096]);
    p
}

/// What a peer speaks over: plain TCP, or TLS.
pub trait Stream: Read + Write + Send {
    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()>;
}

impl Stream for TcpStream {
    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

impl Stream for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        self.sock.shutdown(how)
    }
}

/// A connection to a destination, speaking frames.
pub struct Peer(pub Box<dyn Stream>);

impl Peer {
    /// Over plain TCP (a destination started with `--insecure`, or one that is to
    /// refuse it).
    pub fn connect(addr: &str) -> Self {
        let c = TcpStream::connect(addr).expect("connect to the destination");
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        Self(Box::new(c))
    }

    /// Over TLS with the certificate in `id`, which the destination's CA signed: a
    /// stranger who passes the handshake, to test what comes after it. Panics if
    /// the destination does not let it in.
    pub fn connect_tls(addr: &str, id: &crate::pki::Issued) -> Self {
        use rustls_pki_types::pem::PemObject as _;
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&id.cert)
            .expect("the certificate")
            .collect::<Result<_, _>>()
            .expect("the certificate");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&id.key).expect("the key");
        let mut roots = rustls::RootCertStore::empty();
        for ca in rustls_pki_types::CertificateDer::pem_file_iter(&id.ca).expect("the CA") {
            roots.add(ca.expect("the CA")).expect("the CA");
        }
        #[allow(deprecated)] // ring, as Ferry uses
        let provider = rustls::crypto::ring::default_provider();
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .expect("a client certificate");
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_owned();
        let name = rustls_pki_types::ServerName::try_from(host).expect("a server name");
        let conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("a TLS client");
        let tcp = TcpStream::connect(addr).expect("connect to the destination");
        tcp.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let mut s = rustls::StreamOwned::new(conn, tcp);
        // The destination's first byte: it let us in.
        let mut accepted = [0u8; 1];
        s.read_exact(&mut accepted).expect("let in over TLS");
        assert_eq!(accepted[0], 1);
        Self(Box::new(s))
    }

    pub fn send(&mut self, kind: u8, payload: &[u8]) {
        // A destination that already hung up is an answer too; the reads say which.
        let _ = self.0.write_all(&frame(kind, payload));
    }

    /// The next frame's kind and payload; None once the destination closed.
    pub fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 16];
        self.0.read_exact(&mut header).ok()?;
        let len = u32::from_le_bytes(header[8..12].try_into().ok()?) as usize;
        let mut payload = vec![0u8; len];
        self.0.read_exact(&mut payload).ok()?;
        Some((header[4], payload))
    }

    /// Reads until the destination closes; returns the reason of the `Abort` it sent
    /// on the way (None: it closed without one).
    pub fn abort_reason(&mut self) -> Option<String> {
        let mut reason = None;
        while let Some((kind, payload)) = self.recv() {
            if kind == ABORT && payload.len() >= 4 {
                reason = Some(String::from_utf8_lossy(&payload[4..]).into_owned());
            }
        }
        reason
    }

    /// Says hello for a `memory_mib` VM and sends its config; returns what came back
    /// up to `Prepared` (or the abort).
    pub fn handshake(&mut self, memory_mib: u64, config: &str) -> Result<u128, String> {
        self.send(HELLO, &hello(VERSION, memory_mib << 20, 7, "hostile"));
        match self.recv() {
            Some((HELLO_ACK, p)) if p.len() == 18 => {
                let secret = u128::from_le_bytes(p[2..18].try_into().unwrap_or_default());
                self.send(CONFIG, &string(config));
                loop {
                    match self.recv() {
                        Some((PREPARED, _)) => return Ok(secret),
                        Some((ABORT, p)) => {
                            return Err(String::from_utf8_lossy(&p[4.min(p.len())..]).into_owned());
                        }
                        Some(_) => {}
                        None => return Err("closed".into()),
                    }
                }
            }
            Some((ABORT, p)) => Err(String::from_utf8_lossy(&p[4.min(p.len())..]).into_owned()),
            other => Err(format!("unexpected answer to hello: {other:?}")),
        }
    }
}
