//! What a client asks of a VMM over its control socket: one JSON object per line, its
//! `cmd` naming the request (see docs/CONTROL.md).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::StorageMode;
use crate::{Mode, SettingsChange};

/// Setting name → why it has its value (a policy's reasons, for the report).
pub type Reasons = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    // Empty braces rather than unit variants: serde ignores unknown fields on unit
    // variants of an internally tagged enum, and a typo must not pass silently.
    Status {},
    /// How this VMM moves a VM, as a policy needs to know it.
    Mechanics {},
    Pause {},
    Resume {},
    Verify {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    Snapshot {
        out: PathBuf,
    },
    DirtySample {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
    },
    /// Each codec's ratio and speed on a sample of this VM's pages, and the share of
    /// its memory that is zero: what a policy plans with.
    CodecSample {},
    /// Change the lab guest's page-write rate (pages/s, all vCPUs; 0 = unpaced).
    SetWorkload {
        dirty_pages_per_sec: u64,
    },
    /// Start a migration to a `ferry vmm --incoming` at `to` (HOST:PORT).
    Migrate(Box<Migrate>),
    /// Move the VM's disk images (or one) into folder `to` while it runs.
    StorageMigrate {
        to: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<StorageMode>,
        #[serde(default)]
        remove_source: bool,
        /// Cap on the guest's disk writes while its disks move, bytes per second.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        throttle_writes_bytes_per_sec: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report: Option<PathBuf>,
    },
    /// Switch the running hybrid migration to post-copy.
    StartPostcopy {},
    /// Retry a post-copy whose link stayed down past its recovery window.
    ResumeMigration {},
    /// Change the running migration's settings.
    SetParams {
        #[serde(flatten)]
        settings: SettingsChange,
        /// Why, per setting, for the report's decisions.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        reasons: Reasons,
    },
    /// Stop the running migration; the VM keeps running here.
    Cancel {},
    /// Settle the last migration's handover in doubt with its destination.
    Resolve {},
    /// Stop the VM and the process. Refused while a migration moves the VM unless
    /// `force` (the VM then runs nowhere if the destination does not have it yet).
    Quit {
        #[serde(default)]
        force: bool,
    },
}

impl Request {
    /// Its `cmd`, as the wire spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status {} => "status",
            Request::Mechanics {} => "mechanics",
            Request::Pause {} => "pause",
            Request::Resume {} => "resume",
            Request::Verify { .. } => "verify",
            Request::Snapshot { .. } => "snapshot",
            Request::DirtySample { .. } => "dirty-sample",
            Request::CodecSample {} => "codec-sample",
            Request::SetWorkload { .. } => "set-workload",
            Request::Migrate(_) => "migrate",
            Request::StorageMigrate { .. } => "storage-migrate",
            Request::StartPostcopy {} => "start-postcopy",
            Request::ResumeMigration {} => "resume-migration",
            Request::SetParams { .. } => "set-params",
            Request::Cancel {} => "cancel",
            Request::Resolve {} => "resolve",
            Request::Quit { .. } => "quit",
        }
    }
}

/// `migrate`: where to, how, and the settings to start with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migrate {
    pub to: String,
    #[serde(flatten)]
    pub settings: SettingsChange,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_secs: Option<u64>,
    /// A silent peer is declared dead after this long (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<PathBuf>,
    #[serde(default)]
    pub no_verify: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// How long a broken post-copy link is retried before giving up (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recover_secs: Option<u64>,
    /// Post-copy: one full pre-copy pass first.
    #[serde(default)]
    pub precopy_pass: bool,
    /// Send the disks along (the destination has its own storage).
    #[serde(default)]
    pub copy_storage: bool,
    /// Why, per setting, for the report's decisions (absent: set by the operator).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reasons: Reasons,
    /// The one-time ticket the destination was started with (`ferry vmm --incoming
    /// --ticket-file`); a destination that has one refuses a source without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// The W3C trace context of the migration's trace: sent on in the handshake, so
    /// both VMMs' log lines name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The stream's TLS: this host's certificate and key, and the CA the
    /// destination's certificate must chain to. One of `tls` and `insecure` is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Plain TCP, unencrypted and unauthenticated: the operator's explicit choice.
    #[serde(default)]
    pub insecure: bool,
}

/// A host's TLS files (PEM), read by the process that uses them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// `resolve`'s answer: what the destination did with a handover in doubt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    /// This side had committed the handover.
    pub committed: bool,
    pub destination_running: bool,
    /// `destination` or `source`.
    pub vm_runs_on: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Codec, Switchover};

    #[test]
    fn requests_read_as_the_socket_spells_them() {
        let r: Request = serde_json::from_str(
            r#"{"cmd":"migrate","to":"h:1","codec":"zstd:3","mode":"hybrid",
                "switchover":"when-fits","reasons":{"codec":"it pays"}}"#,
        )
        .unwrap();
        let Request::Migrate(m) = &r else {
            panic!("{r:?}")
        };
        assert_eq!(m.settings.codec, Some(Codec::Zstd(3)));
        assert_eq!(m.mode, Some(Mode::Hybrid));
        assert_eq!(m.settings.switchover, Some(Switchover::WhenFits));
        let back: Request = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let e = serde_json::from_str::<Request>(r#"{"cmd":"set-params","codec":"gzip"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown codec"), "{e}");
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","x":1}"#).is_err());
        // A misspelt setting must not pass silently, in a migrate or a set-params.
        for bad in [
            r#"{"cmd":"migrate","to":"h:1","throttle":5}"#,
            r#"{"cmd":"set-params","throttle":5}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        let q: Request = serde_json::from_str(r#"{"cmd":"quit"}"#).unwrap();
        assert_eq!(q, Request::Quit { force: false });
    }
}
