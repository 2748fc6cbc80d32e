//! The per-replica entitlement cache: an account's subscriptions and today's usage counters, so that
//! the entitlement question other services ask on every message is answered without the database.
//!
//! Subscriptions are cached until a change is reported. With a store that reports committed changes
//! (PostgreSQL `LISTEN`, see [`Store::watch_changes`](crate::Store::watch_changes)) an entry lives
//! until its account changes; while the store is not listening (not connected yet, connection lost)
//! nothing is cached, and everything cached is dropped when changes may have been missed. With a store
//! that cannot report changes (PostgREST) an entry lives for a short time-to-live. This replica's own
//! commits drop their account's entry at once in both modes. Usage counters are always cached for
//! [`CacheConfig::usage_ttl`]; increments go to the store, and their answer refreshes the counter.
//!
//! Accounts named by a calling service by Stripe customer or platform reference are resolved to an
//! account id once: a customer known to have an account is remembered (an account is never removed
//! and its id derives from the customer); a reference for the time-to-live (a later Checkout may
//! give it to another account; this replica's own commits that set a reference drop them at once).
//!
//! A read that started before an invalidation of its account never stores its (possibly stale)
//! result: each invalidation takes a sequence number, and a fill carries the number current when its
//! read began (a ticket). Entries carry the time the store was read (`as_of` in the answer).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use crate::model::SubscriptionState;
use crate::ports::ChangeListener;
use crate::tier::Metric;

/// Entitlement cache settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Cache at all (`false`: every entitlement question reads the store).
    pub enabled: bool,
    /// How long cached subscriptions are used with a store that cannot report changes.
    pub ttl: Duration,
    /// How long cached usage counters are used (increments are never cached: they are atomic
    /// writes in the store).
    pub usage_ttl: Duration,
    /// Most accounts kept; when full the cache starts over.
    pub capacity: usize,
    /// Most subscription aggregates kept to decide a new event before recording it (a stale one
    /// only costs a second round trip: the store compares versions). Used even when `enabled` is off.
    pub aggregates: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: Duration::from_secs(1),
            usage_ttl: Duration::from_secs(1),
            capacity: 100_000,
            aggregates: 10_000,
        }
    }
}

impl CacheConfig {
    /// No caching.
    pub fn disabled() -> Self {
        Self { enabled: false, ..Self::default() }
    }
}

/// How entries are kept fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not decided yet: the store is asked on the first read.
    Unstarted,
    /// The store reports changes: entries live until invalidated.
    Watched,
    /// Entries live for the configured time-to-live.
    Ttl,
    /// Caching is off.
    Off,
}

/// Cached subscriptions of an account.
#[derive(Debug, Clone)]
pub(crate) struct CachedSubscriptions {
    pub(crate) subscriptions: std::sync::Arc<Vec<SubscriptionState>>,
    pub(crate) as_of: DateTime<Utc>,
    filled: Instant,
}

/// Cached usage counters of an account for one UTC day.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachedUsage {
    pub(crate) day: NaiveDate,
    pub(crate) messages: u64,
    pub(crate) api_calls: u64,
    pub(crate) as_of: DateTime<Utc>,
    filled: Instant,
}

#[derive(Debug, Default)]
struct Slot {
    subscriptions: Option<CachedSubscriptions>,
    /// The sequence number of the account's last invalidation.
    invalidated_at: u64,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    /// Whether the store currently reports changes (watched mode only).
    listening: bool,
    /// Bumped by every invalidation.
    seq: u64,
    /// Fills whose ticket is older than this are refused (set when everything is dropped).
    floor: u64,
    accounts: HashMap<Uuid, Slot>,
    usage: HashMap<Uuid, CachedUsage>,
    /// Stripe customers known to have an account.
    customers: HashSet<String>,
    /// Platform references resolved to one account, and when.
    references: HashMap<String, (Uuid, Instant)>,
}

/// A permission to store the result of a read, taken before the read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

/// The cache (see the module docs).
#[derive(Debug)]
pub(crate) struct EntitlementCache {
    config: CacheConfig,
    state: Mutex<State>,
    /// Set once the store has been asked whether it reports changes (the first read).
    start: OnceLock<()>,
}

