//! The supabase adapter of mindroom-billing (work in progress).

/// Test helpers: throwaway PostgreSQL databases and a PostgREST-compatible RPC gateway.
#[cfg(feature = "test-util")]
pub mod testing;
