//! Alertmanager's webhook post: parsed, then booked against the default rules.
#![no_main]

use ferry::daemon::alerts::{Book, Payload, Rule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<Payload>(data) {
        let mut book = Book::new("host-a", Rule::default_rules());
        let _ = book.receive(&p, |vm| vm == "web-1", 0);
    }
});
