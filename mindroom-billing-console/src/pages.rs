//! The pages, as maud templates: every `(value)` is HTML-escaped, so values from Stripe (e-mails,
//! metadata, reasons, ids) cannot inject markup. No inline script or style (the CSP forbids both).

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use mindroom_billing_core::event::InvoiceFact;
use mindroom_billing_core::explain::{explain, instance_writer, job_label, money};
use mindroom_billing_core::operator::event_customer;
use mindroom_billing_core::service::Entitlements;
use mindroom_billing_core::{
    Account, AuditEntry, DriftRecord, EventObject, InstanceRecord, Job, JobCounts, JobKind, JobState, StoredEvent,
    SubscriptionState,
};

use crate::Role;

/// What every logged-in page needs: the operator, its role (to disable actions) and the CSRF token
/// for forms.
pub(crate) struct Ctx {
    pub(crate) operator: String,
    pub(crate) role: Role,
    pub(crate) csrf: String,
}

impl Ctx {
    fn read_only(&self) -> bool {
        self.role == Role::ReadOnly
    }
}

/// Percent-encodes one path segment (ids come from Stripe payloads: never trusted in a URL).
pub(crate) fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn search_link(q: &str) -> String {
    let encoded: String = form_urlencoded::byte_serialize(q.as_bytes()).collect();
    format!("/search?q={encoded}")
}

/// `s` cut to at most `max` characters (an ellipsis marks the cut): long values from Stripe (a
/// 100 KB e-mail) must not blow a page up.
/// How many characters of a long value a page shows.
pub(crate) const LONG: usize = 200;

pub(crate) fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn opt_time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "—".to_owned(), time)
}

fn layout(title: &str, ctx: Option<&Ctx>, content: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · billing console" }
                link rel="stylesheet" href="/static/console.css";
            }
            body {
                header {
                    a.brand href="/" { "mindroom billing" }
                    @if let Some(ctx) = ctx {
                        nav {
                            a href="/events/failed" { "Failed events" }
                            a href="/jobs/dead" { "Dead jobs" }
                            a href="/grace" { "Grace" }
                            a href="/disputes" { "Disputes" }
                            a href="/drift" { "Drift" }
                            a href="/audit" { "Audit" }
                        }
                        form.search method="get" action="/search" {
                            input type="search" name="q" placeholder="id, app, part of an e-mail" aria-label="Find";
                            button type="submit" { "Find" }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(ctx.csrf);
                            span.role { (ctx.operator) " (" (ctx.role.as_str()) ")" }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (content)
                }
            }
        }
    }
}

pub(crate) fn login(error: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        &html! {
            @if let Some(error) = error { p.error { (error) } }
            form.login method="post" action="/login" {
                label { "Name " input type="text" name="name" autocomplete="username" required autofocus; }
                label { "Password " input type="password" name="password" autocomplete="current-password" required; }
                button type="submit" { "Log in" }
            }
        },
    )
}

pub(crate) fn message(ctx: Option<&Ctx>, title: &str, text: &str) -> Markup {
    layout(title, ctx, &html! { p.error { (text) } p { a href="/" { "Back to the start" } } })
}

/// A count read with a bound: `200+` when there are more.
pub(crate) struct Bounded {
    pub(crate) count: usize,
    pub(crate) more: bool,
}

impl std::fmt::Display for Bounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.count, if self.more { "+" } else { "" })
    }
}

pub(crate) fn dashboard(ctx: &Ctx, counts: &JobCounts, failed_events: &Bounded, stripe: bool) -> Markup {
    layout(
        "Find a customer",
        Some(ctx),
        &html! {
            form.search-big method="get" action="/search" {
                input type="search" name="q" placeholder="cus_…, sub_…, evt_…, in_…, app name, part of an e-mail or reference" aria-label="Find" autofocus;
                button type="submit" { "Find" }
            }
            h2 { "Needs attention" }
            dl.attention {
                dt { "failed events" } dd #failed-count { a href="/events/failed" { (failed_events) } }
                dt { "dead jobs" } dd #dead-count { a href="/jobs/dead" { (counts.dead) } }
            }
            h2 { "Jobs" }
            dl.counts {
                dt { "pending" } dd { (counts.pending) }
                dt { "running" } dd { (counts.running) }
                dt { "dead" } dd { a href="/jobs/dead" { (counts.dead) } }
                dt { "done" } dd { (counts.done) }
            }
            @if !stripe { p.note { "The Stripe API is not configured (no STRIPE_SECRET_KEY): reconciling against Stripe is off." } }
        },
    )
}

