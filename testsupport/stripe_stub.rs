//! A local stand-in for the read-only Stripe API (Stripe cannot be reached from here), on the tiny
//! HTTP server of `stub_http.rs`. It holds events, subscriptions (with their latest invoice) and
//! customers that tests add, and speaks the list contract of `shared/fixtures/stripe/api/`:
//! `{"object":"list","data":[…],"has_more":…,"url":…}` newest first, `limit` (1..=100, default 10),
//! `starting_after`, `ending_before`, `created[gte|gt|lte|lt]` (and `created=`), `types[]` / `type`,
//! `status` (`all`; canceled hidden by default), `expand[]`; errors as `{"error":{"type","message"}}`
//! (401 for a wrong key, 404 for an unknown id, 400 for a bad parameter or a wrong `Stripe-Version`).
//! Events are served byte for byte as added. Every request is recorded with its arrival time, and
//! faults can be queued: 429 (with or without `Retry-After`), 500, any status with
//! `Stripe-Should-Retry`, slow answers.
//! Included by tests through `#[path]`; never shipped.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

#[path = "stub_http.rs"]
mod http;

/// The bare recording server, for the other HTTP stubs a test needs next to Stripe's (e-mail).
#[allow(unused_imports)]
pub(crate) use http::Stub;
pub(crate) use http::{Recorded, Reply};

/// The API version the stub expects in `Stripe-Version`, the fixtures' version.
pub(crate) const API_VERSION: &str = "2026-07-29.dahlia";

/// A fault served instead of (or before) the normal answer of the next request.
#[derive(Debug, Clone)]
pub(crate) enum Fault {
    /// 429 with the rate-limit envelope, and `Retry-After: <secs>` when given.
    RateLimited { retry_after: Option<u64> },
    /// 500 with an `api_error` envelope.
    ServerError,
    /// `status` with an error envelope, and `Stripe-Should-Retry` when given.
    Status { status: u16, should_retry: Option<bool> },
    /// The normal answer, after `delay`.
    Slow(Duration),
}

struct Event {
    id: String,
    created: i64,
    event_type: String,
    raw: String,
}

struct Subscription {
    object: Value,
    latest_invoice: Option<Value>,
}

#[derive(Default)]
struct State {
    key: String,
    version: String,
    /// In the order added; listing sorts newest first (ties: added later is newer).
    events: Vec<Event>,
    subscriptions: Vec<Subscription>,
    customers: Vec<Value>,
    charges: Vec<Value>,
    faults: VecDeque<Fault>,
}

/// The running stub. Dropping it stops the server.
pub(crate) struct StripeStub {
    pub(crate) url: String,
    server: http::Stub,
    state: Arc<Mutex<State>>,
}

impl StripeStub {
    /// A stub accepting `Authorization: Bearer <key>` and `Stripe-Version: API_VERSION`.
    pub(crate) async fn start(key: &str) -> Self {
        let state = Arc::new(Mutex::new(State { key: key.into(), version: API_VERSION.into(), ..State::default() }));
        let shared = Arc::clone(&state);
        let server = http::Stub::start(move |request, _| {
            let mut state = shared.lock().unwrap();
            let fault = state.faults.pop_front();
            let normal = || answer(&state, request);
            match fault {
                None => normal(),
                Some(Fault::Slow(delay)) => Reply::Slow(delay, Box::new(normal())),
                Some(Fault::RateLimited { retry_after }) => {
                    let reply = error(429, "invalid_request_error", "Request rate limit exceeded.");
                    match retry_after {
                        Some(secs) => reply.with_header("Retry-After", secs.to_string()),
                        None => reply,
                    }
                }
                Some(Fault::ServerError) => error(500, "api_error", "Something went wrong on Stripe's end."),
                Some(Fault::Status { status, should_retry }) => {
                    let reply = error(status, "invalid_request_error", "injected fault");
                    match should_retry {
                        Some(retry) => reply.with_header("Stripe-Should-Retry", retry.to_string()),
                        None => reply,
                    }
                }
            }
        })
        .await;
        Self { url: server.url.clone(), server, state }
    }

    /// Adds an event given as its exact JSON text (served byte for byte inside `data[]`).
    pub(crate) fn add_event_raw(&self, raw: &str) {
        let v: Value = serde_json::from_str(raw).expect("event JSON");
        let event = Event {
            id: v["id"].as_str().expect("event id").into(),
            created: v["created"].as_i64().expect("event created"),
            event_type: v["type"].as_str().expect("event type").into(),
            raw: raw.into(),
        };
        self.state.lock().unwrap().events.push(event);
    }

