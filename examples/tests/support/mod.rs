//! Harness for the end-to-end suite: replicas of the real binary, a recording stub provisioner,
//! a TCP cutter in front of PostgreSQL, and a Stripe-like sender.
#![allow(dead_code, unreachable_pub, clippy::print_stderr)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use mindroom_billing_core::ports::Store;
use mindroom_billing_core::signature::{WebhookSecret, sign};
use mindroom_billing_core::{Limits, Tier};
use mindroom_billing_supabase::testing::TestDb;
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

pub const SECRET: &str = "whsec_e2e_secret";
pub const PROVISIONER_KEY: &str = "e2e-provisioner-key";

/// The `accounts` / `subscriptions` / `instances` tables as the Node service created them (DESIGN §4):
/// its columns only, none of billing's.
pub const NODE_SCHEMA: &str = include_str!("node_schema.sql");

#[allow(clippy::disallowed_methods)]
pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The wire form of limits as the provisioner sees them.
pub type WireLimits = (i64, i64, i64, f64);

pub fn wire(limits: Limits) -> WireLimits {
    (limits.agents.to_wire(), limits.messages_per_day.to_wire(), i64::from(limits.memory_mb), limits.cpu())
}

pub fn tier_wire(tier: Tier) -> WireLimits {
    wire(tier.limits())
}

// ---- events -------------------------------------------------------------------------------------

/// One event as Stripe would send it.
#[derive(Clone, Debug)]
pub struct SentEvent {
    pub id: String,
    pub body: String,
}

/// A subscription's life in the storm.
#[derive(Clone, Debug)]
pub struct Life {
    pub sub: String,
    pub customer: String,
    pub start: i64,
    pub first_price: String,
    pub upgrade_to: Option<String>,
    pub payment_failed: bool,
    pub paid_after_failure: bool,
    pub cancelled: bool,
}

impl Life {
    /// A subscription of `customer` on `first_price` from `start`: no upgrade, failure or cancellation.
    pub fn new(sub: impl Into<String>, customer: impl Into<String>, start: i64, first_price: &str) -> Self {
        Self {
            sub: sub.into(),
            customer: customer.into(),
            start,
            first_price: first_price.into(),
            upgrade_to: None,
            payment_failed: false,
            paid_after_failure: false,
            cancelled: false,
        }
    }
}

pub fn subscription_event(id: &str, kind: &str, created: i64, life: &Life, status: &str, price: &str) -> SentEvent {
    let canceled_at = if status == "canceled" { created.to_string() } else { "null".into() };
    let body = format!(
        r#"{{"id":"{id}","object":"event","api_version":"2026-07-29.dahlia","created":{created},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"{kind}","data":{{"object":{{"id":"{sub}","object":"subscription","customer":"{cus}","status":"{status}","cancel_at_period_end":false,"canceled_at":{canceled_at},"trial_end":null,"metadata":{{"app_user_id":"user_{cus}"}},"items":{{"object":"list","data":[{{"id":"si_{sub}","object":"subscription_item","current_period_start":{created},"current_period_end":{end},"price":{{"id":"{price}","object":"price","lookup_key":null,"metadata":{{}},"unit_amount":4900,"currency":"usd"}}}}]}}}}}}}}"#,
        sub = life.sub,
        cus = life.customer,
        end = created + 30 * 86_400,
    );
    SentEvent { id: id.into(), body }
}

pub fn invoice_event(id: &str, kind: &str, created: i64, life: &Life, invoice: &str, status: &str) -> SentEvent {
    let body = format!(
        r#"{{"id":"{id}","object":"event","api_version":"2026-07-29.dahlia","created":{created},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"{kind}","data":{{"object":{{"id":"{invoice}","object":"invoice","customer":"{cus}","customer_email":"{cus}@example.com","status":"{status}","amount_due":4900,"currency":"usd","hosted_invoice_url":"https://invoice.stripe.com/i/{invoice}","parent":{{"type":"subscription_details","subscription_details":{{"subscription":"{sub}","metadata":{{}}}}}}}}}}}}"#,
        sub = life.sub,
        cus = life.customer,
    );
    SentEvent { id: id.into(), body }
}

