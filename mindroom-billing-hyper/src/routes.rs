//! Routing and the route handlers.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use mindroom_billing_core::service::{AccountLookupError, AccountName, error_chain};
use mindroom_billing_core::{Disposition, Metric, ReceiveError, StoreError};
use serde::Deserialize;
use tokio::time::{Instant as TokioInstant, timeout_at};
use tracing::{Instrument, debug, error, field, info, info_span, warn};
use uuid::Uuid;

use crate::ResponseBody;
use crate::error::{ApiError, json, raw};
use crate::state::AppState;

const RECEIVED: &[u8] = br#"{"received":true}"#;
const HEALTHY: &[u8] = br#"{"status":"healthy","service":"stripe-handler"}"#;
const READY: &[u8] = br#"{"status":"ready"}"#;

/// The routes, resolved from the path alone (the method is checked afterwards, for 405).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Webhook,
    Health,
    Ready,
    Metrics,
    Usage,
    Entitlements(String),
    /// `GET /v1/entitlements?customer=…` (or `reference=…`, `account_id=…`).
    EntitlementsOf,
    Unmatched,
}

/// The route labels of the answered routes.
pub(crate) const ROUTE_LABELS: [&str; 7] = [
    "/webhooks/stripe",
    "/health",
    "/ready",
    "/metrics",
    "/v1/usage",
    "/v1/accounts/{id}/entitlements",
    "/v1/entitlements",
];

impl Route {
    fn of(path: &str) -> Self {
        match path {
            "/webhooks/stripe" => Self::Webhook,
            "/health" => Self::Health,
            "/ready" => Self::Ready,
            "/metrics" => Self::Metrics,
            "/v1/usage" => Self::Usage,
            "/v1/entitlements" => Self::EntitlementsOf,
            _ => match path.strip_prefix("/v1/accounts/").and_then(|rest| rest.strip_suffix("/entitlements")) {
                Some(id) if !id.is_empty() && !id.contains('/') => Self::Entitlements(id.to_owned()),
                _ => Self::Unmatched,
            },
        }
    }

    /// Low-cardinality label for spans and metrics.
    fn label(&self) -> &'static str {
        match self {
            Self::Webhook => "/webhooks/stripe",
            Self::Health => "/health",
            Self::Ready => "/ready",
            Self::Metrics => "/metrics",
            Self::Usage => "/v1/usage",
            Self::Entitlements(_) => "/v1/accounts/{id}/entitlements",
            Self::EntitlementsOf => "/v1/entitlements",
            Self::Unmatched => "unmatched",
        }
    }

    /// The one method the route answers.
    fn method(&self) -> Option<&'static str> {
        match self {
            Self::Webhook | Self::Usage => Some("POST"),
            Self::Health | Self::Ready | Self::Metrics | Self::Entitlements(_) | Self::EntitlementsOf => Some("GET"),
            Self::Unmatched => None,
        }
    }
}

/// Handles one request: routes it, enforces the body limit and the time budget, and maps every
/// outcome to a response. Never fails; generic over the request body so that hyper (`Incoming`),
/// tower stacks and tests can all call it.
pub async fn handle<B>(state: &AppState, req: Request<B>) -> Response<ResponseBody>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let started = Instant::now();
    let route = Route::of(req.uri().path());
    let label = route.label();
    let span = info_span!("http", method = %req.method(), route = label, status = field::Empty,
        event_id = field::Empty, event_type = field::Empty);
    async move {
        let deadline = TokioInstant::now() + state.request_timeout();
        let response = match dispatch(state, route, req, deadline).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
        let status = response.status();
        tracing::Span::current().record("status", status.as_u16());
        metrics::counter!("billing_http_requests_total", "route" => label, "status" => status_label(status))
            .increment(1);
        metrics::histogram!("billing_http_request_seconds", "route" => label).record(started.elapsed().as_secs_f64());
        debug!(elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX), "request done");
        response
    }
    .instrument(span)
    .await
}

fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
        400 => "400",
        401 => "401",
        404 => "404",
        409 => "409",
        405 => "405",
        408 => "408",
        413 => "413",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => "other",
    }
}

