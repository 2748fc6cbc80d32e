//! The console on a real HTTP server on 127.0.0.1 (MemoryStore): authentication, CSRF, escaping,
//! the pages and the actions with their audit rows.
#![allow(clippy::unwrap_used)]

mod support;

use chrono::Duration;
use mindroom_billing_core::ports::JobFilter;
use mindroom_billing_core::{EventStatus, JobState, OperatorStore, Store};
use support::{
    ADMIN_PASSWORD, APPLIED_EVENT, CUS, Client, EVIL_EMAIL, EVIL_METADATA, FAILED_EVENT, Options, READONLY_PASSWORD,
    SUB, session_cookie, start,
};

const PAGES: &[&str] = &[
    "/",
    "/search?q=cus_Evil1",
    "/customers/cus_Evil1",
    "/events/failed",
    "/events/evt_failed_1",
    "/events/evt_failed_1/raw",
    "/jobs/dead",
    "/grace",
    "/drift",
    "/audit",
];

#[tokio::test]
async fn every_page_and_action_requires_a_login() {
    let h = start(Options::default()).await;
    let anonymous = Client::new(h.addr);
    for path in PAGES {
        let response = anonymous.get(path).await;
        assert_eq!(response.status(), 303, "GET {path}");
        assert_eq!(response.headers()["location"], "/login", "GET {path}");
        assert!(!response.text().await.unwrap().contains("cus_Evil1"), "GET {path} leaks nothing");
    }
    for path in ["/events/evt_failed_1/replay", "/jobs/1/retry", "/subscriptions/sub_Console1/reconcile", "/logout"] {
        let response = anonymous.post_form(path, &[("confirm", "yes")]).await;
        assert_eq!(response.status(), 401, "POST {path}");
    }
    let login = anonymous.get("/login").await;
    assert_eq!(login.status(), 200);
    assert!(login.text().await.unwrap().contains(r#"type="password""#));
    assert_eq!(anonymous.get("/static/console.css").await.status(), 200, "the stylesheet is public");
    assert_eq!(h.store.load_event(FAILED_EVENT).await.unwrap().unwrap().status, EventStatus::Failed);
}

#[tokio::test]
async fn a_wrong_password_an_expired_and_a_forged_cookie_are_refused() {
    let h = start(Options::default()).await;
    let anonymous = Client::new(h.addr);
    let wrong = anonymous.post_form("/login", &[("password", "admin: guess")]).await;
    assert_eq!(wrong.status(), 401);
    assert!(session_cookie(&wrong).is_none(), "no cookie for a wrong password");
    assert!(wrong.text().await.unwrap().contains("Wrong password"));
    assert_eq!(anonymous.post_form("/login", &[]).await.status(), 401, "no password");

    let response = anonymous.post_form("/login", &[("password", ADMIN_PASSWORD)]).await;
    assert_eq!(response.status(), 303);
    let set = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    assert!(!set.contains("Secure"), "not Secure unless configured behind TLS");
    let cookie = session_cookie(&response).unwrap();
    let mut admin = Client::new(h.addr);
    admin.cookie = Some(cookie.clone());
    assert_eq!(admin.get("/").await.status(), 200);

    // Forged: another role, another expiry, another key, garbage.
    let value = cookie.split_once('=').unwrap().1.to_owned();
    let (body, mac) = value.rsplit_once('.').unwrap();
    let mut parts: Vec<String> = body.split('.').map(str::to_owned).collect();
    parts[1] = (parts[1].parse::<i64>().unwrap() + 86_400).to_string();
    let later = format!("{}.{mac}", parts.join("."));
    let readonly_mac = format!("{}.{mac}", body.replacen("admin", "readonly", 1));
    let other_key = {
        let mut c = Client::login(h.addr, ADMIN_PASSWORD).await;
        c.cookie.take().unwrap()
    };
    assert_ne!(other_key, cookie, "every login gets its own session");
    for forged in [later, readonly_mac, format!("{body}.{}", "0".repeat(64)), "admin.9999999999.00.00".to_owned()] {
        let mut client = Client::new(h.addr);
        client.cookie = Some(format!("mrb_console={forged}"));
        let response = client.get("/customers/cus_Evil1").await;
        assert_eq!(response.status(), 303, "forged {forged}");
        assert_eq!(response.headers()["location"], "/login");
    }

    // A replica with the same key accepts the cookie; a deployment with another key does not.
    let same = start(Options::default()).await;
    let mut replica = Client::new(same.addr);
    replica.cookie = Some(cookie.clone());
    assert_eq!(replica.get("/").await.status(), 200, "same configured key: accepted");
    let other = start(Options { key: Some("another deployment's key, 32+ bytes"), ..Options::default() }).await;
    let mut foreign = Client::new(other.addr);
    foreign.cookie = Some(cookie.clone());
    assert_eq!(foreign.get("/").await.status(), 303, "another key: refused");

    // Expired: eight hours later.
    h.clock.advance(Duration::hours(8));
    let expired = admin.get("/").await;
    assert_eq!(expired.status(), 303);
    assert_eq!(expired.headers()["location"], "/login");
}

#[tokio::test]
async fn the_cookie_is_secure_when_configured_behind_tls() {
    let h = start(Options { secure_cookie: true, ..Options::default() }).await;
    let response = Client::new(h.addr).post_form("/login", &[("password", ADMIN_PASSWORD)]).await;
    assert!(response.headers()["set-cookie"].to_str().unwrap().contains("; Secure"));
}

#[tokio::test]
async fn login_attempts_are_rate_limited() {
    let h = start(Options { login_attempts_per_minute: Some(3), ..Options::default() }).await;
    let client = Client::new(h.addr);
    for _ in 0..3 {
        assert_eq!(client.post_form("/login", &[("password", "wrong")]).await.status(), 401);
    }
    let limited = client.post_form("/login", &[("password", ADMIN_PASSWORD)]).await;
    assert_eq!(limited.status(), 429, "even the right password waits");
    assert!(session_cookie(&limited).is_none());
    h.clock.advance(Duration::seconds(61));
    assert_eq!(client.post_form("/login", &[("password", ADMIN_PASSWORD)]).await.status(), 303);
}

#[tokio::test]
async fn a_post_without_or_with_a_wrong_csrf_token_is_refused() {
    let h = start(Options::default()).await;
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let other = Client::login(h.addr, ADMIN_PASSWORD).await;
    let replay = "/events/evt_failed_1/replay";
    let missing = admin.post_form(replay, &[("confirm", "yes")]).await;
    assert_eq!(missing.status(), 403);
    let wrong = admin.post_form(replay, &[("confirm", "yes"), ("csrf", "00ff")]).await;
    assert_eq!(wrong.status(), 403);
    let foreign = other.csrf().await;
    let stolen = admin.post_form(replay, &[("confirm", "yes"), ("csrf", &foreign)]).await;
    assert_eq!(stolen.status(), 403, "another session's token");
    let retry = format!("/jobs/{}/retry", h.dead_job);
    assert_eq!(admin.post_form(&retry, &[("confirm", "yes")]).await.status(), 403);
    assert_eq!(admin.post_form("/logout", &[]).await.status(), 403, "logout too");
    assert_eq!(h.store.load_event(FAILED_EVENT).await.unwrap().unwrap().status, EventStatus::Failed);
    let dead = h.store.list_jobs(&JobFilter { state: Some(JobState::Dead), limit: 5 }).await.unwrap();
    assert_eq!(dead.len(), 1, "the job is still dead");
    assert!(h.store.list_audit(None, 10).await.unwrap().is_empty(), "nothing acted, nothing audited");

    let token = admin.csrf().await;
    for origin in ["http://evil.example", "null"] {
        let cross = admin
            .http
            .post(format!("{}{replay}", admin.base))
            .header("cookie", admin.cookie.as_deref().unwrap())
            .header("origin", origin)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("csrf={token}&confirm=yes"))
            .send()
            .await
            .unwrap();
        assert_eq!(cross.status(), 403, "a POST from {origin}, even with the token");
    }
    let same = admin
        .http
        .post(format!("{}/logout", admin.base))
        .header("cookie", admin.cookie.as_deref().unwrap())
        .header("origin", admin.base.as_str())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(same.status(), 303, "its own origin is fine");
    let login = Client::new(h.addr)
        .http
        .post(format!("{}/login", admin.base))
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("password=x")
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 403, "no login CSRF");
    let unconfirmed = admin.post_form(replay, &[("csrf", &token)]).await;
    assert_eq!(unconfirmed.status(), 400, "the confirmation box is required");
    assert_eq!(h.store.load_event(FAILED_EVENT).await.unwrap().unwrap().status, EventStatus::Failed);
}

