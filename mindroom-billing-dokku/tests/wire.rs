//! The Dokku provisioner client against local stub servers that speak the wire contract, including
//! failures and slowness; and end to end with the core's orchestrator and job worker.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mindroom_billing_core::ports::{ProvisionError, ProvisionRequest, ProvisionedInstance, Provisioner};
use mindroom_billing_core::tier::Tier;
use mindroom_billing_dokku::{DokkuConfig, DokkuProvisioner};
use serde_json::json;
use uuid::Uuid;

const KEY: &str = "pk_live_SUPERSECRET_0123456789";

#[path = "../../testsupport/stub_http.rs"]
mod stub;

use stub::{Reply, Stub};

fn provisioner(url: &str) -> DokkuProvisioner {
    DokkuProvisioner::new(DokkuConfig::new(url, KEY).with_timeout(Duration::from_millis(500))).unwrap()
}

fn request(tier: Tier) -> ProvisionRequest {
    ProvisionRequest {
        subscription_id: "sub_123".into(),
        customer_id: "cus_456".into(),
        account_id: Uuid::from_u128(0x1234),
        app_name: "mr-123-abcdef".into(),
        tier,
        limits: tier.limits(),
        idempotency_key: "provision:sub_123:1".into(),
    }
}

fn assert_headers(r: &stub::Recorded, idempotency_key: &str) {
    assert_eq!(r.header("x-api-key"), Some(KEY));
    assert_eq!(r.header("idempotency-key"), Some(idempotency_key));
    assert_eq!(r.header("content-type"), Some("application/json"));
}

/// Runs all three calls against a stub answering `reply`, returning their results.
async fn all_calls(
    reply: impl Fn() -> Reply + Send + Sync + 'static,
) -> Vec<(&'static str, Result<(), ProvisionError>)> {
    let stub = Stub::start(move |_, _| reply()).await;
    let p = provisioner(&stub.url);
    let limits = Tier::Starter.limits();
    vec![
        ("provision", p.provision(&request(Tier::Starter)).await.map(|_| ())),
        ("update", p.update_limits("mr-1", &limits, "k1").await),
        ("deprovision", p.deprovision("mr-1", "k2").await),
    ]
}

fn assert_no_key_in(e: &ProvisionError) {
    let text = format!("{e} {e:?} {}", mindroom_billing_core::service::error_chain(e));
    assert!(!text.contains(KEY), "API key leaked: {text}");
}

#[tokio::test]
async fn provision_request_shape_and_answer() {
    let stub = Stub::start(|_, _| {
        Reply::json(
            201,
            json!({
                "appName": "mr-123-abcdef",
                "subdomain": "mr-123",
                "frontendUrl": "https://mr-123.mindroom.chat",
                "backendUrl": "https://api.mr-123.mindroom.chat",
                "status": "created",
                "extra": {"nested": [1, 2]}
            }),
        )
    })
    .await;
    // A trailing slash in the base URL is handled.
    let p = DokkuProvisioner::new(DokkuConfig::new(format!("{}/", stub.url), KEY)).unwrap();
    let created = p.provision(&request(Tier::Starter)).await.unwrap();
    assert_eq!(
        created,
        ProvisionedInstance {
            app_name: "mr-123-abcdef".into(),
            subdomain: Some("mr-123".into()),
            frontend_url: Some("https://mr-123.mindroom.chat".into()),
            backend_url: Some("https://api.mr-123.mindroom.chat".into()),
        }
    );
    p.provision(&request(Tier::Enterprise)).await.unwrap();

    let seen = stub.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/provision");
    assert_headers(&seen[0], "provision:sub_123:1");
    assert_eq!(
        seen[0].json(),
        json!({
            "subscriptionId": "sub_123",
            "accountId": "00000000-0000-0000-0000-000000001234",
            "tier": "starter",
            "limits": {"agents": 3, "messagesPerDay": 1000, "memoryMb": 512, "cpuLimit": 0.5},
            "stripeSubscriptionId": "sub_123",
            "stripeCustomerId": "cus_456",
            "appName": "mr-123-abcdef"
        })
    );
    assert_eq!(seen[1].json()["tier"], "enterprise");
    assert_eq!(
        seen[1].json()["limits"],
        json!({"agents": -1, "messagesPerDay": -1, "memoryMb": 8192, "cpuLimit": 4.0})
    );
}