pub(crate) fn accounts(ctx: &Ctx, q: &str, found: &[Account]) -> Markup {
    layout(
        "Search",
        Some(ctx),
        &html! {
            @if found.is_empty() {
                p.empty { "Nothing found for " code { (q) } "." }
            } @else {
                table {
                    thead { tr { th { "customer" } th { "e-mail" } th { "reference" } } }
                    tbody {
                        @for a in found {
                            tr {
                                td { a href=(format!("/customers/{}", seg(&a.stripe_customer_id))) { (a.stripe_customer_id) } }
                                td { (shorten(a.email.as_deref().unwrap_or("—"), LONG)) }
                                td { (shorten(a.reference.as_deref().unwrap_or("—"), LONG)) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// One subscription on the customer page, with what hangs off it.
pub(crate) struct SubscriptionView {
    pub(crate) state: SubscriptionState,
    pub(crate) instance: Option<InstanceRecord>,
    pub(crate) jobs: Vec<Job>,
    pub(crate) drift: Vec<DriftRecord>,
}

/// Everything the customer page shows.
pub(crate) struct CustomerView {
    pub(crate) customer_id: String,
    pub(crate) account: Option<Account>,
    pub(crate) entitlements: Entitlements,
    pub(crate) subscriptions: Vec<SubscriptionView>,
    pub(crate) events: Vec<StoredEvent>,
    pub(crate) audit: Vec<AuditEntry>,
    /// The invoices the customer's events carry (for ids and amounts).
    pub(crate) invoices: Vec<InvoiceFact>,
    pub(crate) stripe: bool,
    pub(crate) now: DateTime<Utc>,
}

/// The customer's name as the newest customer event (of `events`, newest first) gives it.
pub(crate) fn customer_name(events: &[StoredEvent]) -> Option<String> {
    events.iter().find_map(|e| {
        let value: serde_json::Value = serde_json::from_str(&e.payload).ok()?;
        let object = value.get("data")?.get("object")?;
        if object.get("object")?.as_str()? != "customer" {
            return None;
        }
        object.get("name")?.as_str().map(str::to_owned)
    })
}

/// The invoice an event carries, if it is an invoice event.
pub(crate) fn invoice_of(e: &StoredEvent) -> Option<InvoiceFact> {
    match mindroom_billing_core::parse_str(&e.payload).ok()?.object {
        EventObject::Invoice(invoice) => Some(invoice),
        _ => None,
    }
}

fn job_subject(job: &Job) -> String {
    match &job.kind {
        JobKind::Reconcile { .. } => "reconcile instance".to_owned(),
        JobKind::Email { email, .. } => format!("e-mail: {}", email.label()),
        JobKind::AdminAlert { subject, .. } => format!("admin alert: {subject}"),
    }
}

fn retry_form(ctx: &Ctx, job: &Job) -> Markup {
    html! {
        form.action method="post" action=(format!("/jobs/{}/retry", job.id)) {
            input type="hidden" name="csrf" value=(ctx.csrf);
            label { input type="checkbox" name="confirm" value="yes" required; " confirm" }
            button type="submit" disabled[ctx.read_only()] { "Retry job " (job.id) }
        }
    }
}

/// A job's error as it stands: a done job's last error is history (it succeeded after it), shown
/// muted as "earlier"; a skipped one says why.
fn job_error(job: &Job) -> Markup {
    let error = job.last_error.as_deref().unwrap_or("");
    html! {
        @if job.state == JobState::Done && !error.is_empty() {
            @if error.starts_with("skipped:") { span.note { (shorten(error, LONG)) } }
            @else { span.earlier { "earlier attempt: " (shorten(error, LONG)) } }
        } @else {
            span.error { (shorten(error, LONG)) }
        }
    }
}

fn jobs_table(ctx: &Ctx, sub: &SubscriptionView, now: DateTime<Utc>) -> Markup {
    let jobs = &sub.jobs;
    html! {
        @if jobs.is_empty() { p.empty { "No jobs." } } @else {
            table.jobs {
                thead { tr { th { "id" } th { "operation" } th { "state" } th { "attempts" } th { "next run" } th { "error" } th {} } }
                tbody {
                    @for job in jobs {
                        tr class=(format!("state-{}", job.state.as_str())) {
                            td { (job.id) }
                            td.operation { (job_label(job, &sub.state, sub.instance.as_ref(), jobs, now)) }
                            td { (job.state.as_str()) }
                            td { (job.attempts) }
                            td { (time(job.run_after)) }
                            td { (job_error(job)) }
                            td { @if job.state == JobState::Dead { (retry_form(ctx, job)) } }
                        }
                    }
                }
            }
        }
    }
}

fn drift_table(drift: &[DriftRecord]) -> Markup {
    html! {
        table.drift {
            thead { tr { th { "subscription" } th { "field" } th { "billing had" } th { "Stripe says" } th { "found" } } }
            tbody {
                @for d in drift {
                    tr {
                        td { a href=(search_link(&d.subscription_id)) { (d.subscription_id) } }
                        td { (d.field) } td { (d.before) } td { (d.after) } td { (time(d.found_at)) }
                    }
                }
            }
        }
    }
}

fn audit_table(rows: &[AuditEntry]) -> Markup {
    html! {
        @if rows.is_empty() { p.empty { "No operator actions yet." } } @else {
            table.audit {
                thead { tr { th { "when" } th { "who" } th { "what" } th { "on" } th { "customer" } th { "result" } } }
                tbody {
                    @for a in rows {
                        tr class=(if a.ok { "ok" } else { "failed" }) {
                            td { (time(a.at)) } td { (shorten(&a.actor, 80)) } td { (a.action) }
                            td { (audit_target(a)) }
                            td { @match &a.customer_id {
                                Some(c) => a href=(format!("/customers/{}", seg(c))) { (shorten(c, 40)) },
                                None => "—",
                            } }
                            td { (if a.ok { "ok: " } else { "failed: " }) (shorten(&a.result, LONG)) }
                        }
                    }
                }
            }
        }
    }
}

/// An audit row's target as a link to what it names.
fn audit_target(a: &AuditEntry) -> Markup {
    let target = shorten(&a.target, 60);
    let href = match a.action.as_str() {
        "replay" => Some(format!("/events/{}", seg(&a.target))),
        "reconcile" => Some(search_link(&a.target)),
        "retry_job" => Some("/jobs/dead".to_owned()),
        _ => None,
    };
    html! { @match href { Some(h) => a href=(h) { (target) }, None => (target) } }
}

fn events_table(events: &[StoredEvent], customers: bool) -> Markup {
    html! {
        @if events.is_empty() { p.empty { "No events." } } @else {
            table.events {
                thead { tr {
                    th { "event" } th { "type" } th { "invoice" } @if customers { th { "customer" } }
                    th { "created" } th { "received" } th { "source" } th { "disposition" } th { "reason" } th {}
                } }
                tbody {
                    @for e in events {
                        tr class=(format!("status-{}", e.status.as_str())) {
                            td { a href=(format!("/events/{}", seg(&e.id))) { (shorten(&e.id, 40)) } }
                            td { (e.event_type) }
                            td.invoice { @if let Some(i) = invoice_of(e) { (shorten(&i.id, 40)) " " (money(i.amount_due, &i.currency)) } }
                            @if customers {
                                td { @match event_customer(&e.payload) {
                                    Some(c) => a href=(format!("/customers/{}", seg(&c))) { (shorten(&c, 40)) },
                                    None => "—",
                                } }
                            }
                            td { (time(e.created)) }
                            td { (time(e.received_at)) }
                            td { (e.source.as_str()) }
                            td.disposition { (e.status.as_str()) }
                            td.error { (shorten(e.reason.as_deref().unwrap_or(""), LONG)) }
                            td { a href=(format!("/events/{}/raw", seg(&e.id))) { "raw" } }
                        }
                    }
                }
            }
        }
    }
}

fn instance_block(sub: &SubscriptionView, now: DateTime<Utc>) -> Markup {
    let (instance, jobs) = (sub.instance.as_ref(), &sub.jobs);
    // The provisioner was called by the job that wrote the record, or by one still failing; a
    // reconcile that found nothing to do called nothing.
    let writer = instance.and_then(|i| instance_writer(i, jobs)).map(|j| j.id);
    let last_call = jobs
        .iter()
        .filter(|j| matches!(j.kind, JobKind::Reconcile { .. }) && j.attempts > 0)
        .filter(|j| j.state != JobState::Done || Some(j.id) == writer)
        .max_by_key(|j| (j.updated_at, j.id));
    html! {
        @match instance {
            None => p.empty { "No instance recorded." },
            Some(i) => dl.instance {
                dt { "app" } dd { (i.app_name) }
                dt { "status" } dd.status { (i.status.as_str()) }
                dt { "generation" } dd { (i.generation) }
                dt { "tier" } dd { (i.tier.map_or("—", |t| t.as_str())) }
                dt { "frontend" } dd { (shorten(i.frontend_url.as_deref().unwrap_or("—"), LONG)) }
                dt { "backend" } dd { (shorten(i.backend_url.as_deref().unwrap_or("—"), LONG)) }
                dt { "updated" } dd { (time(i.updated_at)) }
                @if let Some(at) = i.deprovisioned_at { dt { "deprovisioned" } dd { (time(at)) } }
            },
        }
        p.last-call {
            "Last provisioner call: "
            @match last_call {
                None => "none yet.",
                Some(j) => {
                    (job_label(j, &sub.state, instance, jobs, now)) ", job " (j.id) " (attempt " (j.attempts) "), "
                    (j.state.as_str()) " at " (time(j.updated_at)) ": "
                    @if j.state == JobState::Done { "ok" } @else { span.error { (shorten(j.last_error.as_deref().unwrap_or("—"), LONG)) } }
                },
            }
        }
    }
}

pub(crate) fn customer(ctx: &Ctx, view: &CustomerView) -> Markup {
    let e = &view.entitlements;
    layout(
        &format!("Customer {}", view.customer_id),
        Some(ctx),
        &html! {
            @if !view.subscriptions.is_empty() {
                section.why {
                    h2 { "Why" }
                    @for sub in &view.subscriptions {
                        p.why data-subscription=(sub.state.subscription_id) {
                            strong { (sub.state.subscription_id) ": " }
                            (explain(&sub.state, sub.instance.as_ref(), &sub.jobs, &view.invoices, view.now))
                        }
                    }
                }
            }
            section.account {
                dl {
                    dt { "customer" } dd { (view.customer_id) }
                    dt { "name" } dd.name { (shorten(customer_name(&view.events).as_deref().unwrap_or("—"), LONG)) }
                    dt { "e-mail" } dd.email { (shorten(view.account.as_ref().and_then(|a| a.email.as_deref()).unwrap_or("—"), LONG)) }
                    dt { "reference" } dd { (shorten(view.account.as_ref().and_then(|a| a.reference.as_deref()).unwrap_or("—"), LONG)) }
                    dt { "account" } dd { (e.account_id) }
                }
            }
            section.entitlements {
                h2 { "Entitlements now" }
                dl {
                    dt { "tier" } dd { (e.tier.as_str()) }
                    dt { "entitlement status" } dd { (e.entitlement_status.map_or("— (no subscription)", |s| s.as_str())) }
                    dt { "agents" } dd { (e.limits.agents.to_wire()) }
                    dt { "messages / day" } dd { (e.limits.messages_per_day.to_wire()) }
                    dt { "grace deadline" } dd { (opt_time(e.grace_period_ends_at)) }
                    dt { "usage today" } dd { (e.usage_today.messages) " messages, " (e.usage_today.api_calls) " API calls" }
                }
            }
            @for sub in &view.subscriptions {
                @let s = &sub.state;
                @let snapshot = s.snapshot.as_ref();
                section.subscription {
                    h2 { "Subscription " (s.subscription_id) }
                    dl {
                        dt { "status" } dd { (snapshot.map_or("— (only invoices seen)", |x| x.status.as_str())) }
                        dt { "tier" } dd { (snapshot.map_or("—", |x| x.tier.as_str())) }
                        dt { "price" } dd { (snapshot.map_or("—", |x| x.price_id.as_str())) }
                        dt { "period end" }
                        @match snapshot.and_then(|x| x.current_period_end) {
                            Some(end) if end < view.now => dd.past { (time(end)) " — in the past: no renewal seen" },
                            end => dd { (opt_time(end)) },
                        }
                        dt { "entitlement" } dd { (s.entitlement(view.now).status.as_str()) }
                        dt { "grace deadline" } dd { (opt_time(s.grace.map(|g| g.ends_at))) }
                        dt { "version" } dd { (s.version) }
                    }
                    h3 { "Instance" }
                    (instance_block(sub, view.now))
                    h3 { "Jobs" }
                    (jobs_table(ctx, sub, view.now))
                    h3 { "Last reconcile drift" }
                    @if sub.drift.is_empty() { p.empty { "None found by the last reconciliation (or none ran)." } } @else { (drift_table(&sub.drift)) }
                    @if view.stripe {
                        form.action method="post" action=(format!("/subscriptions/{}/reconcile", seg(&s.subscription_id))) {
                            input type="hidden" name="csrf" value=(ctx.csrf);
                            label { input type="checkbox" name="confirm" value="yes" required; " confirm" }
                            button type="submit" disabled[ctx.read_only()] { "Reconcile with Stripe now" }
                        }
                    } @else {
                        p.note { "Reconcile now is off: the Stripe API is not configured (no STRIPE_SECRET_KEY)." }
                    }
                }
            }
            @if view.subscriptions.is_empty() { p.empty { "No subscription known for this customer." } }
            section.timeline {
                h2 { "Events" }
                (events_table(&view.events, false))
            }
            section {
                h2 { "Operator actions" }
                (audit_table(&view.audit))
            }
        },
    )
}

pub(crate) fn event(ctx: &Ctx, e: &StoredEvent, customer: Option<&str>) -> Markup {
    layout(
        &format!("Event {}", e.id),
        Some(ctx),
        &html! {
            dl.event {
                dt { "type" } dd { (e.event_type) }
                dt { "customer" } dd { @match customer { Some(c) => a href=(format!("/customers/{}", seg(c))) { (c) }, None => "—" } }
                dt { "created" } dd { (time(e.created)) }
                dt { "received" } dd { (time(e.received_at)) }
                dt { "processed" } dd { (opt_time(e.processed_at)) }
                dt { "source" } dd { (e.source.as_str()) }
                dt { "deliveries" } dd { (e.deliveries) }
                dt { "disposition" } dd #disposition class=(format!("status-{}", e.status.as_str())) { (e.status.as_str()) }
                dt { "reason" } dd.error { (shorten(e.reason.as_deref().unwrap_or("—"), LONG)) }
            }
            @if !e.status.is_done() {
                form.action method="post" action=(format!("/events/{}/replay", seg(&e.id))) {
                    input type="hidden" name="csrf" value=(ctx.csrf);
                    label { input #confirm type="checkbox" name="confirm" value="yes" required; " I want to apply this event again" }
                    button #replay type="submit" disabled[ctx.read_only()] { "Replay" }
                }
            }
            h2 { "Raw JSON " a href=(format!("/events/{}/raw", seg(&e.id))) { "(as received, byte for byte)" } }
            @if e.payload.is_empty() { p.empty { "The payload of this old event is no longer kept." } }
            @else { pre.raw { (e.payload) } }
        },
    )
}

/// Where a list page is, and whether older rows follow.
pub(crate) struct Pager {
    pub(crate) path: &'static str,
    pub(crate) page: u32,
    pub(crate) more: bool,
}

fn pager(pg: &Pager) -> Markup {
    html! {
        @if pg.page > 1 || pg.more {
            nav.pager {
                @if pg.page > 1 { a rel="prev" href=(format!("{}?page={}", pg.path, pg.page - 1)) { "← newer" } }
                span { "page " (pg.page) }
                @if pg.more { a rel="next" href=(format!("{}?page={}", pg.path, pg.page + 1)) { "older →" } }
            }
        }
    }
}

pub(crate) fn failed_events(ctx: &Ctx, events: &[StoredEvent], pg: &Pager) -> Markup {
    layout("Failed events", Some(ctx), &html! { (events_table(events, true)) (pager(pg)) })
}

pub(crate) fn dead_jobs(ctx: &Ctx, jobs: &[Job], pg: &Pager) -> Markup {
    layout(
        "Dead jobs",
        Some(ctx),
        &html! {
            @if jobs.is_empty() { p.empty { "No dead jobs." } } @else {
                table.jobs {
                    thead { tr { th { "id" } th { "kind" } th { "about" } th { "attempts" } th { "died" } th { "last error" } th {} } }
                    tbody {
                        @for job in jobs {
                            tr {
                                td { (job.id) }
                                td { (job_subject(job)) }
                                td { @match job_about(job) { Some(q) => a href=(search_link(q)) { (q) }, None => "—" } }
                                td { (job.attempts) }
                                td { (time(job.updated_at)) }
                                td.error { (shorten(job.last_error.as_deref().unwrap_or(""), LONG)) }
                                td { (retry_form(ctx, job)) }
                            }
                        }
                    }
                }
            }
            (pager(pg))
        },
    )
}

/// The subscription (or customer) a job is about, for a link.
pub(crate) fn job_about(job: &Job) -> Option<&str> {
    match &job.kind {
        JobKind::Reconcile { subscription_id } => Some(subscription_id),
        JobKind::Email { subscription_id, customer_id, .. } => Some(subscription_id.as_deref().unwrap_or(customer_id)),
        JobKind::AdminAlert { .. } => job.group.as_deref(),
    }
}

pub(crate) fn grace(ctx: &Ctx, subs: &[SubscriptionState], now: DateTime<Utc>, pg: &Pager) -> Markup {
    layout(
        "In grace, by deadline",
        Some(ctx),
        &html! {
            @if subs.is_empty() { p.empty { "No subscription is in a grace period." } } @else {
                table {
                    thead { tr { th { "deadline" } th { "subscription" } th { "customer" } th { "status" } th { "tier" } th { "entitlement" } } }
                    tbody {
                        @for s in subs {
                            tr {
                                td { (opt_time(s.grace.map(|g| g.ends_at))) }
                                td { (s.subscription_id) }
                                td { a href=(format!("/customers/{}", seg(&s.customer_id))) { (s.customer_id) } }
                                td { (s.status().map_or("—", |x| x.as_str())) }
                                td { (s.tier().map_or("—", |x| x.as_str())) }
                                td { (s.entitlement(now).status.as_str()) }
                            }
                        }
                    }
                }
            }
            (pager(pg))
        },
    )
}

/// Open disputes of a page of subscriptions (the store orders them by their earliest evidence
/// deadline), earliest evidence deadline first (none last).
pub(crate) fn disputes(ctx: &Ctx, subs: &[SubscriptionState], now: DateTime<Utc>, pg: &Pager) -> Markup {
    let mut open: Vec<(&SubscriptionState, &mindroom_billing_core::DisputeRecord)> =
        subs.iter().flat_map(|s| s.open_disputes().into_iter().map(move |d| (s, d))).collect();
    open.sort_by_key(|(s, d)| {
        (d.evidence_due_by.is_none(), d.evidence_due_by, d.id.clone(), s.subscription_id.clone())
    });
    layout(
        "Open disputes, by evidence due date",
        Some(ctx),
        &html! {
            @if open.is_empty() { p.empty { "No dispute is open." } } @else {
                table {
                    thead { tr { th { "evidence due" } th { "dispute" } th { "amount" } th { "reason" } th { "status" } th { "customer" } th { "subscription" } th { "entitlement" } } }
                    tbody {
                        @for (s, d) in &open {
                            tr {
                                td { (opt_time(d.evidence_due_by)) }
                                td { (d.id) }
                                td { (mindroom_billing_core::explain::money(d.amount, &d.currency)) }
                                td { (d.reason) }
                                td { (d.status) }
                                td { a href=(format!("/customers/{}", seg(&s.customer_id))) { (s.customer_id) } }
                                td { (s.subscription_id) }
                                td { (s.entitlement(now).status.as_str()) }
                            }
                        }
                    }
                }
            }
            (pager(pg))
        },
    )
}

pub(crate) fn drift(ctx: &Ctx, drift: &[DriftRecord], stripe: bool, pg: &Pager) -> Markup {
    layout(
        "Drift found by the last reconciliation",
        Some(ctx),
        &html! {
            @if !stripe { p.note { "The Stripe API is not configured (no STRIPE_SECRET_KEY): no reconciliation runs." } }
            @if drift.is_empty() { p.empty { "No drift." } } @else { (drift_table(drift)) }
            (pager(pg))
        },
    )
}

pub(crate) fn audit(ctx: &Ctx, rows: &[AuditEntry], pg: &Pager) -> Markup {
    layout("Operator actions", Some(ctx), &html! { (audit_table(rows)) (pager(pg)) })
}

pub(crate) fn action_result(ctx: &Ctx, title: &str, entry: &AuditEntry, back: &str) -> Markup {
    layout(
        title,
        Some(ctx),
        &html! {
            p #result class=(if entry.ok { "ok" } else { "failed" }) {
                (entry.action) " " (entry.target) ": " (if entry.ok { "" } else { "failed: " }) (entry.result)
            }
            p { a #back href=(back) { "Back" } }
        },
    )
}
