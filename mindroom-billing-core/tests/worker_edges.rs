//! The orchestrator at the edges (issue 10): dead jobs by operation, a provisioner that answers
//! another app name, leases renewed during slow calls, poison events in the pick-up, e-mails that
//! wait for an address or no longer hold, verified events that do not parse.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use chrono::Duration;
use common::{CUS, SUB, T0, TestClock, at, policy};
use mindroom_billing_core::model::{Commit, EventStatus, InstanceStatus, Job, JobKind, JobState, NewEvent};
use mindroom_billing_core::ports::{
    JobFilter, Message, Notification, NotifyError, ProvisionError, ProvisionRequest, ProvisionedInstance, StoreError,
};
use mindroom_billing_core::signature::{WebhookSecret, sign};
use mindroom_billing_core::testing::{HookedStore, StoreHooks};
use mindroom_billing_core::{
    Billing, BillingConfig, Clock, Disposition, Limits, MemoryStore, Notifier, Provisioner, Store, SystemClock, Tier,
    Verifier, WorkerConfig,
};

const SECRET: &str = "whsec_worker_edges";
const ADMIN: &str = "ops@mindroom.test";
const STARTER: &str = common::PRICE_STARTER;
const PRO: &str = common::PRICE_PRO;

/// One provisioner call as the fake saw it.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Provision { app: String, tier: Tier, key: String },
    Update { app: String, limits: Limits, key: String },
    Deprovision { app: String, key: String },
}

/// A provisioner that records calls and answers as the test says.
#[derive(Default)]
struct FakeProvisioner {
    calls: Mutex<Vec<Call>>,
    /// Fails `PUT /update` permanently (a 400) while set.
    update_rejected: Mutex<bool>,
    /// Answers provision with this app name instead of the requested one.
    other_name: Mutex<Option<String>>,
    /// How long each call takes.
    delay: Mutex<StdDuration>,
    /// The next this many provisions answer 503 without doing anything.
    unavailable: Mutex<u32>,
    /// Provisions do the work and then never answer (the worker making the call dies meanwhile).
    hang: Mutex<bool>,
}

impl FakeProvisioner {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    async fn pause(&self) {
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

#[async_trait]
impl Provisioner for FakeProvisioner {
    async fn provision(&self, request: &ProvisionRequest) -> Result<ProvisionedInstance, ProvisionError> {
        let call =
            Call::Provision { app: request.app_name.clone(), tier: request.tier, key: request.idempotency_key.clone() };
        {
            let mut unavailable = self.unavailable.lock().unwrap();
            if *unavailable > 0 {
                *unavailable -= 1;
                return Err(ProvisionError::retryable("503 Service Unavailable"));
            }
        }
        self.calls.lock().unwrap().push(call);
        if *self.hang.lock().unwrap() {
            std::future::pending::<()>().await;
        }
        self.pause().await;
        let app_name = self.other_name.lock().unwrap().clone().unwrap_or_else(|| request.app_name.clone());
        Ok(ProvisionedInstance { app_name, subdomain: None, frontend_url: None, backend_url: None })
    }

    async fn update_limits(&self, app_name: &str, limits: &Limits, key: &str) -> Result<(), ProvisionError> {
        let call = Call::Update { app: app_name.into(), limits: *limits, key: key.into() };
        self.calls.lock().unwrap().push(call);
        self.pause().await;
        if *self.update_rejected.lock().unwrap() {
            return Err(ProvisionError::permanent("400 Bad Request: limits rejected"));
        }
        Ok(())
    }

    async fn deprovision(&self, app_name: &str, key: &str) -> Result<(), ProvisionError> {
        self.calls.lock().unwrap().push(Call::Deprovision { app: app_name.into(), key: key.into() });
        Ok(())
    }
}

/// A notifier that records what it sent.
#[derive(Default)]
struct Outbox(Mutex<Vec<Notification>>);

impl Outbox {
    fn sent(&self) -> Vec<Notification> {
        self.0.lock().unwrap().clone()
    }