async fn dispatch<B>(
    state: &AppState,
    route: Route,
    req: Request<B>,
    deadline: TokioInstant,
) -> Result<Response<ResponseBody>, ApiError>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let Some(allowed) = route.method() else { return Err(ApiError::NotFound) };
    if req.method().as_str() != allowed {
        return Err(ApiError::MethodNotAllowed(allowed));
    }
    match route {
        Route::Webhook => webhook(state, req, deadline).await,
        Route::Health => Ok(raw(StatusCode::OK, "application/json", Bytes::from_static(HEALTHY))),
        Route::Ready => ready(state, deadline).await,
        Route::Metrics => match state.metrics() {
            Some(render) => Ok(raw(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", Bytes::from(render()))),
            None => Err(ApiError::NotFound),
        },
        Route::Usage => {
            authorize(state, &req)?;
            usage(state, req, deadline).await
        }
        Route::Entitlements(id) => {
            authorize(state, &req)?;
            let account_id =
                Uuid::parse_str(&id).map_err(|_| ApiError::BadRequest("account id is not a UUID".to_owned()))?;
            entitlements(state, Named::Id(account_id), deadline).await
        }
        Route::EntitlementsOf => {
            authorize(state, &req)?;
            let named = Named::from_query(req.uri().query().unwrap_or(""))?;
            entitlements(state, named, deadline).await
        }
        Route::Unmatched => Err(ApiError::NotFound),
    }
}

/// Reads the whole body, at most `limit` bytes, before `deadline`. A declared `Content-Length` over
/// the limit is refused before reading anything; a streamed body is cut off at the limit.
async fn read_body<B>(req: Request<B>, limit: usize, deadline: TokioInstant) -> Result<Bytes, ApiError>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    match timeout_at(deadline, Limited::new(req.into_body(), limit).collect()).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::PayloadTooLarge { limit }),
        Ok(Err(e)) => {
            debug!(error = %e, "request body could not be read");
            Err(ApiError::BadRequest("request body could not be read".to_owned()))
        }
    }
}

async fn webhook<B>(
    state: &AppState,
    req: Request<B>,
    deadline: TokioInstant,
) -> Result<Response<ResponseBody>, ApiError>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    // The header value is a credential-like MAC: it is read here and never logged.
    let signature = match req.headers().get("stripe-signature").map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v.to_owned()),
        Some(Err(_)) => return Err(ApiError::BadRequest("malformed Stripe-Signature header: not ASCII".to_owned())),
    };
    let body = read_body(req, state.body_limit(), deadline).await?;
    // Once the body is in, the decision runs in its own task: a request that times out or a client
    // that hangs up must not cancel it between record and commit (it would then wait for Stripe's
    // redelivery or the worker's pick-up). The answer still honours the request deadline.
    let billing = Arc::clone(state.billing());
    let decision = tokio::spawn(async move { billing.receive(signature.as_deref(), &body).await }.in_current_span());
    let receipt = match timeout_at(deadline, decision).await {
        Err(_) => {
            warn!("webhook handling timed out; it completes in the background");
            return Err(ApiError::Unavailable("timed out; retry later"));
        }
        Ok(Err(join_error)) => {
            error!(error = %join_error, "webhook handling panicked");
            return Err(ApiError::Internal);
        }
        Ok(Ok(result)) => result.map_err(receive_error)?,
    };
    let span = tracing::Span::current();
    span.record("event_id", receipt.event_id.as_str());
    span.record("event_type", receipt.event_type.as_str());
    match &receipt.disposition {
        Disposition::Failed(reason) => {
            warn!(subscription_id = receipt.subscription_id.as_deref(), %reason,
                "webhook recorded as failed; an admin alert is queued and it can be replayed");
        }
        // A redelivery carries no news: keep it out of the info log.
        Disposition::Duplicate => debug!("webhook accepted: duplicate"),
        d => info!(subscription_id = receipt.subscription_id.as_deref(), disposition = d.label(), "webhook accepted"),
    }
    Ok(raw(StatusCode::OK, "application/json", Bytes::from_static(RECEIVED)))
}

fn receive_error(e: ReceiveError) -> ApiError {
    match e {
        ReceiveError::Signature(e) => {
            info!(reason = e.reason(), "webhook signature rejected");
            ApiError::BadRequest(e.to_string())
        }
        ReceiveError::Parse(e) => {
            info!(error = %e, "verified webhook payload could not be parsed");
            ApiError::BadRequest(e.to_string())
        }
        ReceiveError::Store(e) => store_error(&e),
        other => {
            error!(error = %error_chain(&other), "webhook failed");
            ApiError::Internal
        }
    }
}

