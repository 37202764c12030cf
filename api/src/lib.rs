//! Ferry's control API: the types the VMM's control socket, the CLI, a migration
//! driver, the lab and the tests exchange. No KVM, no eBPF, no I/O: a front end (or a
//! QEMU backend) builds against this crate alone.
//!
//! Every type has one spelling on the wire (serde) and one in text (`Display` and
//! `FromStr`, for flags and reports), so a value is parsed once, where it enters, and
//! travels typed from there.

pub mod codec;
pub mod error;
pub mod mechanics;
pub mod progress;
pub mod report;
pub mod request;
pub mod settings;
pub mod status;

pub use codec::{Codec, CodecParseError, ZSTD_MAX_LEVEL};
pub use error::ErrorKind;
pub use mechanics::Mechanics;
pub use progress::{
    CodecSample, DirtyWindows, MigrationProgress, Phase, PostcopyPhase, PostcopyStatus,
    StoragePhase, StorageProgress,
};
pub use report::{Decision, MigrationReport, MovedDisk, Outcome, ReportCore, StorageReport};
pub use request::{Migrate, Reasons, Request, Resolution, SettingsChange, SettingsNow};
pub use settings::{DiskMirror, Mode, ParseError, StorageMode, Switchover};
pub use status::{
    CodecSamples, DirtySample, IncomingStatus, MachineStatus, PortCounters, RestoreTimings,
    RunState, SnapshotReport, Status, VcpuStatus, VerifyReport, VmStatus,
};

/// The control API's version; a request or answer from another version is refused.
pub const API_VERSION: u32 = 1;
