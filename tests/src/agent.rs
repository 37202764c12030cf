//! A `ferry agent` process and plain HTTP/1.1 to it: requests written by hand, so a
//! test can also send what no client library would (bad JSON, wrong headers).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ferry_bin, free_port};

/// An HTTP answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the answer is not JSON ({e}): {self:?}"))
    }

    /// An error answer's `kind`.
    pub fn kind(&self) -> String {
        self.json()["kind"].as_str().unwrap_or_default().to_owned()
    }
}

/// As [`request`], from inside the network namespace `ns` (None: this one): a thread
/// of its own enters it (setns changes only the calling thread's namespace).
pub fn request_in(
    ns: Option<&str>,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Option<Answer> {
    let Some(ns) = ns else {
        return request(addr, method, path, token, body);
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}")).ok()?;
            // SAFETY: setns on a namespace file we hold open, for this thread only.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            if r != 0 {
                return None;
            }
            request(addr, method, path, token, body)
        })
        .join()
        .ok()
        .flatten()
    })
}

/// One request on a fresh connection; None if the agent cannot be reached.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Option<Answer> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes()).ok()?;
    if let Some(b) = body {
        c.write_all(b.as_bytes()).ok()?;
    }
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (headers, body) = text.split_once("\r\n\r\n")?;
    let status = headers.split(' ').nth(1)?.parse().ok()?;
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some(Answer {
        status,
        headers: headers.to_owned(),
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// One request over HTTPS, the agent's certificate checked against `ca`; None if
/// the agent cannot be reached or the handshake fails.
pub fn request_tls(
    addr: &str,
    ca: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<Answer, String> {
    let pem = std::fs::read(ca).map_err(|e| e.to_string())?;
    let roots: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|i| match i {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    let http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
                .build(),
        )
        .build()
        .new_agent();
    let url = format!("https://{addr}{path}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let sent = match (method, body) {
        ("GET", _) => {
            let mut r = http.get(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        ("DELETE", _) => {
            let mut r = http.delete(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        (_, b) => {
            let mut r = http.post(&url).header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(b.unwrap_or("").as_bytes())
        }
    };
    let mut resp = sent.map_err(|e| e.to_string())?;
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| format!("{k}: {}\r\n", v.to_str().unwrap_or("")))
        .collect();
    Ok(Answer {
        status: resp.status().as_u16(),
        headers,
        body: resp
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?,
    })
}

/// A test CA and a certificate it signed for `localhost` and 127.0.0.1, written to
/// `dir` as `ca.pem`, `cert.pem` and `key.pem`.
pub fn write_test_pki(dir: &Path) {
    let ca = crate::pki::Ca::new(dir, "ferry test CA").expect("a test CA");
    let host = ca
        .issue("host", &["localhost", "127.0.0.1"])
        .expect("a certificate");
    std::fs::rename(&host.cert, dir.join("cert.pem")).expect("cert.pem");
    std::fs::rename(&host.key, dir.join("key.pem")).expect("key.pem");
}

/// A host's agent: its folder (config, tokens, VM folder, run folder) and process.
pub struct Agent {
    pub name: String,
    /// The network namespace it runs in (None: this one).
    pub ns: Option<String>,
    pub dir: PathBuf,
    pub addr: String,
    pub token: String,
    pub peer_token: String,
    pub webhook_token: String,
    /// Set in the agent's environment (and so its VMMs'): a test's fault injection.
    pub env: Vec<(String, String)>,
    /// The API serves HTTPS, its certificate signed by this CA (None: plain HTTP).
    pub tls_ca: Option<PathBuf>,
    pub child: Option<Child>,
}

impl Agent {
    /// Writes an agent's config under `dir` (VMs in `dir/vms`, sockets and VMM logs
    /// in `dir/run`), on a free loopback port. Not started.
    pub fn configure(dir: &Path, name: &str) -> Self {
        Self::configure_at(dir, name, None)
    }

    /// As [`Agent::configure`], in the network namespace `ns` at `ip` (port 7070).
    pub fn configure_in(dir: &Path, name: &str, ns: &str, ip: &str) -> Self {
        Self::configure_at(dir, name, Some((ns, ip)))
    }

    fn configure_at(dir: &Path, name: &str, at: Option<(&str, &str)>) -> Self {
        let addr = match at {
            Some((_, ip)) => format!("{ip}:7070"),
            None => format!("127.0.0.1:{}", free_port()),
        };
        std::fs::create_dir_all(dir.join("vms")).expect("create the VM folder");
        let token = format!("operator-{name}-0123456789abcdef");
        let peer_token = format!("peer-{name}-0123456789abcdef");
        let webhook_token = format!("webhook-{name}-0123456789abcdef");
        std::fs::write(dir.join("token"), format!("{token}\n")).expect("token");
        std::fs::write(dir.join("peer-token"), &peer_token).expect("peer token");
        std::fs::write(dir.join("webhook-token"), &webhook_token).expect("webhook token");
        std::fs::write(
            dir.join("agent.toml"),
            format!(
                "name = \"{name}\"\nlisten = \"{addr}\"\nvm_dir = \"vms\"\nrun_dir = \"run\"\n\
                 token_file = \"token\"\npeer_token_file = \"peer-token\"\n\
                 webhook_token_file = \"webhook-token\"\ninsecure_migrations = true\n"
            ),
        )
        .expect("agent.toml");
        Self {
            name: name.to_owned(),
            ns: at.map(|(ns, _)| ns.to_owned()),
            dir: dir.to_owned(),
            addr,
            token,
            peer_token,
            webhook_token,
            env: Vec::new(),
            tls_ca: None,
            child: None,
        }
    }

    /// Adds a top-level `key = value` line to the agent's config (before it starts).
    pub fn set(&self, line: &str) {
        let path = self.dir.join("agent.toml");
        let text = std::fs::read_to_string(&path).expect("agent.toml");
        // Top-level keys go before any table.
        std::fs::write(&path, format!("{line}\n{text}")).expect("agent.toml");
    }

    /// Polls `path` (a migration or storage migration) until its record has ended;
    /// returns it.
    pub fn wait_record_ended(&self, path: &str, timeout: Duration) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let a = self.call("GET", path, None);
            assert_eq!(a.status, 200, "{a:?}");
            let m = a.json();
            if ["completed", "failed", "cancelled"].contains(&m["state"].as_str().unwrap_or("")) {
                return m;
            }
            assert!(
                t0.elapsed() < timeout,
                "{path} still {} after {timeout:?}: {m}\n{}",
                m["state"],
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Serves the API over HTTPS with the certificate and key in `pki` (from
    /// [`write_test_pki`]), before it starts.
    pub fn serve_tls(&mut self, pki: &Path) {
        // The same certificate secures its migrations, both ways.
        let path = self.dir.join("agent.toml");
        let text = std::fs::read_to_string(&path).expect("agent.toml");
        std::fs::write(&path, text.replacen("insecure_migrations = true\n", "", 1))
            .expect("agent.toml");
        self.set(&format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nca_file = \"{}\"",
            pki.join("cert.pem").display(),
            pki.join("key.pem").display(),
            pki.join("ca.pem").display()
        ));
        self.tls_ca = Some(pki.join("ca.pem"));
    }

    /// Makes `other` a peer of this agent (before it starts): its name, its API, and
    /// the token it takes from peers.
    pub fn peer_with(&self, other: &Agent) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("agent.toml"))
            .expect("agent.toml");
        let (scheme, ca) = match &other.tls_ca {
            Some(ca) => ("https", format!("ca_file = \"{}\"\n", ca.display())),
            None => ("http", String::new()),
        };
        write!(
            f,
            "\n[[peers]]\nname = \"{}\"\nurl = \"{scheme}://{}\"\ntoken_file = \"{}\"\n{ca}",
            other.name,
            other.addr,
            other.dir.join("peer-token").display()
        )
        .expect("add a peer");
    }

    /// One request to this agent, over HTTPS if it serves it; None if unreachable.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Option<Answer> {
        match &self.tls_ca {
            Some(ca) => request_tls(&self.addr, ca, method, path, token, body).ok(),
            None => request_in(self.ns.as_deref(), &self.addr, method, path, token, body),
        }
    }

    /// A request as the operator; unreachable is a test failure.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        self.send(method, path, Some(&self.token), body)
            .unwrap_or_else(|| panic!("the agent did not answer {path}: {}", self.log_text()))
    }

    /// Starts a migration through the API; returns its id.
    pub fn migrate(&self, body: &str) -> String {
        let a = self.call("POST", "/v1/migrations", Some(body));
        assert_eq!(a.status, 201, "{a:?}\n{}", self.log_text());
        a.json()["id"].as_str().expect("an id").to_owned()
    }

    /// Polls the migration `id` until it has ended; returns its record.
    pub fn wait_ended(&self, id: &str, timeout: Duration) -> serde_json::Value {
        self.wait_record_ended(&format!("/v1/migrations/{id}"), timeout)
    }

    /// Starts `ferry agent` and waits until `/healthz` answers.
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        let mut cmd = match &self.ns {
            Some(ns) => crate::netns::LinkPair::command(ns, &ferry_bin()),
            None => Command::new(ferry_bin()),
        };
        let child = cmd
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["agent", "--config"])
            .arg(self.dir.join("agent.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start ferry agent");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Some(a) = self.get("/healthz", None)
                && a.status == 200
            {
                return;
            }
            if let Some(Ok(Some(exit))) = self.child.as_mut().map(Child::try_wait) {
                panic!("ferry agent exited ({exit}): {}", self.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the agent did not answer /healthz: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Option<Answer> {
        self.send("GET", path, token, None)
    }

    /// A GET as the operator; unreachable is a test failure.
    pub fn read(&self, path: &str) -> Answer {
        self.get(path, Some(&self.token))
            .unwrap_or_else(|| panic!("the agent did not answer {path}: {}", self.log_text()))
    }

    /// `GET /v1/vms` until `pred` holds for the list, within `timeout`.
    pub fn wait_for_vms(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let t0 = Instant::now();
        loop {
            let a = self.read("/v1/vms");
            assert_eq!(a.status, 200, "{a:?}");
            let list = a.json().as_array().cloned().unwrap_or_default();
            if pred(&list) {
                return list;
            }
            assert!(
                t0.elapsed() < timeout,
                "{what}: not within {timeout:?}: {list:?}\nagent log: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's process: SIGKILL (a crash) or SIGTERM (a stop); waits for it.
    pub fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the agent runs");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait().expect("wait for the agent")
    }

    /// `ferry ARGS` aimed at this agent as its operator: `--agent` (https:// when it
    /// serves TLS, with `--ca-file`) and `--token-file` added.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        let mut cmd = Command::new(ferry_bin());
        cmd.args(args)
            .arg("--agent")
            .arg(format!("{scheme}://{}", self.addr))
            .arg("--token-file")
            .arg(self.dir.join("token"));
        if let Some(ca) = &self.tls_ca {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd.output().expect("run ferry")
    }

    /// The control socket of the VM `name`, as the agent runs it.
    pub fn control(&self, name: &str) -> String {
        self.dir
            .join("run")
            .join(format!("{name}.sock"))
            .display()
            .to_string()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The VMs it started outlive it by design; a test leaves none behind.
        if let Ok(entries) = std::fs::read_dir(self.dir.join("run")) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "sock") {
                    let _ = Command::new(ferry_bin())
                        .args(["quit", "--force", "--control"])
                        .arg(&p)
                        .stdin(Stdio::null())
                        .output();
                }
            }
        }
    }
}
