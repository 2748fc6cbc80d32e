#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// Test helpers: throwaway PostgreSQL databases and a PostgREST-compatible RPC gateway.
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;

// ---- the store ----
//
// Two implementations of the core's `Store`, sharing one set of SQL functions
// (`migrations/*.sql`): [`PgStore`] (direct PostgreSQL, `DATABASE_URL`, pooler-safe) and
// [`PostgrestStore`] (`POST /rest/v1/rpc/<fn>`, `SUPABASE_URL` + service key).
pub mod migrations;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod node;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod pg;
#[cfg(feature = "postgres")]
pub mod pg_transfer;
#[cfg(feature = "postgrest")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgrest")))]
pub mod postgrest;
#[cfg(any(feature = "postgres", feature = "postgrest"))]
mod wire;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use node::NodeDatabase;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use pg::{MigrationReport, PgStore, PgStoreOptions};
#[cfg(feature = "postgrest")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgrest")))]
pub use postgrest::{PostgrestError, PostgrestOptions, PostgrestStore};
