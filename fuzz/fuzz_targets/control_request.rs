//! What a client writes on a VMM's control socket: lines, each a JSON request.
#![no_main]

use ferry::control::{Line, read_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::BufReader::with_capacity(4096, data);
    let mut buf = Vec::new();
    while let Ok(Some(line)) = read_line(&mut r, &mut buf) {
        if let Line::Request(text) = line {
            let _ = serde_json::from_str::<ferry_api::Request>(&text);
        }
    }
});
