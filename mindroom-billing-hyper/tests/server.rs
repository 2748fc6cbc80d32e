//! End-to-end tests: a real server on 127.0.0.1:0, a real HTTP client, the in-memory store, real
//! Stripe signatures, and a stub provisioner that is a local HTTP server speaking the Dokku
//! provisioner wire contract.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use mindroom_billing_core::dryrun::LogNotifier;
use mindroom_billing_core::model::JobKind;
use mindroom_billing_core::ports::{
    EventFilter, JobFilter, ProvisionError, ProvisionRequest, ProvisionedInstance, Provisioner,
};
use mindroom_billing_core::signature::sign;
use mindroom_billing_core::{
    Billing, BillingConfig, Clock, Limits, MemoryStore, Policy, PriceCatalog, Store, Tier, Verifier, WebhookSecret,
    WorkerConfig,
};
use mindroom_billing_hyper::{AppState, serve};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SECRET: &str = "whsec_test_primary";
const API_KEY: &str = "test-api-key-0123456789";
const STARTER_PRICE: &str = "price_1PgafmB7WZ01zgkW6dKueIc5";
const PRO_PRICE: &str = "price_1PgagYB7WZ01zgkWq2Lx9Rz4";
const SUBSCRIPTION: &str = "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw";
const CUSTOMER: &str = "cus_QXg1o8vcGmoR32";

// ---------------------------------------------------------------------------------------------
// Fixtures, clock, metrics
// ---------------------------------------------------------------------------------------------

fn fixture(version: &str, event_type: &str) -> Vec<u8> {
    let path = format!("{}/../testdata/stripe/events/{version}/{event_type}.json", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn created_of(body: &[u8]) -> i64 {
    serde_json::from_slice::<Value>(body).unwrap()["created"].as_i64().unwrap()
}

/// A settable clock: tests move time to each event's `created` so grace periods are deterministic.
#[derive(Debug)]
struct TestClock(Mutex<DateTime<Utc>>);

impl TestClock {
    fn at(unix: i64) -> Arc<Self> {
        Arc::new(Self(Mutex::new(Utc.timestamp_opt(unix, 0).unwrap())))
    }

    fn unix(&self) -> i64 {
        self.0.lock().unwrap().timestamp()
    }

    /// Moves the clock forward to `unix` (never backwards).
    fn advance_to(&self, unix: i64) {
        let mut now = self.0.lock().unwrap();
        if unix > now.timestamp() {
            *now = Utc.timestamp_opt(unix, 0).unwrap();
        }
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

/// The global Prometheus recorder of this test binary (installed once; tests run in parallel, so
/// metric assertions compare before/after values rather than absolute ones).
fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().expect("install recorder"))
}

/// Sum of every sample of `name` whose labels contain all of `labels` (`key="value"` strings).
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Stub provisioner: a local HTTP server speaking the Dokku provisioner wire contract
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct StubCall {
    method: String,
    path: String,
    body: Value,
    api_key: Option<String>,
    idempotency_key: Option<String>,
}

#[derive(Clone, Default)]
struct Stub {
    calls: Arc<Mutex<Vec<StubCall>>>,
}

impl Stub {
    async fn start(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::clone(&self.calls);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let calls = Arc::clone(&calls);
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let calls = Arc::clone(&calls);
                        async move {
                            let header =
                                |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
                            let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
                            let (api_key, idempotency_key) = (header("x-api-key"), header("idempotency-key"));
                            let bytes = req.into_body().collect().await.unwrap().to_bytes();
                            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                            let answer = match (method.as_str(), path.as_str()) {
                                ("POST", "/provision") => {
                                    let app = body["appName"].as_str().unwrap_or("mindroom-app").to_owned();
                                    json!({"appName": app, "subdomain": app,
                                        "frontendUrl": format!("https://{app}.example.test"),
                                        "backendUrl": format!("https://api.{app}.example.test")})
                                }
                                _ => json!({"success": true}),
                            };
                            calls.lock().unwrap().push(StubCall { method, path, body, api_key, idempotency_key });
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(answer.to_string()))))
                        }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        addr
    }

    fn calls(&self) -> Vec<StubCall> {
        self.calls.lock().unwrap().clone()
    }

    fn ops(&self) -> Vec<String> {
        self.calls().iter().map(|c| format!("{} {}", c.method, c.path)).collect()
    }
}