/// The events of one life, in Stripe's order.
pub fn life_events(life: &Life) -> Vec<SentEvent> {
    let s = &life.sub;
    let t = life.start;
    let mut events = vec![
        subscription_event(
            &format!("evt_{s}_created"),
            "customer.subscription.created",
            t,
            life,
            "active",
            &life.first_price,
        ),
        invoice_event(&format!("evt_{s}_paid1"), "invoice.paid", t + 1, life, &format!("in_{s}_1"), "paid"),
    ];
    let mut price = life.first_price.clone();
    if let Some(up) = &life.upgrade_to {
        price.clone_from(up);
        events.push(subscription_event(
            &format!("evt_{s}_updated"),
            "customer.subscription.updated",
            t + 10,
            life,
            "active",
            up,
        ));
    }
    if life.payment_failed {
        events.push(invoice_event(
            &format!("evt_{s}_failed"),
            "invoice.payment_failed",
            t + 20,
            life,
            &format!("in_{s}_2"),
            "open",
        ));
        if life.paid_after_failure {
            events.push(invoice_event(
                &format!("evt_{s}_paid2"),
                "invoice.paid",
                t + 30,
                life,
                &format!("in_{s}_2"),
                "paid",
            ));
        }
    }
    if life.cancelled {
        events.push(subscription_event(
            &format!("evt_{s}_deleted"),
            "customer.subscription.deleted",
            t + 40,
            life,
            "canceled",
            &price,
        ));
    }
    events
}

/// Subscription created, then a payment failure at `failed_at`.
pub fn grace_events(life: &Life, failed_at: i64) -> Vec<SentEvent> {
    let s = &life.sub;
    vec![
        subscription_event(
            &format!("evt_{s}_created"),
            "customer.subscription.created",
            life.start,
            life,
            "active",
            &life.first_price,
        ),
        invoice_event(
            &format!("evt_{s}_failed"),
            "invoice.payment_failed",
            failed_at,
            life,
            &format!("in_{s}_2"),
            "open",
        ),
    ]
}

// ---- stub provisioner ---------------------------------------------------------------------------

/// What the stub knows of one app.
#[derive(Clone, Debug, Default)]
pub struct AppRecord {
    pub provision_keys: HashSet<String>,
    pub alive: bool,
    pub deprovisions: u32,
    pub limits: Option<WireLimits>,
}

/// One call as the stub provisioner saw it: method and path, app name, limits, idempotency key.
#[derive(Clone, Debug, PartialEq)]
pub struct StubCall {
    pub op: String,
    pub app: String,
    pub limits: Option<WireLimits>,
    pub key: String,
}

#[derive(Default)]
struct StubState {
    apps: HashMap<String, AppRecord>,
    fail_until: Option<Instant>,
    delay: Duration,
    calls: u64,
    log: Vec<StubCall>,
    /// Answers `PUT /update` with 400 while set.
    reject_updates: bool,
    /// Answers `POST /provision` with this app name instead of the requested one.
    answer_app_name: Option<String>,
    /// The next this many `POST /provision` calls do their work and then answer this late.
    late_provisions: (u32, Duration),
}

/// A local HTTP server speaking the Dokku provisioner's wire contract; it records every call.
#[derive(Clone)]
pub struct StubProvisioner {
    state: Arc<Mutex<StubState>>,
    pub url: String,
}

