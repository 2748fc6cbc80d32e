//! The [`OperatorStore`] conformance suite (feature `test-util`): every store that implements the
//! operator port must pass it, next to [`crate::conformance::run_all`].
//!
//! ```ignore
//! mindroom_billing_core::operator_conformance::run_all(|| async { Arc::new(MyStore::fresh().await) }).await;
//! ```

#![allow(clippy::missing_panics_doc, clippy::unwrap_used)]

use std::future::Future;
use std::sync::Arc;

use chrono::Duration;

use crate::conformance::{job, new_event, t0};
use crate::model::{
    AccountPatch, Claim, Commit, EmailKind, Failure, Grace, InstanceRecord, InstanceStatus, JobFinish, JobKind,
    JobResolution, JobState, NewJob, Outcome, PaidInvoice, SubscriptionState,
};
use crate::operator::{AuditEntry, DriftRecord, Operator, OperatorRole, OperatorSession, OperatorStore, SessionCutoff};
use crate::ports::{JobFilter, Store};

/// Runs every check, each on a fresh store from `fresh`.
pub async fn run_all<S, F, Fut>(fresh: F)
where
    S: Store + OperatorStore,
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<S>>,
{
    finds_by_email_app_and_customer(fresh().await).await;
    searches_by_part_of_an_email_a_reference_or_an_invoice(fresh().await).await;
    events_of_a_customer_newest_first(fresh().await).await;
    jobs_of_a_subscription(fresh().await).await;
    grace_by_deadline(fresh().await).await;
    every_subscription_by_id_a_page_at_a_time(fresh().await).await;
    open_disputes_by_evidence_deadline(fresh().await).await;
    retry_is_fenced_on_dead(fresh().await).await;
    audit_rows_by_customer(fresh().await).await;
    drift_is_replaced_per_checked_subscription(fresh().await).await;
    operators_are_named_and_unique(fresh().await).await;
    sessions_end_by_logout_password_removal_and_time(fresh().await).await;
}

fn commit(subscription: Option<SubscriptionState>, account: Option<AccountPatch>) -> Commit {
    Commit { now: t0(), event_id: None, outcome: Outcome::Applied, subscription, account, jobs: vec![] }
}

fn patch(customer: &str, email: &str) -> AccountPatch {
    AccountPatch { stripe_customer_id: customer.into(), email: Some(email.into()), reference: None, observed_at: t0() }
}

/// E-mail look-up ignores ASCII case; an app name finds its instance; a customer's subscriptions
/// are found without an account row.
pub async fn finds_by_email_app_and_customer<S: Store + OperatorStore>(store: Arc<S>) {
    store.commit(&commit(None, Some(patch("cus_a", "Ann@Example.com")))).await.unwrap();
    store.commit(&commit(None, Some(patch("cus_b", "bob@example.com")))).await.unwrap();
    let found = store.accounts_by_email("ann@example.COM", 10).await.unwrap();
    assert_eq!(found.iter().map(|a| a.stripe_customer_id.as_str()).collect::<Vec<_>>(), ["cus_a"]);
    assert!(store.accounts_by_email("nobody@example.com", 10).await.unwrap().is_empty());
    assert!(store.accounts_by_email("%", 10).await.unwrap().is_empty(), "no pattern matching");

    store.commit(&commit(Some(SubscriptionState::new("sub_o1", "cus_only")), None)).await.unwrap();
    store.commit(&commit(Some(SubscriptionState::new("sub_o2", "cus_other")), None)).await.unwrap();
    let subs = store.subscriptions_for_customer("cus_only").await.unwrap();
    assert_eq!(subs.iter().map(|s| s.subscription_id.as_str()).collect::<Vec<_>>(), ["sub_o1"]);

    store.enqueue(&[job("r1", Some("sub_o1"), t0())]).await.unwrap();
    let claimed = store.claim_jobs(&Claim { now: t0(), lease: Duration::seconds(30), limit: 1 }).await.unwrap();
    let instance = InstanceRecord {
        subscription_id: "sub_o1".into(),
        app_name: "mr-o1-abc".into(),
        status: InstanceStatus::Running,
        generation: 1,
        tier: None,
        limits: None,
        subdomain: None,
        frontend_url: None,
        backend_url: None,
        deprovisioned_at: None,
        updated_at: t0(),
        adopted: false,
    };
    let finish = JobFinish {
        job_id: claimed[0].id,
        attempt: claimed[0].attempts,
        now: t0(),
        resolution: JobResolution::Done,
        instance: Some(instance.clone()),
        enqueue: vec![],
    };
    assert!(store.finish_job(&finish).await.unwrap());
    assert_eq!(store.instance_by_app("mr-o1-abc").await.unwrap(), Some(instance));
    assert_eq!(store.instance_by_app("mr-none").await.unwrap(), None);
}

