//! The control socket's client side: one request line out, one answer line back.
//! Knows the wire (JSON lines, `ok` with `result` or `error`) and the API's types,
//! nothing of the VMM behind it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use ferry_api::ErrorKind;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

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

/// Sends one request and returns its `result`, or the VMM's error.
pub fn request(path: &Path, req: &Value) -> Result<Value, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let mut w = stream.try_clone().map_err(io)?;
    let mut text = req.to_string();
    text.push('\n');
    w.write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    let malformed = |message: String| ClientError::Malformed {
        path: path.to_owned(),
        message,
    };
    let v: Value = serde_json::from_str(&line).map_err(|e| {
        malformed(if line.is_empty() {
            "connection closed".into()
        } else {
            e.to_string()
        })
    })?;
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
        Some(false) => Err(ClientError::Refused {
            message: v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unspecified error")
                .to_owned(),
            kind: v
                .get("kind")
                .and_then(|k| serde_json::from_value(k.clone()).ok()),
        }),
        None => Err(malformed("no `ok` field".into())),
    }
}

/// Sends a typed request and reads its answer as `T`.
pub fn call<T: DeserializeOwned>(path: &Path, req: &impl Serialize) -> Result<T, ClientError> {
    let req = serde_json::to_value(req).map_err(|e| ClientError::Malformed {
        path: path.to_owned(),
        message: format!("the request does not serialize: {e}"),
    })?;
    let answer = request(path, &req)?;
    serde_json::from_value(answer).map_err(|e| ClientError::Malformed {
        path: path.to_owned(),
        message: format!("the answer to {} is not what the API says: {e}", req["cmd"]),
    })
}
