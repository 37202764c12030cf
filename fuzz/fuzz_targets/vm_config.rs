//! A VM config as a source sends it, or an operator writes it.
#![no_main]

use ferry::vmm::config::VmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = VmConfig::parse_unresolved(text, std::path::Path::new("fuzz.toml"));
    }
});
