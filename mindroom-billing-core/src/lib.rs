#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod cutover;
pub mod event;
pub mod explain;
pub mod model;
pub mod operator;
pub mod ports;
pub mod retention;
pub mod signature;
pub mod stripe_api;
pub mod tier;
pub mod transfer;
pub mod transition;

pub use event::{Event, EventObject, EventType, ParseError, SubscriptionStatus, parse, parse_str};
pub use explain::explain;
pub use model::*;
pub use operator::{AuditEntry, DriftRecord, Operator, OperatorRole, OperatorSession, OperatorStore, SessionCutoff};
pub use ports::{ChangeListener, Clock, Notifier, Provisioner, Store, StoreError, SystemClock};
pub use retention::{PruneReport, PruneRequest, RetentionPolicy};
pub use signature::{SignatureError, Verifier, WebhookSecret};
pub use tier::{Limit, Limits, Metric, PriceCatalog, PriceRef, Tier};
pub use transition::{Decision, DisputePolicy, Policy, decide, expire_grace};
pub mod service;
pub mod telemetry;
pub use service::{
    Billing, BillingConfig, CacheConfig, Disposition, Receipt, ReceiveError, StripeSyncConfig, SyncError, WorkerConfig,
};
pub use telemetry::describe_metrics;
pub mod dryrun;
pub mod memory;
pub use memory::{MemoryLimits, MemoryStore};
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod conformance;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod operator_conformance;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;