fn store_error(e: &StoreError) -> ApiError {
    if e.is_retryable() {
        warn!(error = %error_chain(e), "store unavailable");
        ApiError::Unavailable("store unavailable; retry later")
    } else {
        error!(error = %error_chain(e), "store error");
        ApiError::Internal
    }
}

async fn ready(state: &AppState, deadline: TokioInstant) -> Result<Response<ResponseBody>, ApiError> {
    match timeout_at(deadline, state.billing().store().ping()).await {
        Ok(Ok(())) => Ok(raw(StatusCode::OK, "application/json", Bytes::from_static(READY))),
        Ok(Err(e)) => {
            warn!(error = %error_chain(&e), "not ready: store ping failed");
            Err(ApiError::Unavailable("store unavailable"))
        }
        Err(_) => {
            warn!("not ready: store ping timed out");
            Err(ApiError::Unavailable("store unavailable"))
        }
    }
}

/// Checks `Authorization: Bearer <key>` in constant time. The token is never logged.
fn authorize<B>(state: &AppState, req: &Request<B>) -> Result<(), ApiError> {
    if !state.api_enabled() {
        return Err(ApiError::Unavailable("internal API disabled: no API key configured"));
    }
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match token.and_then(|t| state.check_token(t)) {
        Some(true) => Ok(()),
        _ => {
            info!("internal API: missing or invalid bearer token");
            Err(ApiError::Unauthorized)
        }
    }
}

/// An account as a request names it (see [`AccountName`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Named {
    Id(Uuid),
    Customer(String),
    Reference(String),
}

const NAME_EXACTLY_ONE: &str = "name the account with exactly one of account_id, customer or reference";

impl Named {
    /// Exactly one of the three names (an empty string counts as none).
    fn exactly_one(
        account_id: Option<Uuid>,
        customer: Option<String>,
        reference: Option<String>,
    ) -> Result<Self, ApiError> {
        let given = |s: Option<String>| s.filter(|s| !s.is_empty());
        match (account_id, given(customer), given(reference)) {
            (Some(id), None, None) => Ok(Self::Id(id)),
            (None, Some(customer), None) => Ok(Self::Customer(customer)),
            (None, None, Some(reference)) => Ok(Self::Reference(reference)),
            _ => Err(ApiError::BadRequest(NAME_EXACTLY_ONE.to_owned())),
        }
    }

    /// From a query string: `account_id=…`, `customer=…` or `reference=…` (percent-decoded).
    fn from_query(query: &str) -> Result<Self, ApiError> {
        let (mut account_id, mut customer, mut reference) = (None, None, None);
        let mut seen = 0;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            seen += 1;
            match key.as_ref() {
                "account_id" if value.is_empty() => {}
                "account_id" => {
                    account_id = Some(
                        Uuid::parse_str(&value)
                            .map_err(|_| ApiError::BadRequest("account id is not a UUID".to_owned()))?,
                    );
                }
                "customer" => customer = Some(value.into_owned()),
                "reference" => reference = Some(value.into_owned()),
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown query parameter {other:?} (account_id, customer or reference)"
                    )));
                }
            }
        }
        if seen > 1 {
            return Err(ApiError::BadRequest(NAME_EXACTLY_ONE.to_owned()));
        }
        Self::exactly_one(account_id, customer, reference)
    }

    fn as_name(&self) -> AccountName<'_> {
        match self {
            Self::Id(id) => AccountName::Id(*id),
            Self::Customer(customer) => AccountName::Customer(customer),
            Self::Reference(reference) => AccountName::Reference(reference),
        }
    }
}

/// The account id `named` stands for, before `deadline`.
async fn resolve(state: &AppState, named: &Named, deadline: TokioInstant) -> Result<Uuid, ApiError> {
    match timeout_at(deadline, state.billing().resolve_account(named.as_name())).await {
        Err(_) => Err(ApiError::Unavailable("timed out; retry later")),
        Ok(Ok(account_id)) => Ok(account_id),
        Ok(Err(AccountLookupError::Store(e))) => Err(store_error(&e)),
        Ok(Err(e @ AccountLookupError::Ambiguous(_))) => Err(ApiError::Ambiguous(e.to_string())),
        Ok(Err(e)) => Err(ApiError::UnknownAccount(e.to_string())),
    }
}