fn json(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn limits_of(v: &serde_json::Value) -> Option<WireLimits> {
    let l = v.get("limits")?;
    Some((l["agents"].as_i64()?, l["messagesPerDay"].as_i64()?, l["memoryMb"].as_i64()?, l["cpuLimit"].as_f64()?))
}

impl StubProvisioner {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(StubState::default()));
        let shared = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, std::convert::Infallible>(Self::handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { state, url }
    }

    async fn handle(state: &Mutex<StubState>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let (delay, failing) = {
            let mut s = state.lock().unwrap();
            s.calls += 1;
            (s.delay, s.fail_until.is_some_and(|u| Instant::now() < u))
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if failing {
            return json(503, serde_json::json!({"error": "provisioner down"}));
        }
        if parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(PROVISIONER_KEY) {
            return json(401, serde_json::json!({"error": "bad api key"}));
        }
        let key = parts.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return json(400, serde_json::json!({"error": "invalid json"}));
        };
        let app = v["appName"].as_str().unwrap_or_default().to_owned();
        let (answer, late) = Self::apply(&mut state.lock().unwrap(), &parts, &v, app, key);
        if let Some(late) = late {
            tokio::time::sleep(late).await;
        }
        answer
    }

    /// Does what one authenticated call asks; returns the answer and how late to send it.
    fn apply(
        s: &mut StubState,
        parts: &hyper::http::request::Parts,
        v: &serde_json::Value,
        app: String,
        key: String,
    ) -> (Response<Full<Bytes>>, Option<Duration>) {
        let op = format!("{} {}", parts.method, parts.uri.path());
        s.log.push(StubCall { op, app: app.clone(), limits: limits_of(v), key: key.clone() });
        let answer = match (parts.method.as_str(), parts.uri.path()) {
            ("POST", "/provision") => {
                let record = s.apps.entry(app.clone()).or_default();
                record.provision_keys.insert(key);
                if !record.alive {
                    // A new app gets the requested limits; an existing one is returned as it is.
                    record.alive = true;
                    record.limits = limits_of(v);
                }
                let answered = s.answer_app_name.clone().unwrap_or(app);
                let late = match &mut s.late_provisions {
                    (0, _) => None,
                    (n, by) => {
                        *n -= 1;
                        Some(*by)
                    }
                };
                let body = serde_json::json!({"appName": answered, "subdomain": format!("{answered}.test"),
                    "frontendUrl": format!("https://{answered}.test"), "backendUrl": format!("https://api.{answered}.test")});
                return (json(200, body), late);
            }
            ("PUT", "/update") if s.reject_updates => json(400, serde_json::json!({"error": "limits rejected"})),
            ("PUT", "/update") => match s.apps.get_mut(&app) {
                Some(r) if r.alive => {
                    r.limits = limits_of(v);
                    json(200, serde_json::json!({"ok": true}))
                }
                _ => json(404, serde_json::json!({"error": "no such app"})),
            },
            ("DELETE", "/deprovision") => match s.apps.get_mut(&app) {
                Some(r) if r.alive => {
                    r.alive = false;
                    r.deprovisions += 1;
                    json(200, serde_json::json!({"ok": true}))
                }
                _ => json(404, serde_json::json!({"error": "no such app"})),
            },
            _ => json(404, serde_json::json!({"error": "not found"})),
        };
        (answer, None)
    }

    /// Registers an app that exists already (provisioned before billing took over).
    pub fn add_app(&self, app: &str) {
        self.state.lock().unwrap().apps.insert(app.to_owned(), AppRecord { alive: true, ..AppRecord::default() });
    }

    pub fn apps(&self) -> HashMap<String, AppRecord> {
        self.state.lock().unwrap().apps.clone()
    }

    pub fn fail_for(&self, d: Duration) {
        self.state.lock().unwrap().fail_until = Some(Instant::now() + d);
    }

    pub fn set_delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    /// Every authenticated call, in arrival order.
    pub fn calls(&self) -> Vec<StubCall> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn reject_updates(&self, reject: bool) {
        self.state.lock().unwrap().reject_updates = reject;
    }

    /// The next `times` `POST /provision` calls create the app and then answer only after `by` (a
    /// caller whose timeout is shorter never learns that the app exists).
    pub fn answer_provisions_late(&self, times: u32, by: Duration) {
        self.state.lock().unwrap().late_provisions = (times, by);
    }

    pub fn answer_app_name(&self, name: Option<&str>) {
        self.state.lock().unwrap().answer_app_name = name.map(str::to_owned);
    }
}

// ---- TCP cutter ---------------------------------------------------------------------------------

/// A TCP forwarder in front of PostgreSQL that can simulate the database going away.
pub struct TcpCutter {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    kill: broadcast::Sender<()>,
}

impl TcpCutter {
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (kill, _) = broadcast::channel(4);
        let (cut2, kill2) = (Arc::clone(&cut), kill.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if cut2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let mut killed = kill2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = killed.recv() => {}
                    }
                });
            }
        });
        Self { addr, cut, kill }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.kill.send(());
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

