//! The metrics the core emits, described once for the installed recorder (Prometheus `# HELP`).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Describes every metric the core emits (meaning, unit, labels) to the installed `metrics`
/// recorder. Call it once after installing the recorder; without a recorder it does nothing.
pub fn describe_metrics() {
    describe_counter!(
        "billing_webhook_events_total",
        Unit::Count,
        "Verified webhook events received, by event type and outcome (applied, duplicate, stale, ignored, failed)"
    );
    describe_counter!(
        "billing_webhook_verification_failures_total",
        Unit::Count,
        "Webhook requests rejected before parsing because the Stripe-Signature did not verify, by reason"
    );
    describe_counter!(
        "billing_webhook_parse_failures_total",
        Unit::Count,
        "Verified webhook payloads that could not be parsed as a Stripe event"
    );
    describe_histogram!(
        "billing_webhook_processing_seconds",
        Unit::Seconds,
        "Time from a verified webhook to its committed decision, in seconds"
    );
    describe_histogram!(
        "billing_webhook_delivery_lag_seconds",
        Unit::Seconds,
        "Delay between an event's creation at Stripe and its receipt here, in seconds"
    );
    describe_counter!(
        "billing_commit_conflicts_total",
        Unit::Count,
        "Commits that lost the compare-and-swap on a subscription and were decided again"
    );
    describe_counter!(
        "billing_jobs_total",
        Unit::Count,
        "Job runs finished, by job kind and result (done, skipped, retry, dead)"
    );
    describe_gauge!("billing_jobs_pending", Unit::Count, "Jobs waiting to run (all replicas, sampled by the sweeper)");
    describe_gauge!("billing_jobs_running", Unit::Count, "Jobs currently leased by a worker (all replicas)");
    describe_gauge!("billing_jobs_dead", Unit::Count, "Jobs that exhausted their attempts and need an operator");
    describe_histogram!(
        "billing_provisioner_request_seconds",
        Unit::Seconds,
        "Duration of calls to the provisioner, by operation (provision, update, deprovision), in seconds"
    );
    describe_counter!(
        "billing_provisioner_errors_total",
        Unit::Count,
        "Failed provisioner calls, by operation and kind (retryable, permanent)"
    );
    describe_counter!(
        "billing_unapplied_pickup_errors_total",
        Unit::Count,
        "Recorded events the unapplied pick-up could not apply (left for the next pass)"
    );
    describe_counter!(
        "billing_stripe_catch_up_events_total",
        Unit::Count,
        "Events listed from the Stripe API by catch-up, by outcome (applied, duplicate, stale, ignored, failed)"
    );
    describe_gauge!(
        "billing_stripe_cursor_lag_seconds",
        Unit::Seconds,
        "How far behind now the catch-up cursor was when last saved, in seconds"
    );
    describe_counter!(
        "billing_stripe_drift_total",
        Unit::Count,
        "Differences between billing and the Stripe API found by reconciliation, by field (tier, status, grace, instance)"
    );
    describe_counter!(
        "billing_stripe_sync_errors_total",
        Unit::Count,
        "Failed catch-up or reconciliation runs, by task and kind (unauthorized, api, store)"
    );
    describe_counter!(
        "billing_retention_pruned_rows_total",
        Unit::Count,
        "Rows pruned by retention, by kind (events: whole event rows; payloads: raw payloads emptied, the id row kept; jobs: finished jobs)"
    );
    describe_counter!(
        "billing_retention_errors_total",
        Unit::Count,
        "Retention pruning passes that ended on a store error (retried at the next interval)"
    );
}
