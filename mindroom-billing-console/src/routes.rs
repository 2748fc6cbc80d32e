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
use mindroom_billing_core::{
    AuditEntry, EventStatus, JobState, OperatorSession, SessionCutoff, StoreError, account_id_for_customer,
};
use tracing::{error, info, warn};

use crate::auth::{PasswordDigest, SessionToken};
use crate::pages::{self, Ctx, CustomerView, SubscriptionView};
use crate::{Console, ResponseBody, Role};

/// The largest form body read (a login or an action form is a few hundred bytes).
const FORM_LIMIT: usize = 16 * 1024;
/// Rows on a list page.
const LIST_LIMIT: u32 = 200;
/// The deepest list page (50 pages of 200 rows).
const MAX_PAGES: u32 = 50;
/// Customers a search lists.
const SEARCH_LIMIT: u32 = 50;
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
    let client = client_address(console, client, &req);
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

/// The client's address: the peer's, or, when the peer is a configured trusted proxy, the address
/// that proxy appended to `X-Forwarded-For` (the last entry; earlier ones are the client's own
/// claims and are ignored).
fn client_address<B>(console: &Console, peer: Option<IpAddr>, req: &Request<B>) -> Option<IpAddr> {
    let trusted = peer.is_some_and(|p| console.config.trusted_proxies.contains(&p));
    if !trusted {
        return peer;
    }
    let forwarded = req.headers().get_all("x-forwarded-for").iter().rev().find_map(|v| v.to_str().ok());
    forwarded.and_then(|v| v.rsplit(',').next()).and_then(|a| a.trim().parse().ok()).or(peer)
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

/// A third layer under the CSRF token and `SameSite=Strict`: a `POST` whose `Origin` is not the
/// console's configured origin (scheme included), or `null` (an opaque origin: a sandboxed frame, a
/// `data:` page), is refused (also at login, which has no session yet). Browsers send `Origin` with
/// every `POST` (the `same-origin` referrer policy keeps it a real one); a request without one
/// (curl, a test) is let through to the token check.
fn same_origin<B>(console: &Console, req: &Request<B>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else { return true };
    let configured = console.origin.get();
    origin.to_str().ok().is_some_and(|o| configured.is_some_and(|c| c.origin_ok(o)))
}

/// Whether the request's `Host` names the console (a DNS-rebinding page names its own host).
fn host_ok<B>(console: &Console, req: &Request<B>) -> bool {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    matches!((host, console.origin.get()), (Some(h), Some(o)) if o.host_ok(h))
}

/// Who acted, for the audit: the operator's name and the client's address.
fn actor(name: &str, client: Option<IpAddr>) -> String {
    let name = pages::shorten(name, 64);
    match client {
        Some(ip) => format!("{name} from {ip}"),
        None => name,
    }
}

/// The `page` query parameter of a list (1, the default, is the newest [`LIST_LIMIT`] rows), at most
/// [`MAX_PAGES`].
fn page_number<B>(req: &Request<B>) -> u32 {
    let query = req.uri().query().unwrap_or("");
    let page = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "page").and_then(|(_, v)| v.parse().ok());
    page.unwrap_or(1).clamp(1, MAX_PAGES)
}

/// Rows to read for page `n`: every row up to its end and one more (is there a next page?). The
/// ports list newest first with a limit, so a later page reads the earlier ones again: fine for
/// the thousands of rows an operator pages through.
fn rows_for(n: u32) -> u32 {
    n.saturating_mul(LIST_LIMIT).saturating_add(1)
}

