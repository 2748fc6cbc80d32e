//! The hyper adapter of mindroom-billing (work in progress).
