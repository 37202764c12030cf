//! Certificates for tests and the lab: a CA, and host certificates it signs, as PEM
//! files. The migration stream is TLS by default, so every test that migrates uses
//! these unless it says `--insecure` on purpose.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A host's files: its certificate and key, and the CA that signed it (and its peers).
#[derive(Debug, Clone)]
pub struct Issued {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    /// `--tls-cert C --tls-key K --tls-ca A`, for `ferry vmm --incoming` and
    /// `ferry migrate`.
    pub fn args(&self) -> Vec<String> {
        [
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
            ("--tls-ca", &self.ca),
        ]
        .into_iter()
        .flat_map(|(flag, p)| [flag.to_owned(), p.display().to_string()])
        .collect()
    }
}

/// A certificate authority whose certificate is `dir/ca.pem`.
pub struct Ca {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    pub fn new(dir: &Path, common_name: &str) -> std::io::Result<Self> {
        let bad = |e: rcgen::Error| std::io::Error::other(e.to_string());
        std::fs::create_dir_all(dir)?;
        let key = rcgen::KeyPair::generate().map_err(bad)?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let cert = p.self_signed(&key).map_err(bad)?;
        std::fs::write(dir.join("ca.pem"), cert.pem())?;
        Ok(Self {
            dir: dir.to_owned(),
            cert,
            key,
        })
    }

    /// Signs a certificate for `name` valid for `names` (DNS names or IP
    /// addresses): `dir/<name>.pem` and its key `dir/<name>-key.pem` (mode 0600).
    pub fn issue(&self, name: &str, names: &[&str]) -> std::io::Result<Issued> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let bad = |e: rcgen::Error| std::io::Error::other(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(bad)?;
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map_err(bad)?;
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = p.signed_by(&key, &self.cert, &self.key).map_err(bad)?;
        let issued = Issued {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&issued.cert, cert.pem())?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&issued.key)?;
        std::io::Write::write_all(&mut f, key.serialize_pem().as_bytes())?;
        Ok(issued)
    }
}

static TEST_PKI: OnceLock<Issued> = OnceLock::new();

extern "C" fn remove_test_pki() {
    if let Some(i) = TEST_PKI.get()
        && let Some(dir) = i.ca.parent()
    {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// This test process's CA and one certificate it signed, good for every address
/// the tests use (loopback, and both ends of a test link); removed when the process
/// exits.
pub fn test_pki() -> &'static Issued {
    TEST_PKI.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-test-pki-{}", std::process::id()));
        let ca = Ca::new(&dir, "ferry test CA").expect("a test CA");
        let issued = ca
            .issue(
                "host",
                &[
                    "localhost",
                    "127.0.0.1",
                    crate::netns::SOURCE_ADDR,
                    crate::netns::DEST_ADDR,
                ],
            )
            .expect("a test certificate");
        // SAFETY: registers a plain function that only removes files.
        unsafe { libc::atexit(remove_test_pki) };
        issued
    })
}

/// Adds the test PKI's `--tls-*` flags to a `ferry vmm --incoming` or a `ferry
/// migrate --control` that says neither them nor `--insecure`.
pub fn secured(args: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let says = |flag: &str| args.contains(&flag);
    let wants = (says("--incoming")
        || (args.first() == Some(&"migrate") && says("--control") && says("--to")))
        && !says("--insecure")
        && !says("--tls-cert");
    if wants {
        out.extend(test_pki().args());
    }
    out
}
