//! Fuzzes the `Stripe-Signature` header parser and the verifier: typed errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mindroom_billing_core::signature::{SignatureHeader, Verifier, WebhookSecret};

fuzz_target!(|data: &[u8]| {
    // First half: header text; second half: body.
    let split = data.len() / 2;
    let (header, body) = data.split_at(split);
    if let Ok(header) = std::str::from_utf8(header) {
        let _ = SignatureHeader::parse(header);
        let verifier = Verifier::new([WebhookSecret::new("whsec_fuzz")]);
        let _ = verifier.verify(Some(header), body, 1_785_000_000);
    }
});