#[tokio::test]
async fn provision_answer_without_app_name_falls_back_to_the_requested_one() {
    let stub = Stub::start(|_, _| Reply::json(200, json!({"subdomain": null, "frontendUrl": "https://x"}))).await;
    let created = provisioner(&stub.url).provision(&request(Tier::Free)).await.unwrap();
    assert_eq!(created.app_name, "mr-123-abcdef");
    assert_eq!(created.subdomain, None);
    assert_eq!(created.frontend_url.as_deref(), Some("https://x"));
    assert_eq!(created.backend_url, None);
}

#[tokio::test]
async fn update_and_deprovision_request_shapes() {
    let stub = Stub::start(|r, _| match r.path.as_str() {
        "/update" => Reply::text(204, ""),
        _ => Reply::json(200, json!({"ok": true})),
    })
    .await;
    let p = provisioner(&stub.url);
    p.update_limits("mr-1", &Tier::Professional.limits(), "update:sub_1:1:7").await.unwrap();
    p.deprovision("mr-1", "deprovision:sub_1:1").await.unwrap();

    let seen = stub.requests();
    assert_eq!((seen[0].method.as_str(), seen[0].path.as_str()), ("PUT", "/update"));
    assert_headers(&seen[0], "update:sub_1:1:7");
    assert_eq!(
        seen[0].json(),
        json!({"appName": "mr-1", "limits": {"agents": 10, "messagesPerDay": 10000, "memoryMb": 2048, "cpuLimit": 2.0}})
    );
    assert_eq!((seen[1].method.as_str(), seen[1].path.as_str()), ("DELETE", "/deprovision"));
    assert_headers(&seen[1], "deprovision:sub_1:1");
    assert_eq!(seen[1].json(), json!({"appName": "mr-1"}));
}

#[tokio::test]
async fn deprovision_of_a_missing_app_is_success() {
    for status in [404, 410] {
        let stub = Stub::start(move |_, _| Reply::json(status, json!({"error": "app not found"}))).await;
        provisioner(&stub.url).deprovision("mr-gone", "k").await.unwrap();
    }
}

#[tokio::test]
async fn server_errors_are_retryable_with_status_and_snippet() {
    for status in [500u16, 502, 503] {
        let results = all_calls(move || Reply::text(status, "upstream dokku exploded\nline two")).await;
        for (op, result) in results {
            let e = result.unwrap_err();
            assert!(e.is_retryable(), "{op} {status}: {e}");
            assert_eq!(e.retry_after(), None);
            let msg = e.to_string();
            assert!(msg.contains(&status.to_string()), "{msg}");
            assert!(msg.contains("upstream dokku exploded line two"), "{msg}");
            assert_no_key_in(&e);
        }
    }
}

#[tokio::test]
async fn rate_limits_honour_retry_after() {
    let results = all_calls(|| Reply::text(429, "slow down").with_header("Retry-After", "7")).await;
    for (op, result) in results {
        let e = result.unwrap_err();
        assert!(e.is_retryable(), "{op}");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)), "{op}");
    }

    let at = std::time::SystemTime::now() + Duration::from_secs(120);
    let date = httpdate_fmt(at);
    let results = all_calls(move || Reply::text(429, "").with_header("Retry-After", date.clone())).await;
    for (op, result) in results {
        let after = result.unwrap_err().retry_after().expect(op);
        assert!(after > Duration::from_secs(100) && after <= Duration::from_secs(120), "{op}: {after:?}");
    }

    // A 503 with Retry-After is honoured too; garbage is ignored.
    let results = all_calls(|| Reply::text(503, "").with_header("Retry-After", "3")).await;
    assert!(results.iter().all(|(_, r)| r.as_ref().unwrap_err().retry_after() == Some(Duration::from_secs(3))));
    let results = all_calls(|| Reply::text(429, "").with_header("Retry-After", "whenever")).await;
    for (_, r) in results {
        let e = r.unwrap_err();
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), None);
    }
}

