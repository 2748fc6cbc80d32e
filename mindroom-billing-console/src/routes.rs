//! Routing, authentication and the actions.

use std::error::Error as StdError;
use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use maud::Markup;
use mindroom_billing_core::operator::event_customer;
use mindroom_billing_core::ports::{EventFilter, JobFilter};
use mindroom_billing_core::service::{SyncError, error_chain};
use mindroom_billing_core::{AuditEntry, EventStatus, JobState, StoreError, account_id_for_customer};
use tracing::{error, info, warn};

use crate::auth::{Role, Session};
use crate::pages::{self, Ctx, CustomerView, SubscriptionView};
use crate::{Console, ResponseBody, SESSION_COOKIE};

/// The largest form body read (a login or an action form is a few hundred bytes).
const FORM_LIMIT: usize = 16 * 1024;
/// Rows on a list page.
const LIST_LIMIT: u32 = 200;
/// Rows of each kind on the customer page.
const PAGE_LIMIT: u32 = 100;

const CSS: &str = include_str!("../assets/console.css");

/// Answers one request. `client` is the peer address (for the login rate limit and the audit).
pub async fn handle<B>(console: &Console, client: Option<IpAddr>, req: Request<B>) -> Response<ResponseBody>
where
    B: Body + Send,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut response = match route(console, client, req).await {
        Ok(response) | Err(response) => response,
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

type Answer = Result<Response<ResponseBody>, Response<ResponseBody>>;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn page(status: StatusCode, markup: &Markup) -> Response<ResponseBody> {
    respond(status, "text/html; charset=utf-8", markup.0.clone())
}

fn see_other(location: &str) -> Response<ResponseBody> {
    let mut response = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn refuse(ctx: Option<&Ctx>, status: StatusCode, text: &str) -> Response<ResponseBody> {
    let title = status.canonical_reason().unwrap_or("Error");
    page(status, &pages::message(ctx, title, text))
}

/// A store error: logged with its chain, answered without internals.
fn store_failed(ctx: &Ctx, e: &StoreError) -> Response<ResponseBody> {
    error!(error = %error_chain(e), "console: store error");
    let status = if e.is_retryable() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::INTERNAL_SERVER_ERROR };
    refuse(Some(ctx), status, "The store did not answer; try again (details are in the service log).")
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn cookie<'a, B>(req: &'a Request<B>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A third layer under the CSRF token and `SameSite=Strict`: a `POST` whose `Origin` names another
/// host than the one it was sent to, or `null` (an opaque origin: a sandboxed frame, a `data:` page),
/// is refused (also at login, which has no session yet). Browsers send `Origin` with every `POST`
/// (the `same-origin` referrer policy keeps it a real one); a request without one (curl, a test) is
/// let through to the token check.
fn same_origin<B>(req: &Request<B>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else { return true };
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, rest)| rest);
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

fn form_field(form: &[(String, String)], name: &str) -> Option<String> {
    form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

async fn read_form<B>(req: Request<B>) -> Result<Vec<(String, String)>, Response<ResponseBody>>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let body = Limited::new(req.into_body(), FORM_LIMIT)
        .collect()
        .await
        .map_err(|_| refuse(None, StatusCode::PAYLOAD_TOO_LARGE, "The form is too large or was not received."))?
        .to_bytes();
    Ok(form_urlencoded::parse(&body).into_owned().collect())
}

async fn route<B>(console: &Console, client: Option<IpAddr>, req: Request<B>) -> Answer
where
    B: Body + Send,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect::<Option<_>>()
        .ok_or_else(|| refuse(None, StatusCode::BAD_REQUEST, "Malformed path."))?;
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let now = console.billing.now();
    let key = &console.config.key;
    let session = cookie(&req, SESSION_COOKIE).and_then(|v| Session::decode(v, key, now));

    match (&method, segments.as_slice()) {
        (&Method::GET, ["static", "console.css"]) => {
            return Ok(respond(StatusCode::OK, "text/css; charset=utf-8", CSS));
        }
        (&Method::GET, ["login"]) => {
            return Ok(if session.is_some() { see_other("/") } else { page(StatusCode::OK, &pages::login(None)) });
        }
        (&Method::POST, ["login"]) if !same_origin(&req) => {
            return Err(refuse(None, StatusCode::FORBIDDEN, "Cross-origin requests are refused."));
        }
        (&Method::POST, ["login"]) => return login(console, client, req).await,
        _ => {}
    }
    let Some(session) = session else {
        return Err(if method == Method::GET || method == Method::HEAD {
            see_other("/login")
        } else {
            refuse(None, StatusCode::UNAUTHORIZED, "Log in first.")
        });
    };
    let ctx = Ctx { role: session.role, csrf: session.csrf_token(key) };

    if method == Method::POST {
        if !same_origin(&req) {
            warn!(path, "console: cross-origin POST refused");
            return Err(refuse(Some(&ctx), StatusCode::FORBIDDEN, "Cross-origin requests are refused."));
        }
        let form = read_form(req).await?;
        let token = form_field(&form, "csrf").unwrap_or_default();
        if !session.csrf_ok(key, &token) {
            warn!(path, "console: POST without a valid CSRF token refused");
            return Err(refuse(
                Some(&ctx),
                StatusCode::FORBIDDEN,
                "The form expired or did not come from this console; reload the page and try again.",
            ));
        }
        if segments.as_slice() == ["logout"] {
            let mut response = see_other("/login");
            response.headers_mut().insert(header::SET_COOKIE, clear_cookie(console));
            return Ok(response);
        }
        if session.role != Role::Admin {
            return Err(refuse(Some(&ctx), StatusCode::FORBIDDEN, "Read-only users cannot act."));
        }
        if form_field(&form, "confirm").as_deref() != Some("yes") {
            return Err(refuse(Some(&ctx), StatusCode::BAD_REQUEST, "Tick the confirmation box to act."));
        }
        let actor = match client {
            Some(ip) => format!("{} from {ip}", session.role.as_str()),
            None => session.role.as_str().to_owned(),
        };
        return match segments.as_slice() {
            ["events", id, "replay"] => replay(console, &ctx, actor, id).await,
            ["jobs", id, "retry"] => retry(console, &ctx, actor, id).await,
            ["subscriptions", id, "reconcile"] => reconcile(console, &ctx, actor, id).await,
            _ => Err(refuse(Some(&ctx), StatusCode::NOT_FOUND, "No such action.")),
        };
    }
    if method != Method::GET {
        return Err(refuse(Some(&ctx), StatusCode::METHOD_NOT_ALLOWED, "Method not allowed."));
    }
    let ops = &console.ops;
    let store = console.billing.store();
    let fail = |e: StoreError| store_failed(&ctx, &e);
    match segments.as_slice() {
        [] => {
            let counts = store.job_counts().await.map_err(fail)?;
            Ok(page(StatusCode::OK, &pages::dashboard(&ctx, &counts, console.billing.has_stripe_api())))
        }
        ["search"] => {
            let q = req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "q").map(|(_, v)| v.trim().to_owned())
            });
            search(console, &ctx, q.unwrap_or_default()).await
        }
        ["customers", id] => customer(console, &ctx, id).await,
        ["events", "failed"] => {
            let events = store.list_events(&EventFilter { status: Some(EventStatus::Failed), limit: LIST_LIMIT });
            Ok(page(StatusCode::OK, &pages::failed_events(&ctx, &events.await.map_err(fail)?)))
        }
        ["events", id] => match store.load_event(id).await.map_err(fail)? {
            Some(event) => {
                let customer = event_customer(&event.payload);
                Ok(page(StatusCode::OK, &pages::event(&ctx, &event, customer.as_deref())))
            }
            None => Err(refuse(Some(&ctx), StatusCode::NOT_FOUND, "No such event.")),
        },
        ["events", id, "raw"] => match store.load_event(id).await.map_err(fail)? {
            // The bytes as received; text/plain + nosniff, so a browser never renders them.
            Some(event) => Ok(respond(StatusCode::OK, "text/plain; charset=utf-8", event.payload)),
            None => Err(refuse(Some(&ctx), StatusCode::NOT_FOUND, "No such event.")),
        },
        ["jobs", "dead"] => {
            let jobs = store.list_jobs(&JobFilter { state: Some(JobState::Dead), limit: LIST_LIMIT });
            Ok(page(StatusCode::OK, &pages::dead_jobs(&ctx, &jobs.await.map_err(fail)?)))
        }
        ["grace"] => {
            let subs = ops.subscriptions_in_grace(LIST_LIMIT).await.map_err(fail)?;
            Ok(page(StatusCode::OK, &pages::grace(&ctx, &subs, now)))
        }
        ["drift"] => {
            let drift = ops.list_drift(None, LIST_LIMIT).await.map_err(fail)?;
            Ok(page(StatusCode::OK, &pages::drift(&ctx, &drift, console.billing.has_stripe_api())))
        }
        ["audit"] => {
            let rows = ops.list_audit(None, LIST_LIMIT).await.map_err(fail)?;
            Ok(page(StatusCode::OK, &pages::audit(&ctx, &rows)))
        }
        _ => Err(refuse(Some(&ctx), StatusCode::NOT_FOUND, "No such page.")),
    }
}

