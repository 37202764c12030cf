//! A destination reading what a source (or anyone reaching its port) sent: frames,
//! then each frame's message, for a guest of 64 MiB. Half the inputs are taken as
//! they are (the framing's own checks); the other half as (kind, length, payload)
//! records framed here with a valid checksum, so the message decoders behind the
//! checksum are reached too.
#![no_main]

use ferry::migration::protocol::{self, MAGIC, Message};
use libfuzzer_sys::fuzz_target;

fn framed(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let [kind, l0, l1, rest @ ..] = data {
        let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&[*kind, 0, 0, 0]);
        header.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&header);
        h.update(payload);
        out.extend_from_slice(&header);
        out.extend_from_slice(&h.finalize().to_le_bytes());
        out.extend_from_slice(payload);
        data = tail;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, data)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        data.to_vec()
    } else {
        framed(data)
    };
    let mut r = &bytes[..];
    while let Ok(frame) = protocol::read_frame(&mut r) {
        let _ = Message::decode(&frame, Some(16_384));
    }
});
