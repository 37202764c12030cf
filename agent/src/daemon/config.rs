//! `agent.toml`: what one host's agent serves, where its VMs live, who may ask it
//! what. Read once at start; an unknown key or a bad value stops the agent, named.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::{Limits, LimitsError, LimitsTable};

#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("cannot read the agent config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("the agent config {path}: {key} = {value:?}: {why}")]
    Invalid {
        path: PathBuf,
        key: String,
        value: String,
        why: String,
    },
    #[error("the agent config {path}: [limits]: {source}")]
    Limits { path: PathBuf, source: LimitsError },
    #[error("the {role} token file {path}: {why}")]
    Token {
        role: &'static str,
        path: PathBuf,
        why: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    listen: String,
    migration_ip: Option<String>,
    vm_dir: PathBuf,
    token_file: PathBuf,
    peer_token_file: Option<PathBuf>,
    webhook_token_file: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    #[serde(default)]
    datastores: Vec<PathBuf>,
    max_outbound: Option<u32>,
    max_inbound: Option<u32>,
    #[serde(default)]
    limits: LimitsTable,
    #[serde(default)]
    peers: Vec<PeerFile>,
    /// Serve the API over TLS: the certificate chain and its key (PEM), both or none.
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    /// The CA this host's peers' certificates chain to: with the certificate and key
    /// above, every migration stream (either way) is TLS 1.3, both ends
    /// authenticated; and it is the default CA of `https://` peers.
    ca_file: Option<PathBuf>,
    /// Migrate over plain TCP (no certificates): the operator's explicit choice.
    #[serde(default)]
    insecure_migrations: bool,
    #[serde(default)]
    sampling: SamplingFile,
    /// Memory VMs may take here, MiB (default: the host's).
    capacity_memory_mib: Option<u64>,
    /// Which alerts move VMs, and how (default: `ferry_action="migrate-away"`).
    alert_rules: Option<Vec<AlertRuleFile>>,
}

/// `[[alert_rules]]`: the alerts (by Alertmanager's label matchers) that move VMs off
/// this host, and how they go.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertRuleFile {
    matchers: Vec<String>,
    policy: Option<String>,
    #[serde(default)]
    copy_storage: bool,
}

/// `[sampling]`: how often each running VM's dirty rate is measured between
/// migrations, and for how long.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplingFile {
    /// Seconds between two samples of a VM; 0 turns sampling off.
    every_secs: Option<u64>,
    sample_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerFile {
    name: String,
    url: String,
    /// The token this agent presents to that peer (its `peer_token_file`'s content).
    token_file: Option<PathBuf>,
    /// The CA certificates (PEM) an `https://` peer's certificate is checked against
    /// (default: the public web's roots).
    ca_file: Option<PathBuf>,
}

/// Another host's agent.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    /// `http://host:port` or `https://host:port`, no trailing slash.
    pub url: String,
    pub token: Option<String>,
    /// The client to reach it with (its CA, if it has one of its own).
    pub http: ureq::Agent,
}

/// A peer's answer within this, or it is unreachable.
const PEER_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Who may call what: each role's token (None: that role is not served).
#[derive(Clone)]
pub struct Tokens {
    pub operator: String,
    pub peer: Option<String>,
    pub webhook: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens { .. }")
    }
}

/// Migrations at once, each way, unless the config says otherwise (KubeVirt's
/// `parallelOutboundMigrationsPerNode` is 2 as well).
pub const DEFAULT_CONCURRENCY: u32 = 2;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Where sources send the VMs this host receives (default: `listen`'s address).
    pub migration_ip: std::net::IpAddr,
    pub vm_dir: PathBuf,
    /// Control sockets and VMM logs.
    pub run_dir: PathBuf,
    pub datastores: Vec<PathBuf>,
    /// The config file's folder: relative paths, in it and in requests, start here.
    pub base: PathBuf,
    pub max_outbound: u32,
    pub max_inbound: u32,
    pub limits: Limits,
    pub peers: Vec<Peer>,
    pub tokens: Tokens,
    /// The API's TLS (None: plain HTTP).
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// A peer's token counts only on a connection that presented a certificate of
    /// the fleet's CA: the API is TLS and `ca_file` names the CA.
    pub peers_certified: bool,
    /// The migration stream's TLS files, which this host's VMMs read (None: plain
    /// TCP, `insecure_migrations = true`).
    pub migration_tls: Option<ferry_api::TlsFiles>,
    pub sampling: super::sampler::Schedule,
    /// Memory VMs may take here, MiB: what peers choosing a destination weigh.
    pub capacity_memory_mib: u64,
    pub alert_rules: Vec<super::alerts::Rule>,
}