/// Page `n` of `rows` (read with [`rows_for`]) and its links.
fn paged<T>(rows: Vec<T>, n: u32, path: &'static str) -> (Vec<T>, pages::Pager) {
    let per = usize::try_from(LIST_LIMIT).unwrap_or(usize::MAX);
    let skip = usize::try_from(n - 1).unwrap_or(usize::MAX).saturating_mul(per);
    let more = rows.len() > skip.saturating_add(per);
    let rows: Vec<T> = rows.into_iter().skip(skip).take(per).collect();
    (rows, pages::Pager { path, page: n, more })
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
    if !host_ok(console, &req) {
        warn!(host = ?req.headers().get(header::HOST), "console: request for another host refused");
        return Err(refuse(None, StatusCode::MISDIRECTED_REQUEST, "This console does not serve that host."));
    }
    let now = console.billing.now();
    let key = &console.config.key;
    let token = cookie(&req, console.cookie_name()).and_then(SessionToken::from_cookie);
    let session = match &token {
        Some(token) => {
            let cutoff = SessionCutoff {
                now,
                idle_since: now - console.config.idle_timeout,
                opened_since: now - console.config.session_ttl,
            };
            let touched = console.ops.touch_session(&token.store_id(), &cutoff).await;
            touched.map_err(|e| {
                error!(error = %error_chain(&e), "console: store error reading the session");
                refuse(None, StatusCode::SERVICE_UNAVAILABLE, "The store did not answer; try again.")
            })?
        }
        None => None,
    };

    match (&method, segments.as_slice()) {
        (&Method::GET, ["static", "console.css"]) => {
            return Ok(respond(StatusCode::OK, "text/css; charset=utf-8", CSS));
        }
        (&Method::GET, ["login"]) => {
            return Ok(if session.is_some() { see_other("/") } else { page(StatusCode::OK, &pages::login(None)) });
        }
        (&Method::POST, ["login"]) if !same_origin(console, &req) => {
            warn!(?client, "console: cross-origin login refused");
            return Err(refuse(None, StatusCode::FORBIDDEN, "Cross-origin requests are refused."));
        }
        (&Method::POST, ["login"]) => return login(console, client, req).await,
        _ => {}
    }
    let (Some(session), Some(token)) = (session, token) else {
        return Err(if method == Method::GET || method == Method::HEAD {
            see_other("/login")
        } else {
            refuse(None, StatusCode::UNAUTHORIZED, "Log in first.")
        });
    };
    let ctx = Ctx { operator: session.operator.clone(), role: session.role, csrf: token.csrf_token(key) };

    if method == Method::POST {
        let action = action_of(&segments);
        // The customer the refused action was about, so its page lists the refusal too.
        let customer_id = target_customer(console, action.0, action.1).await;
        let refused = |result: &str| AuditEntry {
            at: now,
            actor: actor(&session.operator, client),
            action: action.0.to_owned(),
            target: action.1.to_owned(),
            customer_id: customer_id.clone(),
            ok: false,
            result: result.to_owned(),
        };
        if !same_origin(console, &req) {
            warn!(path, operator = %session.operator, "console: cross-origin POST refused");
            audit_refusal(console, &refused("refused: cross-origin request")).await;
            return Err(refuse(Some(&ctx), StatusCode::FORBIDDEN, "Cross-origin requests are refused."));
        }
        let form = read_form(req).await?;
        let csrf = form_field(&form, "csrf").unwrap_or_default();
        if !token.csrf_ok(key, &csrf) {
            warn!(path, operator = %session.operator, "console: POST without a valid CSRF token refused");
            audit_refusal(console, &refused("refused: no valid CSRF token")).await;
            return Err(refuse(
                Some(&ctx),
                StatusCode::FORBIDDEN,
                "The form expired or did not come from this console; reload the page and try again.",
            ));
        }
        if segments.as_slice() == ["logout"] {
            return logout(console, client, &session, now).await;
        }
        if session.role != Role::Admin {
            warn!(path, operator = %session.operator, "console: read-only operator refused");
            audit_refusal(console, &refused(&format!("refused: {} is read-only", session.operator))).await;
            return Err(refuse(Some(&ctx), StatusCode::FORBIDDEN, "Read-only operators cannot act."));
        }
        if form_field(&form, "confirm").as_deref() != Some("yes") {
            return Err(refuse(Some(&ctx), StatusCode::BAD_REQUEST, "Tick the confirmation box to act."));
        }
        let actor = actor(&session.operator, client);
        let entry = match segments.as_slice() {
            ["events", id, "replay"] => replay(console, &ctx, actor, id).await?,
            ["jobs", id, "retry"] => retry(console, &ctx, actor, id).await?,
            ["subscriptions", id, "reconcile"] => reconcile(console, &ctx, actor, id).await?,
            _ => return Err(refuse(Some(&ctx), StatusCode::NOT_FOUND, "No such action.")),
        };
        return audited(console, &ctx, &entry).await;
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
            let failed = store.list_events(&EventFilter { status: Some(EventStatus::Failed), limit: LIST_LIMIT + 1 });
            let failed = failed.await.map_err(fail)?;
            let bound = usize::try_from(LIST_LIMIT).unwrap_or(usize::MAX);
            let failed = pages::Bounded { count: failed.len().min(bound), more: failed.len() > bound };
            Ok(page(StatusCode::OK, &pages::dashboard(&ctx, &counts, &failed, console.billing.has_stripe_api())))
        }
        ["search"] => {
            let q = req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "q").map(|(_, v)| v.trim().to_owned())
            });
            search(console, &ctx, q.unwrap_or_default()).await
        }
        ["customers", id] => customer(console, &ctx, id).await,
        ["events", "failed"] => {
            let n = page_number(&req);
            let filter = EventFilter { status: Some(EventStatus::Failed), limit: rows_for(n) };
            let (rows, pager) = paged(store.list_events(&filter).await.map_err(fail)?, n, "/events/failed");
            Ok(page(StatusCode::OK, &pages::failed_events(&ctx, &rows, &pager)))
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
            let n = page_number(&req);
            let filter = JobFilter { state: Some(JobState::Dead), limit: rows_for(n) };
            let (rows, pager) = paged(store.list_jobs(&filter).await.map_err(fail)?, n, "/jobs/dead");
            Ok(page(StatusCode::OK, &pages::dead_jobs(&ctx, &rows, &pager)))
        }
        ["grace"] => {
            let n = page_number(&req);
            let (rows, pager) = paged(ops.subscriptions_in_grace(rows_for(n)).await.map_err(fail)?, n, "/grace");
            Ok(page(StatusCode::OK, &pages::grace(&ctx, &rows, now, &pager)))
        }
        ["disputes"] => {
            let n = page_number(&req);
            let (subs, pager) = paged(ops.open_disputes(rows_for(n)).await.map_err(fail)?, n, "/disputes");
            Ok(page(StatusCode::OK, &pages::disputes(&ctx, &subs, now, &pager)))
        }
        ["drift"] => {
            let n = page_number(&req);
            let (rows, pager) = paged(ops.list_drift(None, rows_for(n)).await.map_err(fail)?, n, "/drift");
            Ok(page(StatusCode::OK, &pages::drift(&ctx, &rows, console.billing.has_stripe_api(), &pager)))
        }
        ["audit"] => {
            let n = page_number(&req);
            let (rows, pager) = paged(ops.list_audit(None, rows_for(n)).await.map_err(fail)?, n, "/audit");
            Ok(page(StatusCode::OK, &pages::audit(&ctx, &rows, &pager)))
        }
        ["result"] => action_result(console, &ctx, &session, req.uri().query().unwrap_or("")).await,
        _ => Err(refuse(Some(&ctx), StatusCode::NOT_FOUND, "No such page.")),
    }
}