    fn alerts(&self) -> Vec<(String, String)> {
        self.sent()
            .into_iter()
            .filter_map(|n| match n.message {
                Message::AdminAlert { subject, detail } => Some((subject, detail)),
                _ => None,
            })
            .collect()
    }
}

#[async_trait]
impl Notifier for Outbox {
    async fn send(&self, notification: &Notification) -> Result<(), NotifyError> {
        self.0.lock().unwrap().push(notification.clone());
        Ok(())
    }
}

struct World {
    billing: Billing,
    store: Arc<dyn Store>,
    provisioner: Arc<FakeProvisioner>,
    outbox: Arc<Outbox>,
    clock: Arc<TestClock>,
}

fn config(worker: WorkerConfig) -> BillingConfig {
    BillingConfig::new(Verifier::new([WebhookSecret::new(SECRET)]))
        .with_policy(policy())
        .with_worker(worker)
        .with_admin_email(ADMIN)
}

fn world_with(store: Arc<dyn Store>, worker: WorkerConfig) -> World {
    let clock = Arc::new(TestClock::new(at(T0 + 10)));
    let provisioner = Arc::new(FakeProvisioner::default());
    let outbox = Arc::new(Outbox::default());
    let billing = Billing::new(
        Arc::clone(&store),
        Arc::clone(&provisioner) as Arc<dyn Provisioner>,
        Arc::clone(&outbox) as Arc<dyn Notifier>,
        config(worker),
    )
    .with_clock(Arc::clone(&clock) as Arc<dyn Clock>);
    World { billing, store, provisioner, outbox, clock }
}

fn world() -> World {
    world_with(Arc::new(MemoryStore::new()), WorkerConfig { max_attempts: 3, ..WorkerConfig::default() })
}

fn subscription(id: &str, kind: &str, created: i64, status: &str, price: &str, metadata: &str) -> String {
    format!(
        r#"{{"id":"{id}","object":"event","type":"{kind}","created":{created},"data":{{"object":{{"id":"{SUB}","object":"subscription","customer":"{CUS}","status":"{status}","metadata":{metadata},"items":{{"object":"list","data":[{{"id":"si_1","price":{{"id":"{price}","object":"price"}},"current_period_end":{end}}}]}}}}}}}}"#,
        end = created + 30 * 86_400
    )
}

fn invoice(id: &str, kind: &str, created: i64, invoice: &str) -> String {
    format!(
        r#"{{"id":"{id}","object":"event","type":"{kind}","created":{created},"data":{{"object":{{"id":"{invoice}","object":"invoice","customer":"{CUS}","subscription":"{SUB}","amount_due":4900,"currency":"usd"}}}}}}"#
    )
}

fn customer(id: &str, created: i64, email: &str) -> String {
    format!(
        r#"{{"id":"{id}","object":"event","type":"customer.updated","created":{created},"data":{{"object":{{"id":"{CUS}","object":"customer","email":"{email}"}}}}}}"#
    )
}

impl World {
    async fn send(&self, body: &str) -> Disposition {
        let header = sign(&WebhookSecret::new(SECRET), body.as_bytes(), self.clock.now().timestamp());
        self.billing.receive(Some(&header), body.as_bytes()).await.unwrap().disposition
    }

    /// Runs due jobs until none is due at the current time.
    async fn drain(&self) {
        for _ in 0..50 {
            if self.billing.run_due_jobs(10).await.unwrap() == 0 {
                return;
            }
        }
        panic!("jobs did not settle");
    }

    async fn jobs(&self) -> Vec<Job> {
        let mut jobs = self.store.list_jobs(&JobFilter { state: None, limit: 1000 }).await.unwrap();
        jobs.sort_by_key(|j| j.id);
        jobs
    }

    async fn email_jobs(&self) -> Vec<Job> {
        self.jobs().await.into_iter().filter(|j| matches!(j.kind, JobKind::Email { .. })).collect()
    }
}

#[tokio::test]
async fn a_dead_update_keeps_the_instance_running_and_the_next_change_updates_it() {
    let w = world();
    assert_eq!(
        w.send(&subscription("evt_1", "customer.subscription.created", T0, "active", STARTER, "{}")).await,
        Disposition::Applied
    );
    w.drain().await;
    let app = w.store.load_instance(SUB).await.unwrap().unwrap().app_name;

    *w.provisioner.update_rejected.lock().unwrap() = true;
    w.send(&subscription("evt_2", "customer.subscription.updated", T0 + 5, "active", PRO, "{}")).await;
    w.drain().await;
    let instance = w.store.load_instance(SUB).await.unwrap().unwrap();
    assert_eq!(instance.status, InstanceStatus::Running, "a dead update does not mark the instance failed");
    assert_eq!(instance.tier, Some(Tier::Starter), "it keeps its old limits");
    let alerts = w.outbox.alerts();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].0.contains("PUT /update"), "the alert names the operation: {alerts:?}");

