//! What a VMM answers on its control socket: one JSON object per line, `ok` saying
//! which of `result` or `error` (with its `kind`) it carries; and the small results of
//! requests that only acknowledge (the larger ones are in `status` and `report`).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{API_VERSION, ErrorKind};

/// One answer line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer<T> {
    /// The API version of the side that answered (absent: before version 2).
    #[serde(default)]
    pub api_version: u32,
    pub ok: bool,
    // No `default`: serde would ask `T: Default` of it; a missing Option is None anyway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A kind this side does not know yet reads as none: the refusal still stands.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "known_kind"
    )]
    pub kind: Option<ErrorKind>,
}

fn known_kind<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<ErrorKind>, D::Error> {
    let v = Option::<String>::deserialize(d)?;
    Ok(v.and_then(|k| {
        ErrorKind::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(&k)).ok()
    }))
}

impl<T> Answer<T> {
    pub fn ok(result: T) -> Self {
        Self {
            api_version: API_VERSION,
            ok: true,
            result: Some(result),
            error: None,
            kind: None,
        }
    }

    pub fn refused(error: impl Into<String>, kind: ErrorKind) -> Self {
        Self {
            api_version: API_VERSION,
            ok: false,
            result: None,
            error: Some(error.into()),
            kind: Some(kind),
        }
    }
}

impl<T: DeserializeOwned> Answer<T> {
    /// The result, or the refusal as (message, kind).
    pub fn into_result(self) -> Result<Option<T>, (String, Option<ErrorKind>)> {
        if self.ok {
            Ok(self.result)
        } else {
            Err((
                self.error.unwrap_or_else(|| "unspecified error".into()),
                self.kind,
            ))
        }
    }
}

/// `pause`, `resume`, `quit`: the VM's state afterwards (`quitting` for `quit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateNow {
    pub state: String,
}

/// `migrate`, `storage-migrate`: it started (the destination is resolved and
/// connected); progress and the report follow in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub started: bool,
}

/// `set-workload`: the guest's page-write rate from now on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSet {
    pub dirty_pages_per_sec: u64,
}

/// `start-postcopy`: the switch is asked for; it happens at the send loop's next turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostcopyRequested {
    /// Always `requested`.
    pub postcopy: String,
}

/// `resume-migration`: a post-copy whose link stayed down is being retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resuming {
    pub resuming: bool,
}

/// `cancel`: what is being stopped (a migration, or a `dirty-sample`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancelling {
    pub cancelling: bool,
    /// `dirty-sample` when that is what stops; absent for a migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_reads_back_as_its_result_or_its_refusal() {
        let line = serde_json::to_string(&Answer::ok(Started { started: true })).unwrap();
        assert_eq!(
            line,
            format!(r#"{{"api_version":{API_VERSION},"ok":true,"result":{{"started":true}}}}"#)
        );
        let a: Answer<Started> = serde_json::from_str(&line).unwrap();
        assert_eq!(a.into_result(), Ok(Some(Started { started: true })));
        let no: Answer<Started> =
            serde_json::from_str(r#"{"ok":false,"error":"busy","kind":"busy"}"#).unwrap();
        assert_eq!(
            no.into_result(),
            Err(("busy".to_string(), Some(ErrorKind::Busy)))
        );
        let later: Answer<Started> =
            serde_json::from_str(r#"{"ok":false,"error":"no","kind":"quota-exceeded"}"#).unwrap();
        assert_eq!(later.into_result(), Err(("no".to_string(), None)));
    }
}
