//! The control socket's client side: one request line out, one answer line back.
//! Knows the wire (JSON lines, `ok` with `result` or `error`) and the API's types,
//! nothing of the VMM behind it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use ferry_api::{API_VERSION, Answer, ErrorKind, Request};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the VMM at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the VMM at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM at {path} sent a malformed answer: {message}")]
    Malformed { path: PathBuf, message: String },
    /// 0: from before answers carried a version.
    #[error(
        "the VMM at {path} speaks control API version {theirs}, this ferry {API_VERSION}: \
         talk to it with the ferry that started it"
    )]
    Version { path: PathBuf, theirs: u32 },
    /// The VMM answered, and said no (and, where it says, which kind of no).
    #[error("{message}")]
    Refused {
        message: String,
        kind: Option<ErrorKind>,
    },
}

impl ClientError {
    /// What a failed call was, for whoever answers for it: a VMM that cannot be
    /// reached (or did not answer in time) is unavailable; one that says no says
    /// which kind of no, when it says.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Connect { .. } | ClientError::Io { .. } => ErrorKind::Unavailable,
            ClientError::Malformed { .. } | ClientError::Version { .. } => ErrorKind::Failed,
            ClientError::Refused { kind, .. } => kind.unwrap_or(ErrorKind::Failed),
        }
    }
}

/// Sends `req` and reads its answer's `result` as `T`, or the VMM's refusal.
pub fn call<T: DeserializeOwned>(path: &Path, req: &Request) -> Result<T, ClientError> {
    call_with(path, req, None)
}

/// As [`call`], giving up on a VMM that takes longer than `within` to read the
/// request or to answer (a stopped or wedged process must not hold the caller).
pub fn call_within<T: DeserializeOwned>(
    path: &Path,
    req: &Request,
    within: std::time::Duration,
) -> Result<T, ClientError> {
    call_with(path, req, Some(within))
}

fn call_with<T: DeserializeOwned>(
    path: &Path,
    req: &Request,
    within: Option<std::time::Duration>,
) -> Result<T, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let malformed = |message: String| ClientError::Malformed {
        path: path.to_owned(),
        message,
    };
    let mut text = serde_json::to_string(req)
        .map_err(|e| malformed(format!("the request does not serialize: {e}")))?;
    text.push('\n');
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream.set_read_timeout(within).map_err(io)?;
    stream.set_write_timeout(within).map_err(io)?;
    let mut w = stream.try_clone().map_err(io)?;
    w.write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    if line.is_empty() {
        return Err(malformed("connection closed".into()));
    }
    // An answer of another version is refused, not misread: its version decides
    // whether a line that does not read as `T` is malformed or just someone else's.
    #[derive(serde::Deserialize)]
    struct Version {
        #[serde(default)]
        api_version: u32,
    }
    let other_version = |theirs: u32| ClientError::Version {
        path: path.to_owned(),
        theirs,
    };
    let answer: Answer<T> = match serde_json::from_str(&line) {
        Ok(a) => a,
        Err(e) => {
            return Err(match serde_json::from_str::<Version>(&line) {
                Ok(v) if v.api_version != API_VERSION => other_version(v.api_version),
                _ => malformed(format!(
                    "the answer to {} is not what the API says: {e}",
                    req.name()
                )),
            });
        }
    };
    if answer.api_version != API_VERSION {
        return Err(other_version(answer.api_version));
    }
    match answer.into_result() {
        Ok(Some(result)) => Ok(result),
        Ok(None) => Err(malformed(format!(
            "the answer to {} has no result",
            req.name()
        ))),
        Err((message, kind)) => Err(ClientError::Refused { message, kind }),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A VMM that answers one request with `line`.
    fn answering(line: &'static str) -> (PathBuf, std::thread::JoinHandle<()>) {
        let path = std::env::temp_dir().join(format!(
            "ferry-client-{}-{}.sock",
            std::process::id(),
            line.len()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&s).read_line(&mut request).unwrap();
            (&s).write_all(line.as_bytes()).unwrap();
        });
        (path, server)
    }

    #[test]
    fn an_answer_of_another_api_version_is_refused_not_misread() {
        let (path, server) = answering("{\"ok\":true,\"result\":{\"state\":\"running\"}}\n");
        let e = call::<serde::de::IgnoredAny>(&path, &Request::Pause {}).unwrap_err();
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(e, ClientError::Version { theirs: 0, .. }), "{e}");
        assert!(e.to_string().contains("version 0, this ferry 2"), "{e}");
    }
}