impl EntitlementCache {
    pub(crate) fn new(config: CacheConfig) -> Self {
        let mode = if config.enabled { Mode::Unstarted } else { Mode::Off };
        let state = State {
            mode,
            listening: false,
            seq: 0,
            floor: 0,
            accounts: HashMap::new(),
            usage: HashMap::new(),
            customers: HashSet::new(),
            references: HashMap::new(),
        };
        Self { config, state: Mutex::new(state), start: OnceLock::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding the lock (every update is one
        // assignment), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// On the first call only (an atomic load afterwards): asks `watch` whether the store reports
    /// changes, unless caching is off. `watch` may call back into the cache (no lock is held).
    pub(crate) fn start(&self, watch: impl FnOnce() -> bool) {
        self.start.get_or_init(|| {
            if self.lock().mode == Mode::Unstarted {
                self.started(watch());
            }
        });
    }

    /// Settles the mode: watched when the store reports changes, else time-to-live.
    pub(crate) fn started(&self, watched: bool) {
        let mut state = self.lock();
        if state.mode == Mode::Unstarted {
            state.mode = if watched { Mode::Watched } else { Mode::Ttl };
        }
    }

    /// The cached subscriptions of `account`, or a ticket to fill them after reading the store
    /// (`None`: do not fill).
    pub(crate) fn subscriptions(&self, account: Uuid) -> Result<CachedSubscriptions, Option<Ticket>> {
        let state = self.lock();
        let usable = match state.mode {
            Mode::Watched => state.listening,
            Mode::Ttl => true,
            Mode::Unstarted | Mode::Off => false,
        };
        if !usable {
            return Err(None);
        }
        if let Some(cached) = state.accounts.get(&account).and_then(|slot| slot.subscriptions.as_ref()) {
            if state.mode == Mode::Watched || cached.filled.elapsed() < self.config.ttl {
                return Ok(cached.clone());
            }
        }
        Err(Some(Ticket(state.seq)))
    }

    /// Stores what a read that began with `ticket` found, unless the account changed meanwhile.
    pub(crate) fn fill_subscriptions(
        &self,
        account: Uuid,
        ticket: Ticket,
        subscriptions: std::sync::Arc<Vec<SubscriptionState>>,
        as_of: DateTime<Utc>,
    ) {
        let mut state = self.lock();
        if state.mode == Mode::Watched && !state.listening || ticket.0 < state.floor {
            return;
        }
        if state.accounts.get(&account).is_some_and(|slot| slot.invalidated_at > ticket.0) {
            return;
        }
        if state.accounts.len() >= self.config.capacity && !state.accounts.contains_key(&account) {
            // Starting over forgets the invalidations too: refuse every read that began before.
            state.accounts.clear();
            state.floor = state.seq;
        }
        let cached = CachedSubscriptions { subscriptions, as_of, filled: Instant::now() };
        state.accounts.entry(account).or_default().subscriptions = Some(cached);
    }

    /// Drops the cached subscriptions of `account`.
    pub(crate) fn invalidate(&self, account: Uuid) {
        let mut state = self.lock();
        state.seq += 1;
        let seq = state.seq;
        let slot = state.accounts.entry(account).or_default();
        slot.subscriptions = None;
        slot.invalidated_at = seq;
    }

    /// Drops every cached subscription and refuses every fill whose read began before.
    fn clear(state: &mut State) {
        state.seq += 1;
        state.floor = state.seq;
        state.accounts.clear();
    }

    /// Today's cached counters of `account`, if fresh.
    pub(crate) fn usage(&self, account: Uuid, day: NaiveDate) -> Option<CachedUsage> {
        let state = self.lock();
        if state.mode == Mode::Off {
            return None;
        }
        state
            .usage
            .get(&account)
            .filter(|usage| usage.day == day && usage.filled.elapsed() < self.config.usage_ttl)
            .copied()
    }

    /// Stores counters read from the store.
    pub(crate) fn fill_usage(&self, account: Uuid, day: NaiveDate, messages: u64, api_calls: u64, at: DateTime<Utc>) {
        let mut state = self.lock();
        if state.mode == Mode::Off {
            return;
        }
        if state.usage.len() >= self.config.capacity && !state.usage.contains_key(&account) {
            state.usage.clear();
        }
        let usage = CachedUsage { day, messages, api_calls, as_of: at, filled: Instant::now() };
        state.usage.insert(account, usage);
    }

    /// Whether `customer` is known to have an account.
    pub(crate) fn known_customer(&self, customer: &str) -> bool {
        let state = self.lock();
        state.mode != Mode::Off && state.customers.contains(customer)
    }

    /// Remembers that `customer` has an account.
    pub(crate) fn customer_found(&self, customer: &str) {
        let mut state = self.lock();
        if state.mode == Mode::Off {
            return;
        }
        if state.customers.len() >= self.config.capacity {
            state.customers.clear();
        }
        state.customers.insert(customer.to_owned());
    }

    /// The account `reference` was resolved to within the time-to-live.
    pub(crate) fn reference(&self, reference: &str) -> Option<Uuid> {
        let state = self.lock();
        if state.mode == Mode::Off {
            return None;
        }
        let (account, filled) = state.references.get(reference)?;
        (filled.elapsed() < self.config.ttl).then_some(*account)
    }

    /// Remembers the one account `reference` names.
    pub(crate) fn reference_found(&self, reference: &str, account: Uuid) {
        let mut state = self.lock();
        if state.mode == Mode::Off {
            return;
        }
        if state.references.len() >= self.config.capacity && !state.references.contains_key(reference) {
            state.references.clear();
        }
        state.references.insert(reference.to_owned(), (account, Instant::now()));
    }

    /// Forgets every resolved reference (an account's reference changed).
    pub(crate) fn forget_references(&self) {
        self.lock().references.clear();
    }

    /// An increment's answer: the store's counter after it (never lowers what is cached).
    pub(crate) fn counted(&self, account: Uuid, day: NaiveDate, metric: Metric, used: u64) {
        let mut state = self.lock();
        if let Some(usage) = state.usage.get_mut(&account).filter(|usage| usage.day == day) {
            let counter = match metric {
                Metric::Messages => &mut usage.messages,
                Metric::ApiCalls => &mut usage.api_calls,
            };
            *counter = (*counter).max(used);
        }
    }
}

impl ChangeListener for EntitlementCache {
    fn listening(&self) {
        let mut state = self.lock();
        Self::clear(&mut state);
        state.listening = true;
    }

    fn account_changed(&self, account_id: Uuid) {
        self.invalidate(account_id);
    }

    fn lost(&self) {
        let mut state = self.lock();
        Self::clear(&mut state);
        state.listening = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(watched: bool) -> EntitlementCache {
        let cache = EntitlementCache::new(CacheConfig { capacity: 2, ..CacheConfig::default() });
        cache.started(watched);
        cache
    }

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    #[test]
    fn a_watched_cache_serves_nothing_until_the_store_listens() {
        let cache = cache(true);
        let account = Uuid::from_u128(1);
        assert_eq!(cache.subscriptions(account).err(), Some(None));
        cache.listening();
        let Err(Some(ticket)) = cache.subscriptions(account) else { panic!("expected a ticket") };
        cache.fill_subscriptions(account, ticket, Vec::new().into(), at());
        assert!(cache.subscriptions(account).is_ok());
        cache.lost();
        assert_eq!(cache.subscriptions(account).err(), Some(None), "a lost connection drops everything");
    }

    #[test]
    fn a_read_that_began_before_an_invalidation_is_not_stored() {
        let cache = cache(true);
        cache.listening();
        let account = Uuid::from_u128(1);
        let Err(Some(ticket)) = cache.subscriptions(account) else { panic!("expected a ticket") };
        cache.account_changed(account);
        cache.fill_subscriptions(account, ticket, Vec::new().into(), at());
        assert!(cache.subscriptions(account).is_err(), "the stale read was stored");
        let Err(Some(ticket)) = cache.subscriptions(account) else { panic!("expected a ticket") };
        cache.fill_subscriptions(account, ticket, Vec::new().into(), at());
        assert!(cache.subscriptions(account).is_ok());
    }

    #[test]
    fn a_read_that_began_before_a_reconnection_or_a_restart_is_not_stored() {
        let cache = cache(true);
        cache.listening();
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let Err(Some(early)) = cache.subscriptions(a) else { panic!("expected a ticket") };
        cache.lost();
        cache.listening();
        cache.fill_subscriptions(a, early, Vec::new().into(), at());
        assert!(cache.subscriptions(a).is_err());

        // A full cache starts over and forgets its invalidations: older reads are refused.
        let Err(Some(early)) = cache.subscriptions(a) else { panic!("expected a ticket") };
        cache.account_changed(a);
        for account in [b, c] {
            let Err(Some(ticket)) = cache.subscriptions(account) else { panic!("expected a ticket") };
            cache.fill_subscriptions(account, ticket, Vec::new().into(), at());
        }
        cache.fill_subscriptions(a, early, Vec::new().into(), at());
        assert!(cache.subscriptions(a).is_err());
    }

    #[test]
    fn a_ttl_cache_expires_and_a_disabled_one_keeps_nothing() {
        let cache = EntitlementCache::new(CacheConfig { ttl: Duration::ZERO, ..CacheConfig::default() });
        cache.started(false);
        let account = Uuid::from_u128(1);
        let Err(Some(ticket)) = cache.subscriptions(account) else { panic!("expected a ticket") };
        cache.fill_subscriptions(account, ticket, Vec::new().into(), at());
        assert!(cache.subscriptions(account).is_err(), "a zero time-to-live keeps nothing");

        let off = EntitlementCache::new(CacheConfig::disabled());
        off.started(true);
        assert_eq!(off.subscriptions(account).err(), Some(None));
        off.fill_usage(account, at().date_naive(), 1, 2, at());
        assert!(off.usage(account, at().date_naive()).is_none());
    }

    #[test]
    fn customers_are_remembered_and_references_expire() {
        let cache = EntitlementCache::new(CacheConfig { ttl: Duration::ZERO, ..CacheConfig::default() });
        cache.started(false);
        assert!(!cache.known_customer("cus_1"));
        cache.customer_found("cus_1");
        assert!(cache.known_customer("cus_1"));
        cache.reference_found("user_1", Uuid::from_u128(1));
        assert_eq!(cache.reference("user_1"), None, "a zero time-to-live keeps no reference");

        let cache = cache_with_ttl(true);
        cache.reference_found("user_1", Uuid::from_u128(1));
        assert_eq!(cache.reference("user_1"), Some(Uuid::from_u128(1)));
        cache.forget_references();
        assert_eq!(cache.reference("user_1"), None);

        let off = EntitlementCache::new(CacheConfig::disabled());
        off.customer_found("cus_1");
        off.reference_found("user_1", Uuid::from_u128(1));
        assert!(!off.known_customer("cus_1") && off.reference("user_1").is_none());
    }

    fn cache_with_ttl(watched: bool) -> EntitlementCache {
        let cache = EntitlementCache::new(CacheConfig { ttl: Duration::from_secs(3600), ..CacheConfig::default() });
        cache.started(watched);
        cache
    }

    #[test]
    fn usage_counters_are_per_day_and_increments_only_raise_them() {
        let cache = cache(false);
        let (account, day) = (Uuid::from_u128(1), at().date_naive());
        cache.fill_usage(account, day, 5, 7, at());
        cache.counted(account, day, Metric::Messages, 9);
        cache.counted(account, day, Metric::ApiCalls, 3);
        let usage = cache.usage(account, day).expect("cached");
        assert_eq!((usage.messages, usage.api_calls), (9, 7));
        let tomorrow = day.succ_opt().expect("a next day");
        assert!(cache.usage(account, tomorrow).is_none(), "yesterday's counters are not today's");
    }
}

/// The subscription aggregates this replica last committed or loaded, so that a new event is decided
/// before it is recorded and sent to the store in one call ([`crate::Store::record_and_commit`]). Only
/// a starting point: the store's compare-and-swap on the version catches any that went stale (another
/// replica committed since), and answers the current aggregate. Bounded; when full it starts over.
#[derive(Debug)]
pub(crate) struct AggregateCache {
    capacity: usize,
    aggregates: Mutex<HashMap<String, SubscriptionState>>,
}

impl AggregateCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { capacity, aggregates: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, SubscriptionState>> {
        self.aggregates.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The aggregate last seen for `subscription_id`.
    pub(crate) fn get(&self, subscription_id: &str) -> Option<SubscriptionState> {
        self.lock().get(subscription_id).cloned()
    }

    /// Remembers the aggregate as stored now (`None`: forget it).
    pub(crate) fn put(&self, subscription_id: &str, state: Option<SubscriptionState>) {
        let mut aggregates = self.lock();
        match state {
            None => {
                aggregates.remove(subscription_id);
            }
            Some(state) => {
                if aggregates.len() >= self.capacity && !aggregates.contains_key(subscription_id) {
                    aggregates.clear();
                }
                aggregates.insert(subscription_id.to_owned(), state);
            }
        }
    }
}
