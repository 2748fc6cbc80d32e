//! The `mindroom-billing` server binary.

fn main() {}
