//! The console on a real HTTP server on 127.0.0.1 over a seeded MemoryStore, and a client that
//! logs in and keeps the session cookie.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::missing_panics_doc)]

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};

use chrono::{DateTime, Duration, TimeZone, Utc};
use mindroom_billing_console::{Console, ConsoleConfig, SessionKey, hash_password};
use mindroom_billing_core::dryrun::{DryRunProvisioner, LogNotifier};
use mindroom_billing_core::stripe_api::{FakeStripeApi, RawObject};
use mindroom_billing_core::{
    AccountPatch, Billing, BillingConfig, Claim, Clock, Commit, EventSource, JobFinish, JobKind, JobResolution,
    MemoryStore, NewEvent, NewJob, Outcome, Policy, PriceCatalog, Store, Tier, Verifier, WebhookSecret,
};
use mindroom_billing_core::{Operator, OperatorRole, OperatorStore};
use tokio::sync::oneshot;

pub mod browser;

pub const ADMIN_PASSWORD: &str = "admin: correct horse battery staple";
pub const READONLY_PASSWORD: &str = "readonly: tr0ub4dor&3";
pub const KEY: &str = "test session key, 32 bytes or more!";
pub const CUS: &str = "cus_Evil1";
pub const SUB: &str = "sub_Console1";
pub const PRICE: &str = "price_pro";
pub const EVIL_EMAIL: &str = r#""><script>alert(1)</script>"#;
pub const EVIL_METADATA: &str = r#"<img src=x onerror=alert(2)>"#;
pub const FAILED_EVENT: &str = "evt_failed_1";
/// A second customer whose grace expired: its instance was deprovisioned.
pub const GRACE_CUS: &str = "cus_GraceGone";
pub const GRACE_SUB: &str = "sub_GraceGone";
pub const GRACE_EMAIL: &str = "grace.hopper@example.com";
pub const GRACE_INVOICE: &str = "in_1Pgd9kAugust";
pub const APPLIED_EVENT: &str = "evt_applied_1";

/// A named admin operator kept in the store.
pub const ALICE: &str = "alice";
pub const ALICE_PASSWORD: &str = "alice: purple monkey dishwasher";
/// A named read-only operator kept in the store.
pub const BOB: &str = "bob";
pub const BOB_PASSWORD: &str = "bob: the quick brown fox";

/// Hashing is slow on purpose: once per test binary (the two bootstrap hashes, then alice's and bob's).
pub static HASHES: LazyLock<[String; 4]> = LazyLock::new(|| {
    [ADMIN_PASSWORD, READONLY_PASSWORD, ALICE_PASSWORD, BOB_PASSWORD].map(|p| hash_password(p).unwrap())
});

pub fn t0() -> DateTime<Utc> {
    Utc.timestamp_opt(1_785_000_000, 0).unwrap()
}

/// A clock the tests move.
#[derive(Debug)]
pub struct TestClock(Mutex<DateTime<Utc>>);

