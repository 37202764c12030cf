//! Saved or migrated device state: the versioned, checksummed blob a snapshot holds
//! and a source sends.
#![no_main]

use ferry::vmm::blob::{self, BlobKind};
use ferry::vmm::snapshot::MachineState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blob::decode::<MachineState>(BlobKind::MachineState, data);
});