fn session_cookie(console: &Console, value: &str, max_age: i64) -> HeaderValue {
    let secure = if console.secure_cookie() { "; Secure" } else { "" };
    let name = console.cookie_name();
    let cookie = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The (action, target) a `POST` path names, for the audit of a refusal.
fn action_of<'a>(segments: &[&'a str]) -> (&'static str, &'a str) {
    match segments {
        ["events", id, "replay"] => ("replay", id),
        ["jobs", id, "retry"] => ("retry_job", id),
        ["subscriptions", id, "reconcile"] => ("reconcile", id),
        ["logout"] => ("logout", ""),
        _ => ("unknown", ""),
    }
}

/// The customer an action's target concerns: the event's, the subscription's, or the job's (its
/// e-mail's customer, or its subscription's). `None` when unknown or the store does not answer.
async fn target_customer(console: &Console, action: &str, target: &str) -> Option<String> {
    let store = console.billing.store();
    match action {
        "replay" => store.load_event(target).await.ok().flatten().and_then(|e| event_customer(&e.payload)),
        "reconcile" => store.load_subscription(target).await.ok().flatten().map(|s| s.customer_id),
        "retry_job" => {
            let job = console.ops.load_job(target.parse().ok()?).await.ok().flatten()?;
            match &job.kind {
                mindroom_billing_core::JobKind::Email { customer_id, .. } => Some(customer_id.clone()),
                _ => {
                    let sub = pages::job_about(&job)?;
                    store.load_subscription(sub).await.ok().flatten().map(|s| s.customer_id)
                }
            }
        }
        _ => None,
    }
}

