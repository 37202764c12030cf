//! Saved or migrated device state: the versioned, checksummed blob a snapshot holds
//! and a source sends. Half the inputs are taken as they are (the framing's checks);
//! the other half are sealed here as a MachineState payload with a valid checksum,
//! so the payload decoder behind it is reached too.
#![no_main]

use ferry::vmm::blob::{self, BlobKind};
use ferry::vmm::snapshot::MachineState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, data)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let _ = blob::decode::<MachineState>(BlobKind::MachineState, data);
        return;
    }
    // The header of a real blob (magic, version, kind) from an empty one.
    let Ok(empty) = blob::encode(BlobKind::MachineState, &()) else {
        return;
    };
    let mut sealed = empty[..empty.len() - 12].to_vec();
    sealed.extend_from_slice(&(data.len() as u64).to_le_bytes());
    sealed.extend_from_slice(data);
    let crc = crc32fast::hash(&sealed);
    sealed.extend_from_slice(&crc.to_le_bytes());
    let _ = blob::decode::<MachineState>(BlobKind::MachineState, &sealed);
});