/// A customer's events: those whose object names it as `customer`, or that are the customer.
pub async fn events_of_a_customer_newest_first<S: Store + OperatorStore>(store: Arc<S>) {
    let sub = r#"{"id":"evt_c1","data":{"object":{"object":"subscription","id":"sub_1","customer":"cus_t"}}}"#;
    let cus = r#"{"id":"evt_c2","data":{"object":{"object":"customer","id":"cus_t"}}}"#;
    let inv = r#"{"id":"evt_c3","data":{"object":{"object":"invoice","customer":"cus_t"}}}"#;
    let other = r#"{"id":"evt_c4","data":{"object":{"object":"invoice","customer":"cus_u"}}}"#;
    for (i, (id, payload)) in [("evt_c1", sub), ("evt_c2", cus), ("evt_c3", inv), ("evt_c4", other)].iter().enumerate()
    {
        let at = t0() + Duration::seconds(i64::try_from(i).unwrap());
        store.record_event(&new_event(id, payload, at)).await.unwrap();
    }
    store.record_event(&new_event("evt_bad", "not json", t0())).await.unwrap();
    let found = store.events_for_customer("cus_t", 10).await.unwrap();
    assert_eq!(found.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["evt_c3", "evt_c2", "evt_c1"]);
    assert_eq!(found[0].payload, inv, "byte for byte");
    let limited = store.events_for_customer("cus_t", 2).await.unwrap();
    assert_eq!(limited.len(), 2);
    assert!(store.events_for_customer("cus_none", 10).await.unwrap().is_empty());
}

/// A subscription's jobs: its group's and the e-mails about it, newest first.
pub async fn jobs_of_a_subscription<S: Store + OperatorStore>(store: Arc<S>) {
    let email = NewJob {
        key: "email:sub_j".into(),
        group: None,
        kind: JobKind::Email {
            customer_id: "cus_j".into(),
            subscription_id: Some("sub_j".into()),
            email: EmailKind::Welcome,

            late: None,
        },
        run_after: t0(),
    };
    let alert = NewJob {
        key: "alert".into(),
        group: None,
        kind: JobKind::AdminAlert { subject: "sub_j".into(), detail: String::new() },
        run_after: t0(),
    };
    store.enqueue(&[job("reconcile:sub_j", Some("sub_j"), t0())]).await.unwrap();
    store.enqueue(&[email, alert, job("reconcile:sub_k", Some("sub_k"), t0())]).await.unwrap();
    let jobs = store.jobs_for_subscription("sub_j", 10).await.unwrap();
    let mut keys: Vec<&str> = jobs.iter().map(|j| j.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["email:sub_j", "reconcile:sub_j"]);
    assert!(jobs[0].id > jobs[1].id, "newest first");
    assert_eq!(store.jobs_for_subscription("sub_j", 1).await.unwrap().len(), 1);
}

/// Grace periods not handled yet, earliest deadline first; a handled one is not listed.
pub async fn grace_by_deadline<S: Store + OperatorStore>(store: Arc<S>) {
    for (id, days) in [("sub_late", 9), ("sub_soon", 2), ("sub_mid", 5)] {
        let mut s = SubscriptionState::new(id, "cus_g");
        s.grace = Some(Grace { started_at: t0(), ends_at: t0() + Duration::days(days) });
        s.grace_expiry_handled = id == "sub_late";
        store.commit(&commit(Some(s), None)).await.unwrap();
    }
    store.commit(&commit(Some(SubscriptionState::new("sub_fine", "cus_g")), None)).await.unwrap();
    let found = store.subscriptions_in_grace(10).await.unwrap();
    assert_eq!(found.iter().map(|s| s.subscription_id.as_str()).collect::<Vec<_>>(), ["sub_soon", "sub_mid"]);
    assert_eq!(found[0].version, 1, "the aggregate as stored");
    assert_eq!(store.subscriptions_in_grace(1).await.unwrap().len(), 1);
}