    /// Adds an event of `event_type` about `object`, created at `created`; returns its JSON text.
    pub(crate) fn add_event(&self, id: &str, event_type: &str, created: i64, object: Value) -> String {
        let raw = json!({
            "id": id, "object": "event", "api_version": API_VERSION, "created": created,
            "data": {"object": object}, "livemode": false, "pending_webhooks": 0,
            "request": {"id": null, "idempotency_key": null}, "type": event_type,
        })
        .to_string();
        self.add_event_raw(&raw);
        raw
    }

    /// Adds (or replaces, by id) a subscription; `latest_invoice` is served expanded on request.
    pub(crate) fn add_subscription(&self, object: Value, latest_invoice: Option<Value>) {
        let mut state = self.state.lock().unwrap();
        state.subscriptions.retain(|s| s.object["id"] != object["id"]);
        state.subscriptions.push(Subscription { object, latest_invoice });
    }

    /// Adds (or replaces, by id) a customer.
    pub(crate) fn add_customer(&self, object: Value) {
        let mut state = self.state.lock().unwrap();
        state.customers.retain(|c| c["id"] != object["id"]);
        state.customers.push(object);
    }

    /// Adds (or replaces, by id) a charge (`GET /v1/charges/{id}`).
    pub(crate) fn add_charge(&self, object: Value) {
        let mut state = self.state.lock().unwrap();
        state.charges.retain(|c| c["id"] != object["id"]);
        state.charges.push(object);
    }

    /// Serves `fault` to the next `times` requests (after the faults already queued).
    pub(crate) fn fail_next(&self, fault: Fault, times: usize) {
        let mut state = self.state.lock().unwrap();
        state.faults.extend(std::iter::repeat_n(fault, times));
    }

    /// Every request so far, in arrival order.
    pub(crate) fn requests(&self) -> Vec<Recorded> {
        self.server.requests()
    }
}

fn error(status: u16, kind: &str, message: &str) -> Reply {
    Reply::json(status, json!({"error": {"type": kind, "message": message}}))
}

fn param_error(param: &str, message: String) -> Reply {
    Reply::json(400, json!({"error": {"type": "invalid_request_error", "param": param, "message": message}}))
}

fn not_found(kind: &str, id: &str) -> Reply {
    Reply::json(
        404,
        json!({"error": {"code": "resource_missing", "param": "id", "type": "invalid_request_error",
                         "message": format!("No such {kind}: '{id}'")}}),
    )
}

/// The answer when no fault is queued.
fn answer(state: &State, request: &Recorded) -> Reply {
    let expected = format!("Bearer {}", state.key);
    match request.header("authorization") {
        Some(auth) if auth == expected => {}
        Some(auth) => {
            let given = auth.strip_prefix("Bearer ").unwrap_or(auth);
            let tail = &given[given.len().saturating_sub(4)..];
            return error(401, "invalid_request_error", &format!("Invalid API Key provided: sk_test_****{tail}"));
        }
        None => return error(401, "invalid_request_error", "You did not provide an API key."),
    }
    if request.header("stripe-version") != Some(state.version.as_str()) {
        let got = request.header("stripe-version").unwrap_or("none");
        return error(
            400,
            "invalid_request_error",
            &format!("stub expects Stripe-Version {}, got {got}", state.version),
        );
    }
    if request.method != "GET" {
        return error(405, "invalid_request_error", "the stub is read-only: GET only");
    }
    let url = reqwest::Url::parse(&format!("http://stub{}", request.path)).unwrap();
    let query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let params = Params(&query);
    let segments: Vec<&str> = url.path().trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "events"] => list_events(state, &params),
        ["v1", "events", id] => match state.events.iter().find(|e| e.id == *id) {
            Some(e) => Reply::Respond {
                status: 200,
                headers: vec![("Content-Type", "application/json".into())],
                body: e.raw.clone(),
            },
            None => not_found("event", id),
        },
        ["v1", "subscriptions"] => list_subscriptions(state, &params),
        ["v1", "subscriptions", id] => match state.subscriptions.iter().find(|s| s.object["id"] == *id) {
            Some(s) => Reply::json(200, render_subscription(s, params.expands("latest_invoice"))),
            None => not_found("subscription", id),
        },
        ["v1", "customers", id] => match state.customers.iter().find(|c| c["id"] == *id) {
            Some(c) => Reply::json(200, c.clone()),
            None => not_found("customer", id),
        },
        ["v1", "charges", id] => match state.charges.iter().find(|c| c["id"] == *id) {
            Some(c) => Reply::json(200, c.clone()),
            None => not_found("charge", id),
        },
        _ => error(404, "invalid_request_error", &format!("Unrecognized request URL (GET: {}).", url.path())),
    }
}

struct Params<'a>(&'a [(String, String)]);

