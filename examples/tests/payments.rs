//! Payments that need the customer or the team, black box: signed events into a real `mindroom-billing
//! serve` (in-memory store and PostgreSQL), the customer and admin e-mails read from a Resend API stub,
//! the instance from the recording stub provisioner, the entitlements from the internal API, and the
//! disputed charge from the Stripe API stub.
//!
//! Run with `scripts/test.sh` (or `cargo test -p mindroom-billing-examples --test payments`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../testsupport/stripe_stub.rs"]
mod stripe_stub;
mod support;

use std::time::{Duration, Instant};

use mindroom_billing_core::service::app_name_for;
use serde_json::{Value, json};

use stripe_stub::{Recorded, Reply, StripeStub, Stub};
use support::{Cluster, ClusterOptions, Life, SentEvent, StubProvisioner, invoice_event, now_secs, subscription_event};

const STARTER: &str = "price_pay_starter";
const PRO: &str = "price_pay_pro";
const DAY: i64 = 86_400;
const ADMIN: &str = "ops@example.com";
const STRIPE_KEY: &str = "sk_test_e2e_disputes";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Postgres,
}

/// A Resend API stub: every `POST /emails` is answered with an id and recorded.
struct Mailbox {
    stub: Stub,
}

impl Mailbox {
    async fn start() -> Self {
        let stub = Stub::start(|_, n| Reply::json(200, json!({ "id": format!("email_{n}") }))).await;
        Self { stub }
    }

    fn sent(&self) -> Vec<Value> {
        self.stub.requests().iter().filter(|r| r.method == "POST").map(Recorded::json).collect()
    }

    /// The e-mails whose subject contains `subject`.
    fn with_subject(&self, subject: &str) -> Vec<Value> {
        self.sent().into_iter().filter(|m| m["subject"].as_str().is_some_and(|s| s.contains(subject))).collect()
    }
}

fn life(sub: &str) -> Life {
    Life::new(sub, format!("cus_{sub}"), now_secs() - 20 * DAY, STARTER)
}

