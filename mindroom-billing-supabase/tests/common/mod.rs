//! Helpers shared by the store's integration tests: fresh migrated databases, stores over them
//! (direct and through the PostgREST test gateway), fixtures, a test clock and a TCP proxy that
//! can take the database "down".
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, TimeZone, Utc};
use mindroom_billing_core::signature::{WebhookSecret, sign};
use mindroom_billing_core::{
    Billing, BillingConfig, CacheConfig, Clock, Policy, PriceCatalog, Store, Tier, Verifier, WorkerConfig,
};
use mindroom_billing_supabase::testing::{Gateway, GatewayConfig, TestDb};
use mindroom_billing_supabase::{PgStore, PgStoreOptions, PostgrestOptions, PostgrestStore};
use secrecy::SecretString;

pub const PRICE_STARTER: &str = "price_1PgafmB7WZ01zgkW6dKueIc5";
pub const PRICE_PRO: &str = "price_1PgagYB7WZ01zgkWq2Lx9Rz4";
pub const SUB: &str = "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw";
pub const CUS: &str = "cus_QXg1o8vcGmoR32";
pub const SECRET: &str = "whsec_supabase_store_test";
pub const T0: i64 = 1_785_000_000;
pub const DAY: i64 = 86_400;
pub const DAHLIA: &str = "2026-07-29.dahlia";

pub fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).unwrap()
}

/// A fresh database with the migrations applied, and a direct store on it.
pub struct Fresh {
    pub db: TestDb,
    pub store: Arc<PgStore>,
}

pub async fn fresh() -> Fresh {
    let db = TestDb::create().await.expect("test database");
    let store = PgStore::connect(db.url(), PgStoreOptions::default().with_max_connections(6)).await.expect("connect");
    store.migrate().await.expect("migrate");
    Fresh { db, store: Arc::new(store) }
}

/// Another store (another "replica": its own pool) on the same database.
pub async fn replica(db: &TestDb) -> Arc<PgStore> {
    Arc::new(PgStore::connect(db.url(), PgStoreOptions::default().with_max_connections(6)).await.expect("connect"))
}

/// A PostgREST store through a fresh gateway on `db`, with the `sb_secret_…` key or the legacy JWT.
pub async fn via_gateway(db: &TestDb, legacy_jwt: bool) -> (Gateway, Arc<PostgrestStore>) {
    let config = GatewayConfig { pool_max_connections: 6, ..GatewayConfig::default() };
    let gw = Gateway::start(db.url(), config).await;
    let key = if legacy_jwt { gw.service_role_jwt() } else { gw.secret_key().to_owned() };
    let store = PostgrestStore::new(&gw.base_url(), SecretString::from(key), PostgrestOptions::default()).unwrap();
    (gw, Arc::new(store))
}

pub fn stripe_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/stripe")
}

/// The raw bytes of `events/<version>/<name>.json`.
pub fn fixture(version: &str, name: &str) -> Vec<u8> {
    std::fs::read(stripe_dir().join("events").join(version).join(format!("{name}.json"))).unwrap()
}

/// A clock tests move by hand.
#[derive(Debug)]
pub struct TestClock(Mutex<DateTime<Utc>>);

impl TestClock {
    pub fn new(now: DateTime<Utc>) -> Self {
        Self(Mutex::new(now))
    }
    pub fn set(&self, now: DateTime<Utc>) {
        *self.0.lock().unwrap() = now;
    }
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

pub fn policy(pro_tier: Tier) -> Policy {
    Policy::default()
        .with_prices(PriceCatalog::new().with_price(PRICE_STARTER, Tier::Starter).with_price(PRICE_PRO, pro_tier))
}

/// A `Billing` over `store` with the dry-run provisioner, a logging notifier and `clock`.
pub fn billing(store: Arc<dyn Store>, clock: Arc<TestClock>, pro_tier: Tier) -> Billing {
    billing_with_cache(store, clock, pro_tier, CacheConfig::default())
}

/// [`billing`] with the given entitlement cache settings.
pub fn billing_with_cache(store: Arc<dyn Store>, clock: Arc<TestClock>, pro_tier: Tier, cache: CacheConfig) -> Billing {
    let worker = WorkerConfig { lease: Duration::seconds(2), ..WorkerConfig::default() };
    let config = BillingConfig::new(Verifier::new([WebhookSecret::new(SECRET)]))
        .with_policy(policy(pro_tier))
        .with_worker(worker)
        .with_cache(cache);
    Billing::new(
        store,
        Arc::new(mindroom_billing_core::dryrun::DryRunProvisioner::default()),
        Arc::new(mindroom_billing_core::dryrun::LogNotifier),
        config,
    )
    .with_clock(clock as Arc<dyn Clock>)
}

/// The `Stripe-Signature` header for `body` at `now`.
pub fn signed(body: &[u8], now: DateTime<Utc>) -> String {
    sign(&WebhookSecret::new(SECRET), body, now.timestamp())
}

/// A TCP proxy in front of PostgreSQL that tests switch off ("the database is down").
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (Arc::clone(&up), Arc::clone(&conns));
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().unwrap().push(task);
            }
        });
        Proxy { addr, up, conns, accept }
    }

    /// Drops every connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
        self.accept.abort();
    }
}

/// `(host:port, url with host:port replaced by addr)` of a `postgres://user@host:port/db` URL.
pub fn through(url: &str, addr: std::net::SocketAddr) -> (String, String) {
    let after_scheme = url.find("://").unwrap() + 3;
    let rest = &url[after_scheme..];
    let host_start = rest.find('@').map_or(0, |i| i + 1);
    let host_end = rest[host_start..].find(['/', '?']).map_or(rest.len(), |i| host_start + i);
    let mut host_port = rest[host_start..host_end].to_owned();
    if !host_port.contains(':') {
        host_port.push_str(":5432");
    }
    let proxied = format!("{}{}{addr}{}", &url[..after_scheme], &rest[..host_start], &rest[host_end..]);
    (host_port, proxied)
}