impl Params<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }

    fn expands(&self, path: &str) -> bool {
        self.all("expand[]").contains(&path)
    }

    /// Whether `created` passes every `created…` bound given; `Err` for an unreadable bound.
    fn created_ok(&self, created: i64) -> Result<bool, Reply> {
        for (name, value) in self.0 {
            let op = match name.as_str() {
                "created" => "eq",
                "created[gte]" => "gte",
                "created[gt]" => "gt",
                "created[lte]" => "lte",
                "created[lt]" => "lt",
                _ => continue,
            };
            let bound: i64 = value.parse().map_err(|_| param_error(name, format!("Invalid integer: {value}")))?;
            let ok = match op {
                "eq" => created == bound,
                "gte" => created >= bound,
                "gt" => created > bound,
                "lte" => created <= bound,
                _ => created < bound,
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// One page of `items` (already filtered and newest first), as Stripe pages it.
fn page(url: &str, items: Vec<(String, String)>, params: &Params<'_>) -> Reply {
    let limit = match params.get("limit") {
        None => 10,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => return param_error("limit", format!("Invalid limit: must be between 1 and 100, got {v}")),
        },
    };
    let position = |param: &str, id: &str| {
        items.iter().position(|(i, _)| i == id).ok_or_else(|| param_error(param, format!("No such object: '{id}'")))
    };
    let (chosen, has_more): (Vec<&(String, String)>, bool) =
        match (params.get("starting_after"), params.get("ending_before")) {
            (Some(_), Some(_)) => {
                return param_error("ending_before", "starting_after and ending_before are exclusive".into());
            }
            (Some(after), None) => match position("starting_after", after) {
                Ok(at) => {
                    let rest = &items[at + 1..];
                    (rest.iter().take(limit).collect(), rest.len() > limit)
                }
                Err(reply) => return reply,
            },
            (None, Some(before)) => match position("ending_before", before) {
                Ok(at) => {
                    let newer = &items[..at];
                    let from = newer.len().saturating_sub(limit);
                    (newer[from..].iter().collect(), from > 0)
                }
                Err(reply) => return reply,
            },
            (None, None) => (items.iter().take(limit).collect(), items.len() > limit),
        };
    let data: Vec<&str> = chosen.iter().map(|(_, raw)| raw.as_str()).collect();
    let body = format!(r#"{{"object":"list","data":[{}],"has_more":{has_more},"url":"{url}"}}"#, data.join(","));
    Reply::Respond { status: 200, headers: vec![("Content-Type", "application/json".into())], body }
}

fn list_events(state: &State, params: &Params<'_>) -> Reply {
    let mut types = params.all("types[]");
    types.extend(params.get("type"));
    if types.len() > 20 {
        return param_error("types", "at most 20 types".into());
    }
    let mut events: Vec<(usize, &Event)> = Vec::new();
    for (index, e) in state.events.iter().enumerate() {
        match params.created_ok(e.created) {
            Ok(true) if types.is_empty() || types.contains(&e.event_type.as_str()) => events.push((index, e)),
            Ok(_) => {}
            Err(reply) => return reply,
        }
    }
    events.sort_by(|(ia, a), (ib, b)| b.created.cmp(&a.created).then(ib.cmp(ia)));
    let items = events.into_iter().map(|(_, e)| (e.id.clone(), e.raw.clone())).collect();
    page("/v1/events", items, params)
}

fn list_subscriptions(state: &State, params: &Params<'_>) -> Reply {
    let status = params.get("status");
    let expand = params.expands("data.latest_invoice");
    let mut subs: Vec<(usize, &Subscription)> = Vec::new();
    for (index, s) in state.subscriptions.iter().enumerate() {
        let sub_status = s.object["status"].as_str().unwrap_or("");
        let shown = match status {
            Some("all") => true,
            Some(wanted) => sub_status == wanted,
            None => sub_status != "canceled",
        };
        match params.created_ok(s.object["created"].as_i64().unwrap_or(0)) {
            Ok(true) if shown => subs.push((index, s)),
            Ok(_) => {}
            Err(reply) => return reply,
        }
    }
    let created = |s: &Subscription| s.object["created"].as_i64().unwrap_or(0);
    subs.sort_by(|(ia, a), (ib, b)| created(b).cmp(&created(a)).then(ib.cmp(ia)));
    let items = subs
        .into_iter()
        .map(|(_, s)| (s.object["id"].as_str().unwrap_or("").to_owned(), render_subscription(s, expand).to_string()))
        .collect();
    page("/v1/subscriptions", items, params)
}

/// The subscription with `latest_invoice` expanded, or as its id.
fn render_subscription(s: &Subscription, expand: bool) -> Value {
    let mut object = s.object.clone();
    object["latest_invoice"] = match &s.latest_invoice {
        None => Value::Null,
        Some(invoice) if expand => invoice.clone(),
        Some(invoice) => invoice["id"].clone(),
    };
    object
}