/// Every aggregate is listed by subscription id in byte order, a page at a time after the last id
/// seen, each as stored (with its version), whatever its state.
pub async fn every_subscription_by_id_a_page_at_a_time<S: Store + OperatorStore>(store: Arc<S>) {
    assert!(store.list_subscriptions(None, 10).await.unwrap().is_empty());
    // Byte order: upper case before lower case, `_` between them.
    let ids = ["sub_b", "sub_A", "sub_a", "sub_Z_", "sub_a_1", "sub_c"];
    for id in ids {
        let mut s = SubscriptionState::new(id, format!("cus_{id}"));
        s.grace_expiry_handled = id == "sub_c";
        store.commit(&commit(Some(s), None)).await.unwrap();
    }
    let mut bumped = store.load_subscription("sub_b").await.unwrap().unwrap();
    bumped.grace = Some(Grace { started_at: t0(), ends_at: t0() + Duration::days(1) });
    store.commit(&commit(Some(bumped), None)).await.unwrap();
    let mut sorted = ids.map(str::to_owned);
    sorted.sort_unstable();
    let all = store.list_subscriptions(None, 100).await.unwrap();
    assert_eq!(all.iter().map(|s| s.subscription_id.as_str()).collect::<Vec<_>>(), sorted);
    let b = all.iter().find(|s| s.subscription_id == "sub_b").unwrap();
    assert_eq!((b.version, b.grace.is_some()), (2, true), "the aggregate as stored");
    assert_eq!(b, &store.load_subscription("sub_b").await.unwrap().unwrap());
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_subscriptions(after.as_deref(), 4).await.unwrap();
        assert!(page.len() <= 4);
        paged.extend(page.iter().map(|s| s.subscription_id.clone()));
        after = page.last().map(|s| s.subscription_id.clone());
        if page.len() < 4 {
            break;
        }
    }
    assert_eq!(paged, sorted);
    let rest = store.list_subscriptions(Some("sub_a"), 100).await.unwrap();
    assert_eq!(rest.iter().map(|s| s.subscription_id.as_str()).collect::<Vec<_>>(), ["sub_a_1", "sub_b", "sub_c"]);
    assert!(store.list_subscriptions(Some("sub_c"), 100).await.unwrap().is_empty());
}

/// Subscriptions with an open dispute, earliest evidence deadline first (none last); closed disputes
/// (won, lost, inquiry closed) are not listed; the aggregate is answered as stored.
pub async fn open_disputes_by_evidence_deadline<S: Store + OperatorStore>(store: Arc<S>) {
    let dispute = |id: &str, status: &str, due_days: Option<i64>| crate::model::DisputeRecord {
        id: id.into(),
        charge: format!("ch_{id}"),
        amount: 4900,
        currency: "usd".into(),
        reason: "fraudulent".into(),
        status: status.into(),
        evidence_due_by: due_days.map(|d| t0() + Duration::days(d)),
        opened_at: t0(),
        reported_at: t0(),
    };
    let cases = [
        ("sub_dp_late", vec![dispute("dp_1", "needs_response", Some(9))]),
        // One closed dispute with an earlier deadline does not count; the open one does.
        ("sub_dp_soon", vec![dispute("dp_2", "won", Some(1)), dispute("dp_3", "under_review", Some(3))]),
        ("sub_dp_none", vec![dispute("dp_4", "warning_needs_response", None)]),
        ("sub_dp_closed", vec![dispute("dp_5", "lost", Some(2)), dispute("dp_6", "warning_closed", Some(2))]),
    ];
    for (id, disputes) in cases {
        let mut s = SubscriptionState::new(id, "cus_dp");
        s.disputes = disputes;
        store.commit(&commit(Some(s), None)).await.unwrap();
    }
    store.commit(&commit(Some(SubscriptionState::new("sub_dp_never", "cus_dp")), None)).await.unwrap();
    let found = store.open_disputes(10).await.unwrap();
    let ids: Vec<&str> = found.iter().map(|s| s.subscription_id.as_str()).collect();
    assert_eq!(ids, ["sub_dp_soon", "sub_dp_late", "sub_dp_none"]);
    assert_eq!(found[0].version, 1, "the aggregate as stored");
    assert_eq!(found[0].disputes.len(), 2, "with all its disputes");
    assert_eq!(store.open_disputes(1).await.unwrap().len(), 1);
}

