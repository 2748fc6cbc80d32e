//! Bench support (see `benches/`).
