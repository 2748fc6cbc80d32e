//! Events committed per second through `Billing::receive` (verify, parse, record, load, decide,
//! commit) with 1, 4 and 16 concurrent senders, each event a new subscription of a new customer (no contention on one row),
//! through `PgStore` and through `PostgrestStore` + the test gateway, on a scratch database.
//!
//! ```text
//! scripts/with-postgres.sh cargo run --release -p mindroom-billing-supabase --features test-util \
//!     --example throughput [seconds-per-run]
//! ```
//! Compare with `pgbench -N` on the same server (see README).
#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use mindroom_billing_core::signature::{WebhookSecret, sign};
use mindroom_billing_core::{
    Billing, BillingConfig, Disposition, Policy, PriceCatalog, Store, SystemClock, Tier, Verifier,
};
use mindroom_billing_supabase::testing::{Gateway, GatewayConfig, TestDb};
use mindroom_billing_supabase::{PgStore, PgStoreOptions, PostgrestOptions, PostgrestStore};
use secrecy::SecretString;

const SECRET: &str = "whsec_throughput";
const EVT: &str = "evt_1FxcB7WZ01zgkWrFwUFXakUx";
const SUB: &str = "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw";
const CUS: &str = "cus_QXg1o8vcGmoR32";

fn billing(store: Arc<dyn Store>) -> Billing {
    let policy =
        Policy::default().with_prices(PriceCatalog::new().with_price("price_1PgafmB7WZ01zgkW6dKueIc5", Tier::Starter));
    let config = BillingConfig::new(Verifier::new([WebhookSecret::new(SECRET)])).with_policy(policy);
    Billing::new(
        store,
        Arc::new(mindroom_billing_core::dryrun::DryRunProvisioner::default()),
        Arc::new(mindroom_billing_core::dryrun::LogNotifier),
        config,
    )
    .with_clock(Arc::new(SystemClock))
}

async fn run(label: &str, billing: Arc<Billing>, senders: usize, seconds: u64, template: &str) -> f64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let committed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let (billing, committed, template) = (Arc::clone(&billing), Arc::clone(&committed), template.to_owned());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let body = template
                    .replace(EVT, &format!("evt_bench_{n}"))
                    .replace(SUB, &format!("sub_bench_{n}"))
                    .replace(CUS, &format!("cus_bench_{n}"));
                let header = sign(&WebhookSecret::new(SECRET), body.as_bytes(), Utc::now().timestamp());
                let receipt = billing.receive(Some(&header), body.as_bytes()).await.unwrap();
                assert_eq!(receipt.disposition, Disposition::Applied);
                committed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    #[allow(clippy::cast_precision_loss)]
    let rate = committed.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    println!("{label:<28} senders={senders:<3} events/s={rate:>8.0}");
    rate
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/stripe/events/2026-07-29.dahlia/customer.subscription.created.json"
    ))
    .unwrap();
    let db = TestDb::create().await.unwrap();
    let store = PgStore::connect(db.url(), PgStoreOptions::default().with_max_connections(16)).await.unwrap();
    store.migrate().await.unwrap();
    let direct = Arc::new(billing(Arc::new(store.clone())));
    for senders in [1, 4, 16] {
        run("PgStore (direct)", Arc::clone(&direct), senders, seconds, &template).await;
    }
    let gw = Gateway::start(db.url(), GatewayConfig { pool_max_connections: 16, ..GatewayConfig::default() }).await;
    let rest = PostgrestStore::new(
        &gw.base_url(),
        SecretString::from(gw.secret_key().to_owned()),
        PostgrestOptions::default(),
    )
    .unwrap();
    let via_rest = Arc::new(billing(Arc::new(rest)));
    for senders in [1, 4, 16] {
        run("PostgrestStore (test gw)", Arc::clone(&via_rest), senders, seconds, &template).await;
    }
    drop(gw);
    store.close().await;
    db.drop_db().await.unwrap();
}
