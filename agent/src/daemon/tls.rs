//! TLS for the agent's API: the server's certificate and key, a listener that hands
//! the HTTP server only connections whose handshake completed, and the HTTP client
//! (peers, the CLI) that trusts a given CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);
/// Handshakes done and not yet taken by the server, at most.
const READY_MAX: usize = 64;
/// Handshakes under way at most; a connection over it is closed at once (each one
/// holds a task and a descriptor for up to [`HANDSHAKE_WITHIN`]).
const HANDSHAKES_MAX: usize = 256;

pub use crate::pki::PkiError as TlsError;

/// The server's side: the certificate chain in `cert` (PEM, the server's first) and
/// its private key in `key` (PEM). With `clients` (the fleet's CA, PEM), a client may
/// present a certificate, which must then chain to it (the handshake fails
/// otherwise); one without is let in too (operators and Alertmanager carry tokens
/// only), and [`Caller`] says which it was. Read once, at start.
pub fn server_config(
    cert: &Path,
    key: &Path,
    clients: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let id = crate::pki::Identity::load(cert, key)?;
    let builder = rustls::ServerConfig::builder_with_provider(crate::pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(crate::pki::roots(ca)?),
                crate::pki::provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Ca {
                path: ca.to_owned(),
                why: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(id.certs, id.key)
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections and shakes hands with each on a task of its own (a slow
/// or silent client holds only its own task, never the port); the server takes the
/// connections whose handshake completed.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Call within the runtime.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_MAX);
        let acceptor = TlsAcceptor::from(config);
        let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
        tokio::spawn(async move {
            loop {
                let (conn, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, say: wait rather than spin.
                        tracing::warn!("the API port cannot accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break;
                }
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(
                        %peer,
                        "API connection closed: {HANDSHAKES_MAX} TLS handshakes under way already"
                    );
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(conn)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, "API connection closed: TLS handshake failed: {e}");
                        }
                        Err(_) => tracing::warn!(
                            %peer,
                            "API connection closed: no TLS handshake within {} s",
                            HANDSHAKE_WITHIN.as_secs()
                        ),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

/// What the connection says of its client: whether it presented a certificate the
/// CA vouches for (the handshake refused any other).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub certified: bool,
}

impl Connected<IncomingStream<'_, TlsListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let (_, session) = stream.io().get_ref();
        Self {
            certified: session.peer_certificates().is_some_and(|c| !c.is_empty()),
        }
    }
}

impl Connected<IncomingStream<'_, TcpListener>> for Caller {
    fn connect_info(_: IncomingStream<'_, TcpListener>) -> Self {
        Self { certified: false }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task ended (it never does while the port is open).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// An HTTP client for an agent's API: `https://` URLs are checked against the CA
/// certificates in `ca` (PEM) if given, else against the public web's roots.
pub fn client(ca: Option<&Path>, timeout: Duration) -> Result<ureq::Agent, TlsError> {
    client_as(ca, None, timeout)
}

/// As [`client`], presenting the certificate and key (PEM files) in `identity`: an
/// agent calling its peers.
pub fn client_as(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
    timeout: Duration,
) -> Result<ureq::Agent, TlsError> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some((cert, key)) = identity {
        // Checked as the server's side is (a pair that does not match is refused by
        // name), then read into ureq's own types.
        crate::pki::Identity::load(cert, key)?;
        let pem = |path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::Pair(format!("{}: {e}", path.display())))
        };
        let (cert_pem, key_pem) = (pem(cert)?, pem(key)?);
        let certs: Vec<_> = ureq::tls::parse_pem(&cert_pem)
            .filter_map(|i| match i {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        let key = ureq::tls::parse_pem(&key_pem)
            .find_map(|i| match i {
                Ok(ureq::tls::PemItem::PrivateKey(k)) => Some(k),
                _ => None,
            })
            .ok_or_else(|| TlsError::Pair(format!("{}: no private key", key.display())))?;
        tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&certs, key)));
    }
    if let Some(path) = ca {
        let bad = |why: String| TlsError::Ca {
            path: path.to_owned(),
            why,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certs = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("it holds no certificate".into()));
        }
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .tls_config(tls.build())
        .build()
        .new_agent())
}
