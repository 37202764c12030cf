//! What kind of failure an answer is: what a front end maps to its own codes without
//! matching on messages (an HTTP API: 400, 404, 409, 429, 503, 500).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request is malformed or names values outside their bounds.
    InvalidRequest,
    /// What it names does not exist (no migration, no such disk).
    NotFound,
    /// It contradicts the state things are in (the VM is paused, post-copy started).
    Conflict,
    /// Something else holds what it needs (a migration runs); later it may pass.
    Busy,
    /// What would do it cannot be reached.
    Unavailable,
    /// It was tried and failed.
    Failed,
}

impl ErrorKind {
    /// Asking again later may succeed: something was busy, unreachable, or failed on
    /// the way. The rest are answers that a retry only repeats.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::Busy | ErrorKind::Unavailable | ErrorKind::Failed
        )
    }

    /// The HTTP status an API answers with for this kind.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Busy => 429,
            ErrorKind::Unavailable => 503,
            ErrorKind::Failed => 500,
        }
    }
}
