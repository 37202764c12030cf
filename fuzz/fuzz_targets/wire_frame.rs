//! A destination reading what a source (or anyone reaching its port) sent: frames,
//! then each frame's message, for a guest of 64 MiB.
#![no_main]

use ferry::migration::protocol::{self, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(frame) = protocol::read_frame(&mut r) {
        let _ = Message::decode(&frame, Some(16_384));
    }
});