    *w.provisioner.update_rejected.lock().unwrap() = false;
    w.send(
        &subscription("evt_3", "customer.subscription.updated", T0 + 9, "active", "price_ent", "{}")
            .replace(r#""object":"price"}"#, r#""object":"price","lookup_key":"enterprise"}"#),
    )
    .await;
    w.drain().await;
    let calls = w.provisioner.calls();
    let provisions = calls.iter().filter(|c| matches!(c, Call::Provision { .. })).count();
    assert_eq!(provisions, 1, "no second POST /provision: {calls:?}");
    let updates: Vec<&Call> = calls.iter().filter(|c| matches!(c, Call::Update { .. })).collect();
    assert_eq!(updates.len(), 2, "the rejected one, then one with the enterprise limits: {calls:?}");
    let (Call::Update { key: first, .. }, Call::Update { app: a, limits, key: second }) = (updates[0], updates[1])
    else {
        unreachable!()
    };
    assert_eq!((a, *limits), (&app, Tier::Enterprise.limits()));
    assert_ne!(first, second, "a retry after a dead job is a new request");
    assert!(second.contains(":enterprise:"), "the key names the desired state: {second}");
    assert_eq!(w.store.load_instance(SUB).await.unwrap().unwrap().tier, Some(Tier::Enterprise));
}

#[tokio::test]
async fn a_provisioner_answering_another_app_name_is_a_contract_violation() {
    let w = world();
    *w.provisioner.other_name.lock().unwrap() = Some("someone-elses-app".into());
    w.send(&subscription("evt_1", "customer.subscription.created", T0, "active", STARTER, "{}")).await;
    w.drain().await;
    let instance = w.store.load_instance(SUB).await.unwrap().expect("recorded as failed");
    assert_eq!(instance.status, InstanceStatus::Failed, "nothing recorded as running");
    assert_ne!(instance.app_name, "someone-elses-app");
    let reconcile = w.jobs().await.into_iter().find(|j| matches!(j.kind, JobKind::Reconcile { .. })).unwrap();
    assert_eq!((reconcile.state, reconcile.attempts), (JobState::Dead, 1), "permanent: not retried");
    let alerts = w.outbox.alerts();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].1.contains("someone-elses-app") && alerts[0].1.contains(&instance.app_name), "{alerts:?}");
    assert!(w.email_jobs().await.is_empty(), "no welcome e-mail for an instance that is not ours");
}

#[tokio::test]
async fn the_lease_is_renewed_while_a_slow_provisioner_call_is_in_flight() {
    // Real time here: the lease (300 ms) is shorter than the call (1.2 s). Without renewal a second
    // worker takes the job over mid-call and provisions a second time.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let worker = WorkerConfig { lease: Duration::milliseconds(300), ..WorkerConfig::default() };
    let provisioner = Arc::new(FakeProvisioner::default());
    *provisioner.delay.lock().unwrap() = StdDuration::from_millis(1200);
    let outbox = Arc::new(Outbox::default());
    let replica = || {
        Billing::new(
            Arc::clone(&store),
            Arc::clone(&provisioner) as Arc<dyn Provisioner>,
            Arc::clone(&outbox) as Arc<dyn Notifier>,
            config(worker.clone()),
        )
    };
    let (a, b) = (replica(), replica());
    let now = SystemClock.now().timestamp();
    let body = subscription("evt_1", "customer.subscription.created", now, "active", STARTER, "{}");
    let header = sign(&WebhookSecret::new(SECRET), body.as_bytes(), now);
    a.receive(Some(&header), body.as_bytes()).await.unwrap();
    let first = a.run_due_jobs(1);
    let second = async {
        for _ in 0..15 {
            tokio::time::sleep(StdDuration::from_millis(100)).await;
            b.run_due_jobs(1).await.unwrap();
        }
    };
    let (ran, ()) = tokio::join!(first, second);
    assert_eq!(ran.unwrap(), 1);
    let provisions = provisioner.calls().iter().filter(|c| matches!(c, Call::Provision { .. })).count();
    assert_eq!(provisions, 1, "one worker at a time: {:?}", provisioner.calls());
    assert_eq!(store.load_instance(SUB).await.unwrap().unwrap().status, InstanceStatus::Running);
}

