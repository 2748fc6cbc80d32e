//! The cut-over report predicts the switch with `cutover::worker_step`: this holds it to the real
//! job worker. For each pair of (desired instance, adopted Node record) the worker reconciles on a
//! memory store holding that record, and must make exactly the predicted provisioner call and queue
//! the predicted welcome e-mail.

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use common::{T0, TestClock, at};
use mindroom_billing_core::cutover::{NodeInstance, NodeSubscription, ProvisionerCall, worker_step};
use mindroom_billing_core::dryrun::LogNotifier;
use mindroom_billing_core::event::SubscriptionStatus;
use mindroom_billing_core::model::{
    AppliedSnapshot, Claim, Commit, Grace, JobFinish, JobKind, JobResolution, NewJob, Outcome, SubscriptionState,
};
use mindroom_billing_core::ports::{JobFilter, ProvisionError, ProvisionRequest, ProvisionedInstance};
use mindroom_billing_core::{
    Billing, BillingConfig, Clock, Limits, MemoryStore, Provisioner, Store, Tier, Verifier, WebhookSecret,
};

/// Records each call in the report's terms.
#[derive(Default)]
struct Recorder(Mutex<Vec<ProvisionerCall>>);

#[async_trait]
impl Provisioner for Recorder {
    async fn provision(&self, request: &ProvisionRequest) -> Result<ProvisionedInstance, ProvisionError> {
        let generation = request.idempotency_key.split(':').nth(2).and_then(|g| g.parse().ok()).unwrap_or(0);
        let call = ProvisionerCall::Provision { app_name: request.app_name.clone(), tier: request.tier, generation };
        self.0.lock().unwrap().push(call);
        Ok(ProvisionedInstance {
            app_name: request.app_name.clone(),
            subdomain: None,
            frontend_url: None,
            backend_url: None,
        })
    }

    async fn update_limits(&self, app_name: &str, limits: &Limits, _key: &str) -> Result<(), ProvisionError> {
        let tier = Tier::ALL.into_iter().find(|t| t.limits() == *limits).unwrap();
        self.0.lock().unwrap().push(ProvisionerCall::Update { app_name: app_name.into(), tier });
        Ok(())
    }

    async fn deprovision(&self, app_name: &str, _key: &str) -> Result<(), ProvisionError> {
        self.0.lock().unwrap().push(ProvisionerCall::Deprovision { app_name: app_name.into() });
        Ok(())
    }
}

fn state(sub: &str, status: SubscriptionStatus, grace_over: bool, now: DateTime<Utc>) -> SubscriptionState {
    let mut s = SubscriptionState::new(sub, format!("cus_{sub}"));
    s.snapshot = Some(AppliedSnapshot {
        status,
        price_id: "price_pro".into(),
        tier: Tier::Professional,
        tier_from_price: true,
        current_period_end: None,
        trial_end: None,
        canceled_at: None,
        event_created: now - Duration::days(1),
    });
    if grace_over {
        s.grace = Some(Grace { started_at: now - Duration::days(8), ends_at: now - Duration::days(1) });
    }
    s
}

fn node(sub: &str, rows: &[(&str, &str)]) -> NodeSubscription {
    NodeSubscription {
        subscription_id: sub.into(),
        customer_id: Some(format!("cus_{sub}")),
        tier: None,
        status: None,
        max_agents: None,
        max_messages_per_day: None,
        instances: rows
            .iter()
            .enumerate()
            .map(|(i, (app, status))| NodeInstance {
                id: uuid::Uuid::from_u128(i as u128 + 1),
                app_name: Some((*app).into()),
                status: Some((*status).into()),
                memory_mb: None,
                cpu_millis: None,
                created_at: Some(at(T0 - 1000 + i64::try_from(i).unwrap())),
            })
            .collect(),
    }
}