/// Records the audit row of a refusal; a store failure is logged (the refusal stands).
async fn audit_refusal(console: &Console, entry: &AuditEntry) {
    if let Err(e) = console.ops.record_audit(entry).await {
        error!(error = %error_chain(&e), action = %entry.action, "console: cannot audit a refusal");
    }
}

async fn logout(
    console: &Console,
    client: Option<IpAddr>,
    session: &OperatorSession,
    now: chrono::DateTime<chrono::Utc>,
) -> Answer {
    if let Err(e) = console.ops.end_session(&session.id, now).await {
        error!(error = %error_chain(&e), "console: cannot end the session");
        return Err(refuse(
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            "The store did not answer; the session is still open.",
        ));
    }
    info!(?client, operator = %session.operator, "console: logged out");
    let entry = AuditEntry {
        at: now,
        actor: actor(&session.operator, client),
        action: "logout".into(),
        target: session.operator.clone(),
        customer_id: None,
        ok: true,
        result: "logged out".into(),
    };
    audit_refusal(console, &entry).await;
    let mut response = see_other("/login");
    response.headers_mut().insert(header::SET_COOKIE, session_cookie(console, "", 0));
    Ok(response)
}

/// Which password a login name is checked against: the operator kept in the store, else the
/// bootstrap hash of `admin` / `readonly`.
async fn credentials(console: &Console, name: &str) -> Result<Option<(PasswordDigest, Role)>, StoreError> {
    if let Some(operator) = console.ops.load_operator(name).await? {
        return Ok(PasswordDigest::parse(&operator.password_hash, "the operator's hash")
            .ok()
            .map(|d| (d, operator.role)));
    }
    Ok(match name {
        "admin" => Some((console.config.admin.clone(), Role::Admin)),
        "readonly" => console.config.readonly.clone().map(|d| (d, Role::ReadOnly)),
        _ => None,
    })
}