/// Fails every commit of one event with a non-availability error (a poison event).
struct Poison(&'static str);

#[async_trait]
impl StoreHooks for Poison {
    async fn before_commit(&self, _inner: &dyn Store, commit: &Commit) -> Result<(), StoreError> {
        if commit.event_id.as_deref() == Some(self.0) {
            return Err(StoreError::Other("value too long for type character varying(8)".into()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn one_poison_event_does_not_stop_the_unapplied_pick_up() {
    let store: Arc<dyn Store> =
        Arc::new(HookedStore::new(Arc::new(MemoryStore::new()) as Arc<dyn Store>, Poison("evt_poison")));
    let w = world_with(Arc::clone(&store), WorkerConfig::default());
    // Three events recorded long ago but never committed (a crash); the middle one is poison.
    let bodies = [
        ("evt_a", customer("evt_a", T0 - 300, "a@example.com")),
        ("evt_poison", subscription("evt_poison", "customer.subscription.created", T0 - 200, "active", STARTER, "{}")),
        ("evt_c", invoice("evt_c", "invoice.paid", T0 - 100, "in_c")),
    ];
    for (id, body) in &bodies {
        let kind = if id.ends_with('a') { "customer.updated" } else { "x" };
        let event = NewEvent {
            id,
            event_type: kind,
            created: at(T0 - 300),
            api_version: None,
            livemode: false,
            payload: body,
            received_at: at(T0 - 600),
            source: mindroom_billing_core::EventSource::Webhook,
            customer_id: None,
        };
        store.record_event(&event).await.unwrap();
    }
    let applied = w.billing.pick_up_unapplied().await.expect("the pass goes on past the poison event");
    assert_eq!(applied, 2);
    let status = |id: &'static str| {
        let store = Arc::clone(&store);
        async move { store.load_event(id).await.unwrap().unwrap().status }
    };
    assert_eq!(status("evt_a").await, EventStatus::Applied);
    assert_eq!(status("evt_poison").await, EventStatus::Received, "left for the next pass");
    assert_eq!(status("evt_c").await, EventStatus::Applied, "applied after the poison event");
}

#[tokio::test]
async fn an_email_without_an_address_waits_until_an_event_brings_one() {
    let w = world();
    w.send(&subscription("evt_1", "customer.subscription.created", T0, "active", STARTER, "{}")).await;
    w.drain().await;
    let welcome = w.email_jobs().await.pop().expect("welcome queued");
    assert_eq!(welcome.state, JobState::Pending, "waiting, not dropped: {welcome:?}");
    assert!(welcome.last_error.as_deref().unwrap_or("").contains("no e-mail address"), "{welcome:?}");
    // It keeps waiting past the attempt limit (3 here).
    for _ in 0..5 {
        w.clock.advance(Duration::minutes(15));
        w.drain().await;
    }
    assert_eq!(w.email_jobs().await[0].state, JobState::Pending);
    assert!(w.outbox.sent().is_empty());
    // An older fact's address loses to a newer one, whatever the processing order.
    w.send(&customer("evt_c2", T0 + 7, "new@example.com")).await;
    w.send(&customer("evt_c1", T0 + 6, "old@example.com")).await;
    w.clock.advance(Duration::minutes(15));
    w.drain().await;
    let sent = w.outbox.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].to, "new@example.com");
    assert!(matches!(sent[0].message, Message::Welcome { tier: Tier::Starter, .. }));
}

#[tokio::test]
async fn an_email_gives_up_after_waiting_a_day() {
    let w = world();
    w.send(&subscription("evt_1", "customer.subscription.created", T0, "active", STARTER, "{}")).await;
    w.drain().await;
    w.clock.advance(Duration::hours(25));
    w.drain().await;
    assert_eq!(w.email_jobs().await[0].state, JobState::Dead);
}

#[tokio::test]
async fn the_subscription_metadata_email_reaches_the_welcome_mail() {
    let w = world();
    let metadata = r#"{"email":"seed@example.com"}"#;
    w.send(&subscription("evt_1", "customer.subscription.created", T0, "active", STARTER, metadata)).await;
    w.drain().await;
    let sent = w.outbox.sent();
    assert_eq!(sent.iter().map(|n| n.to.as_str()).collect::<Vec<_>>(), ["seed@example.com"]);
}

#[tokio::test]
async fn emails_recheck_what_they_say_when_they_run() {
    // A failed first payment of an incomplete subscription: no instance exists to remove.
    let w = world();
    w.send(&customer("evt_c", T0 - 5, "jenny@example.com")).await;
    w.send(&subscription("evt_1", "customer.subscription.created", T0, "incomplete", STARTER, "{}")).await;
    w.send(&invoice("evt_f", "invoice.payment_failed", T0 + 1, "in_first")).await;
    w.drain().await;
    assert!(w.outbox.sent().is_empty(), "{:?}", w.outbox.sent());
    let job = w.email_jobs().await.pop().unwrap();
    assert_eq!(job.state, JobState::Done);
    assert!(job.last_error.as_deref().unwrap().starts_with("skipped: "), "recorded as skipped: {job:?}");
    assert!(job.last_error.unwrap().contains("incomplete"));

    // A payment that lands between the sweep and the send: no "your instance was removed".
    let w = world();
    w.send(&customer("evt_c", T0 - 5, "jenny@example.com")).await;
    w.send(&subscription("evt_1", "customer.subscription.created", T0, "active", STARTER, "{}")).await;
    w.send(&invoice("evt_f", "invoice.payment_failed", T0 + 1, "in_a")).await;
    w.drain().await;
    w.clock.advance(Duration::days(8));
    assert_eq!(w.billing.sweep_grace().await.unwrap(), 1);
    w.send(&invoice("evt_p", "invoice.paid", (T0 + 10) + 8 * 86_400, "in_a")).await;
    w.drain().await;
    let kinds: Vec<String> = w.outbox.sent().iter().map(|n| format!("{:?}", n.message)).collect();
    assert!(!kinds.iter().any(|k| k.starts_with("GraceExpired")), "{kinds:?}");
    let grace_job = w
        .email_jobs()
        .await
        .into_iter()
        .find(|j| j.key.starts_with("email:grace_expired"))
        .expect("grace-expired e-mail queued by the sweep");
    assert!(grace_job.last_error.unwrap().starts_with("skipped: the grace period is no longer expired"));
}

#[tokio::test]
async fn a_verified_event_that_does_not_parse_is_stored_as_failed_not_lost() {
    let w = world();
    let body = subscription("evt_zombie", "customer.subscription.updated", T0, "zombie", STARTER, "{}");
    let disposition = w.send(&body).await;
    let Disposition::Failed(reason) = disposition else { panic!("{disposition:?}") };
    assert!(reason.contains("zombie"), "{reason}");
    let stored = w.store.load_event("evt_zombie").await.unwrap().expect("stored");
    assert_eq!(stored.status, EventStatus::Failed);
    assert_eq!(stored.payload, body, "byte for byte");
    assert!(stored.reason.unwrap().contains("data.object.status"));
    // An admin alert, once, however often Stripe redelivers.
    w.send(&body).await;
    w.drain().await;
    let alerts = w.outbox.alerts();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].1.contains("events replay evt_zombie"), "{alerts:?}");
    // Replay reads the stored bytes again (still unreadable by this version: nothing changes).
    assert!(w.billing.replay("evt_zombie").await.is_err());
    assert_eq!(w.store.load_event("evt_zombie").await.unwrap().unwrap().status, EventStatus::Failed);
}

/// A starter subscription whose provisioning job's first attempt made its provision call and then
/// lost its worker (the call never answered; the 120 s lease still holds). Returns the app.
async fn provisioned_by_an_interrupted_attempt(w: &World) -> String {
    let created = subscription("evt_1", "customer.subscription.created", T0, "active", STARTER, "{}");
    assert_eq!(w.send(&created).await, Disposition::Applied);
    interrupt_the_next_provision(w).await
}

/// Runs due jobs until the provisioner has seen a provision call, then drops the worker mid-call.
async fn interrupt_the_next_provision(w: &World) -> String {
    let seen = w.provisioner.calls().len();
    *w.provisioner.hang.lock().unwrap() = true;
    tokio::select! {
        _ = w.billing.run_due_jobs(10) => panic!("the hanging provision answered"),
        () = async { while w.provisioner.calls().len() == seen { tokio::task::yield_now().await } } => {}
    }
    *w.provisioner.hang.lock().unwrap() = false;
    let app = mindroom_billing_core::service::app_name_for(SUB);
    assert!(matches!(&w.provisioner.calls()[seen..], [Call::Provision { app: a, .. }] if *a == app));
    app
}

/// The subscription ends while the interrupted attempt's lease runs out: the retried attempt must
/// remove the app the first attempt created (nothing recorded it), not leave it running for ever.
#[tokio::test]
async fn a_retried_job_removes_the_app_an_interrupted_attempt_created_when_the_subscription_ended() {
    let w = world();
    let app = provisioned_by_an_interrupted_attempt(&w).await;
    let deleted = subscription("evt_2", "customer.subscription.deleted", T0 + 60, "canceled", STARTER, "{}");
    assert_eq!(w.send(&deleted).await, Disposition::Applied);
    w.clock.advance(Duration::seconds(121));
    w.drain().await;
    let removed = w.provisioner.calls().iter().any(|c| matches!(c, Call::Deprovision { app: a, .. } if *a == app));
    assert!(removed, "the app the interrupted attempt created is left running: {:?}", w.provisioner.calls());
}

/// The plan changes instead: the retried attempt provisions the new tier under the same app name (the
/// provisioner answers the app the first attempt created) and then sets its limits, since an existing
/// app keeps the ones it was created with.
#[tokio::test]
async fn a_retried_provision_sets_the_limits_of_a_tier_changed_meanwhile() {
    let w = world();
    let app = provisioned_by_an_interrupted_attempt(&w).await;
    let upgraded = subscription("evt_2", "customer.subscription.updated", T0 + 60, "active", PRO, "{}");
    assert_eq!(w.send(&upgraded).await, Disposition::Applied);
    w.clock.advance(Duration::seconds(121));
    w.drain().await;
    let pro = Tier::Professional.limits();
    let calls = w.provisioner.calls();
    let provision = calls.iter().rposition(|c| matches!(c, Call::Provision { app: a, .. } if *a == app));
    let update =
        calls.iter().position(|c| matches!(c, Call::Update { app: a, limits, .. } if *a == app && *limits == pro));
    assert!(provision.is_some() && update > provision, "provision, then the new tier's limits: {calls:?}");
    assert_eq!(w.store.load_instance(SUB).await.unwrap().unwrap().limits, Some(pro));
}

/// Attempt 1 of the provisioning job gets a 503; attempt 2 creates the app and its worker dies before
/// the answer; the subscription ends meanwhile. Attempt 3 must remove the app attempt 2 created, although
/// an earlier attempt recorded an error.
#[tokio::test]
async fn a_provision_after_a_503_whose_worker_died_is_removed_when_the_subscription_ends() {
    let w = world_with(Arc::new(MemoryStore::new()), WorkerConfig { max_attempts: 5, ..WorkerConfig::default() });
    *w.provisioner.unavailable.lock().unwrap() = 1;
    let created = subscription("evt_1", "customer.subscription.created", T0, "active", STARTER, "{}");
    assert_eq!(w.send(&created).await, Disposition::Applied);
    assert_eq!(w.billing.run_due_jobs(10).await.unwrap(), 1, "attempt 1: a 503");
    assert!(w.provisioner.calls().is_empty());

    // Attempt 2 creates the app; its worker dies before the answer (the future is dropped mid-call).
    w.clock.advance(Duration::minutes(15));
    let app = interrupt_the_next_provision(&w).await;

    let deleted = subscription("evt_2", "customer.subscription.deleted", T0 + 60, "canceled", STARTER, "{}");
    assert_eq!(w.send(&deleted).await, Disposition::Applied);
    w.clock.advance(Duration::minutes(15));
    w.drain().await;
    let removed = w.provisioner.calls().iter().any(|c| matches!(c, Call::Deprovision { app: a, .. } if *a == app));
    assert!(removed, "the app attempt 2 created is left running: {:?}", w.provisioner.calls());
    let instance = w.store.load_instance(SUB).await.unwrap();
    assert_eq!(instance.map(|i| i.status), Some(InstanceStatus::Deprovisioned));
}
