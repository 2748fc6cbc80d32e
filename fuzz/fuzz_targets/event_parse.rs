//! Fuzzes the lean event parser: any bytes give an `Event` or a typed `ParseError`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = mindroom_billing_core::parse(data) {
        // Whatever parses must be decidable without panicking.
        let policy = mindroom_billing_core::Policy::default();
        let now = event.created;
        let _ = mindroom_billing_core::decide(&policy, None, &event, now);
    }
});