fn session_cookie(console: &Console, value: &str) -> HeaderValue {
    let secure = if console.config.secure_cookie { "; Secure" } else { "" };
    let max_age = console.config.session_ttl.num_seconds();
    let cookie = format!("{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn clear_cookie(console: &Console) -> HeaderValue {
    let secure = if console.config.secure_cookie { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

async fn login<B>(console: &Console, client: Option<IpAddr>, req: Request<B>) -> Answer
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let form = read_form(req).await?;
    let now = console.billing.now();
    if !console.limiter.allow(client, now) {
        warn!(?client, "console: login rate limit reached");
        return Err(page(StatusCode::TOO_MANY_REQUESTS, &pages::login(Some("Too many attempts; wait a minute."))));
    }
    let password = form_field(&form, "password").unwrap_or_default();
    let (admin, readonly) = (console.config.admin.clone(), console.config.readonly.clone());
    // argon2 takes tens of milliseconds of CPU: off the async worker threads.
    let role = tokio::task::spawn_blocking(move || {
        if admin.verify(&password) {
            Some(Role::Admin)
        } else if readonly.is_some_and(|r| r.verify(&password)) {
            Some(Role::ReadOnly)
        } else {
            None
        }
    })
    .await
    .ok()
    .flatten();
    let Some(role) = role else {
        warn!(?client, "console: wrong password");
        return Err(page(StatusCode::UNAUTHORIZED, &pages::login(Some("Wrong password."))));
    };
    info!(?client, role = role.as_str(), "console: logged in");
    let session = Session::new(role, now + console.config.session_ttl);
    let mut response = see_other("/");
    response.headers_mut().insert(header::SET_COOKIE, session_cookie(console, &session.encode(&console.config.key)));
    Ok(response)
}

async fn search(console: &Console, ctx: &Ctx, q: String) -> Answer {
    let store = console.billing.store();
    let ops = &console.ops;
    let fail = |e: StoreError| store_failed(ctx, &e);
    if q.is_empty() {
        return Ok(see_other("/"));
    }
    let to_customer = |id: &str| see_other(&format!("/customers/{}", pages::seg(id)));
    if q.starts_with("evt_") {
        if store.load_event(&q).await.map_err(fail)?.is_some() {
            return Ok(see_other(&format!("/events/{}", pages::seg(&q))));
        }
    } else if q.starts_with("sub_") {
        if let Some(s) = store.load_subscription(&q).await.map_err(fail)? {
            return Ok(to_customer(&s.customer_id));
        }
    } else if q.starts_with("cus_") {
        let known = store.load_account(&q).await.map_err(fail)?.is_some()
            || !ops.subscriptions_for_customer(&q).await.map_err(fail)?.is_empty()
            || !ops.events_for_customer(&q, 1).await.map_err(fail)?.is_empty();
        if known {
            return Ok(to_customer(&q));
        }
    } else {
        if let Some(instance) = ops.instance_by_app(&q).await.map_err(fail)? {
            if let Some(s) = store.load_subscription(&instance.subscription_id).await.map_err(fail)? {
                return Ok(to_customer(&s.customer_id));
            }
        }
        // Anything else is taken as an e-mail (Stripe does not validate them).
        let found = ops.accounts_by_email(&q, 20).await.map_err(fail)?;
        if let [only] = found.as_slice() {
            return Ok(to_customer(&only.stripe_customer_id));
        }
        return Ok(page(StatusCode::OK, &pages::accounts(ctx, &q, &found)));
    }
    Ok(page(StatusCode::OK, &pages::accounts(ctx, &q, &[])))
}

async fn customer(console: &Console, ctx: &Ctx, customer_id: &str) -> Answer {
    let store = console.billing.store();
    let ops = &console.ops;
    let fail = |e: StoreError| store_failed(ctx, &e);
    let account = store.load_account(customer_id).await.map_err(fail)?;
    let states = ops.subscriptions_for_customer(customer_id).await.map_err(fail)?;
    let events = ops.events_for_customer(customer_id, PAGE_LIMIT).await.map_err(fail)?;
    if account.is_none() && states.is_empty() && events.is_empty() {
        return Err(refuse(Some(ctx), StatusCode::NOT_FOUND, "No such customer."));
    }
    let entitlements = console.billing.entitlements(account_id_for_customer(customer_id)).await.map_err(fail)?;
    let mut subscriptions = Vec::with_capacity(states.len());
    for state in states {
        let id = state.subscription_id.as_str();
        let instance = store.load_instance(id).await.map_err(fail)?;
        let jobs = ops.jobs_for_subscription(id, PAGE_LIMIT).await.map_err(fail)?;
        let drift = ops.list_drift(Some(id), PAGE_LIMIT).await.map_err(fail)?;
        subscriptions.push(SubscriptionView { state, instance, jobs, drift });
    }
    let audit = ops.list_audit(Some(customer_id), PAGE_LIMIT).await.map_err(fail)?;
    let view = CustomerView {
        customer_id: customer_id.to_owned(),
        account,
        entitlements,
        subscriptions,
        events,
        audit,
        stripe: console.billing.has_stripe_api(),
        now: console.billing.now(),
    };
    Ok(page(StatusCode::OK, &pages::customer(ctx, &view)))
}

/// Records the audit row of an action and renders its result (the row is the page's content).
async fn audited(console: &Console, ctx: &Ctx, entry: AuditEntry, title: &str, back: &str) -> Answer {
    info!(actor = %entry.actor, action = %entry.action, target = %entry.target, ok = entry.ok, result = %entry.result, "console: operator action");
    console.ops.record_audit(&entry).await.map_err(|e| store_failed(ctx, &e))?;
    let status = if entry.ok { StatusCode::OK } else { StatusCode::CONFLICT };
    let response = page(status, &pages::action_result(ctx, title, &entry, back));
    if entry.ok { Ok(response) } else { Err(response) }
}

async fn replay(console: &Console, ctx: &Ctx, actor: String, id: &str) -> Answer {
    let store = console.billing.store();
    let Some(event) = store.load_event(id).await.map_err(|e| store_failed(ctx, &e))? else {
        return Err(refuse(Some(ctx), StatusCode::NOT_FOUND, "No such event."));
    };
    let (ok, result) = match console.billing.replay(id).await {
        Ok(disposition) => {
            let now = store.load_event(id).await.ok().flatten().map(|e| e.status.as_str());
            let mut result = format!("disposition {}", disposition.label());
            if let mindroom_billing_core::Disposition::Failed(reason) = &disposition {
                result.push_str(&format!(" ({reason})"));
            }
            if let Some(status) = now {
                result.push_str(&format!("; the event is {status} now"));
            }
            (true, result)
        }
        Err(e) => (false, error_chain(&e)),
    };
    let entry = AuditEntry {
        at: console.billing.now(),
        actor,
        action: "replay".into(),
        target: id.to_owned(),
        customer_id: event_customer(&event.payload),
        ok,
        result,
    };
    audited(console, ctx, entry, "Replay", &format!("/events/{}", pages::seg(id))).await
}

async fn retry(console: &Console, ctx: &Ctx, actor: String, id: &str) -> Answer {
    let Ok(job_id) = id.parse::<i64>() else {
        return Err(refuse(Some(ctx), StatusCode::NOT_FOUND, "No such job."));
    };
    let fail = |e: StoreError| store_failed(ctx, &e);
    let now = console.billing.now();
    let retried = console.ops.retry_dead_job(job_id, now).await.map_err(fail)?;
    let about = retried.as_ref().and_then(pages::job_about).map(str::to_owned);
    let customer_id = match &retried.as_ref().map(|j| &j.kind) {
        Some(mindroom_billing_core::JobKind::Email { customer_id, .. }) => Some(customer_id.clone()),
        _ => match &about {
            Some(sub) => console.billing.store().load_subscription(sub).await.map_err(fail)?.map(|s| s.customer_id),
            None => None,
        },
    };
    let entry = AuditEntry {
        at: now,
        actor,
        action: "retry_job".into(),
        target: job_id.to_string(),
        customer_id: customer_id.clone(),
        ok: retried.is_some(),
        result: if retried.is_some() {
            "re-queued: pending, due now".into()
        } else {
            "the job is not dead (already retried, or unknown)".into()
        },
    };
    let back = customer_id.map_or_else(|| "/jobs/dead".to_owned(), |c| format!("/customers/{}", pages::seg(&c)));
    audited(console, ctx, entry, "Retry job", &back).await
}

async fn reconcile(console: &Console, ctx: &Ctx, actor: String, id: &str) -> Answer {
    let fail = |e: StoreError| store_failed(ctx, &e);
    let customer_id = console.billing.store().load_subscription(id).await.map_err(fail)?.map(|s| s.customer_id);
    let (ok, result) = match console.billing.reconcile_stripe(Some(id), false).await {
        Ok(report) => {
            // The drift is recorded by the reconciliation itself (`Billing::with_drift_log`).
            let fields: Vec<&str> = report.drift.iter().map(|d| d.field.label()).collect();
            let result = match (report.checked, fields.is_empty()) {
                (0, _) => "Stripe does not know this subscription".to_owned(),
                (_, true) => "in sync with Stripe".to_owned(),
                (_, false) => format!("drift fixed: {}", fields.join(", ")),
            };
            (report.checked > 0, result)
        }
        Err(SyncError::NotConfigured) => (false, "the Stripe API is not configured (no STRIPE_SECRET_KEY)".to_owned()),
        Err(e) => (false, error_chain(&e)),
    };
    let entry = AuditEntry {
        at: console.billing.now(),
        actor,
        action: "reconcile".into(),
        target: id.to_owned(),
        customer_id: customer_id.clone(),
        ok,
        result,
    };
    let back = customer_id.map_or_else(|| "/".to_owned(), |c| format!("/customers/{}", pages::seg(&c)));
    audited(console, ctx, entry, "Reconcile with Stripe", &back).await
}
