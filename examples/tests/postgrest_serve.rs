//! The binary on the PostgREST store: `mindroom-billing serve` with `SUPABASE_URL` and a service key,
//! in front of the PostgREST-compatible test gateway over a real, freshly migrated database.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use mindroom_billing_core::{InstanceStatus, Tier};
use mindroom_billing_supabase::testing::{Gateway, GatewayConfig, TestDb};
use support::{Life, PROVISIONER_KEY, SECRET, StubProvisioner, life_events, now_secs};

async fn run_against_gateway(service_key: impl Fn(&Gateway) -> String) {
    let db = TestDb::create().await.expect("fresh database");
    support::migrate(db.url());
    let gateway = Gateway::start(db.url(), GatewayConfig::default()).await;
    let stub = StubProvisioner::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = support::binary(&std::env::temp_dir());
    command
        .arg("serve")
        .env("PORT", port.to_string())
        .env("SUPABASE_URL", gateway.base_url())
        .env("SUPABASE_SERVICE_KEY", service_key(&gateway))
        .env("STRIPE_WEBHOOK_SECRET", SECRET)
        .env("STRIPE_PRICE_STARTER", "price_pg_starter")
        .env("STRIPE_PRICE_ENTERPRISE", "price_pg_enterprise")
        .env("DOKKU_PROVISIONER_URL", &stub.url)
        .env("PROVISIONER_API_KEY", PROVISIONER_KEY)
        .env("BILLING_JOB_POLL_MS", "100")
        .env("RUST_LOG", "warn");
    let _server = support::Logged::spawn(command, "postgrest-serve");
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while client.get(format!("{url}/ready")).send().await.map(|r| r.status()).ok() != Some(reqwest::StatusCode::OK) {
        assert!(started.elapsed() < Duration::from_secs(30), "server not ready through the gateway");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let life = Life {
        sub: "sub_postgrest".into(),
        customer: "cus_postgrest".into(),
        start: now_secs() - 3600,
        first_price: "price_pg_starter".into(),
        upgrade_to: Some("price_pg_enterprise".into()),
        payment_failed: true,
        paid_after_failure: false,
        cancelled: false,
    };
    let secret = mindroom_billing_core::WebhookSecret::new(SECRET);
    for event in life_events(&life) {
        for _ in 0..2 {
            let header = mindroom_billing_core::signature::sign(&secret, event.body.as_bytes(), now_secs());
            let response = client
                .post(format!("{url}/webhooks/stripe"))
                .header("Stripe-Signature", header)
                .body(event.body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}: {}", event.id, response.text().await.unwrap());
        }
    }

    // The worker provisions through the stub; the public rows are written through PostgREST.
    let app = mindroom_billing_core::service::app_name_for(&life.sub);
    let started = Instant::now();
    loop {
        let row: Option<(String, String, i32, String, Option<String>)> = sqlx::query_as(
            "select s.tier, s.status, s.max_agents, i.status, s.grace_period_ends_at::text
             from subscriptions s join instances i on i.subscription_id = s.id
             where s.stripe_subscription_id = $1",
        )
        .bind(&life.sub)
        .fetch_optional(db.pool())
        .await
        .unwrap();
        let limits_applied = stub.apps().get(&app).and_then(|a| a.limits) == Some(support::tier_wire(Tier::Enterprise));
        if let Some((tier, status, max_agents, instance, grace)) = &row {
            if limits_applied && instance == InstanceStatus::Running.as_str() {
                assert_eq!((tier.as_str(), status.as_str(), *max_agents), ("enterprise", "active", -1));
                assert!(grace.is_some(), "the payment failure set a grace deadline");
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "not converged: {row:?} {:?}", stub.apps());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events: i64 = sqlx::query_scalar("select count(*) from billing_events").fetch_one(db.pool()).await.unwrap();
    assert_eq!(events, i64::try_from(life_events(&life).len()).unwrap(), "each event stored once");
    assert_eq!(stub.apps()[&app].provision_keys.len(), 1, "one provision");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_the_postgrest_store_with_a_secret_key() {
    run_against_gateway(|g| g.secret_key().to_owned()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_the_postgrest_store_with_a_legacy_service_role_jwt() {
    run_against_gateway(Gateway::service_role_jwt).await;
}