/// Only a dead job is re-queued, due now, its attempts kept; it can then be claimed again.
pub async fn retry_is_fenced_on_dead<S: Store + OperatorStore>(store: Arc<S>) {
    store
        .enqueue(&[job("dies", Some("sub_d"), t0()), job("waits", Some("sub_w"), t0() + Duration::days(1))])
        .await
        .unwrap();
    let claimed = store.claim_jobs(&Claim { now: t0(), lease: Duration::seconds(30), limit: 1 }).await.unwrap();
    let dead = JobFinish {
        job_id: claimed[0].id,
        attempt: claimed[0].attempts,
        now: t0(),
        resolution: JobResolution::Dead { error: "provisioner said no".into() },
        instance: None,
        enqueue: vec![],
    };
    assert!(store.finish_job(&dead).await.unwrap());
    let waiting = store.list_jobs(&JobFilter { state: Some(JobState::Pending), limit: 5 }).await.unwrap();
    assert_eq!(store.retry_dead_job(waiting[0].id, t0()).await.unwrap(), None, "a pending job is not touched");
    assert_eq!(store.retry_dead_job(9_999_999, t0()).await.unwrap(), None, "unknown id");
    let later = t0() + Duration::hours(1);
    let retried = store.retry_dead_job(claimed[0].id, later).await.unwrap().expect("a dead job is re-queued");
    assert_eq!((retried.key.as_str(), retried.state, retried.run_after), ("dies", JobState::Pending, later));
    assert_eq!(store.retry_dead_job(claimed[0].id, later).await.unwrap(), None, "once: it is pending now");
    let loaded = store.load_job(claimed[0].id).await.unwrap().expect("a job is loaded by id");
    assert_eq!((loaded.key.as_str(), loaded.state), ("dies", JobState::Pending));
    assert_eq!(store.load_job(9_999_999).await.unwrap(), None);
    let again = store.claim_jobs(&Claim { now: later, lease: Duration::seconds(30), limit: 5 }).await.unwrap();
    assert_eq!(again.iter().map(|j| j.key.as_str()).collect::<Vec<_>>(), ["dies"]);
    assert_eq!(again[0].attempts, 2, "attempts keep counting (the fencing token)");
    assert_eq!(again[0].last_error.as_deref(), Some("provisioner said no"));
}

/// Audit rows are kept and listed newest first, per customer or all.
pub async fn audit_rows_by_customer<S: Store + OperatorStore>(store: Arc<S>) {
    let entry = |secs: i64, customer: Option<&str>, ok: bool| AuditEntry {
        at: t0() + Duration::seconds(secs),
        actor: "admin".into(),
        action: "replay".into(),
        target: format!("evt_{secs}"),
        customer_id: customer.map(str::to_owned),
        ok,
        result: if ok { "applied".into() } else { "store unavailable: <b>".into() },
    };
    store.record_audit(&entry(1, Some("cus_x"), true)).await.unwrap();
    store.record_audit(&entry(2, None, false)).await.unwrap();
    store.record_audit(&entry(3, Some("cus_x"), false)).await.unwrap();
    store.record_audit(&entry(4, Some("cus_y"), true)).await.unwrap();
    let of_x = store.list_audit(Some("cus_x"), 10).await.unwrap();
    assert_eq!(of_x, [entry(3, Some("cus_x"), false), entry(1, Some("cus_x"), true)]);
    let all = store.list_audit(None, 3).await.unwrap();
    assert_eq!(all.iter().map(|a| a.target.as_str()).collect::<Vec<_>>(), ["evt_4", "evt_3", "evt_2"]);
}

