//! The dokku adapter of mindroom-billing (work in progress).