/// A token file's content, trimmed of whitespace; empty or unreadable is an error.
pub fn read_token(role: &'static str, path: &Path) -> Result<String, AgentConfigError> {
    let bad = |why: String| AgentConfigError::Token {
        role,
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if token.len() < 16 {
        return Err(bad(format!(
            "{} characters is too short to guess-proof; use 16 or more",
            token.len()
        )));
    }
    Ok(token.to_owned())
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, AgentConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// `origin` names the file in errors, and relative paths are taken from its folder.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, AgentConfigError> {
        let f: File = toml::from_str(text).map_err(|e| AgentConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let invalid =
            |key: &str, value: &dyn std::fmt::Display, why: &str| AgentConfigError::Invalid {
                path: origin.to_owned(),
                key: key.to_owned(),
                value: value.to_string(),
                why: why.to_owned(),
            };
        let base = origin.parent().unwrap_or(Path::new("."));
        let at = |p: &Path| base.join(p);
        if f.name.is_empty()
            || !f
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(invalid(
                "name",
                &f.name,
                "a host name: letters, digits, '-', '_' and '.'",
            ));
        }
        let listen: SocketAddr = f.listen.parse().map_err(|_| {
            invalid(
                "listen",
                &f.listen,
                "an address and port, as 127.0.0.1:7070",
            )
        })?;
        let migration_ip = match &f.migration_ip {
            Some(ip) => ip.parse().map_err(|_| {
                invalid(
                    "migration_ip",
                    ip,
                    "an IP address sources can reach this host at",
                )
            })?,
            None if listen.ip().is_unspecified() => {
                return Err(invalid(
                    "migration_ip",
                    &"(absent)",
                    "needed when listen is a wildcard address: the address sources reach \
                     this host at",
                ));
            }
            None => listen.ip(),
        };
        let concurrency = |key: &str, v: Option<u32>| match v {
            None => Ok(DEFAULT_CONCURRENCY),
            Some(n @ 1..=64) => Ok(n),
            Some(n) => Err(invalid(key, &n, "between 1 and 64")),
        };
        let max_outbound = concurrency("max_outbound", f.max_outbound)?;
        let max_inbound = concurrency("max_inbound", f.max_inbound)?;
        let limits =
            f.limits
                .over(Limits::default())
                .map_err(|source| AgentConfigError::Limits {
                    path: origin.to_owned(),
                    source,
                })?;
        let mut peers: Vec<Peer> = Vec::new();
        for p in f.peers {
            let url = p.url.trim_end_matches('/').to_owned();
            let host = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            if host.is_none_or(str::is_empty) {
                return Err(invalid(
                    "peers.url",
                    &p.url,
                    "http://host:port or https://host:port",
                ));
            }
            if p.name.is_empty() || peers.iter().any(|q| q.name == p.name) || p.name == f.name {
                return Err(invalid(
                    "peers.name",
                    &p.name,
                    "a name of its own: not empty, not this host's, not another peer's",
                ));
            }
            let token = p
                .token_file
                .map(|t| read_token("peer", &at(&t)))
                .transpose()?;
            if p.ca_file.is_some() && !url.starts_with("https://") {
                return Err(invalid(
                    "peers.ca_file",
                    &p.name,
                    "a CA is for a peer served over https://; its url is http://",
                ));
            }
            let ca = p
                .ca_file
                .as_ref()
                .or(f.ca_file.as_ref().filter(|_| url.starts_with("https://")));
            // Over https://, this agent presents its own certificate: the peer's API
            // takes a peer's token only with one its CA vouches for.
            let identity = match (&f.tls_cert_file, &f.tls_key_file) {
                (Some(c), Some(k)) if url.starts_with("https://") => Some((at(c), at(k))),
                _ => None,
            };
            let http = super::tls::client_as(
                ca.map(|c| at(c)).as_deref(),
                identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
                PEER_WITHIN,
            )
            .map_err(|e| invalid("peers.ca_file", &p.name, &e.to_string()))?;
            peers.push(Peer {
                name: p.name,
                url,
                token,
                http,
            });
        }
        let tls = match (&f.tls_cert_file, &f.tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let clients = f.ca_file.as_ref().map(|c| at(c));
                Some(
                    super::tls::server_config(&at(cert), &at(key), clients.as_deref()).map_err(
                        |e| {
                            let file = if e.key() == "tls_cert_file" {
                                cert
                            } else {
                                key
                            };
                            invalid(e.key(), &file.display(), &e.to_string())
                        },
                    )?,
                )
            }
            (Some(_), None) => {
                return Err(invalid(
                    "tls_key_file",
                    &"(missing)",
                    "tls_cert_file needs the key that goes with it",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls_cert_file",
                    &"(missing)",
                    "tls_key_file needs the certificate that goes with it",
                ));
            }
        };
        let migration_tls = match (&f.tls_cert_file, &f.tls_key_file, &f.ca_file) {
            (Some(_), Some(_), _) | (_, _, Some(_)) if f.insecure_migrations => {
                return Err(invalid(
                    "insecure_migrations",
                    &true,
                    "plain TCP excludes the certificates given for TLS: leave one out",
                ));
            }
            (_, _, _) if f.insecure_migrations => None,
            (Some(cert), Some(key), Some(ca)) => {
                let files = ferry_api::TlsFiles {
                    cert: at(cert),
                    key: at(key),
                    ca: at(ca),
                };
                // Checked now: a VMM told of files it cannot use fails one
                // migration at a time, each later.
                crate::pki::MigrationTls::load(&files.cert, &files.key, &files.ca)
                    .map_err(|e| invalid("ca_file", &files.ca.display(), &e.to_string()))?;
                Some(files)
            }
            _ => {
                return Err(invalid(
                    "ca_file",
                    &f.ca_file
                        .as_ref()
                        .map_or("(missing)".into(), |c| c.display().to_string()),
                    "migrations are TLS with both ends authenticated: give tls_cert_file, \
                     tls_key_file and the CA of the peers' certificates (ca_file), or say \
                     insecure_migrations = true for plain TCP",
                ));
            }
        };
        // A datastore that is not there is a typo or a storage not mounted: disks
        // copied into a folder made in its place would land on the wrong disk.
        for d in &f.datastores {
            if !at(d).is_dir() {
                return Err(invalid(
                    "datastores",
                    &d.display(),
                    "is not a folder (create it, mount its storage, or leave it out)",
                ));
            }
        }
        let sampling = {
            let default = super::sampler::Schedule::default();
            let sample = match f.sampling.sample_ms {
                None => default.sample,
                Some(ms @ 100..=10_000) => std::time::Duration::from_millis(ms),
                Some(ms) => {
                    return Err(invalid(
                        "sampling.sample_ms",
                        &ms,
                        "between 100 and 10000 milliseconds",
                    ));
                }
            };
            let every = match f.sampling.every_secs {
                None => default.every,
                Some(0) => None,
                Some(s @ 1..=3600) if std::time::Duration::from_secs(s) > sample => {
                    Some(std::time::Duration::from_secs(s))
                }
                Some(s) => {
                    return Err(invalid(
                        "sampling.every_secs",
                        &s,
                        "0 (off), or up to 3600 seconds and longer than sample_ms",
                    ));
                }
            };
            super::sampler::Schedule { every, sample }
        };
        let tokens = Tokens {
            operator: read_token("operator", &at(&f.token_file))?,
            peer: f
                .peer_token_file
                .map(|t| read_token("peer", &at(&t)))
                .transpose()?,
            webhook: f
                .webhook_token_file
                .map(|t| read_token("webhook", &at(&t)))
                .transpose()?,
        };
        let distinct = [
            Some(&tokens.operator),
            tokens.peer.as_ref(),
            tokens.webhook.as_ref(),
        ];
        for (i, a) in distinct.iter().enumerate() {
            for b in &distinct[i + 1..] {
                if a.is_some() && a == b {
                    return Err(invalid(
                        "token_file",
                        &"(two roles)",
                        "each role needs a token of its own, or one role could act as another",
                    ));
                }
            }
        }
        let alert_rules = match f.alert_rules {
            None => super::alerts::Rule::default_rules(),
            Some(rules) => {
                let mut out = Vec::new();
                for (i, r) in rules.into_iter().enumerate() {
                    let key = format!("alert_rules[{i}]");
                    if r.matchers.is_empty() {
                        return Err(invalid(
                            &format!("{key}.matchers"),
                            &"[]",
                            "needs at least one matcher, or every alert would move VMs",
                        ));
                    }
                    let matchers = r
                        .matchers
                        .iter()
                        .map(|m| super::alerts::Matcher::parse(m))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| {
                            invalid(&format!("{key}.matchers"), &r.matchers.join(", "), &e)
                        })?;
                    if let Some(p) = &r.policy {
                        crate::policy::by_name(p, crate::policy::Pins::default(), &limits)
                            .map_err(|e| invalid(&format!("{key}.policy"), p, &e))?;
                    }
                    out.push(super::alerts::Rule {
                        matchers,
                        policy: r.policy,
                        copy_storage: r.copy_storage,
                    });
                }
                out
            }
        };
        let capacity_memory_mib = match f.capacity_memory_mib {
            Some(0) => {
                return Err(invalid(
                    "capacity_memory_mib",
                    &0,
                    "must be more than 0 (leave it out for the host's memory)",
                ));
            }
            Some(m) => m,
            None => super::evacuate::host_memory_mib().ok_or_else(|| {
                invalid(
                    "capacity_memory_mib",
                    &"(missing)",
                    "the host's memory cannot be read from /proc/meminfo: set it",
                )
            })?,
        };
        let peers_certified = tls.is_some() && f.ca_file.is_some();
        Ok(Self {
            name: f.name,
            listen,
            migration_ip,
            vm_dir: at(&f.vm_dir),
            run_dir: at(&f.run_dir.unwrap_or_else(|| PathBuf::from("/run/ferry"))),
            datastores: f.datastores.iter().map(|d| at(d)).collect(),
            base: std::path::absolute(base).unwrap_or_else(|_| base.to_owned()),
            max_outbound,
            max_inbound,
            limits,
            peers,
            tls,
            peers_certified,
            migration_tls,
            tokens,
            sampling,
            capacity_memory_mib,
            alert_rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tokens(body: &str) -> (tempdir::Dir, Result<AgentConfig, AgentConfigError>) {
        let dir = tempdir::Dir::new();
        std::fs::write(dir.0.join("token"), "operator-secret-0123456789\n").unwrap();
        std::fs::write(dir.0.join("peer"), "  peer-secret-0123456789  ").unwrap();
        std::fs::write(dir.0.join("short"), "abc").unwrap();
        std::fs::create_dir_all(dir.0.join("disks")).unwrap();
        let path = dir.0.join("agent.toml");
        let r = AgentConfig::parse(body, &path);
        (dir, r)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "ferry-agent-config-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const GOOD: &str = r#"
name = "host-a"
listen = "127.0.0.1:7070"
vm_dir = "vms"
token_file = "token"
peer_token_file = "peer"
datastores = ["disks"]
insecure_migrations = true
[limits]
max_downtime_ms = 300
[[peers]]
name = "host-b"
url = "http://198.18.0.2:7070/"
token_file = "peer"
"#;

    #[test]
    fn a_good_config_reads_with_defaults_and_trimmed_tokens() {
        let (dir, c) = with_tokens(GOOD);
        let c = c.unwrap();
        assert_eq!(c.name, "host-a");
        assert_eq!(c.vm_dir, dir.0.join("vms"));
        assert_eq!(c.run_dir, PathBuf::from("/run/ferry"));
        assert_eq!((c.max_outbound, c.max_inbound), (2, 2));
        assert_eq!(c.tokens.operator, "operator-secret-0123456789");
        assert_eq!(c.tokens.peer.as_deref(), Some("peer-secret-0123456789"));
        assert_eq!(c.peers[0].url, "http://198.18.0.2:7070");
        assert_eq!(c.limits.max_downtime_ms, 300.0);
        assert_eq!(c.sampling, crate::daemon::sampler::Schedule::default());
        let (_dir, c) =
            with_tokens(&GOOD.replacen("[limits]", "[sampling]\nevery_secs = 0\n[limits]", 1));
        assert_eq!(c.unwrap().sampling.every, None);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        for (change, words) in [
            (("name = \"host-a\"", "name = \"host a\""), "name"),
            (
                ("listen = \"127.0.0.1:7070\"", "listen = \"nowhere\""),
                "listen",
            ),
            (("vm_dir", "vm_folder"), "unknown field"),
            (
                ("max_downtime_ms = 300", "max_downtime_ms = -1"),
                "max_downtime_ms",
            ),
            (
                ("token_file = \"token\"", "token_file = \"short\""),
                "too short",
            ),
            (
                ("token_file = \"token\"", "token_file = \"absent\""),
                "operator token",
            ),
            (("token_file = \"token\"", "token_file = \"peer\""), "role"),
            (("url = \"http://", "url = \"ftp://"), "peers.url"),
            (("name = \"host-b\"", "name = \"host-a\""), "peers.name"),
            (("[limits]", "max_inbound = 0\n[limits]"), "max_inbound"),
            (("\"disks\"", "\"disks\", \"nowhere\""), "datastores"),
            (
                ("[limits]", "tls_cert_file = \"token\"\n[limits]"),
                "tls_key_file",
            ),
            (
                (
                    "[limits]",
                    "tls_cert_file = \"token\"\ntls_key_file = \"token\"\n[limits]",
                ),
                "no certificate",
            ),
            (
                (
                    "url = \"http://198.18.0.2:7070/\"",
                    "url = \"https://198.18.0.2:7070/\"\nca_file = \"absent\"",
                ),
                "peers.ca_file",
            ),
            (
                ("[limits]", "[sampling]\nsample_ms = 20\n[limits]"),
                "sampling.sample_ms",
            ),
            (
                (
                    "[limits]",
                    "[sampling]\nevery_secs = 1\nsample_ms = 2000\n[limits]",
                ),
                "sampling.every_secs",
            ),
            // Migrations need TLS, or the operator's word for plain TCP; not both.
            (
                ("insecure_migrations = true\n", ""),
                "insecure_migrations = true for plain TCP",
            ),
            (
                (
                    "insecure_migrations = true\n",
                    "insecure_migrations = true\nca_file = \"token\"\n",
                ),
                "plain TCP excludes",
            ),
            (
                (
                    "insecure_migrations = true\n",
                    "tls_cert_file = \"token\"\ntls_key_file = \"token\"\nca_file = \"token\"\n",
                ),
                "tls_cert_file",
            ),
        ] {
            let (_dir, r) = with_tokens(&GOOD.replacen(change.0, change.1, 1));
            let e = r.expect_err(change.1).to_string();
            assert!(e.contains(words), "{}: {e}", change.1);
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            // Paths are taken from a folder that does not exist: nothing on the host
            // is read, whatever the text names.
            #[test]
            fn random_text_never_panics(text in "\\PC{0,400}") {
                let _ = AgentConfig::parse(&text, Path::new("/nonexistent-ferry/agent.toml"));
            }

            #[test]
            fn the_good_config_with_any_line_changed_never_panics(
                line in 0usize..20,
                value in "(-?[0-9]{1,20}|\"[ -~]{0,12}\"|\\[\\]|true|1e999)",
            ) {
                let text: String = GOOD
                    .lines()
                    .enumerate()
                    .map(|(i, l)| match (i == line, l.split_once(" = ")) {
                        (true, Some((k, _))) => format!("{k} = {value}\n"),
                        _ => format!("{l}\n"),
                    })
                    .collect();
                let _ = AgentConfig::parse(&text, Path::new("/nonexistent-ferry/agent.toml"));
            }
        }
    }
}