/// Test-only provisioner over the wire contract (stands in until `mindroom-billing-dokku` lands).
struct HttpProvisioner {
    base: String,
    client: reqwest::Client,
}

fn limits_wire(limits: &Limits) -> Value {
    json!({"agents": limits.agents.to_wire(), "messagesPerDay": limits.messages_per_day.to_wire(),
        "memoryMb": limits.memory_mb, "cpuLimit": limits.cpu()})
}

impl HttpProvisioner {
    async fn call(&self, method: reqwest::Method, path: &str, key: &str, body: Value) -> Result<Value, ProvisionError> {
        let response = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("X-API-Key", "stub-provisioner-key")
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .map_err(|e| ProvisionError::retryable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(ProvisionError::retryable(format!("status {}", response.status())));
        }
        response.json().await.map_err(|e| ProvisionError::permanent(e.to_string()))
    }
}

#[async_trait]
impl Provisioner for HttpProvisioner {
    async fn provision(&self, r: &ProvisionRequest) -> Result<ProvisionedInstance, ProvisionError> {
        let body = json!({"subscriptionId": r.subscription_id, "accountId": r.account_id, "tier": r.tier.as_str(),
            "limits": limits_wire(&r.limits), "appName": r.app_name,
            "stripeSubscriptionId": r.subscription_id, "stripeCustomerId": r.customer_id});
        let v = self.call(reqwest::Method::POST, "/provision", &r.idempotency_key, body).await?;
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        Ok(ProvisionedInstance {
            app_name: s("appName").unwrap_or_else(|| r.app_name.clone()),
            subdomain: s("subdomain"),
            frontend_url: s("frontendUrl"),
            backend_url: s("backendUrl"),
        })
    }

    async fn update_limits(&self, app_name: &str, limits: &Limits, key: &str) -> Result<(), ProvisionError> {
        let body = json!({"appName": app_name, "limits": limits_wire(limits)});
        self.call(reqwest::Method::PUT, "/update", key, body).await.map(drop)
    }

    async fn deprovision(&self, app_name: &str, key: &str) -> Result<(), ProvisionError> {
        self.call(reqwest::Method::DELETE, "/deprovision", key, json!({"appName": app_name})).await.map(drop)
    }
}

// ---------------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------------

struct Options {
    secrets: &'static str,
    body_limit: usize,
    request_timeout: Duration,
    clock_at: i64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            secrets: SECRET,
            body_limit: mindroom_billing_hyper::DEFAULT_BODY_LIMIT,
            request_timeout: Duration::from_secs(10),
            clock_at: 1_785_000_006,
        }
    }
}

