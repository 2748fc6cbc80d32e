//! Bench support (see `benches/`): the realistic payloads the benches and load tools sign.

use std::path::PathBuf;

/// The repository's Stripe test data directory.
pub fn stripe_testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/stripe")
}

/// The raw bytes of `testdata/stripe/events/<version>/<name>.json`.
///
/// # Panics
/// If the fixture is missing.
pub fn fixture(version: &str, name: &str) -> Vec<u8> {
    let path = stripe_testdata().join("events").join(version).join(format!("{name}.json"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Copies of `payload`, one per number in `ids`, whose event id (`"id": "evt_…"`, the first `evt_` in the body) is
/// made unique by a numeric suffix, so each one is a new event for the store.
///
/// # Panics
/// If the payload has no `evt_` id.
pub fn with_distinct_ids(payload: &[u8], ids: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    let text = std::str::from_utf8(payload).expect("UTF-8 payload");
    let start = text.find("\"evt_").expect("an evt_ id") + 1;
    let end = start + text[start..].find('"').expect("closing quote");
    let id = &text[start..end];
    ids.map(|n| format!("{}{id}x{n}{}", &text[..start], &text[end..]).into_bytes()).collect()
}