// ---- the cluster --------------------------------------------------------------------------------

#[derive(Clone)]
pub struct ClusterOptions {
    pub replicas: usize,
    pub provisioner_url: String,
    pub prices: Vec<String>,
    pub db_cutter: bool,
    /// More environment for every replica (e.g. `STRIPE_SECRET_KEY`).
    pub env: Vec<(String, String)>,
    /// Each replica keeps its state in memory (`DATABASE_URL=memory:`) instead of the test database.
    pub memory_store: bool,
}

impl ClusterOptions {
    pub fn new(stub: &StubProvisioner, prices: &[&str]) -> Self {
        Self {
            replicas: 3,
            provisioner_url: stub.url.clone(),
            prices: prices.iter().map(|p| (*p).to_owned()).collect(),
            db_cutter: false,
            env: Vec::new(),
            memory_store: false,
        }
    }
}

struct Replica {
    child: Logged,
    addr: SocketAddr,
    alive: bool,
}

/// N `mindroom-billing serve` processes on one fresh database.
pub struct Cluster {
    db: TestDb,
    options: ClusterOptions,
    replica_db_url: String,
    replicas: Vec<Replica>,
    cutter: Option<TcpCutter>,
    client: reqwest::Client,
    secret: WebhookSecret,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn host_port(url: &str) -> (usize, usize) {
    let start = url.find('@').map_or_else(|| url.find("://").unwrap() + 3, |i| i + 1);
    let end = start + url[start..].find('/').unwrap();
    (start, end)
}

impl Cluster {
    pub async fn start(options: ClusterOptions) -> Self {
        Self::start_on(TestDb::create().await.expect("fresh database"), options).await
    }

    /// Migrates `db` (which may hold tables already, e.g. the Node service's) and starts the replicas.
    pub async fn start_on(db: TestDb, options: ClusterOptions) -> Self {
        migrate(db.url());
        let (cutter, replica_db_url) = if options.memory_store {
            (None, String::new())
        } else if options.db_cutter {
            let (s, e) = host_port(db.url());
            let cutter = TcpCutter::start(db.url()[s..e].to_owned()).await;
            let url = format!("{}{}{}", &db.url()[..s], cutter.addr, &db.url()[e..]);
            (Some(cutter), url)
        } else {
            (None, db.url().to_owned())
        };
        let mut cluster = Self {
            db,
            options,
            replica_db_url,
            replicas: Vec::new(),
            cutter,
            client: reqwest::Client::new(),
            secret: WebhookSecret::new(SECRET),
        };
        cluster.spawn_replicas().await;
        cluster
    }

    async fn spawn_replicas(&mut self) {
        let bin = env!("CARGO_BIN_EXE_mindroom-billing");
        let options = &self.options;
        for i in 0..options.replicas {
            let port = free_port();
            let mut command = Command::new(bin);
            command
                .arg("serve")
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("PORT", port.to_string())
                .env("DATABASE_URL", if options.memory_store { "memory:" } else { self.replica_db_url.as_str() })
                .env("STRIPE_WEBHOOK_SECRET", SECRET)
                .env("STRIPE_PRICE_STARTER", &options.prices[0])
                .env("STRIPE_PRICE_PRO", &options.prices[1])
                .env("STRIPE_PRICE_ENTERPRISE", options.prices.get(2).map_or("", String::as_str))
                .env("DOKKU_PROVISIONER_URL", &options.provisioner_url)
                .env("PROVISIONER_API_KEY", PROVISIONER_KEY)
                .env("BILLING_API_KEY", "e2e-billing-key")
                .env("LOG_FORMAT", "json")
                .env("RUST_LOG", "warn")
                .env("BILLING_WORKER_CONCURRENCY", "4")
                .env("BILLING_JOB_POLL_MS", "100")
                .env("BILLING_SWEEP_INTERVAL_MS", "500")
                // The provisioner stub is made 2 s slow in one test: a call must not time out then,
                // and the lease must outlast two calls (the binary refuses less).
                .env("BILLING_JOB_LEASE_SECS", "10")
                .env("PROVISIONER_TIMEOUT_SECS", "4")
                .env("BILLING_JOB_BACKOFF_BASE_MS", "200")
                .env("BILLING_JOB_BACKOFF_MAX_MS", "3000")
                .env("BILLING_JOB_MAX_ATTEMPTS", "100")
                .env("BILLING_UNAPPLIED_AFTER_SECS", "2")
                .env("BILLING_REQUEST_TIMEOUT_SECS", "5")
                .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let child = Logged::spawn(command, &format!("e2e-replica-{i}"));
            self.replicas.push(Replica { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), alive: true });
        }
        for i in 0..self.replicas.len() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(r) = self.client.get(self.url(i, "/health")).send().await {
                    if r.status() == 200 {
                        break;
                    }
                }
                assert!(Instant::now() < deadline, "replica {i} did not start");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Kills every replica (SIGKILL): the database stays.
    pub fn stop_all(&mut self) {
        for i in 0..self.replicas.len() {
            if self.replicas[i].alive {
                self.kill_replica(i);
            }
        }
        self.replicas.clear();
    }