/// One replica on `backend`, e-mail through the Resend stub, one job at a time (jobs run in the order
/// they were queued, so a later e-mail proves the earlier jobs finished).
async fn serve(backend: Backend, stub: &StubProvisioner, mail: &Mailbox, extra: &[(&str, &str)]) -> Cluster {
    let mut options = ClusterOptions::new(stub, &[STARTER, PRO]);
    options.replicas = 1;
    options.env = [
        ("RESEND_API_KEY", "re_e2e_payments_key"),
        ("RESEND_API_BASE", mail.stub.url.as_str()),
        ("EMAIL_FROM", "MindRoom <billing@example.com>"),
        ("ADMIN_EMAIL", ADMIN),
        ("BILLING_WORKER_CONCURRENCY", "1"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    if let Backend::Memory = backend {
        options.env.push(("DATABASE_URL".into(), "memory:".into()));
    }
    Cluster::start(options).await
}

/// Polls `done` every 100 ms for up to 30 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(30), "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post_ok(cluster: &Cluster, event: &SentEvent) {
    let (status, body) = cluster.post(0, &event.body).await;
    assert_eq!(status, 200, "{}: {body}", event.id);
}

/// `GET /v1/accounts/{id}/entitlements` of the customer's account.
async fn entitlements(cluster: &Cluster, customer: &str) -> Value {
    let account = mindroom_billing_core::account_id_for_customer(customer);
    let r = reqwest::Client::new()
        .get(cluster.url(0, &format!("/v1/accounts/{account}/entitlements")))
        .bearer_auth("e2e-billing-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// `invoice.payment_action_required` for `invoice` of `life`, as Stripe renders it (newest shape).
fn action_required(id: &str, created: i64, life: &Life, invoice: &str) -> SentEvent {
    invoice_event(id, "invoice.payment_action_required", created, life, invoice, "open")
}

/// The subscription is created and its first invoice paid; returns once the instance runs and the
/// welcome e-mail went out.
async fn running(cluster: &Cluster, stub: &StubProvisioner, mail: &Mailbox, l: &Life) {
    post_ok(
        cluster,
        &subscription_event(
            &format!("evt_{}_c", l.sub),
            "customer.subscription.created",
            l.start,
            l,
            "active",
            STARTER,
        ),
    )
    .await;
    post_ok(
        cluster,
        &invoice_event(
            &format!("evt_{}_p1", l.sub),
            "invoice.paid",
            l.start + 1,
            l,
            &format!("in_{}_1", l.sub),
            "paid",
        ),
    )
    .await;
    let app = app_name_for(&l.sub);
    eventually("provisioned", || stub.apps().get(&app).is_some_and(|a| a.alive)).await;
    eventually("welcome e-mail", || !mail.with_subject("instance is ready").is_empty()).await;
}

/// A renewal that needs 3-D Secure: one "confirm your payment" e-mail with the invoice link, the
/// amount and the grace deadline, also when Stripe delivers the event again and when it sends the
/// same fact under a new event id; the customer pays within the grace: nothing is removed, no
/// second e-mail.
async fn action_required_e_mails_the_link_once_and_a_payment_keeps_the_instance(backend: Backend) {
    let stub = StubProvisioner::start().await;
    let mail = Mailbox::start().await;
    let cluster = serve(backend, &stub, &mail, &[]).await;
    let l = life(&format!("sub_sca_once_{backend:?}").to_lowercase());
    running(&cluster, &stub, &mail, &l).await;

    let invoice = format!("in_{}_2", l.sub);
    let at = now_secs() - 120;
    let event = action_required("evt_sca_1", at, &l, &invoice);
    post_ok(&cluster, &event).await;
    post_ok(&cluster, &event).await; // Stripe redelivers the same event
    post_ok(&cluster, &action_required("evt_sca_1_again", at + 20, &l, &invoice)).await; // same fact, new id
    let grace = entitlements(&cluster, &l.customer).await;
    assert_eq!(grace["entitlement_status"], "grace", "{grace}");
    eventually("the confirm e-mail", || !mail.with_subject("Confirm your payment").is_empty()).await;

    // The customer confirms: the invoice is paid within the grace.
    post_ok(&cluster, &invoice_event("evt_sca_paid", "invoice.paid", at + 60, &l, &invoice, "paid")).await;
    // Stripe's late redelivery of the request after the payment must not e-mail again either.
    post_ok(&cluster, &action_required("evt_sca_1_late", at + 30, &l, &invoice)).await;
    // A later admin alert is the sentinel: jobs run one at a time, in order.
    post_ok(&cluster, &unbooked_dispute("evt_sca_sentinel", "dp_sentinel_sca", now_secs())).await;
    eventually("the sentinel alert", || !mail.with_subject("Dispute opened").is_empty()).await;

    let confirms = mail.with_subject("Confirm your payment");
    assert_eq!(confirms.len(), 1, "{confirms:#?}");
    let m = &confirms[0];
    assert_eq!(m["to"], json!([format!("{}@example.com", l.customer)]), "{m}");
    let text = m["text"].as_str().unwrap();
    assert!(text.contains(&format!("https://invoice.stripe.com/i/{invoice}")), "{text}");
    assert!(text.contains("$49.00"), "{text}");
    let deadline = chrono::DateTime::from_timestamp(at + 7 * DAY, 0).unwrap();
    assert!(text.contains(&deadline.format("%B %-d, %Y at %H:%M UTC").to_string()), "{text}");
    assert!(m["html"].as_str().unwrap().contains(&format!(r#"href="https://invoice.stripe.com/i/{invoice}""#)));

    let after = entitlements(&cluster, &l.customer).await;
    assert_eq!(
        (after["entitlement_status"].as_str(), after["tier"].as_str()),
        (Some("active"), Some("starter")),
        "{after}"
    );
    let record = &stub.apps()[&app_name_for(&l.sub)];
    assert!(record.alive && record.deprovisions == 0, "{record:?}");
}

/// The request arrives while no address is known, so its e-mail waits; the customer pays before it
/// can go out: the e-mail is re-checked at send time and skipped, never sent.
async fn action_required_paid_before_sending_is_not_e_mailed(backend: Backend) {
    let stub = StubProvisioner::start().await;
    let mail = Mailbox::start().await;
    let cluster = serve(backend, &stub, &mail, &[]).await;
    let l = life(&format!("sub_sca_paid_{backend:?}").to_lowercase());
    let created = subscription_event("evt_sp_c", "customer.subscription.created", l.start, &l, "active", STARTER);
    post_ok(&cluster, &created).await;
    eventually("provisioned", || stub.apps().get(&app_name_for(&l.sub)).is_some_and(|a| a.alive)).await;
    let invoice = format!("in_{}_2", l.sub);
    let at = now_secs() - 60;
    // No customer_email on this invoice: billing knows no address yet, the e-mail job waits.
    let without_address = action_required("evt_sp_sca", at, &l, &invoice)
        .body
        .replace(&format!(r#""customer_email":"{}@example.com""#, l.customer), r#""customer_email":null"#);
    assert!(without_address.contains(r#""customer_email":null"#));
    post_ok(&cluster, &SentEvent { id: "evt_sp_sca".into(), body: without_address }).await;
    // The payment brings the address; the waiting e-mail then finds the invoice paid.
    post_ok(&cluster, &invoice_event("evt_sp_paid", "invoice.paid", at + 60, &l, &invoice, "paid")).await;
    eventually("welcome e-mail (sent once the address is known)", || {
        !mail.with_subject("instance is ready").is_empty()
    })
    .await;
    let skipped = || async {
        let metrics = reqwest::get(cluster.url(0, "/metrics")).await.unwrap().text().await.unwrap();
        // Every series is listed from the start (at 0): the count must have moved.
        metrics.lines().any(|l| {
            l.starts_with("billing_jobs_total{")
                && l.contains(r#"kind="email""#)
                && l.contains(r#"result="skipped""#)
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v >= 1.0)
        })
    };
    let started = Instant::now();
    while !skipped().await {
        assert!(started.elapsed() < Duration::from_secs(30), "the confirm e-mail was never skipped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(mail.with_subject("Confirm your payment").is_empty(), "{:#?}", mail.sent());
    if let Backend::Postgres = backend {
        let jobs = cluster
            .store()
            .await
            .list_jobs(&mindroom_billing_core::ports::JobFilter { state: None, limit: 100 })
            .await
            .unwrap();
        let job = jobs.iter().find(|j| j.key == format!("email:payment_action_required:{invoice}")).expect("the job");
        assert_eq!(
            job.last_error.as_deref(),
            Some(format!("skipped: invoice {invoice} was paid meanwhile").as_str()),
            "{job:?}"
        );
    }
}

/// No payment: the instance is removed when the grace of the request's invoice runs out.
async fn action_required_unpaid_is_deprovisioned_at_the_deadline(backend: Backend) {
    let stub = StubProvisioner::start().await;
    let mail = Mailbox::start().await;
    let cluster = serve(backend, &stub, &mail, &[]).await;
    let l = life(&format!("sub_sca_gone_{backend:?}").to_lowercase());
    running(&cluster, &stub, &mail, &l).await;
    // The request was sent 7 days minus 15 s ago: the grace ends 15 s from now.
    let at = now_secs() - 7 * DAY + 15;
    post_ok(&cluster, &action_required("evt_sg_sca", at, &l, &format!("in_{}_2", l.sub))).await;
    let app = app_name_for(&l.sub);
    assert!(stub.apps()[&app].alive, "running during the grace");
    eventually("deprovisioned at the deadline", || stub.apps()[&app].deprovisions == 1).await;
    assert!(now_secs() >= at + 7 * DAY, "not before the deadline");
    eventually("grace-expired e-mail", || !mail.with_subject("has been removed").is_empty()).await;
    assert_eq!(mail.with_subject("Confirm your payment").len(), 1);
}

/// A dispute event as Stripe renders it (newest shape), for `charge`.
fn dispute_event(
    id: &str,
    kind: &str,
    created: i64,
    dispute: &str,
    charge: &str,
    status: &str,
    opened: i64,
) -> SentEvent {
    let body = json!({
        "id": id, "object": "event", "api_version": "2026-07-29.dahlia", "created": created,
        "data": {"object": {
            "id": dispute, "object": "dispute", "amount": 4900, "balance_transactions": [], "charge": charge,
            "created": opened, "currency": "usd", "enhanced_eligibility_types": [], "evidence": {"enhanced_evidence": {}},
            "evidence_details": {"due_by": opened + 9 * DAY, "enhanced_eligibility": {}, "has_evidence": false,
                                 "past_due": false, "submission_count": 0},
            "is_charge_refundable": false, "livemode": false, "metadata": {}, "payment_intent": format!("pi_{charge}"),
            "reason": "fraudulent", "status": status,
        }},
        "livemode": false, "pending_webhooks": 1, "request": {"id": null, "idempotency_key": null}, "type": kind,
    });
    SentEvent { id: id.into(), body: body.to_string() }
}

/// A dispute of a charge nobody can look up (an admin alert and nothing else).
fn unbooked_dispute(id: &str, dispute: &str, at: i64) -> SentEvent {
    dispute_event(id, "charge.dispute.created", at, dispute, "ch_unknown_sentinel", "needs_response", at)
}

/// A dispute alerts the team once per state change; with `BILLING_DISPUTE_POLICY=suspend` the
/// entitlements are suspended while it is open (the instance is kept) and come back when it is won.
async fn a_dispute_alerts_once_per_state_change_and_suspend_restores_when_won(backend: Backend) {
    let stub = StubProvisioner::start().await;
    let mail = Mailbox::start().await;
    let stripe = StripeStub::start(STRIPE_KEY).await;
    let stripe_url = stripe.url.clone();
    // The console is served (its origin is what admin alerts link to).
    let console_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let hash = mindroom_billing_console::hash_password("e2e console password").unwrap();
    let env = [
        ("BILLING_DISPUTE_POLICY", "suspend"),
        ("STRIPE_SECRET_KEY", STRIPE_KEY),
        ("STRIPE_API_BASE", stripe_url.as_str()),
        ("BILLING_CONSOLE_ADDR", console_addr.as_str()),
        ("BILLING_CONSOLE_PASSWORD_HASH", hash.as_str()),
        ("BILLING_CONSOLE_ORIGIN", "https://billing.example.com"),
    ];
    let cluster = serve(backend, &stub, &mail, &env).await;
    let l = life(&format!("sub_dispute_{backend:?}").to_lowercase());
    let charge = format!("ch_{}", l.sub);
    stripe.add_charge(json!({"id": charge, "object": "charge", "amount": 4900, "currency": "usd",
        "customer": l.customer, "disputed": true, "livemode": false, "paid": true, "status": "succeeded"}));
    running(&cluster, &stub, &mail, &l).await;
    let before = entitlements(&cluster, &l.customer).await;
    assert_eq!((before["entitlement_status"].as_str(), before["tier"].as_str()), (Some("active"), Some("starter")));

    let opened = now_secs() - 3600;
    let dp = format!("dp_{}", l.sub);
    post_ok(
        &cluster,
        &dispute_event("evt_dp_created", "charge.dispute.created", opened, &dp, &charge, "needs_response", opened),
    )
    .await;
    let suspended = entitlements(&cluster, &l.customer).await;
    assert_eq!(
        (suspended["entitlement_status"].as_str(), suspended["tier"].as_str()),
        (Some("suspended"), Some("free")),
        "{suspended}"
    );

    let updated =
        dispute_event("evt_dp_updated", "charge.dispute.updated", opened + 600, &dp, &charge, "under_review", opened);
    post_ok(&cluster, &updated).await;
    post_ok(&cluster, &updated).await; // redelivered
    post_ok(
        &cluster,
        &dispute_event("evt_dp_updated2", "charge.dispute.updated", opened + 700, &dp, &charge, "under_review", opened),
    )
    .await;
    post_ok(
        &cluster,
        &dispute_event("evt_dp_closed", "charge.dispute.closed", opened + 1200, &dp, &charge, "won", opened),
    )
    .await;
    let restored = entitlements(&cluster, &l.customer).await;
    assert_eq!(
        (restored["entitlement_status"].as_str(), restored["tier"].as_str()),
        (Some("active"), Some("starter")),
        "{restored}"
    );

    // The "won" alert is queued last: once it is out, every earlier job has run.
    eventually("the won alert", || !mail.with_subject("Dispute won").is_empty()).await;
    let alerts: Vec<Value> = mail.sent().into_iter().filter(|m| m["to"] == json!([ADMIN])).collect();
    let subjects: Vec<&str> = alerts.iter().map(|m| m["subject"].as_str().unwrap()).collect();
    assert_eq!(
        subjects,
        [
            format!("[mindroom-billing] Dispute opened: $49.00 of {}", l.customer),
            format!("[mindroom-billing] Dispute {dp} is now under_review: $49.00 of {}", l.customer),
            format!("[mindroom-billing] Dispute won: $49.00 of {}", l.customer),
        ],
        "{alerts:#?}"
    );
    let first = alerts[0]["text"].as_str().unwrap();
    let due = chrono::DateTime::from_timestamp(opened + 9 * DAY, 0).unwrap().format("%Y-%m-%d %H:%M UTC").to_string();
    for part in ["$49.00", "reason fraudulent", &format!("Evidence due by {due}"), &l.sub, &l.customer, &charge] {
        assert!(first.contains(part), "{part}: {first}");
    }
    assert!(first.contains(&format!("https://billing.example.com/customers/{}", l.customer)), "{first}");
    let record = &stub.apps()[&app_name_for(&l.sub)];
    assert!(record.alive && record.deprovisions == 0, "the instance is kept: {record:?}");
    assert!(stripe.requests().iter().any(|r| r.path == format!("/v1/charges/{charge}")));
}

/// With `suspend`, an open dispute keeps the instance for the grace period from its opening, then
/// the instance is removed; winning the dispute provisions it again.
async fn suspend_removes_the_instance_after_the_grace_and_a_win_brings_it_back(backend: Backend) {
    let stub = StubProvisioner::start().await;
    let mail = Mailbox::start().await;
    let stripe = StripeStub::start(STRIPE_KEY).await;
    let stripe_url = stripe.url.clone();
    let env = [
        ("BILLING_DISPUTE_POLICY", "suspend"),
        ("STRIPE_SECRET_KEY", STRIPE_KEY),
        ("STRIPE_API_BASE", stripe_url.as_str()),
    ];
    let cluster = serve(backend, &stub, &mail, &env).await;
    let l = life(&format!("sub_dispute_grace_{backend:?}").to_lowercase());
    let charge = format!("ch_{}", l.sub);
    stripe.add_charge(json!({"id": charge, "object": "charge", "customer": l.customer}));
    running(&cluster, &stub, &mail, &l).await;
    let app = app_name_for(&l.sub);
    // Opened 7 days minus 15 s ago: the instance is kept 15 s more.
    let opened = now_secs() - 7 * DAY + 15;
    let dp = format!("dp_{}", l.sub);
    post_ok(
        &cluster,
        &dispute_event("evt_dg_created", "charge.dispute.created", opened, &dp, &charge, "needs_response", opened),
    )
    .await;
    assert!(stub.apps()[&app].alive, "kept during the grace");
    eventually("removed at the end of the grace", || stub.apps()[&app].deprovisions == 1).await;
    assert!(now_secs() >= opened + 7 * DAY, "not before");
    let won = dispute_event("evt_dg_won", "charge.dispute.closed", now_secs() - 5, &dp, &charge, "won", opened);
    post_ok(&cluster, &won).await;
    eventually("provisioned again", || stub.apps()[&app].alive).await;
    let back = entitlements(&cluster, &l.customer).await;
    assert_eq!(
        (back["entitlement_status"].as_str(), back["tier"].as_str()),
        (Some("active"), Some("starter")),
        "{back}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_suspend_removes_the_instance_after_the_grace_and_a_win_brings_it_back() {
    suspend_removes_the_instance_after_the_grace_and_a_win_brings_it_back(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_suspend_removes_the_instance_after_the_grace_and_a_win_brings_it_back() {
    suspend_removes_the_instance_after_the_grace_and_a_win_brings_it_back(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_action_required_e_mails_the_link_once_and_a_payment_keeps_the_instance() {
    action_required_e_mails_the_link_once_and_a_payment_keeps_the_instance(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_action_required_e_mails_the_link_once_and_a_payment_keeps_the_instance() {
    action_required_e_mails_the_link_once_and_a_payment_keeps_the_instance(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_action_required_paid_before_sending_is_not_e_mailed() {
    action_required_paid_before_sending_is_not_e_mailed(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_action_required_paid_before_sending_is_not_e_mailed() {
    action_required_paid_before_sending_is_not_e_mailed(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_action_required_unpaid_is_deprovisioned_at_the_deadline() {
    action_required_unpaid_is_deprovisioned_at_the_deadline(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_action_required_unpaid_is_deprovisioned_at_the_deadline() {
    action_required_unpaid_is_deprovisioned_at_the_deadline(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_a_dispute_alerts_once_per_state_change_and_suspend_restores_when_won() {
    a_dispute_alerts_once_per_state_change_and_suspend_restores_when_won(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_a_dispute_alerts_once_per_state_change_and_suspend_restores_when_won() {
    a_dispute_alerts_once_per_state_change_and_suspend_restores_when_won(Backend::Postgres).await;
}
