//! Retention pruning: the worker deletes history older than the [`RetentionPolicy`] in small
//! batches, one replica at a time (a lease in the store).
//!
//! [`RetentionPolicy`]: crate::retention::RetentionPolicy

use tracing::{info, warn};

use super::{Billing, error_chain};
use crate::ports::StoreError;
use crate::retention::PruneReport;

/// The singleton lease of the periodic pruning.
const RETENTION_LEASE: &str = "retention_prune";

impl Billing {
    /// Prunes what the retention policy lets go, batch by batch, at most `max_batches` batches
    /// (`None`: until nothing is left). With `dry_run`, counts what would go and changes nothing.
    /// Every pruned row is counted in `billing_retention_pruned_rows_total`.
    pub async fn prune(&self, dry_run: bool, max_batches: Option<u32>) -> Result<PruneReport, StoreError> {
        let policy = &self.config.retention;
        let request = policy.request(self.clock.now(), dry_run);
        if dry_run {
            return self.store.prune(&request).await;
        }
        let mut total = PruneReport::default();
        let mut batches = 0_u32;
        while max_batches.is_none_or(|max| batches < max) {
            let report = self.store.prune(&request).await?;
            batches += 1;
            for (kind, n) in [("events", report.events), ("payloads", report.payloads), ("jobs", report.jobs)] {
                if n > 0 {
                    metrics::counter!("billing_retention_pruned_rows_total", "kind" => kind).increment(n);
                }
            }
            total = total.plus(report);
            // A batch under the limit for every kind was the last one; a batch that pruned
            // something always shrinks what is left, so this loop ends.
            if report.exhausted(request.limit) {
                break;
            }
        }
        if total.total() > 0 {
            info!(events = total.events, payloads = total.payloads, jobs = total.jobs, batches, "pruned old history");
        }
        Ok(total)
    }

    /// Every `interval`, the replica holding the pruning lease prunes up to `max_batches` batches.
    pub(crate) async fn run_retention(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let policy = self.config.retention.clone();
        while !*stop.borrow() {
            if self.lease(RETENTION_LEASE, policy.interval).await {
                if let Err(e) = self.prune(false, Some(policy.max_batches)).await {
                    metrics::counter!("billing_retention_errors_total").increment(1);
                    warn!(error = %error_chain(&e), "retention pruning: store error");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(policy.interval) => {}
                _ = stop.changed() => {}
            }
        }
    }
}
