//! The control socket's client side: one request line out, one answer line back.
//! Knows the wire (JSON lines, `ok` with `result` or `error`) and the API's types,
//! nothing of the VMM behind it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use ferry_api::{Answer, ErrorKind, Request};
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
    /// The VMM answered, and said no (and, where it says, which kind of no).
    #[error("{message}")]
    Refused {
        message: String,
        kind: Option<ErrorKind>,
    },
}

/// Sends `req` and reads its answer's `result` as `T`, or the VMM's refusal.
pub fn call<T: DeserializeOwned>(path: &Path, req: &Request) -> Result<T, ClientError> {
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
    let mut w = stream.try_clone().map_err(io)?;
    w.write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    if line.is_empty() {
        return Err(malformed("connection closed".into()));
    }
    let answer: Answer<T> = serde_json::from_str(&line).map_err(|e| {
        malformed(format!(
            "the answer to {} is not what the API says: {e}",
            req.name()
        ))
    })?;
    match answer.into_result() {
        Ok(Some(result)) => Ok(result),
        Ok(None) => Err(malformed(format!(
            "the answer to {} has no result",
            req.name()
        ))),
        Err((message, kind)) => Err(ClientError::Refused { message, kind }),
    }
}
