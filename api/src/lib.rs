//! Ferry's control API: the types the VMM's control socket, the CLI, a migration
//! driver, the lab and the tests exchange. No KVM, no eBPF, no I/O: a front end (or a
//! QEMU backend) builds against this crate alone.
//!
//! Every type has one spelling on the wire (serde) and one in text (`Display` and
//! `FromStr`, for flags and reports), so a value is parsed once, where it enters, and
//! travels typed from there.

/// Text and serde spellings from one table, so the two can never disagree.
macro_rules! named {
    ($ty:ident, $what:literal, [$($variant:ident = $name:literal),+ $(,)?]) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        // The text spelling on the wire too, so a bad value is refused with the
        // message that names the choices.
        impl ::serde::Serialize for $ty {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <String as ::serde::Deserialize>::deserialize(d)?;
                text.parse().map_err(::serde::de::Error::custom)
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = $crate::ParseError;
            fn from_str(s: &str) -> Result<Self, $crate::ParseError> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    other => Err($crate::ParseError(format!(
                        concat!("unknown ", $what, " {:?} (one of: {})"),
                        other,
                        [$($name),+].join(", ")
                    ))),
                }
            }
        }
    };
}

pub mod agent;
pub mod answer;
pub mod codec;
pub mod error;
pub mod mechanics;
pub mod progress;
pub mod report;
pub mod request;
pub mod settings;
pub mod status;
pub mod trace;

pub use answer::{Answer, Cancelling, PostcopyRequested, Resuming, Started, StateNow, WorkloadSet};
pub use codec::{Codec, CodecParseError, ZSTD_MAX_LEVEL};
pub use error::ErrorKind;
pub use mechanics::Mechanics;
pub use progress::{
    CodecSample, DirtyWindows, MigrationProgress, Phase, PostcopyPhase, PostcopyStatus,
    StoragePhase, StorageProgress,
};
pub use report::{
    Decision, DriverReport, MigrationReport, MovedDisk, Outcome, PredictionRecord, ProbeSample,
    ReportCore, StorageReport,
};
pub use request::{Migrate, Reasons, Request, Resolution, TlsFiles};
pub use settings::{
    DiskMirror, Mode, ParseError, Settings, SettingsChange, StorageMode, Switchover,
};
pub use status::{
    CodecSamples, DirtySample, IncomingStatus, MachineStatus, PortCounters, RestoreTimings,
    RunState, SnapshotReport, Status, VcpuStatus, VerifyReport, VmStatus,
};

/// The control API's version. Every answer carries it (`Answer::api_version`), and a
/// client refuses an answer of another version rather than misread it. 2: settings in
/// one set of units (`codec`, `*_bytes_per_sec`), typed acknowledgements.
pub const API_VERSION: u32 = 2;
