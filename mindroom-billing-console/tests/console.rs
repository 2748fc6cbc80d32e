//! The console on a real HTTP server on 127.0.0.1 (MemoryStore): authentication, CSRF, escaping,
//! the pages and the actions with their audit rows.
#![allow(clippy::unwrap_used)]

mod support;

use chrono::Duration;
use mindroom_billing_core::ports::JobFilter;
use mindroom_billing_core::{EventStatus, JobState, OperatorStore, Store};
use support::{
    ADMIN_PASSWORD, ALICE, ALICE_PASSWORD, APPLIED_EVENT, BOB, BOB_PASSWORD, CUS, Client, EVIL_EMAIL, EVIL_METADATA,
    FAILED_EVENT, Options, READONLY_PASSWORD, SUB, session_cookie, start,
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
    "/disputes",
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
async fn a_wrong_password_an_idle_an_old_and_a_forged_cookie_are_refused() {
    let h = start(Options::default()).await;
    let anonymous = Client::new(h.addr);
    let wrong = anonymous.post_form("/login", &[("name", "admin"), ("password", "admin: guess")]).await;
    assert_eq!(wrong.status(), 401);
    assert!(session_cookie(&wrong).is_none(), "no cookie for a wrong password");
    assert!(wrong.text().await.unwrap().contains("Wrong name or password"));
    assert_eq!(anonymous.post_form("/login", &[]).await.status(), 401, "no password");
    let crossed = anonymous.post_form("/login", &[("name", ALICE), ("password", ADMIN_PASSWORD)]).await;
    assert_eq!(crossed.status(), 401, "another operator's password");

    let response = anonymous.post_form("/login", &[("name", "admin"), ("password", ADMIN_PASSWORD)]).await;
    assert_eq!(response.status(), 303);
    let set = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    assert!(!set.contains("Secure"), "not Secure on an http origin");
    let cookie = session_cookie(&response).unwrap();
    let value = cookie.split_once('=').unwrap().1.to_owned();
    assert!(value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()), "only a random id: {value}");
    let mut admin = Client::new(h.addr);
    admin.cookie = Some(cookie.clone());
    assert_eq!(admin.get("/").await.status(), 200);

    // Forged: another id, the old signed format with a far expiry, garbage.
    let other = Client::login(h.addr, ADMIN_PASSWORD).await.cookie.unwrap();
    assert_ne!(other, cookie, "every login gets its own session");
    let ten_years = format!("admin.{}.00.{}", 1_785_000_000 + 10 * 365 * 86_400, "0".repeat(64));
    let flipped = format!("{}{}", &value[..63], if value.ends_with('0') { '1' } else { '0' });
    for forged in [flipped, ten_years, "x".to_owned(), String::new()] {
        let mut client = Client::new(h.addr);
        client.cookie = Some(format!("mrb_console={forged}"));
        let response = client.get("/customers/cus_Evil1").await;
        assert_eq!(response.status(), 303, "forged {forged}");
        assert_eq!(response.headers()["location"], "/login");
    }

    // Another deployment (another store) does not know the session.
    let foreign_deployment = start(Options::default()).await;
    let mut foreign = Client::new(foreign_deployment.addr);
    foreign.cookie = Some(cookie.clone());
    assert_eq!(foreign.get("/").await.status(), 303, "not in that store: refused");

    // Idle: 29 minutes between requests are fine, 31 are not.
    h.clock.advance(Duration::minutes(29));
    assert_eq!(admin.get("/").await.status(), 200);
    h.clock.advance(Duration::minutes(31));
    let idle = admin.get("/").await;
    assert_eq!(idle.status(), 303, "idle for 31 minutes");
    assert_eq!(idle.headers()["location"], "/login");
    h.clock.advance(Duration::minutes(-31));
    assert_eq!(admin.get("/").await.status(), 303, "an ended session stays ended");

    // Old: a session kept busy ends eight hours after its login, whatever the cookie says.
    let busy = Client::login(h.addr, ADMIN_PASSWORD).await;
    for _ in 0..16 {
        h.clock.advance(Duration::minutes(29));
        assert_eq!(busy.get("/").await.status(), 200);
    }
    h.clock.advance(Duration::minutes(20));
    assert_eq!(busy.get("/").await.status(), 303, "eight hours and four minutes after its login");
}