#[tokio::test]
async fn values_from_stripe_are_escaped_and_the_headers_lock_the_page_down() {
    let h = start(Options::default()).await;
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let response = admin.get("/customers/cus_Evil1").await;
    assert_eq!(response.status(), 200);
    let csp = response.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let page = response.text().await.unwrap();
    assert!(page.contains("&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"), "the e-mail, escaped");
    assert!(!page.contains(EVIL_EMAIL), "never raw");
    assert!(!page.contains("<script"), "no script at all");
    assert!(page.contains("&lt;b&gt;ref&lt;/b&gt;"), "the reference, escaped");

    let event = admin.page("/events/evt_failed_1").await;
    assert!(event.contains("&lt;img src=x onerror=alert(2)&gt;"), "metadata in the JSON, escaped");
    assert!(!event.contains(EVIL_METADATA));
    let dead = admin.page("/jobs/dead").await;
    assert!(dead.contains("resend said &lt;no&gt;"), "a job's error, escaped");

    // The raw JSON: byte for byte, as text that no browser renders.
    let raw = admin.get("/events/evt_failed_1/raw").await;
    assert_eq!(raw.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(raw.headers()["x-content-type-options"], "nosniff");
    let stored = h.store.load_event(FAILED_EVENT).await.unwrap().unwrap().payload;
    assert_eq!(raw.text().await.unwrap(), stored);

    // A search for markup is echoed escaped.
    let search = admin.page("/search?q=%3Cscript%3Ex%3C%2Fscript%3E").await;
    assert!(search.contains("&lt;script&gt;x&lt;/script&gt;") && !search.contains("<script>x"));
}

#[tokio::test]
async fn search_finds_a_customer_by_every_key() {
    let h = start(Options::default()).await;
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let app = mindroom_billing_core::service::app_name_for(SUB);
    assert_eq!(h.store.load_instance(SUB).await.unwrap().unwrap().app_name, app, "provisioned (dry run)");
    let customer = format!("/customers/{CUS}");
    let email = urlencoding(EVIL_EMAIL);
    for q in [CUS, SUB, app.as_str(), email.as_str(), &urlencoding(&EVIL_EMAIL.to_uppercase())] {
        let response = admin.get(&format!("/search?q={q}")).await;
        assert_eq!(response.status(), 303, "search {q}");
        assert_eq!(response.headers()["location"], customer.as_str(), "search {q}");
    }
    let event = admin.get("/search?q=evt_failed_1").await;
    assert_eq!(event.headers()["location"], "/events/evt_failed_1");
    let nothing = admin.page("/search?q=cus_nobody").await;
    assert!(nothing.contains("Nothing found"));
    assert_eq!(admin.get("/customers/cus_nobody").await.status(), 404);
}

fn urlencoding(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn the_customer_page_and_the_lists_show_what_is_known() {
    let h = start(Options::default()).await;
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let page = admin.page("/customers/cus_Evil1").await;
    for expected in [
        SUB,
        "professional",
        "active",
        "price_pro",
        APPLIED_EVENT,
        FAILED_EVENT,
        "unknown price price_pro",
        "e-mail: welcome",
        "resend said &lt;no&gt;",
        "Reconcile now is off",
        "mr-console1-",
        "running",
    ] {
        assert!(page.contains(expected), "{expected} on the customer page");
    }
    let failed = admin.page("/events/failed").await;
    assert!(failed.contains(FAILED_EVENT) && !failed.contains(APPLIED_EVENT));
    let dead = admin.page("/jobs/dead").await;
    assert!(dead.contains(&format!("Retry job {}", h.dead_job)));
    assert!(admin.page("/grace").await.contains("No subscription is in a grace period"));
    let drift = admin.page("/drift").await;
    assert!(drift.contains("not configured") && drift.contains("No drift"));
}

#[tokio::test]
async fn replay_and_retry_change_what_they_should_and_leave_audit_rows() {
    let h = start(Options::default()).await;
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let token = admin.csrf().await;

    let replayed = admin.post_form("/events/evt_failed_1/replay", &[("csrf", &token), ("confirm", "yes")]).await;
    assert_eq!(replayed.status(), 200);
    let text = replayed.text().await.unwrap();
    assert!(text.contains("disposition applied; the event is applied now"), "{text}");
    assert_eq!(h.store.load_event(FAILED_EVENT).await.unwrap().unwrap().status, EventStatus::Applied);
    let again = admin.post_form("/events/evt_failed_1/replay", &[("csrf", &token), ("confirm", "yes")]).await;
    assert!(again.text().await.unwrap().contains("disposition duplicate"), "a done event is not applied twice");

    let retry = format!("/jobs/{}/retry", h.dead_job);
    let retried = admin.post_form(&retry, &[("csrf", &token), ("confirm", "yes")]).await;
    assert_eq!(retried.status(), 200);
    let jobs = h.store.jobs_for_subscription(SUB, 10).await.unwrap();
    let job = jobs.iter().find(|j| j.id == h.dead_job).unwrap();
    assert_eq!((job.state, job.run_after), (JobState::Pending, h.billing.now()));
    let twice = admin.post_form(&retry, &[("csrf", &token), ("confirm", "yes")]).await;
    assert_eq!(twice.status(), 409, "a job that is not dead is not retried");

    let reconcile =
        admin.post_form(&format!("/subscriptions/{SUB}/reconcile"), &[("csrf", &token), ("confirm", "yes")]).await;
    assert_eq!(reconcile.status(), 409);
    assert!(reconcile.text().await.unwrap().contains("the Stripe API is not configured"));

    let audit = h.store.list_audit(Some(CUS), 10).await.unwrap();
    let rows: Vec<(&str, &str, bool)> = audit.iter().map(|a| (a.action.as_str(), a.target.as_str(), a.ok)).collect();
    let job_id = h.dead_job.to_string();
    assert_eq!(
        rows,
        [
            ("reconcile", SUB, false),
            ("retry_job", job_id.as_str(), true),
            ("replay", FAILED_EVENT, true),
            ("replay", FAILED_EVENT, true),
        ]
    );
    assert!(audit.iter().all(|a| a.actor == "admin from 127.0.0.1" && a.at == h.billing.now()));
    let all = h.store.list_audit(None, 10).await.unwrap();
    let refused = all.iter().find(|a| a.action == "retry_job" && !a.ok).expect("the refused retry is audited too");
    assert_eq!(refused.result, "the job is not dead (already retried, or unknown)");
    let page = admin.page("/customers/cus_Evil1").await;
    assert!(page.contains("re-queued: pending, due now") && page.contains("admin from 127.0.0.1"));
    assert!(admin.page("/audit").await.contains("retry_job"));
}

#[tokio::test]
async fn a_read_only_user_sees_the_pages_and_gets_403_on_every_action() {
    let h = start(Options::default()).await;
    let readonly = Client::login(h.addr, READONLY_PASSWORD).await;
    for path in PAGES.iter().filter(|p| !p.starts_with("/search")) {
        assert_eq!(readonly.get(path).await.status(), 200, "GET {path}");
    }
    let page = readonly.page("/events/evt_failed_1").await;
    assert!(page.contains("disabled"), "the replay button is shown disabled");
    let token = readonly.csrf().await;
    let retry = format!("/jobs/{}/retry", h.dead_job);
    for path in ["/events/evt_failed_1/replay", retry.as_str(), "/subscriptions/sub_Console1/reconcile"] {
        let response = readonly.post_form(path, &[("csrf", &token), ("confirm", "yes")]).await;
        assert_eq!(response.status(), 403, "POST {path}");
    }
    assert_eq!(h.store.load_event(FAILED_EVENT).await.unwrap().unwrap().status, EventStatus::Failed);
    assert!(h.store.list_audit(None, 10).await.unwrap().is_empty());
    let logout = readonly.post_form("/logout", &[("csrf", &token)]).await;
    assert_eq!(logout.status(), 303);
    assert!(logout.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
}

#[tokio::test]
async fn reconcile_now_records_the_drift_it_fixed_and_clears_it_once_in_sync() {
    let api = std::sync::Arc::new(mindroom_billing_core::stripe_api::FakeStripeApi::new());
    api.put_subscription(support::stripe_subscription("past_due"));
    let h = start(Options { stripe: Some(api.clone()), ..Options::default() }).await;
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let page = admin.page("/customers/cus_Evil1").await;
    assert!(page.contains("Reconcile with Stripe now") && !page.contains("Reconcile now is off"));
    let token = admin.csrf().await;
    let reconcile = format!("/subscriptions/{SUB}/reconcile");
    let fixed = admin.post_form(&reconcile, &[("csrf", &token), ("confirm", "yes")]).await;
    assert_eq!(fixed.status(), 200);
    assert!(fixed.text().await.unwrap().contains("drift fixed: status, grace"));
    let drift = h.store.list_drift(Some(SUB), 10).await.unwrap();
    let fields: Vec<(&str, &str)> = drift.iter().map(|d| (d.field.as_str(), d.before.as_str())).collect();
    assert_eq!(fields, [("grace", "-"), ("status", "active")], "past_due opens a grace period");
    assert!(admin.page("/grace").await.contains(SUB), "now in grace");
    assert!(admin.page("/drift").await.contains("past_due"));
    assert!(admin.page("/customers/cus_Evil1").await.contains("past_due"));

    let again = admin.post_form(&reconcile, &[("csrf", &token), ("confirm", "yes")]).await;
    assert!(again.text().await.unwrap().contains("in sync with Stripe"));
    assert!(h.store.list_drift(None, 10).await.unwrap().is_empty(), "the last reconciliation found none");
    let audit = h.store.list_audit(Some(CUS), 10).await.unwrap();
    assert_eq!(
        audit.iter().map(|a| (a.action.as_str(), a.ok)).collect::<Vec<_>>(),
        [("reconcile", true), ("reconcile", true)]
    );
}

/// In real headless Chromium: log in, find the customer, open the failed event, replay it and see
/// its disposition change; screenshots of the customer page and the lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_an_operator_finds_the_customer_and_replays_the_failed_event() {
    use fantoccini::Locator;
    let Some(browser) = support::browser::start().await else { return };
    let h = start(Options::default()).await;
    let c = &browser.client;
    let base = format!("http://{}", h.addr);
    let shots = support::browser::screenshot_dir();
    let shoot = |name: &'static str| {
        let path = shots.join(name);
        async move { std::fs::write(&path, c.screenshot().await.unwrap()).unwrap() }
    };

    c.goto(&format!("{base}/customers/cus_Evil1")).await.unwrap();
    assert!(c.current_url().await.unwrap().as_str().ends_with("/login"), "the browser is sent to log in");
    c.find(Locator::Css("input[name=password]")).await.unwrap().send_keys(ADMIN_PASSWORD).await.unwrap();
    c.find(Locator::Css("form.login button")).await.unwrap().click().await.unwrap();
    let search = c.wait().for_element(Locator::Css("form.search-big input[name=q]")).await.unwrap();
    search.send_keys(CUS).await.unwrap();
    c.find(Locator::Css("form.search-big button")).await.unwrap().click().await.unwrap();
    c.wait().for_element(Locator::Css("section.timeline")).await.unwrap();
    assert!(c.current_url().await.unwrap().as_str().ends_with("/customers/cus_Evil1"));
    let email = c.find(Locator::Css("dd.email")).await.unwrap().text().await.unwrap();
    assert_eq!(email, EVIL_EMAIL, "shown as text; no script ran (an alert would have failed every command)");
    shoot("customer.png").await;

    c.goto(&format!("{base}/events/failed")).await.unwrap();
    shoot("failed-events.png").await;
    c.goto(&format!("{base}/jobs/dead")).await.unwrap();
    shoot("dead-jobs.png").await;
    c.goto(&format!("{base}/grace")).await.unwrap();
    shoot("grace.png").await;
    c.goto(&format!("{base}/drift")).await.unwrap();
    shoot("drift.png").await;
    c.goto(&format!("{base}/customers/cus_Evil1")).await.unwrap();

    c.find(Locator::LinkText(FAILED_EVENT)).await.unwrap().click().await.unwrap();
    let disposition = c.wait().for_element(Locator::Id("disposition")).await.unwrap();
    assert_eq!(disposition.text().await.unwrap(), "failed");
    shoot("failed-event.png").await;
    c.find(Locator::Id("confirm")).await.unwrap().click().await.unwrap();
    c.find(Locator::Id("replay")).await.unwrap().click().await.unwrap();
    let result = c.wait().for_element(Locator::Id("result")).await.unwrap();
    assert!(result.text().await.unwrap().contains("disposition applied"));
    c.find(Locator::Id("back")).await.unwrap().click().await.unwrap();
    let disposition = c.wait().for_element(Locator::Id("disposition")).await.unwrap();
    assert_eq!(disposition.text().await.unwrap(), "applied", "the disposition changed");
    c.goto(&format!("{base}/customers/cus_Evil1")).await.unwrap();
    shoot("customer-after-replay.png").await;
    assert_eq!(h.store.load_event(FAILED_EVENT).await.unwrap().unwrap().status, EventStatus::Applied);
    assert_eq!(h.store.list_audit(Some(CUS), 10).await.unwrap().len(), 1, "one audit row");
    browser.client.clone().close().await.unwrap();
}
