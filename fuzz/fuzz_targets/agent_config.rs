//! An agent's config file. Paths in it are taken from a folder that does not exist,
//! so nothing on the host is read.
#![no_main]

use ferry::daemon::config::AgentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = AgentConfig::parse(
            text,
            std::path::Path::new("/nonexistent-ferry-fuzz/agent.toml"),
        );
    }
});