#[tokio::test]
async fn the_cookie_is_host_prefixed_and_secure_when_the_origin_is_https() {
    let h = start(Options { origin: Some("https://console.example".into()), ..Options::default() }).await;
    let response = Client::new(h.addr)
        .http
        .post(format!("http://{}/login", h.addr))
        .header("host", "console.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("name=admin&password={}", urlencoding(ADMIN_PASSWORD)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let set = response.headers()["set-cookie"].to_str().unwrap();
    assert!(set.starts_with("__Host-mrb_console="), "{set}");
    assert!(set.contains("; Secure") && set.contains("Path=/") && !set.contains("Domain"), "{set}");
    let secure = start(Options { secure_cookie: true, ..Options::default() }).await;
    let response =
        Client::new(secure.addr).post_form("/login", &[("name", "admin"), ("password", ADMIN_PASSWORD)]).await;
    assert!(response.headers()["set-cookie"].to_str().unwrap().contains("; Secure"), "forced Secure");
}

/// A flood of wrong passwords from six addresses slows those addresses and the operator they
/// guess, but never the right password from an address that has not failed.
#[tokio::test]
async fn a_flood_of_wrong_passwords_does_not_lock_the_right_password_out() {
    let h = start(Options::default()).await;
    let attackers: Vec<Client> =
        (2..8u8).map(|i| Client::from_address(h.addr, std::net::IpAddr::from([127, 0, 0, i]))).collect();
    let mut throttled = 0;
    for round in 0..10 {
        for attacker in &attackers {
            let password = format!("guess {round}");
            let status = attacker.post_form("/login", &[("name", "admin"), ("password", &password)]).await.status();
            assert!(status == 401 || status == 429, "{status}");
            throttled += usize::from(status == 429);
        }
    }
    assert!(throttled > 0, "the guessers are slowed");
    let admin = Client::from_address(h.addr, std::net::IpAddr::from([127, 0, 0, 9]));
    let response = admin.post_form("/login", &[("name", "admin"), ("password", ADMIN_PASSWORD)]).await;
    assert_eq!(response.status(), 303, "the right password from another address passes at once");
    let guesser = &attackers[0];
    let response = guesser.post_form("/login", &[("name", "admin"), ("password", ADMIN_PASSWORD)]).await;
    assert_eq!(response.status(), 429, "an address that guessed admin waits, even with the right password");
    assert!(response.headers().contains_key("retry-after"));
    let response = guesser.post_form("/login", &[("name", ALICE), ("password", ALICE_PASSWORD)]).await;
    assert_eq!(response.status(), 303, "alice from there is not held by admin's delay (the address failed twice)");

    // Every refusal is audited, with the name that was tried and the address.
    let audit = h.store.list_audit(None, 200).await.unwrap();
    let refused = audit.iter().filter(|a| a.action == "login" && !a.ok).count();
    assert_eq!(refused, 61, "60 guesses and the guesser's throttled right password");
    assert!(audit.iter().any(|a| a.actor == "admin from 127.0.0.2" && a.result.starts_with("throttled")));
    assert!(audit.iter().any(|a| a.actor == "admin from 127.0.0.9" && a.ok && a.result == "logged in"));
}

/// From one address: a few free tries, then delays that grow; the right password passes once the
/// delay is over.
#[tokio::test]
async fn one_address_gets_growing_delays_and_then_gets_in() {
    let h = start(Options::default()).await;
    let client = Client::new(h.addr);
    let mut waits = Vec::new();
    for i in 0..10 {
        let response = client.post_form("/login", &[("name", "admin"), ("password", &format!("guess {i}"))]).await;
        if response.status() == 429 {
            waits.push(response.headers()["retry-after"].to_str().unwrap().parse::<i64>().unwrap());
            h.clock.advance(Duration::seconds(*waits.last().unwrap()));
            let again = client.post_form("/login", &[("name", "admin"), ("password", &format!("guess {i}"))]).await;
            assert_eq!(again.status(), 401, "after the wait the attempt is checked");
        } else {
            assert_eq!(response.status(), 401);
        }
    }
    assert!(waits.len() >= 4, "{waits:?}");
    assert!(waits.windows(2).all(|w| w[1] > w[0]), "growing: {waits:?}");
    let limited = client.post_form("/login", &[("name", "admin"), ("password", ADMIN_PASSWORD)]).await;
    assert_eq!(limited.status(), 429, "even the right password waits on this address");
    assert!(session_cookie(&limited).is_none());
    let wait = limited.headers()["retry-after"].to_str().unwrap().parse::<i64>().unwrap();
    h.clock.advance(Duration::seconds(wait));
    assert_eq!(client.post_form("/login", &[("name", "admin"), ("password", ADMIN_PASSWORD)]).await.status(), 303);
}

#[tokio::test]
async fn a_cookie_replayed_after_logout_or_a_password_change_or_a_removal_is_refused() {
    let h = start(Options::default()).await;
    let alice = Client::login_as(h.addr, ALICE, ALICE_PASSWORD).await;
    let token = alice.csrf().await;
    let logout = alice.post_form("/logout", &[("csrf", &token)]).await;
    assert_eq!(logout.status(), 303);
    assert!(logout.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    assert_eq!(alice.get("/").await.status(), 303, "the old cookie reads nothing");
    let retry = format!("/jobs/{}/retry", h.dead_job);
    assert_eq!(alice.post_form(&retry, &[("csrf", &token), ("confirm", "yes")]).await.status(), 401);
    assert_eq!(
        h.store.jobs_for_subscription(SUB, 10).await.unwrap().iter().find(|j| j.id == h.dead_job).unwrap().state,
        JobState::Dead
    );

    let alice = Client::login_as(h.addr, ALICE, ALICE_PASSWORD).await;
    let other = Client::login_as(h.addr, ALICE, ALICE_PASSWORD).await;
    let bob = Client::login_as(h.addr, BOB, BOB_PASSWORD).await;
    let new_hash = mindroom_billing_console::hash_password("alice: a new password").unwrap();
    assert!(h.store.set_operator_password(ALICE, &new_hash, h.billing.now()).await.unwrap());
    assert_eq!(alice.get("/").await.status(), 303, "ended by the password change");
    assert_eq!(other.get("/").await.status(), 303, "every session of alice");
    assert_eq!(bob.get("/").await.status(), 200, "bob's session lives on");
    let old = Client::new(h.addr).post_form("/login", &[("name", ALICE), ("password", ALICE_PASSWORD)]).await;
    assert_eq!(old.status(), 401, "the old password is refused");
    Client::login_as(h.addr, ALICE, "alice: a new password").await;

    assert!(h.store.remove_operator(BOB, h.billing.now()).await.unwrap());
    assert_eq!(bob.get("/").await.status(), 303, "ended by the removal");
    let gone = Client::new(h.addr).post_form("/login", &[("name", BOB), ("password", BOB_PASSWORD)]).await;
    assert_eq!(gone.status(), 401);
}

#[tokio::test]
async fn audit_rows_name_the_operator_and_refusals_are_audited() {
    let h = start(Options::default()).await;
    let alice = Client::login_as(h.addr, ALICE, ALICE_PASSWORD).await;
    let bob = Client::login_as(h.addr, BOB, BOB_PASSWORD).await;
    let token = alice.csrf().await;
    let retry = format!("/jobs/{}/retry", h.dead_job);
    assert_eq!(alice.post_form(&retry, &[("csrf", "forged"), ("confirm", "yes")]).await.status(), 403);
    let bob_token = bob.csrf().await;
    assert_eq!(bob.post_form(&retry, &[("csrf", &bob_token), ("confirm", "yes")]).await.status(), 403);
    let done = alice.post_form(&retry, &[("csrf", &token), ("confirm", "yes")]).await;
    assert_eq!(done.status(), 303);
    let audit = h.store.list_audit(None, 10).await.unwrap();
    let rows: Vec<(&str, &str, bool, &str)> =
        audit.iter().map(|a| (a.actor.as_str(), a.action.as_str(), a.ok, a.result.as_str())).collect();
    assert_eq!(
        rows,
        [
            ("alice from 127.0.0.1", "retry_job", true, "re-queued: pending, due now"),
            ("bob from 127.0.0.1", "retry_job", false, "refused: bob is read-only"),
            ("alice from 127.0.0.1", "retry_job", false, "refused: no valid CSRF token"),
            ("bob from 127.0.0.1", "login", true, "logged in"),
            ("alice from 127.0.0.1", "login", true, "logged in"),
        ]
    );
    assert_eq!(audit[0].customer_id.as_deref(), Some(CUS));
    let page = alice.page("/audit").await;
    assert!(page.contains("alice from 127.0.0.1") && page.contains("refused: bob is read-only"));
}

/// DNS rebinding and forged origins: only the configured origin, scheme included.
#[tokio::test]
async fn other_hosts_and_origins_are_refused() {
    let h = start(Options::default()).await;
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let port = h.addr.port();
    let with_host = |host: String| {
        admin
            .http
            .get(format!("{}/", admin.base))
            .header("cookie", admin.cookie.as_deref().unwrap())
            .header("host", host)
    };
    for host in [format!("evil.test:{port}"), format!("localhost:{port}"), "127.0.0.1".to_owned()] {
        let response = with_host(host.clone()).send().await.unwrap();
        assert_eq!(response.status(), 421, "Host {host}");
        assert!(!response.text().await.unwrap().contains(CUS));
    }
    assert_eq!(with_host(format!("127.0.0.1:{port}")).send().await.unwrap().status(), 200);
    let token = admin.csrf().await;
    let post = |origin: String, host: String| {
        admin
            .http
            .post(format!("{}/jobs/{}/retry", admin.base, h.dead_job))
            .header("cookie", admin.cookie.as_deref().unwrap())
            .header("origin", origin)
            .header("host", host)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("csrf={token}&confirm=yes"))
    };
    let evil = format!("evil.test:{port}");
    let own = format!("127.0.0.1:{port}");
    for (origin, host) in [
        (format!("http://{evil}"), evil.clone()),
        (format!("https://{own}"), own.clone()),
        (format!("http://{evil}"), own.clone()),
        ("null".to_owned(), own.clone()),
    ] {
        let response = post(origin.clone(), host.clone()).send().await.unwrap();
        assert!(matches!(response.status().as_u16(), 403 | 421), "Origin {origin} Host {host}: {}", response.status());
    }
    let job = h.store.jobs_for_subscription(SUB, 10).await.unwrap().into_iter().find(|j| j.id == h.dead_job).unwrap();
    assert_eq!(job.state, JobState::Dead, "nothing acted");
    assert_eq!(post(format!("http://{own}"), own).send().await.unwrap().status(), 303, "its own origin acts");
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
    let audit = h.store.list_audit(None, 10).await.unwrap();
    assert!(audit.iter().all(|a| !a.ok || a.action == "login"), "nothing acted");
    assert!(audit.iter().any(|a| a.result == "refused: no valid CSRF token"), "the refusals are audited");

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
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let token = admin.csrf().await;
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
    let grace = format!("/customers/{}", support::GRACE_CUS);
    for q in ["grace.hop", "HOPPER%40EXAMPLE", support::GRACE_INVOICE] {
        let response = admin.get(&format!("/search?q={q}")).await;
        assert_eq!(response.status(), 303, "search {q}");
        assert_eq!(response.headers()["location"], grace.as_str(), "search {q}");
    }
    let by_reference = admin.get("/search?q=ref%3C%2Fb").await;
    assert_eq!(by_reference.headers()["location"], customer.as_str(), "part of the reference");
    let both = admin.page("/search?q=e").await;
    assert!(both.contains(support::GRACE_EMAIL) && both.contains(CUS), "several: listed");
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
    assert!(failed.contains(r#"<a href="/customers/cus_Evil1">cus_Evil1</a>"#), "the customer column");
    let front = admin.page("/").await;
    assert!(front.contains(r#"<dd id="failed-count"><a href="/events/failed">1</a>"#), "{front}");
    assert!(front.contains(r#"<dd id="dead-count"><a href="/jobs/dead">1</a>"#), "{front}");
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
    assert_eq!(replayed.status(), 303, "POST/redirect/GET");
    let location = replayed.headers()["location"].to_str().unwrap().to_owned();
    let text = admin.page(&location).await;
    assert!(text.contains("disposition applied; the event is applied now"), "{text}");
    assert_eq!(admin.page(&location).await, text, "a refresh shows the result again");
    assert_eq!(h.store.list_audit(Some(CUS), 10).await.unwrap().len(), 1, "and does not act again");
    assert_eq!(h.store.load_event(FAILED_EVENT).await.unwrap().unwrap().status, EventStatus::Applied);
    let again = admin.act("/events/evt_failed_1/replay", &token).await;
    assert!(again.contains("disposition duplicate"), "a done event is not applied twice");

    let retry = format!("/jobs/{}/retry", h.dead_job);
    let retried = admin.act(&retry, &token).await;
    assert!(retried.contains("re-queued"), "{retried}");
    let jobs = h.store.jobs_for_subscription(SUB, 10).await.unwrap();
    let job = jobs.iter().find(|j| j.id == h.dead_job).unwrap();
    assert_eq!((job.state, job.run_after), (JobState::Pending, h.billing.now()));
    let twice = admin.act(&retry, &token).await;
    assert!(
        twice.contains(r#"class="failed""#) && twice.contains("the job is not dead"),
        "a job that is not dead is not retried"
    );

    let reconcile = admin.act(&format!("/subscriptions/{SUB}/reconcile"), &token).await;
    assert!(reconcile.contains("the Stripe API is not configured") && reconcile.contains(r#"class="failed""#));

    let audit = h.store.list_audit(Some(CUS), 10).await.unwrap();
    let rows: Vec<(&str, &str, bool)> = audit.iter().map(|a| (a.action.as_str(), a.target.as_str(), a.ok)).collect();
    let job_id = h.dead_job.to_string();
    assert_eq!(
        rows,
        [
            ("reconcile", SUB, false),
            ("retry_job", job_id.as_str(), false),
            ("retry_job", job_id.as_str(), true),
            ("replay", FAILED_EVENT, true),
            ("replay", FAILED_EVENT, true),
        ]
    );
    assert!(audit.iter().all(|a| a.actor == "admin from 127.0.0.1" && a.at == h.billing.now()));
    let all = h.store.list_audit(None, 10).await.unwrap();
    let refused = all.iter().find(|a| a.action == "retry_job" && !a.ok).expect("the refused retry is audited too");
    assert_eq!(refused.customer_id.as_deref(), Some(CUS), "on its customer's page too");
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
    let audit = h.store.list_audit(None, 10).await.unwrap();
    let refusals: Vec<&str> = audit.iter().filter(|a| a.action != "login").map(|a| a.result.as_str()).collect();
    assert_eq!(refusals, ["refused: readonly is read-only"; 3], "every refusal is audited");
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
    let fixed = admin.act(&reconcile, &token).await;
    assert!(fixed.contains("drift fixed: status, grace"));
    let drift = h.store.list_drift(Some(SUB), 10).await.unwrap();
    let fields: Vec<(&str, &str)> = drift.iter().map(|d| (d.field.as_str(), d.before.as_str())).collect();
    assert_eq!(fields, [("grace", "-"), ("status", "active")], "past_due opens a grace period");
    assert!(admin.page("/grace").await.contains(SUB), "now in grace");
    assert!(admin.page("/drift").await.contains("past_due"));
    assert!(admin.page("/customers/cus_Evil1").await.contains("past_due"));

    let again = admin.act(&reconcile, &token).await;
    assert!(again.contains("in sync with Stripe"));
    assert!(h.store.list_drift(None, 10).await.unwrap().is_empty(), "the last reconciliation found none");
    let audit = h.store.list_audit(Some(CUS), 10).await.unwrap();
    assert_eq!(
        audit.iter().map(|a| (a.action.as_str(), a.ok)).collect::<Vec<_>>(),
        [("reconcile", true), ("reconcile", true)]
    );
}

/// In real headless Chromium: log in as a named operator, find a customer by part of an e-mail,
/// read why its instance is gone, open the failed event of another, replay it, retry a dead job,
/// log out and see the old cookie refused; screenshots of the customer pages and the lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_a_named_operator_finds_reads_why_acts_and_logs_out() {
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
    shoot("login.png").await;
    c.find(Locator::Css("input[name=name]")).await.unwrap().send_keys(ALICE).await.unwrap();
    c.find(Locator::Css("input[name=password]")).await.unwrap().send_keys(ALICE_PASSWORD).await.unwrap();
    c.find(Locator::Css("form.login button")).await.unwrap().click().await.unwrap();
    let search = c.wait().for_element(Locator::Css("form.search-big input[name=q]")).await.unwrap();
    let who = c.find(Locator::Css("header .role")).await.unwrap().text().await.unwrap();
    assert!(who.contains(ALICE), "the header names the operator: {who}");
    shoot("front.png").await;

    // Part of an e-mail finds the customer whose grace expired; the page starts with why.
    search.send_keys("grace.hop").await.unwrap();
    c.find(Locator::Css("form.search-big button")).await.unwrap().click().await.unwrap();
    let why = c.wait().for_element(Locator::Css("p.why")).await.unwrap().text().await.unwrap();
    assert!(c.current_url().await.unwrap().as_str().ends_with(&format!("/customers/{}", support::GRACE_CUS)));
    assert!(
        why.contains(&format!("No instance: invoice {} ($50.00) failed on 15 Jul 2026", support::GRACE_INVOICE))
            && why.contains("the 7-day grace ended on 22 Jul 2026; deprovisioned on 25 Jul 2026 (job"),
        "{why}"
    );
    shoot("customer-grace-expired.png").await;

    // The other customer: escaped values, the failed event replayed (POST, then the result page).
    c.goto(&format!("{base}/customers/cus_Evil1")).await.unwrap();
    let email = c.wait().for_element(Locator::Css("dd.email")).await.unwrap().text().await.unwrap();
    assert_eq!(email, EVIL_EMAIL, "shown as text; no script ran (an alert would have failed every command)");
    shoot("customer.png").await;
    for (path, name) in [
        ("/events/failed", "failed-events.png"),
        ("/jobs/dead", "dead-jobs.png"),
        ("/grace", "grace.png"),
        ("/drift", "drift.png"),
    ] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        shoot(name).await;
    }
    c.goto(&format!("{base}/customers/cus_Evil1")).await.unwrap();
    c.find(Locator::LinkText(FAILED_EVENT)).await.unwrap().click().await.unwrap();
    let disposition = c.wait().for_element(Locator::Id("disposition")).await.unwrap();
    assert_eq!(disposition.text().await.unwrap(), "failed");
    shoot("failed-event.png").await;
    c.find(Locator::Id("confirm")).await.unwrap().click().await.unwrap();
    c.find(Locator::Id("replay")).await.unwrap().click().await.unwrap();
    let result = c.wait().for_element(Locator::Id("result")).await.unwrap();
    assert!(result.text().await.unwrap().contains("disposition applied"));
    assert!(c.current_url().await.unwrap().as_str().contains("/result?"), "redirected to the result");
    c.refresh().await.unwrap();
    c.wait().for_element(Locator::Id("result")).await.unwrap();
    c.find(Locator::Id("back")).await.unwrap().click().await.unwrap();
    let disposition = c.wait().for_element(Locator::Id("disposition")).await.unwrap();
    assert_eq!(disposition.text().await.unwrap(), "applied", "the disposition changed");

    // Retry the dead job from the list.
    c.goto(&format!("{base}/jobs/dead")).await.unwrap();
    c.find(Locator::Css("form.action input[name=confirm]")).await.unwrap().click().await.unwrap();
    c.find(Locator::Css("form.action button")).await.unwrap().click().await.unwrap();
    let result = c.wait().for_element(Locator::Id("result")).await.unwrap().text().await.unwrap();
    assert!(result.contains("re-queued"), "{result}");
    c.goto(&format!("{base}/customers/cus_Evil1")).await.unwrap();
    shoot("customer-after-actions.png").await;
    let audit = h.store.list_audit(Some(CUS), 10).await.unwrap();
    let rows: Vec<(&str, &str)> = audit.iter().map(|a| (a.actor.as_str(), a.action.as_str())).collect();
    assert_eq!(
        rows,
        [("alice from 127.0.0.1", "retry_job"), ("alice from 127.0.0.1", "replay")],
        "a refresh acted once"
    );

    // Log out; the old cookie is refused.
    let old = c.get_named_cookie(mindroom_billing_console::SESSION_COOKIE).await.unwrap().value().to_owned();
    c.find(Locator::Css("form.logout button")).await.unwrap().click().await.unwrap();
    c.wait().for_element(Locator::Css("form.login")).await.unwrap();
    let mut replayed = Client::new(h.addr);
    replayed.cookie = Some(format!("{}={old}", mindroom_billing_console::SESSION_COOKIE));
    let response = replayed.get("/customers/cus_Evil1").await;
    assert_eq!(response.status(), 303, "the old cookie after logout");
    assert_eq!(response.headers()["location"], "/login");
    browser.client.clone().close().await.unwrap();
}

/// The customer page starts with why: for the customer whose grace expired, the invoice, its
/// amount, the dates and the job that deprovisioned; jobs are named by operation; invoice events
/// show their invoice and amount.
#[tokio::test]
async fn the_customer_page_says_why_and_names_jobs_by_operation() {
    let h = start(Options::default()).await;
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let page = admin.page(&format!("/customers/{}", support::GRACE_CUS)).await;
    let jobs = h.store.jobs_for_subscription(support::GRACE_SUB, 20).await.unwrap();
    let instance = h.store.load_instance(support::GRACE_SUB).await.unwrap().unwrap();
    let writer = mindroom_billing_core::explain::instance_writer(&instance, &jobs).unwrap();
    let why = format!(
        "No instance: invoice {} ($50.00) failed on 15 Jul 2026; the 7-day grace ended on 22 Jul 2026; deprovisioned \
         on 25 Jul 2026 (job {}).",
        support::GRACE_INVOICE,
        writer.id
    );
    let why_at = page.find(&why).unwrap_or_else(|| panic!("the why sentence in {page}"));
    assert!(page.contains(r#"<dd class="name">Grace Hopper</dd>"#), "the customer's name");
    assert!(why_at < page.find("Entitlements now").unwrap(), "at the top");
    for expected in [
        "<td class=\"operation\">provision</td>",
        "<td class=\"operation\">deprovision</td>",
        "e-mail: welcome",
        "e-mail: payment failed",
    ] {
        assert!(page.contains(expected), "{expected}");
    }
    assert!(!page.contains("reconcile instance"), "no job is just 'reconcile instance'");
    assert!(page.contains(&format!("{} $50.00", support::GRACE_INVOICE)), "the invoice and its amount on its event");
    let last = &page[page.find("Last provisioner call:").unwrap()..];
    assert!(
        last.starts_with("Last provisioner call: deprovision, job"),
        "the last call names its operation: {}",
        &last[..300]
    );

    let other = admin.page("/customers/cus_Evil1").await;
    assert!(other.contains("Running: active professional subscription; instance mr-console1-"), "{other}");
}

/// A job that failed and then succeeded shows its old error as history, not as the current state.
#[tokio::test]
async fn a_job_done_after_a_retry_does_not_show_its_old_error_as_current() {
    use mindroom_billing_core::{Claim, JobFinish, JobKind, JobResolution, NewJob};
    let h = start(Options::default()).await;
    let now = h.billing.now();
    let job = NewJob {
        key: "reconcile:sub_Console1:flaky".into(),
        group: Some(SUB.into()),
        kind: JobKind::Reconcile { subscription_id: SUB.into() },
        run_after: now,
    };
    h.store.enqueue(&[job]).await.unwrap();
    let claim = Claim { now, lease: Duration::seconds(30), limit: 1 };
    let first = h.store.claim_jobs(&claim).await.unwrap().remove(0);
    let retry = JobResolution::Retry { run_after: now, error: "provisioner timed out (flaky)".into() };
    let finish = |job: &mindroom_billing_core::Job, resolution| JobFinish {
        job_id: job.id,
        attempt: job.attempts,
        now,
        resolution,
        instance: None,
        enqueue: vec![],
    };
    assert!(h.store.finish_job(&finish(&first, retry)).await.unwrap());
    let second = h.store.claim_jobs(&claim).await.unwrap().remove(0);
    // The second attempt updates the instance (it is the provisioner call the page reports).
    let mut record = h.store.load_instance(SUB).await.unwrap().unwrap();
    record.updated_at = now;
    let done = JobFinish { instance: Some(record), ..finish(&second, JobResolution::Done) };
    assert!(h.store.finish_job(&done).await.unwrap());

    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let page = admin.page("/customers/cus_Evil1").await;
    assert!(page.contains("earlier attempt: provisioner timed out (flaky)"), "shown as history");
    assert!(!page.contains("<span class=\"error\">provisioner timed out"), "not as the current error");
    let last = &page[page.find("Last provisioner call:").unwrap()..];
    let last = &last[..last.find("</p>").unwrap()];
    assert!(last.contains(&format!("job {} (attempt 2), done", second.id)) && last.ends_with(": ok"), "{last}");
}

/// Long values are shortened: a 100 KB e-mail does not make the page 100 KB longer.
#[tokio::test]
async fn long_values_are_shortened_and_audit_targets_are_links() {
    use mindroom_billing_core::{AccountPatch, Commit, Outcome};
    let h = start(Options::default()).await;
    let huge = format!("{}@example.com", "a".repeat(100_000));
    let commit = Commit {
        now: h.billing.now(),
        event_id: None,
        outcome: Outcome::Applied,
        subscription: None,
        account: Some(AccountPatch {
            stripe_customer_id: CUS.into(),
            email: Some(huge.clone()),
            reference: None,
            observed_at: h.billing.now() + Duration::days(1),
        }),
        jobs: vec![],
    };
    h.store.commit(&commit).await.unwrap();
    assert_eq!(h.store.load_account(CUS).await.unwrap().unwrap().email.as_deref(), Some(huge.as_str()));
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    let page = admin.page("/customers/cus_Evil1").await;
    assert!(page.len() < 60_000, "{} bytes", page.len());
    assert!(page.contains(&format!("{}…", "a".repeat(200))));

    let token = admin.csrf().await;
    admin.act("/events/evt_failed_1/replay", &token).await;
    let audit = admin.page("/audit").await;
    assert!(audit.contains(r#"<a href="/events/evt_failed_1">evt_failed_1</a>"#), "the target is a link");
    assert!(audit.contains(r#"<a href="/customers/cus_Evil1">cus_Evil1</a>"#), "and its customer");
}

/// Lists page past 200 rows.
#[tokio::test]
async fn lists_page_past_two_hundred_rows() {
    let h = start(Options::default()).await;
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await; // its login row is the oldest
    for i in 0..250i64 {
        let entry = mindroom_billing_core::AuditEntry {
            at: h.billing.now() + Duration::seconds(i),
            actor: "seed".into(),
            action: "replay".into(),
            target: format!("evt_page_{i:03}"),
            customer_id: None,
            ok: true,
            result: "applied".into(),
        };
        h.store.record_audit(&entry).await.unwrap();
    }
    let first = admin.page("/audit").await;
    assert!(first.contains("evt_page_249") && first.contains("evt_page_050") && !first.contains("evt_page_049"));
    assert!(first.contains(r#"href="/audit?page=2""#) && !first.contains("?page=0"), "a link to the older rows");
    let second = admin.page("/audit?page=2").await;
    assert!(second.contains("evt_page_049") && second.contains("evt_page_000") && !second.contains("evt_page_050"));
    assert!(second.contains(r#"href="/audit?page=1""#) && !second.contains("?page=3"), "the last page");
    assert!(admin.page("/audit?page=junk").await.contains("evt_page_249"), "a bad page is the first");
}

/// Behind a trusted proxy every client keeps its own address (so a flood through the proxy does not
/// throttle everyone behind it); from any other peer, `X-Forwarded-For` is ignored.
#[tokio::test]
async fn behind_a_trusted_proxy_each_client_is_throttled_on_its_own_address() {
    let proxy = std::net::IpAddr::from([127, 0, 0, 1]);
    let h = start(Options { trusted_proxies: vec![proxy], ..Options::default() }).await;
    let login = |forwarded: &'static str, password: &'static str| {
        let client = Client::new(h.addr);
        async move {
            let body = format!("name=admin&password={}", urlencoding(password));
            let request = client
                .http
                .post(format!("{}/login", client.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-forwarded-for", forwarded)
                .body(body);
            request.send().await.unwrap().status().as_u16()
        }
    };
    for _ in 0..8 {
        login("10.0.0.66, 10.9.9.9", "wrong guess").await;
    }
    assert_eq!(login("10.9.9.9", "another guess").await, 429, "the guesser's address waits");
    assert_eq!(login("10.0.0.7", ADMIN_PASSWORD).await, 303, "another client behind the same proxy does not");
    let audit = h.store.list_audit(None, 20).await.unwrap();
    assert_eq!(audit[0].actor, "admin from 10.0.0.7", "the audit names the client, not the proxy");
    assert!(audit.iter().all(|a| !a.actor.contains("10.0.0.66")), "a client's own claim is ignored");

    let direct = start(Options::default()).await;
    let spoofed = Client::new(direct.addr)
        .http
        .post(format!("http://{}/login", direct.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-for", "10.1.2.3")
        .body("name=admin&password=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.status(), 401);
    let rows = direct.store.list_audit(None, 5).await.unwrap();
    assert_eq!(rows[0].actor, "admin from 127.0.0.1", "not a trusted proxy: the header is ignored");
}

/// Open disputes, earliest evidence deadline first, each with its customer, subscription, amount,
/// reason and status; a won dispute leaves the list.
#[tokio::test]
async fn open_disputes_are_listed_by_evidence_due_date() {
    let api = std::sync::Arc::new(mindroom_billing_core::stripe_api::FakeStripeApi::new());
    for charge in ["ch_late", "ch_soon"] {
        api.put_charge(mindroom_billing_core::stripe_api::RawObject {
            id: charge.into(),
            raw: format!(r#"{{"id":"{charge}","object":"charge","customer":"{CUS}"}}"#),
        });
    }
    let h = start(Options { stripe: Some(api), ..Options::default() }).await;
    let admin = Client::login(h.addr, ADMIN_PASSWORD).await;
    assert!(admin.page("/disputes").await.contains("No dispute is open"));
    let opened = support::t0().timestamp();
    let dispute = |id: &str, charge: &str, status: &str, due_days: i64, reason: &str| {
        let body = format!(
            r#"{{"id":"evt_{id}_{status}","object":"event","created":{opened},"type":"charge.dispute.created","data":{{"object":{{"id":"{id}","object":"dispute","amount":4900,"currency":"usd","charge":"{charge}","created":{opened},"reason":"{reason}","status":"{status}","evidence_details":{{"due_by":{due}}}}}}}}}"#,
            due = opened + due_days * 86_400
        );
        mindroom_billing_core::parse(body.as_bytes()).unwrap()
    };
    h.billing.apply(&dispute("dp_late", "ch_late", "needs_response", 9, "fraudulent")).await.unwrap();
    h.billing.apply(&dispute("dp_soon", "ch_soon", "warning_needs_response", 2, "<b>general</b>")).await.unwrap();
    let page = admin.page("/disputes").await;
    let (soon, late) = (page.find("dp_soon").unwrap(), page.find("dp_late").unwrap());
    assert!(soon < late, "earliest evidence deadline first:\n{page}");
    for expected in [SUB, CUS, "$49.00", "fraudulent", "needs_response", "warning_needs_response", "&lt;b&gt;general"] {
        assert!(page.contains(expected), "{expected} on the disputes page:\n{page}");
    }
    assert!(!page.contains("<b>general"), "escaped");
    let due = (support::t0() + Duration::days(2)).format("%Y-%m-%d %H:%M").to_string();
    assert!(page.contains(&due), "{due}:\n{page}");
    let mut won = dispute("dp_soon", "ch_soon", "won", 2, "general");
    won.created += Duration::days(1);
    h.billing.apply(&won).await.unwrap();
    let page = admin.page("/disputes").await;
    assert!(!page.contains("dp_soon") && page.contains("dp_late"), "{page}");
}