impl TestClock {
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

pub fn subscription_event(id: &str, created: DateTime<Utc>, metadata: &str) -> String {
    let metadata = serde_json::to_string(metadata).unwrap();
    let (created, end) = (created.timestamp(), created.timestamp() + 30 * 86_400);
    format!(
        r#"{{"id":"{id}","object":"event","api_version":"2023-10-16","created":{created},"data":{{"object":{{"id":"{SUB}","object":"subscription","customer":"{CUS}","status":"active","current_period_end":{end},"cancel_at_period_end":false,"canceled_at":null,"trial_end":null,"items":{{"object":"list","data":[{{"id":"si_1","object":"subscription_item","price":{{"id":"{PRICE}","object":"price"}},"quantity":1}}]}},"metadata":{{"note":{metadata}}}}}}},"livemode":false,"type":"customer.subscription.updated"}}"#
    )
}

/// A running console and what the tests poke at.
pub struct Harness {
    pub addr: SocketAddr,
    pub store: Arc<MemoryStore>,
    pub billing: Arc<Billing>,
    pub clock: Arc<TestClock>,
    pub dead_job: i64,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Options of [`start`].
#[derive(Default)]
pub struct Options {
    pub secure_cookie: bool,
    pub key: Option<&'static str>,
    /// A fake Stripe API (reconciliation on, drift recorded in the store).
    pub stripe: Option<Arc<FakeStripeApi>>,
    /// The console's public origin (default: `http://` and the bound address).
    pub origin: Option<String>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

/// Seeds the store (an applied event, a failed one whose price is known now, an account with a
/// hostile e-mail, a dead job) and serves the console on an ephemeral port.
pub async fn start(options: Options) -> Harness {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(TestClock(Mutex::new(t0())));
    let policy = Policy::default().with_prices(PriceCatalog::new().with_price(PRICE, Tier::Professional));
    let config = BillingConfig::new(Verifier::new([WebhookSecret::new("whsec_test")])).with_policy(policy);
    let mut billing =
        Billing::new(store.clone(), Arc::new(DryRunProvisioner::default()), Arc::new(LogNotifier), config)
            .with_clock(clock.clone());
    if let Some(api) = &options.stripe {
        billing = billing.with_stripe_api(api.clone()).with_drift_log(store.clone());
    }
    let billing = Arc::new(billing);
    seed(&store, &billing).await;
    seed_expired_grace(&store, &billing, &clock).await;
    let dead_job = dead_job(&store, &billing).await;

    let [admin, readonly, alice, bob] = &*HASHES;
    for (name, role, hash) in [(ALICE, OperatorRole::Admin, alice), (BOB, OperatorRole::ReadOnly, bob)] {
        let operator = Operator { name: name.into(), role, password_hash: hash.clone(), created_at: t0() };
        assert!(store.add_operator(&operator).await.unwrap());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let origin = options.origin.clone().unwrap_or_else(|| format!("http://{addr}"));
    let config = ConsoleConfig::new(admin, SessionKey::from_secret(options.key.unwrap_or(KEY)).unwrap())
        .unwrap()
        .with_readonly_password_hash(readonly)
        .unwrap()
        .with_origin(&origin)
        .unwrap()
        .with_secure_cookie(options.secure_cookie)
        .with_trusted_proxies(options.trusted_proxies.clone());
    let console = Arc::new(Console::new(billing.clone(), store.clone(), config));
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(mindroom_billing_console::serve(listener, console, async {
        let _ = stopped.await;
    }));
    Harness { addr, store, billing, clock, dead_job, stop: Some(stop) }
}

/// The subscription as Stripe holds it now, with `status`.
pub fn stripe_subscription(status: &str) -> RawObject {
    let event: serde_json::Value = serde_json::from_str(&subscription_event("evt_x", t0(), "")).unwrap();
    let mut object = event["data"]["object"].clone();
    object["status"] = serde_json::Value::String(status.into());
    RawObject { id: SUB.into(), raw: object.to_string() }
}

fn new_event<'a>(id: &'a str, payload: &'a str, at: DateTime<Utc>) -> NewEvent<'a> {
    typed_event(id, "customer.subscription.updated", payload, at)
}

fn typed_event<'a>(id: &'a str, event_type: &'a str, payload: &'a str, at: DateTime<Utc>) -> NewEvent<'a> {
    NewEvent {
        id,
        event_type,
        created: at,
        api_version: Some("2023-10-16"),
        livemode: false,
        payload,
        received_at: at,
        source: EventSource::Webhook,
        customer_id: None,
    }
}

async fn seed(store: &Arc<MemoryStore>, billing: &Billing) {
    let applied = subscription_event(APPLIED_EVENT, t0() - Duration::hours(2), "first");
    store.record_event(&new_event(APPLIED_EVENT, &applied, t0() - Duration::hours(2))).await.unwrap();
    billing.replay(APPLIED_EVENT).await.unwrap();
    // A later event recorded as failed (as if its price was unknown when it came); the price is
    // configured now, so a replay applies it.
    let failed = subscription_event(FAILED_EVENT, t0() - Duration::hours(1), EVIL_METADATA);
    store.record_event(&new_event(FAILED_EVENT, &failed, t0() - Duration::hours(1))).await.unwrap();
    let commit = Commit {
        now: t0() - Duration::hours(1),
        event_id: Some(FAILED_EVENT.into()),
        outcome: Outcome::Failed("unknown price price_pro".into()),
        subscription: None,
        account: Some(AccountPatch {
            stripe_customer_id: CUS.into(),
            email: Some(EVIL_EMAIL.into()),
            reference: Some("<b>ref</b>".into()),
            observed_at: t0(),
        }),
        jobs: vec![],
    };
    store.commit(&commit).await.unwrap();
}

/// GRACE_CUS: a professional subscription since 40 days, its invoice of $50.00 failed 10 days ago,
/// the 7-day grace expired 3 days ago, and the instance was deprovisioned.
/// The clock moves a second between steps, as it would.
async fn seed_expired_grace(store: &Arc<MemoryStore>, billing: &Billing, clock: &TestClock) {
    let record = |id: &'static str, kind: &'static str, payload: String, at: DateTime<Utc>| async move {
        store.record_event(&typed_event(id, kind, &payload, at)).await.unwrap();
        billing.replay(id).await.unwrap();
        clock.advance(Duration::seconds(1));
        while billing.run_due_jobs(10).await.unwrap() > 0 {
            clock.advance(Duration::seconds(1));
        }
    };
    let created = t0() - Duration::days(40);
    let customer = format!(
        r#"{{"id":"evt_grace_cus","object":"event","api_version":"2023-10-16","created":{},"data":{{"object":{{"id":"{GRACE_CUS}","object":"customer","email":"{GRACE_EMAIL}","name":"Grace Hopper","metadata":{{}}}}}},"livemode":false,"type":"customer.updated"}}"#,
        created.timestamp()
    );
    record("evt_grace_cus", "customer.updated", customer, created).await;
    let subscription = subscription_event("evt_grace_sub", created, "")
        .replace(SUB, GRACE_SUB)
        .replace(CUS, GRACE_CUS)
        .replace("customer.subscription.updated", "customer.subscription.created");
    record("evt_grace_sub", "customer.subscription.created", subscription, created).await;
    let failed_at = t0() - Duration::days(10);
    let invoice = format!(
        r#"{{"id":"evt_grace_inv","object":"event","api_version":"2023-10-16","created":{},"data":{{"object":{{"id":"{GRACE_INVOICE}","object":"invoice","customer":"{GRACE_CUS}","subscription":"{GRACE_SUB}","amount_due":5000,"currency":"usd","status":"open"}}}},"livemode":false,"type":"invoice.payment_failed"}}"#,
        failed_at.timestamp()
    );
    record("evt_grace_inv", "invoice.payment_failed", invoice, failed_at).await;
    assert_eq!(billing.sweep_grace().await.unwrap(), 1, "the grace has expired");
    clock.advance(Duration::seconds(1));
    while billing.run_due_jobs(10).await.unwrap() > 0 {
        clock.advance(Duration::seconds(1));
    }
    let instance = store.load_instance(GRACE_SUB).await.unwrap().expect("provisioned, then deprovisioned");
    assert_eq!(instance.status, mindroom_billing_core::InstanceStatus::Deprovisioned);
}

async fn dead_job(store: &Arc<MemoryStore>, billing: &Billing) -> i64 {
    // Run the jobs the applied event queued (the dry-run provisioner records the instance), so
    // only the dead one below is left.
    while billing.run_due_jobs(10).await.unwrap() > 0 {}
    let job = NewJob {
        key: "email:welcome:console".into(),
        group: Some(SUB.into()),
        kind: JobKind::Email {
            customer_id: CUS.into(),
            subscription_id: Some(SUB.into()),
            email: mindroom_billing_core::EmailKind::Welcome,

            late: None,
        },
        run_after: t0(),
    };
    store.enqueue(&[job]).await.unwrap();
    let claimed = store.claim_jobs(&Claim { now: t0(), lease: Duration::seconds(30), limit: 1 }).await.unwrap();
    let finish = JobFinish {
        job_id: claimed[0].id,
        attempt: claimed[0].attempts,
        now: t0(),
        resolution: JobResolution::Dead { error: "resend said <no>".into() },
        instance: None,
        enqueue: vec![],
    };
    assert!(store.finish_job(&finish).await.unwrap());
    claimed[0].id
}

/// A client that does not follow redirects and sends the cookie it was given.
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub cookie: Option<String>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self::from_address(addr, std::net::IpAddr::from([127, 0, 0, 1]))
    }