async fn login<B>(console: &Console, client: Option<IpAddr>, req: Request<B>) -> Answer
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let form = read_form(req).await?;
    let now = console.billing.now();
    let name = form_field(&form, "name").unwrap_or_default().trim().to_owned();
    let password = form_field(&form, "password").unwrap_or_default();
    let refused = |result: String| AuditEntry {
        at: now,
        actor: actor(&name, client),
        action: "login".into(),
        target: pages::shorten(&name, 64),
        customer_id: None,
        ok: false,
        result,
    };
    if let Err(wait) = console.throttle.begin(&name, client, now) {
        let seconds = wait.num_seconds().max(1);
        warn!(?client, name = %pages::shorten(&name, 64), seconds, "console: login throttled");
        audit_refusal(console, &refused(format!("throttled: wait {seconds} s"))).await;
        let text = format!("Too many failed attempts from here; wait {seconds} seconds.");
        let mut response = page(StatusCode::TOO_MANY_REQUESTS, &pages::login(Some(&text)));
        if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return Err(response);
    }
    let found = credentials(console, &name).await.map_err(|e| {
        error!(error = %error_chain(&e), "console: store error at login");
        refuse(None, StatusCode::SERVICE_UNAVAILABLE, "The store did not answer; try again.")
    })?;
    // argon2 takes tens of milliseconds of CPU: off the async worker threads. An unknown name is
    // checked against the bootstrap hash too (and refused), so answers take as long either way.
    let (digest, role) = found.clone().unwrap_or_else(|| (console.config.admin.clone(), Role::ReadOnly));
    let verified = tokio::task::spawn_blocking(move || digest.verify(&password)).await.unwrap_or(false);
    let role = match (found, verified) {
        (Some(_), true) => role,
        _ => {
            warn!(?client, name = %pages::shorten(&name, 64), "console: wrong name or password");
            audit_refusal(console, &refused("wrong name or password".into())).await;
            return Err(page(StatusCode::UNAUTHORIZED, &pages::login(Some("Wrong name or password."))));
        }
    };
    console.throttle.succeeded(&name, client);
    let token = SessionToken::generate();
    let session = OperatorSession {
        id: token.store_id(),
        operator: name.clone(),
        role,
        created_at: now,
        last_seen: now,
        ended_at: None,
    };
    console.ops.create_session(&session).await.map_err(|e| {
        error!(error = %error_chain(&e), "console: cannot store the session");
        refuse(None, StatusCode::SERVICE_UNAVAILABLE, "The store did not answer; try again.")
    })?;
    info!(?client, operator = %name, role = role.as_str(), "console: logged in");
    let entry = AuditEntry { ok: true, result: "logged in".into(), ..refused(String::new()) };
    audit_refusal(console, &entry).await;
    let mut response = see_other("/");
    let max_age = console.config.session_ttl.num_seconds();
    response.headers_mut().insert(header::SET_COOKIE, session_cookie(console, token.cookie_value(), max_age));
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
        // Anything else: part of an e-mail or a reference, or an invoice id.
        let ids = ops.search_customers(&q, SEARCH_LIMIT).await.map_err(fail)?;
        if let [only] = ids.as_slice() {
            return Ok(to_customer(only));
        }
        let mut found = Vec::with_capacity(ids.len());
        for id in &ids {
            let account = store.load_account(id).await.map_err(fail)?;
            found.push(account.unwrap_or_else(|| mindroom_billing_core::Account {
                id: account_id_for_customer(id),
                stripe_customer_id: id.clone(),
                email: None,
                reference: None,
            }));
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
    let mut events = ops.events_for_customer(customer_id, PAGE_LIMIT).await.map_err(fail)?;
    // Stripe's order (when it happened), not delivery order: a late paid July invoice must not
    // read as newer than the failed August one.
    events.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.received_at.cmp(&a.received_at)));
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
    let events_invoices = events.iter().filter_map(pages::invoice_of).collect();
    let view = CustomerView {
        customer_id: customer_id.to_owned(),
        account,
        entitlements,
        subscriptions,
        events,
        audit,
        invoices: events_invoices,
        stripe: console.billing.has_stripe_api(),
        now: console.billing.now(),
    };
    Ok(page(StatusCode::OK, &pages::customer(ctx, &view)))
}

/// Records the audit row of an action and answers with a redirect to its result page (a browser
/// refresh there shows the result again; it does not act again).
async fn audited(console: &Console, ctx: &Ctx, entry: &AuditEntry) -> Answer {
    info!(actor = %entry.actor, action = %entry.action, target = %entry.target, ok = entry.ok, result = %entry.result, "console: operator action");
    console.ops.record_audit(entry).await.map_err(|e| store_failed(ctx, &e))?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("action", &entry.action).append_pair("target", &entry.target);
    if let Some(customer) = &entry.customer_id {
        query.append_pair("customer", customer);
    }
    Ok(see_other(&format!("/result?{}", query.finish())))
}

