//! Retention: how long raw event payloads, event ids and finished jobs are kept.
//!
//! The contract: raw payloads and finished jobs are kept for the retention (default 400 days:
//! disputes and audits reach back more than a year) and then pruned; an event's id row goes with
//! its payload, but never before [`REDELIVERY_HORIZON_DAYS`] (Stripe redelivers an event for up to 3
//! days and lists it for 30 days, so until then its id must still answer "duplicate"). With a
//! retention of 30 days or more the whole row goes at the retention; with a shorter one the payload
//! goes first (the row keeps an empty payload) and the row after 30 days.
//!
//! Never pruned automatically: failed events (operators replay them), received ones (not applied
//! yet), and pending, running and dead jobs (dead ones need an operator).

use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};

/// Days an event id row is kept at least, whatever the retention: Stripe lists events for 30 days.
pub const REDELIVERY_HORIZON_DAYS: i64 = 30;

/// Days a done customer e-mail job (its key) is kept at least, whatever the retention. The key is the
/// only de-duplication of an e-mail (the e-mail provider's idempotency lasts a day), and Stripe tells
/// a fact again for up to 35 days: it retries a failed invoice's payment for weeks, each attempt with a
/// new event, and lists events for 30 days.
pub const EMAIL_KEY_HORIZON_DAYS: i64 = 35;

/// How long stored history is kept, and how the worker prunes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// How long raw payloads and finished jobs are kept (default 400 days).
    pub retention: Duration,
    /// Rows of each kind pruned per store call (default 250: about 3 ms per call on PostgreSQL with
    /// 10 M stored events, see `scripts/scale.sh`): short transactions, short locks.
    pub batch: u32,
    /// How often a replica tries to take the pruning lease and prune (default 10 minutes).
    pub interval: StdDuration,
    /// Batches per pass at most (default 400, so up to 100,000 rows of each kind per pass), so one
    /// pass stays bounded; the rest waits for the next pass.
    pub max_batches: u32,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self { retention: Duration::days(400), batch: 250, interval: StdDuration::from_secs(600), max_batches: 400 }
    }
}

impl RetentionPolicy {
    /// Sets [`RetentionPolicy::retention`].
    #[must_use]
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets [`RetentionPolicy::batch`] (at least 1).
    #[must_use]
    pub fn with_batch(mut self, batch: u32) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Sets [`RetentionPolicy::interval`].
    #[must_use]
    pub fn with_interval(mut self, interval: StdDuration) -> Self {
        self.interval = interval;
        self
    }

    /// The cut-offs at `now`: payloads and jobs older than the retention, event ids older than both
    /// the retention and [`REDELIVERY_HORIZON_DAYS`], customer e-mail jobs older than both the
    /// retention and [`EMAIL_KEY_HORIZON_DAYS`].
    pub fn request(&self, now: DateTime<Utc>, dry_run: bool) -> PruneRequest {
        let retained = now - self.retention;
        let horizon = now - Duration::days(REDELIVERY_HORIZON_DAYS);
        PruneRequest {
            events_before: retained.min(horizon),
            payloads_before: retained,
            jobs_before: retained,
            email_jobs_before: retained.min(now - Duration::days(EMAIL_KEY_HORIZON_DAYS)),
            limit: self.batch.max(1),
            dry_run,
        }
    }
}

/// One call of [`crate::Store::prune`]: what to prune. Only done events (applied, stale, ignored) and
/// done jobs are ever pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneRequest {
    /// Done events received before this are deleted, id and all.
    pub events_before: DateTime<Utc>,
    /// Done events received before this (and not before `events_before`) lose their payload; the
    /// row stays, so a redelivery is still a duplicate.
    pub payloads_before: DateTime<Utc>,
    /// Done jobs created and last updated before this are deleted.
    pub jobs_before: DateTime<Utc>,
    /// Done customer e-mail jobs are deleted only when also created and last updated before this
    /// (at most [`EMAIL_KEY_HORIZON_DAYS`] ago): their keys de-duplicate the e-mails.
    pub email_jobs_before: DateTime<Utc>,
    /// At most this many rows of each kind per call.
    pub limit: u32,
    /// Count what would go (all of it, ignoring `limit`) and change nothing.
    pub dry_run: bool,
}

/// What a [`crate::Store::prune`] call pruned (or, in a dry run, would prune).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Event rows deleted.
    pub events: u64,
    /// Event payloads emptied (their rows kept).
    pub payloads: u64,
    /// Done jobs deleted.
    pub jobs: u64,
}

impl PruneReport {
    /// All rows touched.
    pub fn total(&self) -> u64 {
        self.events + self.payloads + self.jobs
    }

    /// Whether a batch of `limit` left nothing more to prune (every kind came in under the limit).
    pub fn exhausted(&self, limit: u32) -> bool {
        let limit = u64::from(limit);
        self.events < limit && self.payloads < limit && self.jobs < limit
    }

    /// Adds another report.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self {
            events: self.events + other.events,
            payloads: self.payloads + other.payloads,
            jobs: self.jobs + other.jobs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_785_000_000, 0).unwrap()
    }

    #[test]
    fn a_long_retention_prunes_the_whole_row_at_the_retention() {
        let r = RetentionPolicy::default().request(now(), false);
        assert_eq!(r.events_before, now() - Duration::days(400));
        assert_eq!(r.payloads_before, r.events_before);
        assert_eq!(r.jobs_before, r.events_before);
        assert_eq!((r.limit, r.dry_run), (250, false));
    }

    #[test]
    fn a_short_retention_drops_payloads_first_and_ids_only_after_30_days() {
        let r = RetentionPolicy::default().with_retention(Duration::days(7)).request(now(), true);
        assert_eq!(r.payloads_before, now() - Duration::days(7));
        assert_eq!(r.jobs_before, now() - Duration::days(7));
        assert_eq!(r.events_before, now() - Duration::days(30));
        assert!(r.dry_run);
    }

    #[test]
    fn a_zero_batch_is_one() {
        assert_eq!(RetentionPolicy::default().with_batch(0).request(now(), false).limit, 1);
    }

    #[test]
    fn reports_add_up_and_know_when_a_batch_was_the_last() {
        let a = PruneReport { events: 3, payloads: 0, jobs: 10 };
        let b = PruneReport { events: 1, payloads: 2, jobs: 0 };
        assert_eq!(a.plus(b), PruneReport { events: 4, payloads: 2, jobs: 10 });
        assert_eq!(a.plus(b).total(), 16);
        assert!(!a.exhausted(10));
        assert!(a.exhausted(11));
    }
}