    /// A client whose connections come from `local` (any 127.0.0.0/8 address on Linux).
    pub fn from_address(addr: SocketAddr, local: std::net::IpAddr) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .local_address(local)
            .build()
            .unwrap();
        Self { http, base: format!("http://{addr}"), cookie: None }
    }

    /// Logs in with a bootstrap password (`admin` or `readonly`, from the configured hashes).
    pub async fn login(addr: SocketAddr, password: &str) -> Self {
        let name = if password == READONLY_PASSWORD { "readonly" } else { "admin" };
        Self::login_as(addr, name, password).await
    }

    /// Logs in as the operator `name`.
    pub async fn login_as(addr: SocketAddr, name: &str, password: &str) -> Self {
        let mut client = Self::new(addr);
        let response = client.post_form("/login", &[("name", name), ("password", password)]).await;
        assert_eq!(response.status(), 303, "login of {name} with the right password");
        client.cookie = Some(session_cookie(&response).expect("a session cookie"));
        client
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        request.send().await.unwrap()
    }

    pub async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        request.send().await.unwrap()
    }

    /// Acts (a confirmed `POST` with the session's token): the answer must be a redirect to the
    /// result (POST/redirect/GET); returns the result page's text.
    pub async fn act(&self, path: &str, token: &str) -> String {
        let response = self.post_form(path, &[("csrf", token), ("confirm", "yes")]).await;
        assert_eq!(response.status(), 303, "POST {path} answers with a redirect");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        assert!(location.starts_with("/result?"), "{location}");
        self.page(&location).await
    }

    /// The page's text (asserting 200).
    pub async fn page(&self, path: &str) -> String {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.text().await.unwrap()
    }

    /// The CSRF token of the session, read from a page's form.
    pub async fn csrf(&self) -> String {
        let page = self.page("/").await;
        let at =
            page.find(r#"name="csrf" value=""#).expect("a form with a CSRF token") + r#"name="csrf" value=""#.len();
        page[at..].split('"').next().unwrap().to_owned()
    }
}

/// `name=value` of the `Set-Cookie` header.
pub fn session_cookie(response: &reqwest::Response) -> Option<String> {
    let set = response.headers().get("set-cookie")?.to_str().ok()?;
    Some(set.split(';').next()?.to_owned())
}