/// Each reconciliation replaces the drift of the subscriptions it checked, and only theirs.
pub async fn drift_is_replaced_per_checked_subscription<S: Store + OperatorStore>(store: Arc<S>) {
    let drift = |sub: &str, field: &str, secs: i64| DriftRecord {
        subscription_id: sub.into(),
        field: field.into(),
        before: "active".into(),
        after: "past_due".into(),
        found_at: t0() + Duration::seconds(secs),
    };
    let (a, b) = ("sub_da".to_owned(), "sub_db".to_owned());
    store
        .save_drift(&[a.clone(), b.clone()], &[drift(&a, "status", 1), drift(&a, "tier", 1), drift(&b, "grace", 1)])
        .await
        .unwrap();
    assert_eq!(store.list_drift(None, 10).await.unwrap().len(), 3);
    store.save_drift(std::slice::from_ref(&a), &[]).await.unwrap();
    assert_eq!(store.list_drift(None, 10).await.unwrap(), [drift(&b, "grace", 1)], "a is in sync now; b untouched");
    store.save_drift(std::slice::from_ref(&a), &[drift(&a, "instance", 2)]).await.unwrap();
    assert_eq!(store.list_drift(Some(&a), 10).await.unwrap(), [drift(&a, "instance", 2)]);
    let all = store.list_drift(None, 1).await.unwrap();
    assert_eq!(all, [drift(&a, "instance", 2)], "newest first");
}

fn operator(name: &str, role: OperatorRole) -> Operator {
    Operator {
        name: name.into(),
        role,
        password_hash: format!("$argon2id$v=19$m=8,t=1,p=1$c2FsdA$h-{name}"),
        created_at: t0(),
    }
}

/// Operators: added once per name, listed by name, their password replaced, removed.
pub async fn operators_are_named_and_unique<S: Store + OperatorStore>(store: Arc<S>) {
    let ann = operator("ann", OperatorRole::Admin);
    assert!(store.add_operator(&ann).await.unwrap());
    assert!(store.add_operator(&operator("bob", OperatorRole::ReadOnly)).await.unwrap());
    assert!(!store.add_operator(&operator("ann", OperatorRole::ReadOnly)).await.unwrap(), "the name is taken");
    assert_eq!(store.load_operator("ann").await.unwrap(), Some(ann.clone()), "the first one stays");
    assert_eq!(store.load_operator("Ann").await.unwrap(), None, "names are exact");
    let names: Vec<(String, OperatorRole)> =
        store.list_operators().await.unwrap().into_iter().map(|o| (o.name, o.role)).collect();
    assert_eq!(names, [("ann".to_owned(), OperatorRole::Admin), ("bob".to_owned(), OperatorRole::ReadOnly)]);
    assert!(store.set_operator_password("ann", "$argon2id$new", t0()).await.unwrap());
    assert_eq!(store.load_operator("ann").await.unwrap().unwrap().password_hash, "$argon2id$new");
    assert!(!store.set_operator_password("nobody", "$argon2id$x", t0()).await.unwrap());
    assert!(store.remove_operator("bob", t0()).await.unwrap());
    assert!(!store.remove_operator("bob", t0()).await.unwrap(), "once");
    assert_eq!(store.load_operator("bob").await.unwrap(), None);
    assert!(!format!("{ann:?}").contains("argon2"), "the hash is redacted from Debug");
}

