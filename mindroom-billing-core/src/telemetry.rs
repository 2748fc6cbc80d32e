//! The metrics the core emits, described once for the installed recorder (Prometheus `# HELP`).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Describes every metric the core emits (meaning, unit, labels) to the installed `metrics`
/// recorder, and registers each series at zero (every label value of the closed label sets), so a
/// scrape right after start lists them all and dashboards show 0 rather than "no data". Call it
/// once after installing the recorder; without a recorder it does nothing.
pub fn describe_metrics() {
    describe();
    register_at_zero();
}

/// The label values of the closed label sets.
const OUTCOMES: [&str; 5] = ["applied", "duplicate", "stale", "ignored", "failed"];
const VERIFICATION_REASONS: [&str; 5] =
    ["missing_header", "malformed_header", "no_v1_signature", "no_matching_signature", "timestamp_outside_tolerance"];
const JOB_KINDS: [&str; 3] = ["reconcile", "email", "admin_alert"];
const JOB_RESULTS: [&str; 4] = ["done", "skipped", "retry", "dead"];
const PROVISIONER_OPS: [&str; 3] = ["provision", "update", "deprovision"];
const PROVISIONER_ERRORS: [&str; 2] = ["retryable", "permanent"];
const DRIFT_FIELDS: [&str; 4] = ["tier", "status", "grace", "instance"];
const SYNC_TASKS: [&str; 2] = ["catch_up", "reconcile"];
const SYNC_ERRORS: [&str; 3] = ["unauthorized", "api", "store"];
const RETENTION_KINDS: [&str; 3] = ["events", "payloads", "jobs"];

fn register_at_zero() {
    use metrics::{counter, gauge, histogram};
    for kind in crate::service::CATCH_UP_TYPES {
        for outcome in OUTCOMES {
            counter!("billing_webhook_events_total", "type" => kind, "outcome" => outcome).absolute(0);
        }
    }
    for reason in VERIFICATION_REASONS {
        counter!("billing_webhook_verification_failures_total", "reason" => reason).absolute(0);
    }
    for name in [
        "billing_webhook_parse_failures_total",
        "billing_commit_conflicts_total",
        "billing_unapplied_pickup_errors_total",
        "billing_retention_errors_total",
    ] {
        counter!(name).absolute(0);
    }
    for name in ["billing_webhook_processing_seconds", "billing_webhook_delivery_lag_seconds"] {
        drop(histogram!(name));
    }
    for name in [
        "billing_jobs_pending",
        "billing_jobs_running",
        "billing_jobs_dead",
        "billing_stripe_cursor_lag_seconds",
        "billing_disputes_open",
        "billing_disputes_evidence_due_timestamp_seconds",
    ] {
        gauge!(name).set(0.0);
    }
    for kind in JOB_KINDS {
        for result in JOB_RESULTS {
            counter!("billing_jobs_total", "kind" => kind, "result" => result).absolute(0);
        }
    }
    for op in PROVISIONER_OPS {
        drop(histogram!("billing_provisioner_request_seconds", "op" => op));
        for kind in PROVISIONER_ERRORS {
            counter!("billing_provisioner_errors_total", "op" => op, "kind" => kind).absolute(0);
        }
    }
    for outcome in OUTCOMES {
        counter!("billing_stripe_catch_up_events_total", "outcome" => outcome).absolute(0);
    }
    for field in DRIFT_FIELDS {
        counter!("billing_stripe_drift_total", "field" => field).absolute(0);
    }
    for task in SYNC_TASKS {
        for kind in SYNC_ERRORS {
            counter!("billing_stripe_sync_errors_total", "task" => task, "kind" => kind).absolute(0);
        }
    }
    for kind in RETENTION_KINDS {
        counter!("billing_retention_pruned_rows_total", "kind" => kind).absolute(0);
    }
}

fn describe() {
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
    describe_gauge!("billing_disputes_open", Unit::Count, "Disputes (chargebacks) not yet won, lost or closed");
    describe_gauge!(
        "billing_disputes_evidence_due_timestamp_seconds",
        Unit::Seconds,
        "Earliest evidence deadline among open disputes, unix seconds (0: none)"
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Outcome;
    use crate::service::{Disposition, DriftField};
    use crate::signature::SignatureError;

    /// The registered label values are the ones the code emits.
    #[test]
    fn the_zero_series_use_the_emitted_labels() {
        let reasons = [
            SignatureError::MissingHeader,
            SignatureError::MalformedHeader(""),
            SignatureError::NoV1Signature,
            SignatureError::NoMatchingSignature,
            SignatureError::TimestampOutsideTolerance { skew_secs: 0, tolerance_secs: 0 },
        ];
        assert_eq!(reasons.map(|r| r.reason()), VERIFICATION_REASONS);
        let outcomes = [
            Disposition::Applied,
            Disposition::Duplicate,
            Disposition::Stale,
            Disposition::Ignored,
            Disposition::Failed(String::new()),
        ];
        assert_eq!(outcomes.map(|d| d.label()), OUTCOMES);
        assert_eq!(Outcome::Failed(String::new()).label(), "failed");
        let fields = [DriftField::Tier, DriftField::Status, DriftField::Grace, DriftField::Instance];
        assert_eq!(fields.map(DriftField::label), DRIFT_FIELDS);
    }
}
