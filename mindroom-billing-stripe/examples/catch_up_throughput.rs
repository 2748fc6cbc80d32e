//! Events applied per second by one catch-up: N events (default 5,000, each a new subscription,
//! the 3.8 KB `customer.subscription.created` fixture with fresh ids) wait in the local Stripe API
//! stub; one `Billing::catch_up` pages them through the real client (`limit=100`, the live-mode
//! limiter of 80 requests/s) and applies them oldest first into `PgStore` on a fresh database.
//!
//! ```text
//! scripts/with-postgres.sh cargo run --release -p mindroom-billing-stripe --example catch_up_throughput [events]
//! ```
//! The target (issue 12) is ≥ 500 events/s on this machine.
#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use mindroom_billing_core::signature::WebhookSecret;
use mindroom_billing_core::stripe_api::{EventsQuery, StripeApi};
use mindroom_billing_core::{Billing, BillingConfig, Policy, PriceCatalog, SystemClock, Tier, Verifier};
use mindroom_billing_stripe::{RateLimit, StripeClient, StripeConfig};
use mindroom_billing_supabase::testing::TestDb;
use mindroom_billing_supabase::{PgStore, PgStoreOptions};
use serde_json::Value;

#[path = "../../testsupport/stripe_stub.rs"]
mod stub;

const KEY: &str = "sk_test_catch_up_throughput";

fn client(url: &str) -> StripeClient {
    StripeClient::new(StripeConfig::new(KEY).with_base_url(url).with_rate_limit(RateLimit::LIVE_MODE)).unwrap()
}

#[tokio::main]
async fn main() {
    let n: i64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5_000);
    let template: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../testdata/stripe/events/2026-07-29.dahlia/customer.subscription.created.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let stub = stub::StripeStub::start(KEY).await;
    let now = Utc::now().timestamp();
    let first = now - 3_600;
    for i in 0..n {
        let mut event = template.clone();
        event["id"] = format!("evt_catch_up_{i}").into();
        event["created"] = (first + i * 3_000 / n).into();
        event["data"]["object"]["id"] = format!("sub_catch_up_{i}").into();
        event["data"]["object"]["customer"] = format!("cus_catch_up_{i}").into();
        stub.add_event_raw(&event.to_string());
    }

    // Listing alone (the stub and the limiter), for reference.
    let listing = Instant::now();
    let (mut query, mut pages, mut listed) = (EventsQuery::default(), 0, 0);
    loop {
        let page = client(&stub.url).list_events(&query).await.unwrap();
        pages += 1;
        listed += page.data.len();
        query.starting_after = page.data.last().map(|e| e.id.clone());
        if !page.has_more {
            break;
        }
    }
    let listing = listing.elapsed();

    let db = TestDb::create().await.unwrap();
    let store = PgStore::connect(db.url(), PgStoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    let policy =
        Policy::default().with_prices(PriceCatalog::new().with_price("price_1PgafmB7WZ01zgkW6dKueIc5", Tier::Starter));
    let billing = Billing::new(
        Arc::new(store.clone()),
        Arc::new(mindroom_billing_core::dryrun::DryRunProvisioner::default()),
        Arc::new(mindroom_billing_core::dryrun::LogNotifier),
        BillingConfig::new(Verifier::new([WebhookSecret::new("whsec_unused")])).with_policy(policy),
    )
    .with_clock(Arc::new(SystemClock))
    .with_stripe_api(Arc::new(client(&stub.url)));

    let started = Instant::now();
    let report = billing.catch_up(Some(chrono::DateTime::from_timestamp(first, 0).unwrap())).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(report.applied, usize::try_from(n).unwrap(), "{report:?}");
    #[allow(clippy::cast_precision_loss)]
    let rate = report.applied as f64 / elapsed.as_secs_f64();
    println!("listing alone: {listed} events in {pages} pages, {:.2} s", listing.as_secs_f64());
    println!(
        "catch-up into PgStore: {} events applied in {:.2} s = {rate:.0} events/s (target >= 500)",
        report.applied,
        elapsed.as_secs_f64()
    );
    store.close().await;
    db.drop_db().await.unwrap();
}