/// The result page of an action: the newest audit row of this operator for that action and target.
async fn action_result(console: &Console, ctx: &Ctx, session: &OperatorSession, query: &str) -> Answer {
    let field =
        |name: &str| form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
    let (Some(action), Some(target)) = (field("action"), field("target")) else {
        return Err(refuse(Some(ctx), StatusCode::NOT_FOUND, "No such result."));
    };
    let customer = field("customer");
    let rows = console.ops.list_audit(customer.as_deref(), LIST_LIMIT).await.map_err(|e| store_failed(ctx, &e))?;
    // This operator's row, from whichever address it acted.
    let me = actor(&session.operator, None);
    let mine =
        |a: &AuditEntry| a.actor == me || a.actor.strip_prefix(&me).is_some_and(|rest| rest.starts_with(" from "));
    let Some(entry) = rows.into_iter().find(|a| a.action == action && a.target == target && mine(a)) else {
        return Err(refuse(Some(ctx), StatusCode::NOT_FOUND, "No such result."));
    };
    let (title, back) = match action.as_str() {
        "replay" => ("Replay", format!("/events/{}", pages::seg(&target))),
        "retry_job" => ("Retry job", customer.as_deref().map_or_else(|| "/jobs/dead".to_owned(), customer_link)),
        _ => ("Reconcile with Stripe", customer.as_deref().map_or_else(|| "/".to_owned(), customer_link)),
    };
    Ok(page(StatusCode::OK, &pages::action_result(ctx, title, &entry, &back)))
}

fn customer_link(customer: &str) -> String {
    format!("/customers/{}", pages::seg(customer))
}

async fn replay(console: &Console, ctx: &Ctx, actor: String, id: &str) -> Result<AuditEntry, Response<ResponseBody>> {
    let store = console.billing.store();
    let Some(event) = store.load_event(id).await.map_err(|e| store_failed(ctx, &e))? else {
        return Err(refuse(Some(ctx), StatusCode::NOT_FOUND, "No such event."));
    };
    let (ok, result) = match console.billing.replay(id).await {
        Ok(disposition) => {
            let now = store.load_event(id).await.ok().flatten().map(|e| e.status.as_str());
            let mut result = format!("disposition {}", disposition.label());
            let failed = matches!(&disposition, mindroom_billing_core::Disposition::Failed(_));
            if let mindroom_billing_core::Disposition::Failed(reason) = &disposition {
                result.push_str(&format!(" ({reason})"));
            }
            if let Some(status) = now {
                result.push_str(&format!("; the event is {status} now"));
            }
            // A replay whose event ends failed did not do what was asked.
            (!failed, result)
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
    Ok(entry)
}

async fn retry(console: &Console, ctx: &Ctx, actor: String, id: &str) -> Result<AuditEntry, Response<ResponseBody>> {
    let Ok(job_id) = id.parse::<i64>() else {
        return Err(refuse(Some(ctx), StatusCode::NOT_FOUND, "No such job."));
    };
    let fail = |e: StoreError| store_failed(ctx, &e);
    let now = console.billing.now();
    let retried = console.ops.retry_dead_job(job_id, now).await.map_err(fail)?;
    // Also for a job that is not dead: the refused retry is listed on its customer's page.
    let customer_id = target_customer(console, "retry_job", id).await;
    let entry = AuditEntry {
        at: now,
        actor,
        action: "retry_job".into(),
        target: job_id.to_string(),
        customer_id,
        ok: retried.is_some(),
        result: if retried.is_some() {
            "re-queued: pending, due now".into()
        } else {
            "the job is not dead (already retried, or unknown)".into()
        },
    };
    Ok(entry)
}

async fn reconcile(
    console: &Console,
    ctx: &Ctx,
    actor: String,
    id: &str,
) -> Result<AuditEntry, Response<ResponseBody>> {
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
        customer_id,
        ok,
        result,
    };
    Ok(entry)
}
