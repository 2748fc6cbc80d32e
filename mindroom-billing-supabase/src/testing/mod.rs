//! Test helpers (feature `test-util`).
//!
//! * [`TestDb`](crate::testing::TestDb): a freshly created, uniquely named PostgreSQL database (plus the Supabase roles
//!   `anon`, `authenticated`, `service_role`, `authenticator`), dropped afterwards.
//! * [`Gateway`](crate::testing::Gateway): a PostgREST-compatible RPC gateway (`POST {base_url}/rest/v1/rpc/<fn>`) in
//!   front of a real PostgreSQL, following `POSTGREST.md` §7.
//!
//! The admin connection string comes from `DATABASE_URL`, else
//! `postgres://postgres@127.0.0.1:5432/postgres` (see `scripts/with-postgres.sh`).

mod db;
mod gateway;
pub mod jwt;

pub use db::{DEFAULT_ADMIN_URL, TestDb, TestDbError, ensure_supabase_roles, postgres_admin_url, url_with_database};
pub use gateway::{
    DEFAULT_JWT_SECRET, DEFAULT_SECRET_KEY, Gateway, GatewayConfig, GatewayError, mint_anon_jwt, mint_jwt,
    mint_service_role_jwt,
};