/// Runs the real worker's reconcile for `billing` against the adopted record of `node`; returns the
/// calls it made and whether it queued a welcome e-mail that is not skipped.
async fn run_worker(
    billing_state: &SubscriptionState,
    node: &NodeSubscription,
    now: DateTime<Utc>,
) -> (Vec<ProvisionerCall>, bool) {
    let store = Arc::new(MemoryStore::new());
    let sub = billing_state.subscription_id.clone();
    let commit = Commit {
        now,
        event_id: None,
        outcome: Outcome::Applied,
        subscription: Some(billing_state.clone()),
        account: None,
        jobs: vec![],
    };
    store.commit(&commit).await.unwrap();
    // The adopted record, as the PostgreSQL store's adoption writes it.
    if let Some(record) = node.adopted_record(now) {
        let seed = NewJob {
            key: "seed".into(),
            group: Some(sub.clone()),
            kind: JobKind::AdminAlert { subject: String::new(), detail: String::new() },
            run_after: now,
        };
        store.enqueue(&[seed]).await.unwrap();
        let claimed = store.claim_jobs(&Claim { now, lease: Duration::seconds(30), limit: 1 }).await.unwrap();
        let finish = JobFinish {
            job_id: claimed[0].id,
            attempt: claimed[0].attempts,
            now,
            resolution: JobResolution::Done,
            instance: Some(record),
            enqueue: vec![],
        };
        assert!(store.finish_job(&finish).await.unwrap());
    }
    let reconcile = NewJob {
        key: format!("reconcile:{sub}:switch"),
        group: Some(sub.clone()),
        kind: JobKind::Reconcile { subscription_id: sub.clone() },
        run_after: now,
    };
    store.enqueue(&[reconcile]).await.unwrap();
    let recorder = Arc::new(Recorder::default());
    let billing = Billing::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::clone(&recorder) as Arc<dyn Provisioner>,
        Arc::new(LogNotifier),
        BillingConfig::new(Verifier::new([WebhookSecret::new("whsec_cutover")])),
    )
    .with_clock(Arc::new(TestClock::new(now)) as Arc<dyn Clock>);
    assert_eq!(billing.run_due_jobs(10).await.unwrap(), 1, "the reconcile ran");
    // The e-mails it queued run (a welcome for an adopted app is skipped; one to be sent waits for an
    // address here).
    billing.run_due_jobs(10).await.unwrap();
    let jobs = store.list_jobs(&JobFilter { state: None, limit: 100 }).await.unwrap();
    let welcome = jobs.iter().any(|j| {
        j.key.starts_with(&format!("email:welcome:{sub}:"))
            && !j.last_error.as_deref().is_some_and(|e| e.starts_with("skipped"))
    });
    let calls = recorder.0.lock().unwrap().clone();
    (calls, welcome)
}

#[tokio::test]
async fn the_predicted_switch_is_what_the_worker_does() {
    use SubscriptionStatus::{Active, Canceled, PastDue};
    let now = at(T0);
    let statuses = [(Active, false), (PastDue, true), (Canceled, false)];
    let node_rows: [&[(&str, &str)]; 7] = [
        &[],
        &[("node-app", "running")],
        &[("node-app", "provisioning")],
        &[("node-app", "failed")],
        &[("node-app", "deprovisioning")],
        &[("node-app", "deprovisioned")],
        &[("old-app", "deprovisioned"), ("node-app", "running"), ("newest-app", "running")],
    ];
    let mut checked = 0;
    for (status, grace_over) in statuses {
        for rows in node_rows {
            let sub = "sub_switch";
            let billing_state = state(sub, status, grace_over, now);
            let node = node(sub, rows);
            let record = node.adopted_record(now);
            let predicted = worker_step(sub, billing_state.desired(now), record.as_ref());
            let (calls, welcome) = run_worker(&billing_state, &node, now).await;
            let case = format!("{status:?} (grace over: {grace_over}) against {rows:?}");
            assert_eq!(calls, predicted, "{case}");
            let adopted = record.as_ref().is_some_and(|r| r.may_exist());
            let predicted_welcome =
                !adopted && predicted.iter().any(|c| matches!(c, ProvisionerCall::Provision { .. }));
            assert_eq!(welcome, predicted_welcome, "{case}: the welcome e-mail");
            checked += 1;
        }
    }
    assert_eq!(checked, 21);
}