    /// Starts the replicas again on the same database (after [`Cluster::stop_all`]).
    pub async fn start_again(&mut self) {
        self.stop_all();
        self.spawn_replicas().await;
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.replicas[i].addr)
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.replicas[i].addr
    }

    pub fn sign(&self, body: &[u8], t: i64) -> String {
        sign(&self.secret, body, t)
    }

    pub fn db(&self) -> &TestDb {
        &self.db
    }

    pub fn db_cutter(&self) -> Option<&TcpCutter> {
        self.cutter.as_ref()
    }

    /// SIGKILL, no goodbye.
    pub fn kill_replica(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        r.child.kill();
        r.alive = false;
    }

    fn live(&self) -> Vec<usize> {
        (0..self.replicas.len()).filter(|i| self.replicas[*i].alive).collect()
    }

    /// Sends once to a random live replica; returns the HTTP status (0 on connection error).
    async fn deliver(&self, event: &SentEvent) -> u16 {
        let live = self.live();
        let i = live[rand::thread_rng().gen_range(0..live.len())];
        post_event(&self.client, &self.url(i, "/webhooks/stripe"), event).await
    }

    /// Sends one body, signed now, to replica `i`; returns the status and the body of the answer.
    pub async fn post(&self, i: usize, body: &str) -> (u16, String) {
        let header = self.sign(body.as_bytes(), now_secs());
        let r = self
            .client
            .post(self.url(i, "/webhooks/stripe"))
            .header("Stripe-Signature", header)
            .body(body.to_owned())
            .send()
            .await
            .expect("replica answers");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    pub async fn send_once(&self, events: &[SentEvent]) -> Vec<u16> {
        let mut out = Vec::new();
        for e in events {
            out.push(self.deliver(e).await);
        }
        out
    }

    /// Delivers every event, `concurrency` at a time, redelivering until a 200 like Stripe does.
    pub async fn send_all(&self, events: &[SentEvent], concurrency: usize) {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let worker = || async {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(event) = events.get(i) else { break };
                let mut attempts = 0;
                loop {
                    let status = self.deliver(event).await;
                    if status == 200 {
                        break;
                    }
                    attempts += 1;
                    assert!(attempts < 120, "event {} never accepted (last status {status})", event.id);
                    assert!(matches!(status, 0 | 500 | 503), "unexpected status {status} for {}", event.id);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        let workers: Vec<_> = (0..concurrency).map(|_| worker()).collect();
        futures_join_all(workers).await;
    }

    pub async fn store(&self) -> Arc<dyn Store> {
        support_store(self.db.url()).await
    }

    /// Waits until no job is pending or running and no event waits to be applied.
    pub async fn wait_for_quiet(&self, timeout: Duration) {
        wait_quiet(&*self.store().await, timeout).await;
    }
}

/// Sends one event to `url`, signed now with [`SECRET`]; the HTTP status (0 on connection error).
pub async fn post_event(client: &reqwest::Client, url: &str, event: &SentEvent) -> u16 {
    let header = sign(&WebhookSecret::new(SECRET), event.body.as_bytes(), now_secs());
    match client.post(url).header("Stripe-Signature", header).body(event.body.clone()).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Waits until `store` has no pending or running job and no event waiting to be applied (three polls
/// in a row).
pub async fn wait_quiet(store: &dyn Store, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut quiet_polls = 0;
    loop {
        let counts = store.job_counts().await.unwrap();
        let unapplied = store
            .list_events(&mindroom_billing_core::ports::EventFilter {
                status: Some(mindroom_billing_core::EventStatus::Received),
                limit: 1,
            })
            .await
            .unwrap();
        if counts.pending == 0 && counts.running == 0 && unapplied.is_empty() {
            quiet_polls += 1;
            if quiet_polls >= 3 {
                return;
            }
        } else {
            quiet_polls = 0;
        }
        assert!(Instant::now() < deadline, "not quiet after {timeout:?}: {counts:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: Vec<F>) {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        pinned.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if pinned.is_empty() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
}

/// A direct store on the test database (adapted to the Supabase crate's constructor).
async fn support_store(url: &str) -> Arc<dyn Store> {
    let store = mindroom_billing_supabase::PgStore::connect(url, mindroom_billing_supabase::PgStoreOptions::default())
        .await
        .expect("test store");
    Arc::new(store)
}

// ---- child processes of the real binary ---------------------------------------------------------

/// `mindroom-billing migrate` on `url`; its output is shown only if it fails.
pub fn migrate(url: &str) {
    let out = binary(&std::env::temp_dir()).arg("migrate").env("DATABASE_URL", url).output().unwrap();
    assert!(
        out.status.success(),
        "migrate failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The binary under test, with an empty environment (only `PATH`) and a working directory of its
/// own, so neither the developer's shell nor a `.env` file leaks in.
pub fn binary(dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mindroom-billing"));
    command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).current_dir(dir);
    command
}

/// The binary running `args` against the database `db_url` and the Stripe API (stub) at `api_base`,
/// with the starter and professional prices; returns its stdout, asserting that it succeeded.
pub fn stripe_cli(args: &[&str], db_url: &str, key: &str, api_base: &str, prices: [&str; 2]) -> String {
    let output = binary(&std::env::temp_dir())
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("STRIPE_SECRET_KEY", key)
        .env("STRIPE_API_BASE", api_base)
        .env("STRIPE_PRICE_STARTER", prices[0])
        .env("STRIPE_PRICE_PRO", prices[1])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A fresh empty directory for one child.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mrb-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process whose stdout and stderr go to a log file, printed only when the test fails
/// (the child is dropped while the test panics); the file is removed otherwise.
pub struct Logged {
    child: Child,
    log: std::path::PathBuf,
    name: String,
}

impl Logged {
    pub fn spawn(mut command: Command, name: &str) -> Self {
        let log = std::env::temp_dir().join(format!("mrb-{name}-{}-{}.log", std::process::id(), rand::random::<u32>()));
        let file = std::fs::File::create(&log).unwrap();
        let child = command.stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
        Self { child, log, name: name.to_owned() }
    }

    /// Everything the child wrote so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (as `docker stop` and Kubernetes do).
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    /// Whether the child has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits for the child to exit on its own (a guard against hanging: it must exit within
    /// `within`, else it is killed and `None` is returned).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ({}) ----\n{}---- end of log ----", self.name, self.log.display(), self.output());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Every row of every table in schema `public`, as text, table by table, so that two dumps compare
/// equal exactly when nothing was written (sequences aside) — but for the `(table, column)` pairs in
/// `ignore`, left out of their rows.
pub async fn dump_rows(db: &TestDb, ignore: &[(&str, &str)]) -> Vec<(String, Vec<String>)> {
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables
         where table_schema = 'public' and table_type = 'BASE TABLE' order by 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let mut dump = Vec::new();
    for table in tables {
        let mut row = "to_jsonb(t)".to_owned();
        for (_, column) in ignore.iter().filter(|(t, _)| *t == table) {
            row = format!("({row} - '{column}')");
        }
        let sql = format!("select {row}::text from public.\"{table}\" t order by 1");
        let rows: Vec<String> = sqlx::query_scalar(&sql).fetch_all(db.pool()).await.unwrap();
        dump.push((table, rows));
    }
    dump
}