#[derive(Debug, Deserialize)]
struct UsageRequest {
    #[serde(default)]
    account_id: Option<Uuid>,
    #[serde(default)]
    customer: Option<String>,
    #[serde(default)]
    reference: Option<String>,
    metric: Metric,
    /// Read as any JSON value so that an out-of-range number gets an answer naming the field.
    count: serde_json::Value,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// The longest accepted `idempotency_key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

impl UsageRequest {
    /// `count` as an integer from 0 to `i64::MAX` (what the stores can count).
    fn count(&self) -> Result<u64, ApiError> {
        self.count.as_u64().filter(|n| i64::try_from(*n).is_ok()).ok_or_else(|| {
            ApiError::BadRequest(format!("invalid usage request: count must be an integer from 0 to {}", i64::MAX))
        })
    }

    fn idempotency_key(&self) -> Result<Option<&str>, ApiError> {
        match self.idempotency_key.as_deref() {
            Some(key) if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN => Err(ApiError::BadRequest(format!(
                "invalid usage request: idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} bytes"
            ))),
            key => Ok(key),
        }
    }
}

async fn usage<B>(state: &AppState, req: Request<B>, deadline: TokioInstant) -> Result<Response<ResponseBody>, ApiError>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let body = read_body(req, state.body_limit(), deadline).await?;
    let request: UsageRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid usage request: {e}")))?;
    let (count, key) = (request.count()?, request.idempotency_key()?);
    let named = Named::exactly_one(request.account_id, request.customer.clone(), request.reference.clone())?;
    let account_id = resolve(state, &named, deadline).await?;
    let report = match timeout_at(deadline, state.billing().consume_usage(account_id, request.metric, count, key)).await
    {
        Err(_) => return Err(ApiError::Unavailable("timed out; retry later")),
        Ok(result) => result.map_err(|e| store_error(&e))?,
    };
    let status = if report.allowed { StatusCode::OK } else { StatusCode::TOO_MANY_REQUESTS };
    Ok(json(status, &report))
}

async fn entitlements(
    state: &AppState,
    named: Named,
    deadline: TokioInstant,
) -> Result<Response<ResponseBody>, ApiError> {
    let account_id = resolve(state, &named, deadline).await?;
    match timeout_at(deadline, state.billing().entitlements(account_id)).await {
        Err(_) => Err(ApiError::Unavailable("timed out; retry later")),
        Ok(result) => Ok(json(StatusCode::OK, &result.map_err(|e| store_error(&e))?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve_from_the_path() {
        assert_eq!(Route::of("/webhooks/stripe"), Route::Webhook);
        assert_eq!(Route::of("/v1/accounts/abc/entitlements"), Route::Entitlements("abc".into()));
        assert_eq!(Route::of("/v1/accounts//entitlements"), Route::Unmatched);
        assert_eq!(Route::of("/v1/accounts/a/b/entitlements"), Route::Unmatched);
        assert_eq!(Route::of("/webhooks/stripe/"), Route::Unmatched);
        assert_eq!(Route::of("/"), Route::Unmatched);
        assert_eq!(Route::of("/v1/entitlements"), Route::EntitlementsOf);
        for label in ROUTE_LABELS {
            let path = label.replace("{id}", "x");
            assert_eq!(Route::of(&path).label(), label);
        }
    }

    #[test]
    fn a_query_names_exactly_one_account() {
        let id = Uuid::from_u128(7);
        assert_eq!(Named::from_query("customer=cus_1"), Ok(Named::Customer("cus_1".into())));
        assert_eq!(Named::from_query("reference=user%20a%2Fb"), Ok(Named::Reference("user a/b".into())));
        assert_eq!(Named::from_query(&format!("account_id={id}")), Ok(Named::Id(id)));
        for query in ["", "customer=", "customer=a&reference=b", "customer=a&customer=b"] {
            assert_eq!(Named::from_query(query), Err(ApiError::BadRequest(NAME_EXACTLY_ONE.into())), "{query}");
        }
        assert!(matches!(Named::from_query("account_id=x"), Err(ApiError::BadRequest(m)) if m.contains("UUID")));
        assert!(matches!(Named::from_query("user=1"), Err(ApiError::BadRequest(m)) if m.contains("\"user\"")));
    }
}