struct Harness {
    addr: SocketAddr,
    base: String,
    client: reqwest::Client,
    store: Arc<MemoryStore>,
    billing: Arc<Billing>,
    clock: Arc<TestClock>,
    stub: Stub,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl Harness {
    async fn start() -> Self {
        Self::with(Options::default()).await
    }

    async fn with(options: Options) -> Self {
        let metrics = prometheus().clone();
        let stub = Stub::default();
        let stub_addr = stub.start().await;
        let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
        let provisioner = HttpProvisioner { base: format!("http://{stub_addr}"), client: client.clone() };
        let store = Arc::new(MemoryStore::new());
        let clock = TestClock::at(options.clock_at);
        let prices =
            PriceCatalog::new().with_price(STARTER_PRICE, Tier::Starter).with_price(PRO_PRICE, Tier::Professional);
        let config = BillingConfig::new(Verifier::from_comma_separated(options.secrets))
            .with_policy(Policy::default().with_prices(prices))
            .with_worker(WorkerConfig { backoff_base: Duration::from_millis(1), ..WorkerConfig::default() });
        let billing = Arc::new(
            Billing::new(Arc::clone(&store) as Arc<dyn Store>, Arc::new(provisioner), Arc::new(LogNotifier), config)
                .with_clock(Arc::clone(&clock) as Arc<dyn Clock>),
        );
        let state = AppState::new(Arc::clone(&billing))
            .with_metrics(move || metrics.render())
            .with_api_key(SecretString::from(API_KEY))
            .with_body_limit(options.body_limit)
            .with_request_timeout(options.request_timeout);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(state), async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            base: format!("http://{addr}"),
            client,
            store,
            billing,
            clock,
            stub,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn sign(&self, body: &[u8]) -> String {
        sign(&WebhookSecret::new(SECRET), body, self.clock.unix())
    }

    async fn post_webhook(&self, body: Vec<u8>, signature: Option<String>) -> (u16, String) {
        let mut request = self.client.post(self.url("/webhooks/stripe")).body(body);
        if let Some(signature) = signature {
            request = request.header("Stripe-Signature", signature);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Delivers a signed event at its own `created` time (the clock never goes backwards).
    async fn deliver(&self, body: Vec<u8>) -> (u16, String) {
        self.clock.advance_to(created_of(&body) + 1);
        let signature = self.sign(&body);
        self.post_webhook(body, Some(signature)).await
    }

    /// Runs due jobs until none is left (bounded).
    async fn drain_jobs(&self) {
        for _ in 0..100 {
            if self.billing.run_due_jobs(16).await.unwrap() == 0 {
                return;
            }
        }
        panic!("jobs did not drain");
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn snapshot(&self) -> (usize, usize, Vec<String>) {
        let events = self.store.list_events(&EventFilter { status: None, limit: 1000 }).await.unwrap();
        let jobs = self.store.list_jobs(&JobFilter { state: None, limit: 1000 }).await.unwrap();
        (events.len(), jobs.len(), self.stub.ops())
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.server.take().unwrap()).await.unwrap().unwrap();
    }
}

/// Sends raw bytes on a fresh connection, then reads the answer until the server closes or `wait`
/// passes. Write errors are ignored (the server may close early on purpose).
async fn raw_exchange(addr: SocketAddr, parts: &[&[u8]], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for part in parts {
        if stream.write_all(part).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

async fn timeline(version: &str) {
    let h = Harness::start().await;
    let events = |t: &str| fixture(version, t);

    for event_type in ["checkout.session.completed", "customer.subscription.created"] {
        assert_eq!(h.deliver(events(event_type)).await, (200, r#"{"received":true}"#.to_owned()), "{event_type}");
        h.drain_jobs().await;
    }
    assert_eq!(h.stub.ops(), ["POST /provision"]);

    assert_eq!(h.deliver(events("customer.subscription.updated")).await.0, 200);
    h.drain_jobs().await;
    assert_eq!(h.stub.ops(), ["POST /provision", "PUT /update"]);

    // Payment failed: grace starts at the event's time; the instance keeps running.
    assert_eq!(h.deliver(events("invoice.payment_failed")).await.0, 200);
    h.drain_jobs().await;
    let account = mindroom_billing_core::account_id_for_customer(CUSTOMER);
    let (status, body) = h.get(&format!("/v1/accounts/{account}/entitlements"), Some(API_KEY)).await;
    assert_eq!(status, 200, "{body}");
    let entitlements: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(entitlements["tier"], "professional", "{body}");
    assert!(entitlements["grace_period_ends_at"].is_string(), "grace deadline shown: {body}");

    // The failed invoice paid (the fixture's invoice.paid is of the first invoice: it is made the
    // payment of the failed one, an hour after the failure) clears grace. Paying another invoice
    // would not: failures are tracked per invoice.
    let failed: Value = serde_json::from_slice(&events("invoice.payment_failed")).unwrap();
    let mut paid: Value = serde_json::from_slice(&events("invoice.paid")).unwrap();
    paid["created"] = json!(created_of(&events("invoice.payment_failed")) + 3600);
    paid["data"]["object"]["id"] = failed["data"]["object"]["id"].clone();
    assert_eq!(h.deliver(serde_json::to_vec(&paid).unwrap()).await.0, 200);
    h.drain_jobs().await;
    let (_, body) = h.get(&format!("/v1/accounts/{account}/entitlements"), Some(API_KEY)).await;
    let entitlements: Value = serde_json::from_str(&body).unwrap();
    assert!(entitlements["grace_period_ends_at"].is_null(), "grace cleared: {body}");

    assert_eq!(h.deliver(events("customer.subscription.deleted")).await.0, 200);
    h.drain_jobs().await;

    let calls = h.stub.calls();
    assert_eq!(h.stub.ops(), ["POST /provision", "PUT /update", "DELETE /deprovision"], "{calls:#?}");
    let (provision, update, deprovision) = (&calls[0], &calls[1], &calls[2]);
    assert_eq!(provision.body["tier"], "starter");
    assert_eq!(provision.body["subscriptionId"], SUBSCRIPTION);
    assert_eq!(provision.body["stripeCustomerId"], CUSTOMER);
    assert_eq!(
        provision.body["limits"],
        json!({"agents": 3, "messagesPerDay": 1000, "memoryMb": 512, "cpuLimit": 0.5})
    );
    assert_eq!(update.body["limits"]["messagesPerDay"], 10_000);
    let app = provision.body["appName"].as_str().unwrap();
    assert_eq!(update.body["appName"], app);
    assert_eq!(deprovision.body["appName"], app);
    for call in &calls {
        assert_eq!(call.api_key.as_deref(), Some("stub-provisioner-key"));
        assert!(call.idempotency_key.as_deref().is_some_and(|k| !k.is_empty()));
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_timeline_dahlia_provisions_updates_and_deprovisions_once() {
    timeline("2026-07-29.dahlia").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_timeline_2023_10_16_provisions_updates_and_deprovisions_once() {
    timeline("2023-10-16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_status_and_a_clear_body_and_change_nothing() {
    let h = Harness::start().await;
    let body = fixture("2026-07-29.dahlia", "customer.subscription.created");
    let now = h.clock.unix();
    let secret = WebhookSecret::new(SECRET);
    let mut tampered = body.clone();
    let at = tampered.iter().position(|&b| b == b'7').unwrap();
    tampered[at] = b'8';
    let invalid_json = b"{\"id\": \"evt_x\", not json".to_vec();

    let cases: Vec<(&str, Vec<u8>, Option<String>, &str)> = vec![
        ("missing header", body.clone(), None, "missing Stripe-Signature header"),
        ("malformed header", body.clone(), Some("garbage".into()), "malformed Stripe-Signature header"),
        ("non-numeric timestamp", body.clone(), Some("t=abc,v1=00".into()), "malformed Stripe-Signature header"),
        ("only v0", body.clone(), Some(format!("t={now},v0=abcd")), "no v1 signature"),
        (
            "wrong secret",
            body.clone(),
            Some(sign(&WebhookSecret::new("whsec_wrong"), &body, now)),
            "no signature matches",
        ),
        ("stale timestamp", body.clone(), Some(sign(&secret, &body, now - 301)), "timestamp outside the tolerance"),
        (
            "far-future timestamp",
            body.clone(),
            Some(sign(&secret, &body, now + 3600)),
            "timestamp outside the tolerance",
        ),
        ("tampered body", tampered, Some(sign(&secret, &body, now)), "no signature matches"),
        (
            "invalid JSON, valid signature",
            invalid_json.clone(),
            Some(sign(&secret, &invalid_json, now)),
            "invalid event JSON",
        ),
    ];
    for (name, body, signature, expected) in cases {
        let (status, text) = h.post_webhook(body, signature).await;
        assert_eq!(status, 400, "{name}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
        assert!(error["error"].as_str().unwrap().contains(expected), "{name}: {text}");
    }

    // Over the limit, declared: refused from the headers alone; the 10 MiB body is never sent.
    let head = b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n\r\n";
    let answer = raw_exchange(h.addr, &[head, &[b'{'; 1024]], Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than 1048576 bytes"), "{answer}");

    // Wrong method, unknown path.
    let response = h.client.get(h.url("/webhooks/stripe")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    assert!(response.text().await.unwrap().contains("method not allowed"));
    let response = h.client.post(h.url("/health")).send().await.unwrap();
    assert_eq!((response.status().as_u16(), response.headers()["allow"].to_str().unwrap()), (405, "GET"));
    let (status, text) = h.get("/nope", None).await;
    assert_eq!((status, text.as_str()), (404, r#"{"error":"not found"}"#));

    // Internal API without / with a wrong token / with another scheme.
    let usage = json!({"account_id": uuid::Uuid::nil(), "metric": "messages", "count": 1});
    for token in [None, Some("Bearer wrong"), Some(&*format!("Basic {API_KEY}")), Some("Bearer ")] {
        let mut request = h.client.post(h.url("/v1/usage")).json(&usage);
        if let Some(token) = token {
            request = request.header("Authorization", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{token:?}");
        assert_eq!(response.text().await.unwrap(), r#"{"error":"missing or invalid bearer token"}"#);
    }
    let (status, _) = h.get(&format!("/v1/accounts/{}/entitlements", uuid::Uuid::nil()), Some("wrong")).await;
    assert_eq!(status, 401);

    assert_eq!(h.snapshot().await, (0, 0, Vec::new()), "nothing stored, queued or provisioned");
    h.shutdown().await;
}

/// Streamed (chunked) bodies are cut off at the limit without reading the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_body_over_the_limit_is_cut_off_with_413() {
    let h = Harness::with(Options { body_limit: 64 * 1024, ..Options::default() }).await;
    let head = b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: t=1,v1=00\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunk = [b'x'; 16 * 1024];
    let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
    framed.extend_from_slice(&chunk);
    framed.extend_from_slice(b"\r\n");
    // 5 × 16 KiB = 80 KiB sent, no terminating chunk: the server must answer without the end.
    let parts: Vec<&[u8]> = std::iter::once(&head[..]).chain(std::iter::repeat_n(&framed[..], 5)).collect();
    let answer = raw_exchange(h.addr, &parts, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than 65536 bytes"), "{answer}");
    assert_eq!(h.snapshot().await, (0, 0, Vec::new()));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_gets_408() {
    let h = Harness::with(Options { request_timeout: Duration::from_millis(300), ..Options::default() }).await;
    let head = b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"id\":";
    let answer = raw_exchange(h.addr, &[head], Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("not received in time"), "{answer}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_delivered_50_times_concurrently_has_one_set_of_effects() {
    let h = Arc::new(Harness::start().await);
    let body = fixture("2026-07-29.dahlia", "customer.subscription.created");
    let signature = h.sign(&body);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (h, body, signature) = (Arc::clone(&h), body.clone(), signature.clone());
        tasks.spawn(async move { h.post_webhook(body, Some(signature)).await });
    }
    while let Some(answer) = tasks.join_next().await {
        assert_eq!(answer.unwrap(), (200, r#"{"received":true}"#.to_owned()));
    }
    h.drain_jobs().await;
    assert_eq!(h.stub.ops(), ["POST /provision"]);
    let events = h.store.list_events(&EventFilter { status: None, limit: 100 }).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].deliveries, 50);
    let jobs = h.store.list_jobs(&JobFilter { state: None, limit: 100 }).await.unwrap();
    let reconciles = jobs.iter().filter(|j| matches!(j.kind, JobKind::Reconcile { .. })).count();
    assert_eq!(reconciles, 1, "{jobs:#?}");
    Arc::into_inner(h).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_accepts_events_signed_with_either_secret() {
    let h = Harness::with(Options { secrets: "whsec_old_secret, whsec_new_secret", ..Options::default() }).await;
    let now = h.clock.unix();
    for (secret, event_type) in
        [("whsec_old_secret", "checkout.session.completed"), ("whsec_new_secret", "customer.updated")]
    {
        let body = fixture("2026-07-29.dahlia", event_type);
        let signature = sign(&WebhookSecret::new(secret), &body, now);
        assert_eq!(h.post_webhook(body, Some(signature)).await.0, 200, "{secret}");
    }
    let body = fixture("2026-07-29.dahlia", "customer.subscription.created");
    let signature = sign(&WebhookSecret::new("whsec_retired"), &body, now);
    assert_eq!(h.post_webhook(body, Some(signature)).await.0, 400);
    assert_eq!(h.snapshot().await.0, 2);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_counters_moving() {
    let h = Harness::start().await;
    let webhook_200 = ["route=\"/webhooks/stripe\"", "status=\"200\""];
    let (status, before) = h.get("/metrics", None).await;
    assert_eq!(status, 200);
    let body = fixture("2026-07-29.dahlia", "customer.subscription.created");
    assert_eq!(h.deliver(body).await.0, 200);
    assert_eq!(h.post_webhook(b"{}".to_vec(), None).await.0, 400);
    h.drain_jobs().await;
    let (_, after) = h.get("/metrics", None).await;
    for (name, labels) in [
        ("billing_http_requests_total", &webhook_200[..]),
        ("billing_webhook_events_total", &["outcome=\"applied\""][..]),
        ("billing_webhook_verification_failures_total", &["reason=\"missing_header\""][..]),
        ("billing_jobs_total", &["kind=\"reconcile\"", "result=\"done\""][..]),
        ("billing_provisioner_request_seconds_count", &["op=\"provision\""][..]),
        ("billing_webhook_processing_seconds_count", &[][..]),
    ] {
        let (b, a) = (metric_sum(&before, name, labels), metric_sum(&after, name, labels));
        assert!(a > b, "{name}{labels:?} did not move ({b} → {a}):\n{after}");
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_webhook_answer_503_while_the_store_is_down() {
    let h = Harness::start().await;
    assert_eq!(h.get("/ready", None).await, (200, r#"{"status":"ready"}"#.to_owned()));
    h.store.set_unavailable(true);
    assert_eq!(h.get("/ready", None).await, (503, r#"{"error":"store unavailable"}"#.to_owned()));
    let body = fixture("2026-07-29.dahlia", "customer.subscription.created");
    let (status, text) = h.deliver(body.clone()).await;
    assert_eq!((status, text.as_str()), (503, r#"{"error":"store unavailable; retry later"}"#));
    let (status, text) = h.get(&format!("/v1/accounts/{}/entitlements", uuid::Uuid::nil()), Some(API_KEY)).await;
    assert_eq!((status, text.as_str()), (503, r#"{"error":"store unavailable; retry later"}"#));
    // The process is still healthy; only readiness fails.
    assert_eq!(h.get("/health", None).await, (200, r#"{"status":"healthy","service":"stripe-handler"}"#.to_owned()));
    h.store.set_unavailable(false);
    assert_eq!(h.get("/ready", None).await.0, 200);
    // Stripe's retry then succeeds.
    assert_eq!(h.deliver(body).await.0, 200);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_api_counts_until_the_limit_then_answers_429() {
    let h = Harness::start().await;
    let account = uuid::Uuid::new_v4();
    let post = |body: Value| h.client.post(h.url("/v1/usage")).bearer_auth(API_KEY).json(&body).send();

    let response = post(json!({"account_id": account, "metric": "messages", "count": 100})).await.unwrap();
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report, json!({"allowed": true, "used": 100, "limit": 100, "remaining": 0}));

    let response = post(json!({"account_id": account, "metric": "messages", "count": 1})).await.unwrap();
    assert_eq!(response.status(), 429);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report, json!({"allowed": false, "used": 100, "limit": 100, "remaining": 0}));

    let response = post(json!({"account_id": account, "metric": "tokens", "count": 1})).await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("invalid usage request"));

    let (status, body) = h.get(&format!("/v1/accounts/{account}/entitlements"), Some(API_KEY)).await;
    assert_eq!(status, 200);
    let entitlements: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(entitlements["tier"], "free");
    assert_eq!(entitlements["usage_today"]["messages"], 100);
    let (status, body) = h.get("/v1/accounts/not-a-uuid/entitlements", Some(API_KEY)).await;
    assert_eq!((status, body.as_str()), (400, r#"{"error":"account id is not a UUID"}"#));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_api_names_an_oversized_count_and_counts_a_keyed_retry_once() {
    let h = Harness::start().await;
    let account = uuid::Uuid::new_v4();
    let post = |body: Value| h.client.post(h.url("/v1/usage")).bearer_auth(API_KEY).json(&body).send();

    for count in [json!(9_223_372_036_854_775_808_u64), json!(18_446_744_073_709_551_616_f64), json!(-1), json!(1.5)] {
        let response = post(json!({"account_id": account, "metric": "messages", "count": count})).await.unwrap();
        assert_eq!(response.status(), 400, "{count}");
        let text = response.text().await.unwrap();
        assert!(text.contains("count") && text.contains("9223372036854775807"), "{count}: {text}");
    }

    let keyed = json!({"account_id": account, "metric": "messages", "count": 30, "idempotency_key": "req-7"});
    let first: Value = post(keyed.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(first, json!({"allowed": true, "used": 30, "limit": 100, "remaining": 70}));
    let retried = post(keyed).await.unwrap();
    assert_eq!(retried.status(), 200);
    assert_eq!(retried.json::<Value>().await.unwrap(), first, "the same answer");
    let other: Value =
        post(json!({"account_id": account, "metric": "messages", "count": 30, "idempotency_key": "req-8"}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(other["used"], 60, "another key counts");
    let (_, body) = h.get(&format!("/v1/accounts/{account}/entitlements"), Some(API_KEY)).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["usage_today"]["messages"], 60);

    let response =
        post(json!({"account_id": account, "metric": "messages", "count": 1, "idempotency_key": ""})).await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("idempotency_key"));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_api_is_disabled_without_a_key() {
    let store = Arc::new(MemoryStore::new());
    let billing = Arc::new(Billing::new(
        store,
        Arc::new(mindroom_billing_core::dryrun::DryRunProvisioner::default()),
        Arc::new(LogNotifier),
        BillingConfig::new(Verifier::from_comma_separated(SECRET)),
    ));
    let state = AppState::new(billing).with_api_key(SecretString::from(""));
    assert!(format!("{state:?}").contains("api_key: None"));
    let request = http::Request::get(format!("/v1/accounts/{}/entitlements", uuid::Uuid::nil()))
        .header("Authorization", "Bearer ")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = mindroom_billing_hyper::handle(&state, request).await;
    assert_eq!(response.status(), 503);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"error":"internal API disabled: no API key configured"}"#);
    // And the key never shows in Debug.
    let state = state.with_api_key(SecretString::from(API_KEY));
    assert!(!format!("{state:?}").contains(API_KEY));
}

/// Shutdown stops accepting but lets an in-flight request finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let h = Harness::start().await;
    let body = fixture("2026-07-29.dahlia", "customer.subscription.created");
    let signature = h.sign(&body);
    let head = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: {signature}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..100]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = h.addr;
    let store = Arc::clone(&h.store);
    let shutdown = tokio::spawn(h.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(addr).await.is_err(), "no longer accepting");
    stream.write_all(&body[100..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    shutdown.await.unwrap();
    assert_eq!(store.list_events(&EventFilter { status: None, limit: 10 }).await.unwrap().len(), 1);
}

/// A checkout of another customer carrying the same platform reference.
fn checkout_of(customer: &str, event_id: &str) -> Vec<u8> {
    let mut event: Value = serde_json::from_slice(&fixture("2026-07-29.dahlia", "checkout.session.completed")).unwrap();
    event["id"] = json!(event_id);
    event["data"]["object"]["customer"] = json!(customer);
    serde_json::to_vec(&event).unwrap()
}

/// A subscription created outside Checkout (the API, the dashboard, a migration) names the
/// platform's user in its metadata (`user_id`, or `app_user_id` as in the fixtures): that is the
/// account reference too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_comes_from_the_subscriptions_metadata_without_a_checkout() {
    let h = Harness::start().await;
    assert_eq!(h.deliver(fixture("2026-07-29.dahlia", "customer.subscription.created")).await.0, 200);
    let (status, body) = h.get("/v1/entitlements?reference=user_123", Some(API_KEY)).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["tier"], "starter", "{body}");
    assert_eq!(answer["account_id"], mindroom_billing_core::account_id_for_customer(CUSTOMER).to_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entitlements_and_usage_by_stripe_customer_and_by_reference() {
    let h = Harness::start().await;
    for event_type in ["checkout.session.completed", "customer.subscription.created"] {
        assert_eq!(h.deliver(fixture("2026-07-29.dahlia", event_type)).await.0, 200, "{event_type}");
    }
    let account = mindroom_billing_core::account_id_for_customer(CUSTOMER);
    let (status, by_id) = h.get(&format!("/v1/accounts/{account}/entitlements"), Some(API_KEY)).await;
    assert_eq!(status, 200, "{by_id}");
    assert_eq!(serde_json::from_str::<Value>(&by_id).unwrap()["tier"], "starter", "{by_id}");
    for query in [format!("customer={CUSTOMER}"), "reference=user_123".to_owned(), format!("account_id={account}")] {
        let (status, body) = h.get(&format!("/v1/entitlements?{query}"), Some(API_KEY)).await;
        assert_eq!((status, body.as_str()), (200, by_id.as_str()), "{query}: the same answer as by id");
    }

    // Usage by customer and by reference counts on the same account.
    let post = |body: Value| h.client.post(h.url("/v1/usage")).bearer_auth(API_KEY).json(&body).send();
    let report: Value =
        post(json!({"customer": CUSTOMER, "metric": "messages", "count": 5})).await.unwrap().json().await.unwrap();
    assert_eq!(report, json!({"allowed": true, "used": 5, "limit": 1000, "remaining": 995}));
    let response = post(json!({"reference": "user_123", "metric": "messages", "count": 2})).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["used"], 7);
    let (_, body) = h.get(&format!("/v1/accounts/{account}/entitlements"), Some(API_KEY)).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["usage_today"]["messages"], 7, "{body}");

    // Unknown names: 404, nothing counted.
    let unknown = [
        ("/v1/entitlements?customer=cus_nobody", r#"{"error":"no account with customer \"cus_nobody\""}"#),
        ("/v1/entitlements?reference=user_nobody", r#"{"error":"no account with reference \"user_nobody\""}"#),
    ];
    for (path, answer) in unknown {
        assert_eq!(h.get(path, Some(API_KEY)).await, (404, answer.to_owned()), "{path}");
    }
    let response = post(json!({"reference": "user_nobody", "metric": "messages", "count": 1})).await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.text().await.unwrap(), r#"{"error":"no account with reference \"user_nobody\""}"#);

    // Not exactly one name: 400 with a message saying what to send.
    let one = r#"{"error":"name the account with exactly one of account_id, customer or reference"}"#;
    for path in ["/v1/entitlements", "/v1/entitlements?customer=cus_1&reference=user_123", "/v1/entitlements?customer="]
    {
        assert_eq!(h.get(path, Some(API_KEY)).await, (400, one.to_owned()), "{path}");
    }
    let (status, body) = h.get("/v1/entitlements?user=user_123", Some(API_KEY)).await;
    assert_eq!(status, 400);
    assert!(body.contains("unknown query parameter \\\"user\\\""), "{body}");
    for body in [
        json!({"metric": "messages", "count": 1}),
        json!({"account_id": account, "customer": CUSTOMER, "metric": "messages", "count": 1}),
        json!({"customer": "", "metric": "messages", "count": 1}),
    ] {
        let response = post(body.clone()).await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        assert_eq!(response.text().await.unwrap(), one, "{body}");
    }

    // The same bearer token as the other internal routes.
    assert_eq!(h.get("/v1/entitlements?reference=user_123", None).await.0, 401);
    assert_eq!(h.get("/v1/entitlements?reference=user_123", Some("wrong")).await.0, 401);

    // A reference two customers carry is ambiguous: ask by customer.
    assert_eq!(h.deliver(checkout_of("cus_second", "evt_checkout_second")).await.0, 200);
    let (status, body) = h.get("/v1/entitlements?reference=user_123", Some(API_KEY)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body, r#"{"error":"reference \"user_123\" names more than one account; ask by customer"}"#, "{body}");
    assert_eq!(h.get("/v1/entitlements?customer=cus_second", Some(API_KEY)).await.0, 200);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_key_reused_for_another_metric_is_decided_on_that_metric() {
    let h = Harness::start().await;
    let account = uuid::Uuid::new_v4();
    let post = |body: Value| h.client.post(h.url("/v1/usage")).bearer_auth(API_KEY).json(&body).send();
    let messages: Value =
        post(json!({"account_id": account, "metric": "messages", "count": 30, "idempotency_key": "batch-1"}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(messages["used"], 30);
    // The free tier has no API access: the call is decided on the api_calls counter (refused), not
    // answered with the messages call's result.
    let response =
        post(json!({"account_id": account, "metric": "api_calls", "count": 2, "idempotency_key": "batch-1"}))
            .await
            .unwrap();
    assert_eq!(response.status(), 429);
    let api_calls: Value = response.json().await.unwrap();
    assert_eq!(api_calls, json!({"allowed": false, "used": 0, "limit": 0, "remaining": 0}), "the key is per metric");
    let (_, body) = h.get(&format!("/v1/accounts/{account}/entitlements"), Some(API_KEY)).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["usage_today"]["messages"], 30);
    h.shutdown().await;
}
