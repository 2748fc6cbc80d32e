#![doc = include_str!("../README.md")]
//!
//! The HTTP adapter of mindroom-billing, on hyper 1.x.
//!
//! It exposes the routes of the billing service (DESIGN §4):
//!
//! | route | answer |
//! |---|---|
//! | `POST /webhooks/stripe` | 200 `{"received":true}` once the decision is durable (applied, duplicate, stale, ignored, or recorded as failed with an admin alert — an unknown price, or a verified event whose object does not parse); 400 `{"error":…}` on a signature failure or a payload that is no Stripe event (no `id`, `type`, `created`); 413 over the body limit; 408 when the body is too slow; 503 when the store is unavailable (Stripe retries); 500 otherwise |
//! | `GET /health` | 200 `{"status":"healthy","service":"stripe-handler"}` |
//! | `GET /ready` | 200 when the store answers a ping, else 503 |
//! | `GET /metrics` | Prometheus text, from the render function given to [`AppState::with_metrics`] (404 without one) |
//! | `POST /v1/usage` | bearer-authenticated; `{"account_id"\|"customer"\|"reference","metric","count","idempotency_key"?}` → 200 `{"allowed","used","limit","remaining"}`, or 429 with the same body when over the limit; a retry with the same `idempotency_key` counts once and answers the same |
//! | `GET /v1/accounts/{id}/entitlements` | bearer-authenticated; tier, status, entitlement status, limits, grace deadline, usage today, `as_of` (answered from the replica's cache) |
//! | `GET /v1/entitlements?customer=…` (or `reference=…`, `account_id=…`) | the same answer, for the account named by its Stripe customer or the platform's reference (Checkout `client_reference_id`) |
//!
//! The account is named by exactly one of `account_id`, `customer` or `reference` (else 400); a
//! customer or reference billing has no account for answers 404, a reference carried by more than one
//! account 409 (ask by customer).
//!
//! Wrong methods get 405 with `Allow`, unknown paths 404. Every error body is `{"error":"…"}` and never
//! carries internals (store errors are logged, not returned).
//!
//! The internal API (`/v1/…`) requires `Authorization: Bearer <key>`; the key is compared in constant
//! time. Without a configured key ([`AppState::with_api_key`]) the internal API is disabled and answers
//! 503 `{"error":"internal API disabled: no API key configured"}`, so a misconfiguration is not mistaken
//! for a bad token.
//!
//! Three ways to run it:
//! - [`serve`]: accept loop on a [`tokio::net::TcpListener`] with graceful shutdown;
//! - [`BillingService`]: a cloneable `tower::Service` / `hyper::service::Service` to mount in an
//!   axum/tower stack or a custom hyper server;
//! - [`handle`]: one request in, one response out, generic over the request body.
//!
//! The library never installs a logger or a metrics recorder: it emits `tracing` spans (one per
//! request: method, route, status, and for webhooks event id and type) and `metrics` counters
//! (`billing_http_requests_total{route,status}`, `billing_http_request_seconds{route}`). The
//! `Stripe-Signature` header and the API key are never logged.

mod error;
mod routes;
mod server;
mod state;

pub use error::ApiError;
pub use routes::handle;

/// Describes the metrics this crate emits (`billing_http_requests_total`, `billing_http_request_seconds`)
/// to the installed `metrics` recorder, so `/metrics` carries their `# HELP` text, and registers them
/// at zero for every route (status `200`), so a scrape right after start lists them. Call it once
/// after installing the recorder; without a recorder it does nothing.
pub fn describe_metrics() {
    for route in routes::ROUTE_LABELS {
        metrics::counter!("billing_http_requests_total", "route" => route, "status" => "200").absolute(0);
        drop(metrics::histogram!("billing_http_request_seconds", "route" => route));
    }
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "billing_http_requests_total",
        Unit::Count,
        "HTTP requests answered, by route pattern and status code"
    );
    describe_histogram!(
        "billing_http_request_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by route, in seconds"
    );
}
pub use server::{BillingService, serve};
pub use state::{AppState, DEFAULT_BODY_LIMIT, DEFAULT_REQUEST_TIMEOUT, MetricsRender};

/// The response body type of every answer.
pub type ResponseBody = http_body_util::Full<bytes::Bytes>;
