//! A host's TLS identity: its certificate chain and key, and the CA its peers'
//! certificates are checked against (all PEM files), read once; and the TLS configs
//! built from them for the migration stream (TLS 1.3, both sides authenticated).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("the TLS certificate {}: {why}", .path.display())]
    Cert { path: PathBuf, why: String },
    #[error("the TLS key {}: {why}", .path.display())]
    Key { path: PathBuf, why: String },
    #[error("the TLS certificate and key do not go together: {0}")]
    Pair(String),
    #[error("the CA file {}: {why}", .path.display())]
    Ca { path: PathBuf, why: String },
}

impl PkiError {
    /// The agent config's key whose file is at fault.
    pub fn key(&self) -> &'static str {
        match self {
            PkiError::Cert { .. } => "tls_cert_file",
            PkiError::Key { .. } | PkiError::Pair(_) => "tls_key_file",
            PkiError::Ca { .. } => "ca_file",
        }
    }
}

/// The crypto Ferry's TLS uses: ring, as the HTTP client (ureq) does, because it
/// builds with the C compiler alone (aws-lc-rs would add the post-quantum key
/// exchange ring lacks, at the price of a CMake build on every host). AES-128-GCM
/// first: it is a TLS 1.3 suite every peer has, and the fastest here on a stream
/// that carries gigabytes (AES-256 costs about 40 % more per byte).
pub fn provider() -> Arc<CryptoProvider> {
    #[allow(deprecated)]
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// A certificate chain (the host's first) and its private key.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        write!(
            f,
            "Identity {{ {} certificate(s), key: .. }}",
            self.certs.len()
        )
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| PkiError::Cert {
                path: cert.to_owned(),
                why: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(PkiError::Cert {
                path: cert.to_owned(),
                why: "it holds no certificate".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| PkiError::Key {
            path: key.to_owned(),
            why: e.to_string(),
        })?;
        Ok(Self { certs, key })
    }
}

/// The CA certificates in a PEM file; none is an error.
pub fn roots(ca: &Path) -> Result<RootCertStore, PkiError> {
    let bad = |why: String| PkiError::Ca {
        path: ca.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("it holds no certificate".into()));
    }
    let mut store = RootCertStore::empty();
    for c in certs {
        store.add(c).map_err(|e| bad(e.to_string()))?;
    }
    Ok(store)
}

/// Both ends of the migration stream for one host: it dials as a client and takes
/// migrations in as a server, with the same certificate, and trusts the same CA each
/// way. TLS 1.3 only; no session tickets or resumption (each migration is one
/// handshake, and a ticket would be one more secret to keep).
#[derive(Clone)]
pub struct MigrationTls {
    pub client: Arc<rustls::ClientConfig>,
    pub server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for MigrationTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationTls { .. }")
    }
}

impl MigrationTls {
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, PkiError> {
        Self::new(Identity::load(cert, key)?, roots(ca)?)
    }

    pub fn new(id: Identity, roots: RootCertStore) -> Result<Self, PkiError> {
        let provider = provider();
        let roots = Arc::new(roots);
        let pair = |e: rustls::Error| PkiError::Pair(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| PkiError::Pair(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(pair)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.certs.clone(), id.key.clone_key())
            .map_err(pair)?;
        server.send_tls13_tickets = 0;
        // The stream seals its own records once the handshake is over
        // (`migration::tls_record`): rustls hands the keys over.
        server.enable_secret_extraction = true;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(pair)?
            .with_root_certificates(roots)
            .with_client_auth_cert(id.certs, id.key)
            .map_err(pair)?;
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_secret_extraction = true;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}