/// Sessions: touched while live; ended by logout, a password change, the operator's removal, idle
/// time and age; an ended session never comes back.
pub async fn sessions_end_by_logout_password_removal_and_time<S: Store + OperatorStore>(store: Arc<S>) {
    store.add_operator(&operator("ann", OperatorRole::Admin)).await.unwrap();
    store.add_operator(&operator("bob", OperatorRole::ReadOnly)).await.unwrap();
    let open = |id: &str, who: &str, role: OperatorRole| OperatorSession {
        id: id.into(),
        operator: who.into(),
        role,
        created_at: t0(),
        last_seen: t0(),
        ended_at: None,
    };
    let cutoff = |minutes: i64| SessionCutoff {
        now: t0() + Duration::minutes(minutes),
        idle_since: t0() + Duration::minutes(minutes - 30),
        opened_since: t0() + Duration::minutes(minutes - 480),
    };
    for (id, who, role) in [
        ("s-ann-1", "ann", OperatorRole::Admin),
        ("s-ann-2", "ann", OperatorRole::Admin),
        ("s-bob", "bob", OperatorRole::ReadOnly),
        ("s-idle", "bob", OperatorRole::ReadOnly),
        ("s-boot", "admin", OperatorRole::Admin),
    ] {
        store.create_session(&open(id, who, role)).await.unwrap();
    }
    let live = store.touch_session("s-ann-1", &cutoff(10)).await.unwrap().expect("live");
    assert_eq!(
        (live.operator.as_str(), live.role, live.last_seen),
        ("ann", OperatorRole::Admin, t0() + Duration::minutes(10))
    );
    assert_eq!(store.touch_session("s-none", &cutoff(10)).await.unwrap(), None, "unknown");

    assert!(store.end_session("s-ann-1", t0() + Duration::minutes(11)).await.unwrap(), "logout");
    assert!(!store.end_session("s-ann-1", t0() + Duration::minutes(12)).await.unwrap(), "once");
    assert_eq!(store.touch_session("s-ann-1", &cutoff(12)).await.unwrap(), None, "ended by logout");

    assert!(store.touch_session("s-ann-2", &cutoff(12)).await.unwrap().is_some());
    store.set_operator_password("ann", "$argon2id$new", t0() + Duration::minutes(13)).await.unwrap();
    assert_eq!(store.touch_session("s-ann-2", &cutoff(14)).await.unwrap(), None, "ended by the password change");

    assert!(store.touch_session("s-bob", &cutoff(14)).await.unwrap().is_some());
    // s-idle was last seen at t0: 31 minutes idle at minute 31.
    assert_eq!(store.touch_session("s-idle", &cutoff(31)).await.unwrap(), None, "idle too long");
    assert_eq!(store.touch_session("s-idle", &cutoff(0)).await.unwrap(), None, "ended for good");
    store.remove_operator("bob", t0() + Duration::minutes(15)).await.unwrap();
    assert_eq!(store.touch_session("s-bob", &cutoff(16)).await.unwrap(), None, "ended by the removal");

    // A session kept busy still ends when it is older than the lifetime.
    for minute in (20..=480).step_by(20) {
        assert!(store.touch_session("s-boot", &cutoff(minute)).await.unwrap().is_some(), "minute {minute}");
    }
    assert_eq!(store.touch_session("s-boot", &cutoff(481)).await.unwrap(), None, "eight hours old");
}

/// Search: part of an e-mail or a reference, ignoring case and literally; an invoice id, failed or
/// paid.
pub async fn searches_by_part_of_an_email_a_reference_or_an_invoice<S: Store + OperatorStore>(store: Arc<S>) {
    store.commit(&commit(None, Some(patch("cus_a", "Ann.Lee@Example.com")))).await.unwrap();
    store.commit(&commit(None, Some(patch("cus_b", "bob_100%@example.org")))).await.unwrap();
    let with_ref = AccountPatch { reference: Some("user_123".into()), ..patch("cus_c", "carol@example.net") };
    store.commit(&commit(None, Some(with_ref))).await.unwrap();
    let mut failed = SubscriptionState::new("sub_f", "cus_f");
    failed.failures = vec![Failure { at: t0(), invoice_id: Some("in_Failed1".into()) }];
    failed.paid_invoices = vec![PaidInvoice { invoice_id: "in_Paid1".into(), at: t0() }];
    store.commit(&commit(Some(failed), None)).await.unwrap();
    let search = |text: &'static str| {
        let store = Arc::clone(&store);
        async move { store.search_customers(text, 10).await.unwrap() }
    };
    assert_eq!(search("ann.lee").await, ["cus_a"], "part of an e-mail, ignoring case");
    assert_eq!(search("EXAMPLE").await, ["cus_a", "cus_b", "cus_c"], "sorted");
    assert_eq!(search("100%").await, ["cus_b"], "% is a character");
    assert!(search("b_b").await.is_empty(), "_ is a character");
    assert_eq!(search("user_12").await, ["cus_c"], "part of the reference");
    assert_eq!(search("in_Failed1").await, ["cus_f"], "a failed invoice");
    assert_eq!(search("in_Paid1").await, ["cus_f"], "a paid invoice");
    assert!(search("in_Paid").await.is_empty(), "invoice ids are whole");
    assert!(search("").await.is_empty());
    assert_eq!(store.search_customers("example", 2).await.unwrap(), ["cus_a", "cus_b"], "limited");
}