fn httpdate_fmt(t: std::time::SystemTime) -> String {
    // RFC 7231 IMF-fixdate, via chrono to keep httpdate out of the test's dependencies.
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    dt.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

#[tokio::test]
async fn a_response_slower_than_the_timeout_is_retryable() {
    let stub = Stub::start(|_, _| Reply::Slow(Duration::from_secs(3), Box::new(Reply::json(200, json!({}))))).await;
    let p = DokkuProvisioner::new(DokkuConfig::new(&stub.url, KEY).with_timeout(Duration::from_millis(300))).unwrap();
    let started = Instant::now();
    let e = p.provision(&request(Tier::Starter)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");
    assert_eq!(stub.requests().len(), 1, "a timeout is not retried by the client");
    assert_no_key_in(&e);
}

#[tokio::test]
async fn a_closed_connection_is_retried_once_then_retryable() {
    let stub = Stub::start(|_, _| Reply::Close).await;
    let e = provisioner(&stub.url).provision(&request(Tier::Starter)).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    let seen = stub.requests();
    assert_eq!(seen.len(), 2, "exactly one quick retry");
    assert!(seen.iter().all(|r| r.header("idempotency-key") == Some("provision:sub_123:1")));
    assert_eq!(seen[0].body, seen[1].body);

    // Closed once, then answered: the quick retry succeeds.
    let stub = Stub::start(|_, i| if i == 0 { Reply::Close } else { Reply::text(200, "") }).await;
    provisioner(&stub.url).deprovision("mr-1", "k").await.unwrap();
    assert_eq!(stub.requests().len(), 2);
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let e = provisioner(&url).provision(&request(Tier::Starter)).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("connect"), "{e}");
}

#[tokio::test]
async fn invalid_json_in_a_success_is_permanent() {
    for body in ["<html>oops</html>", "", "[1,2]", "{\"appName\": 42}"] {
        let stub = Stub::start(move |_, _| Reply::text(200, body)).await;
        let e = provisioner(&stub.url).provision(&request(Tier::Starter)).await.unwrap_err();
        assert!(!e.is_retryable(), "{body:?}: {e}");
        assert!(e.to_string().contains("unreadable"), "{e}");
    }
}

#[tokio::test]
async fn client_errors_are_permanent() {
    for status in [400u16, 401, 403, 422, 409] {
        let results = all_calls(move || Reply::json(status, json!({"error": "no", "key": KEY}))).await;
        for (op, result) in results {
            let e = result.unwrap_err();
            assert!(!e.is_retryable(), "{op} {status}: {e}");
            assert!(e.to_string().contains(&status.to_string()), "{e}");
            assert!(e.to_string().contains("[redacted]"), "echoed key masked: {e}");
            assert_no_key_in(&e);
        }
    }
    // 404 is permanent on provision and update (only deprovision treats it as success).
    let stub = Stub::start(|_, _| Reply::text(404, "no such route")).await;
    let p = provisioner(&stub.url);
    assert!(!p.provision(&request(Tier::Starter)).await.unwrap_err().is_retryable());
    assert!(!p.update_limits("mr-1", &Tier::Free.limits(), "k").await.unwrap_err().is_retryable());
    // Redirects are not followed.
    let stub = Stub::start(|_, _| Reply::text(302, "").with_header("Location", "http://127.0.0.1:1/x")).await;
    let e = provisioner(&stub.url).provision(&request(Tier::Starter)).await.unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(stub.requests().len(), 1);
}

#[test]
fn debug_output_redacts_the_api_key() {
    let config = DokkuConfig::new("http://127.0.0.1:9", KEY);
    let text = format!("{config:?} {config:#?}");
    assert!(!text.contains(KEY), "{text}");
    assert!(text.contains("127.0.0.1:9"), "{text}");
    let p = DokkuProvisioner::new(config).unwrap();
    let text = format!("{p:?} {p:#?}");
    assert!(!text.contains(KEY), "{text}");
}

/// The full service (in-memory store) with the Dokku client against a flaky provisioner stub,
/// driven deterministically through a test clock.
mod end_to_end {
    use super::*;

    use async_trait::async_trait;
    use chrono::{DateTime, TimeZone, Utc};
    use mindroom_billing_core::ports::JobFilter;
    use mindroom_billing_core::ports::{Clock, Message, Notification, Notifier, NotifyError, Store};
    use mindroom_billing_core::service::app_name_for;
    use mindroom_billing_core::signature::sign;
    use mindroom_billing_core::{
        Billing, BillingConfig, InstanceStatus, JobKind, JobState, MemoryStore, Policy, PriceCatalog, Verifier,
        WebhookSecret, WorkerConfig,
    };

    const SECRET: &str = "whsec_e2e";
    const PRICE: &str = "price_1PgafmB7WZ01zgkW6dKueIc5";
    const SUB: &str = "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw";
    const ADMIN: &str = "ops@example.com";

    struct TestClock(Mutex<DateTime<Utc>>);

    impl TestClock {
        fn advance(&self, by: chrono::Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> DateTime<Utc> {
            *self.0.lock().unwrap()
        }
    }

    #[derive(Default)]
    struct RecordingNotifier(Mutex<Vec<Notification>>);

    #[async_trait]
    impl Notifier for RecordingNotifier {
        async fn send(&self, notification: &Notification) -> Result<(), NotifyError> {
            self.0.lock().unwrap().push(notification.clone());
            Ok(())
        }
    }

    struct World {
        billing: Billing,
        store: Arc<MemoryStore>,
        clock: Arc<TestClock>,
        notifier: Arc<RecordingNotifier>,
    }

    fn world(stub_url: &str, clock: Arc<TestClock>) -> World {
        let store = Arc::new(MemoryStore::new());
        let notifier = Arc::new(RecordingNotifier::default());
        let provisioner = Arc::new(provisioner(stub_url));
        let config = BillingConfig::new(Verifier::new([WebhookSecret::new(SECRET)]))
            .with_policy(Policy::default().with_prices(PriceCatalog::new().with_price(PRICE, Tier::Starter)))
            .with_worker(WorkerConfig {
                backoff_base: Duration::from_secs(1),
                max_attempts: 10,
                ..WorkerConfig::default()
            })
            .with_admin_email(ADMIN);
        let billing = Billing::new(store.clone(), provisioner, notifier.clone(), config).with_clock(clock.clone());
        World { billing, store, clock, notifier }
    }

    fn clock() -> Arc<TestClock> {
        Arc::new(TestClock(Mutex::new(Utc.timestamp_opt(1_785_000_010, 0).unwrap())))
    }

    /// The customer (with the address the welcome e-mail waits for), then the subscription.
    async fn deliver_created(w: &World) {
        let mut receipts = Vec::new();
        for fixture in ["customer.updated", "customer.subscription.created"] {
            let path =
                format!("{}/../testdata/stripe/events/2026-07-29.dahlia/{fixture}.json", env!("CARGO_MANIFEST_DIR"));
            let body = std::fs::read(path).unwrap();
            let header = sign(&WebhookSecret::new(SECRET), &body, w.clock.now().timestamp());
            receipts.push(w.billing.receive(Some(&header), &body).await.unwrap());
        }
        assert_eq!(receipts[1].subscription_id.as_deref(), Some(SUB));
    }

    /// Runs due jobs, advancing the clock a second at a time, until every job is done or dead.
    async fn drain(w: &World) {
        for _ in 0..3_000 {
            w.billing.run_due_jobs(10).await.unwrap();
            let jobs = w.store.list_jobs(&JobFilter { state: None, limit: 1000 }).await.unwrap();
            if jobs.iter().all(|j| matches!(j.state, JobState::Done | JobState::Dead)) {
                return;
            }
            w.clock.advance(chrono::Duration::seconds(1));
        }
        panic!("jobs did not settle");
    }

    /// A provisioner stub: fails the first `failures` provision calls with 503, then creates the app.
    /// Records the app names it created and the test-clock time of every provision call.
    struct Dokku {
        stub: Stub,
        apps: Arc<Mutex<HashSet<String>>>,
        times: Arc<Mutex<Vec<DateTime<Utc>>>>,
    }

    async fn dokku(failures: usize, clock: Arc<TestClock>) -> Dokku {
        let apps = Arc::new(Mutex::new(HashSet::new()));
        let times = Arc::new(Mutex::new(Vec::new()));
        let (apps2, times2) = (apps.clone(), times.clone());
        let stub = Stub::start(move |r, _| {
            if r.path != "/provision" {
                return Reply::text(404, "");
            }
            let mut times = times2.lock().unwrap();
            times.push(clock.now());
            if times.len() <= failures {
                return Reply::text(503, "dokku busy");
            }
            let app = r.json()["appName"].as_str().unwrap().to_owned();
            apps2.lock().unwrap().insert(app.clone());
            Reply::json(
                200,
                json!({"appName": app, "subdomain": app, "frontendUrl": format!("https://{app}.mindroom.chat"), "backendUrl": null}),
            )
        })
        .await;
        Dokku { stub, apps, times }
    }

    #[tokio::test]
    async fn a_flaky_provisioner_converges_on_one_app() {
        let clock = clock();
        let d = dokku(5, clock.clone()).await;
        let w = world(&d.stub.url, clock);
        deliver_created(&w).await;
        drain(&w).await;

        let instance = w.store.load_instance(SUB).await.unwrap().expect("instance recorded");
        assert_eq!(instance.status, InstanceStatus::Running);
        assert_eq!(instance.app_name, app_name_for(SUB));
        assert_eq!(instance.tier, Some(Tier::Starter));
        assert_eq!(instance.frontend_url, Some(format!("https://{}.mindroom.chat", app_name_for(SUB))));

        // Exactly one app, and every retry carried the same app name and idempotency key.
        assert_eq!(*d.apps.lock().unwrap(), HashSet::from([app_name_for(SUB)]));
        let calls = d.stub.requests();
        assert_eq!(calls.len(), 6);
        assert!(calls.iter().all(|r| r.json()["appName"] == app_name_for(SUB).as_str()));
        let keys: HashSet<_> = calls.iter().map(|r| r.header("idempotency-key").unwrap().to_owned()).collect();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys.iter().all(|k| k.starts_with(&format!("provision:{SUB}:1:starter:"))), "{keys:?}");

        // The job's attempts and last error are visible, and the retries backed off exponentially.
        let jobs = w.store.list_jobs(&JobFilter { state: None, limit: 100 }).await.unwrap();
        let reconcile = jobs.iter().find(|j| matches!(j.kind, JobKind::Reconcile { .. })).unwrap();
        assert_eq!(reconcile.state, JobState::Done);
        assert_eq!(reconcile.attempts, 6);
        let last_error = reconcile.last_error.as_deref().unwrap();
        assert!(last_error.contains("503") && last_error.contains("dokku busy"), "{last_error}");
        let times = d.times.lock().unwrap().clone();
        for (i, pair) in times.windows(2).enumerate() {
            let gap = (pair[1] - pair[0]).num_milliseconds();
            let full = 1000i64 << i; // backoff_base * 2^(attempt-1), jittered into [full/2, full]
            assert!(gap >= full / 2 && gap <= full + 1000, "gap {i}: {gap} ms, backoff {full} ms");
        }

        // Nothing else lost: no dead job, no alert.
        assert!(jobs.iter().all(|j| j.state == JobState::Done), "{jobs:#?}");
        assert!(w.notifier.0.lock().unwrap().iter().all(|n| !matches!(n.message, Message::AdminAlert { .. })));
    }

    #[tokio::test]
    async fn a_provisioner_that_always_fails_marks_the_instance_failed_and_alerts_once() {
        let clock = clock();
        let d = dokku(usize::MAX, clock.clone()).await;
        let w = world(&d.stub.url, clock);
        deliver_created(&w).await;
        drain(&w).await;

        assert_eq!(d.stub.requests().len(), 10, "max_attempts calls");
        assert!(d.apps.lock().unwrap().is_empty());
        let instance = w.store.load_instance(SUB).await.unwrap().expect("instance recorded");
        assert_eq!(instance.status, InstanceStatus::Failed);

        let jobs = w.store.list_jobs(&JobFilter { state: None, limit: 100 }).await.unwrap();
        let reconcile = jobs.iter().find(|j| matches!(j.kind, JobKind::Reconcile { .. })).unwrap();
        assert_eq!(reconcile.state, JobState::Dead);
        assert_eq!(reconcile.attempts, 10);
        assert!(reconcile.last_error.as_deref().unwrap().contains("503"));
        let alerts: Vec<_> = jobs.iter().filter(|j| matches!(j.kind, JobKind::AdminAlert { .. })).collect();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].state, JobState::Done);

        let sent = w.notifier.0.lock().unwrap().clone();
        let sent_alerts: Vec<_> = sent.iter().filter(|n| matches!(n.message, Message::AdminAlert { .. })).collect();
        assert_eq!(sent_alerts.len(), 1, "{sent:#?}");
        assert_eq!(sent_alerts[0].to, ADMIN);
        let Message::AdminAlert { subject, detail } = &sent_alerts[0].message else { unreachable!() };
        assert!(subject.contains(SUB), "{subject}");
        assert!(detail.contains("503"), "{detail}");

        // Running the worker again sends nothing more.
        w.clock.advance(chrono::Duration::hours(1));
        w.billing.run_due_jobs(10).await.unwrap();
        assert_eq!(w.notifier.0.lock().unwrap().len(), sent.len());
        assert_eq!(d.stub.requests().len(), 10);
    }
}
