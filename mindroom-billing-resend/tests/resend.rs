//! The Resend notifier against a local stub of the Resend API: request shape and headers, the
//! idempotency key, retryable vs permanent classification, and secret redaction.

use std::time::{Duration, Instant};

use mindroom_billing_core::ports::{Message, Notification, Notifier, NotifyError};
use mindroom_billing_core::tier::Tier;
use mindroom_billing_resend::{ResendConfig, ResendNotifier, render};
use serde_json::json;

const KEY: &str = "re_SUPERSECRET_abcdef0123456789";
const FROM: &str = "MindRoom <billing@mindroom.chat>";

#[path = "../../testsupport/stub_http.rs"]
mod stub;

use stub::{Reply, Stub};

fn notifier(url: &str) -> ResendNotifier {
    ResendNotifier::new(ResendConfig::new(KEY, FROM).with_base_url(url).with_timeout(Duration::from_millis(500)))
        .unwrap()
}

fn welcome() -> Notification {
    Notification {
        to: "ada@example.com".into(),
        message: Message::Welcome { tier: Tier::Starter, instance_url: Some("https://mr-1.mindroom.chat".into()) },
        idempotency_key: "email:welcome:sub_1:1".into(),
    }
}

fn assert_no_key(e: &NotifyError) {
    let text = format!("{e} {e:?}");
    assert!(!text.contains(KEY), "API key leaked: {text}");
}

async fn send_with(reply: impl Fn() -> Reply + Send + Sync + 'static) -> (Result<(), NotifyError>, Stub) {
    let stub = Stub::start(move |_, _| reply()).await;
    let result = notifier(&stub.url).send(&welcome()).await;
    (result, stub)
}

#[tokio::test]
async fn request_shape_headers_and_idempotency_key() {
    let stub = Stub::start(|_, _| Reply::json(200, json!({"id": "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"}))).await;
    // A trailing slash in the base URL is handled.
    let n = ResendNotifier::new(ResendConfig::new(KEY, FROM).with_base_url(format!("{}/", stub.url))).unwrap();
    n.send(&welcome()).await.unwrap();
    // A retried job sends the same key again (Resend then answers without sending twice).
    n.send(&welcome()).await.unwrap();

    let seen = stub.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/emails"));
        assert_eq!(r.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
        assert_eq!(r.header("idempotency-key"), Some("email:welcome:sub_1:1"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        let email = render(&welcome().message);
        assert_eq!(
            r.json(),
            json!({
                "from": FROM,
                "to": ["ada@example.com"],
                "subject": email.subject,
                "text": email.text,
                "html": email.html,
            })
        );
    }
    assert!(seen[0].json()["text"].as_str().unwrap().contains("https://mr-1.mindroom.chat"));
}

#[tokio::test]
async fn every_message_kind_is_sent_with_its_template() {
    let stub = Stub::start(|_, _| Reply::json(200, json!({"id": "x"}))).await;
    let n = notifier(&stub.url);
    let messages = [
        Message::PaymentFailed {
            amount_due: 4900,
            currency: "usd".into(),
            grace_deadline: None,
            update_payment_url: None,
        },
        Message::GraceExpired,
        Message::TrialEnding { trial_end: None },
        Message::Cancellation,
        Message::AdminAlert { subject: "Provisioning failed".into(), detail: "<b>503</b>".into() },
    ];
    for (i, message) in messages.iter().enumerate() {
        let key = format!("k{i}");
        n.send(&Notification { to: "ops@example.com".into(), message: message.clone(), idempotency_key: key })
            .await
            .unwrap();
    }
    let seen = stub.requests();
    assert_eq!(seen.len(), messages.len());
    for (i, (r, message)) in seen.iter().zip(&messages).enumerate() {
        assert_eq!(r.header("idempotency-key"), Some(format!("k{i}").as_str()));
        assert_eq!(r.json()["subject"], render(message).subject);
    }
    assert!(seen[4].json()["html"].as_str().unwrap().contains("&lt;b&gt;503&lt;/b&gt;"));
}

#[tokio::test]
async fn retryable_failures() {
    for status in [500u16, 502, 503, 429, 408] {
        let (result, _) = send_with(move || Reply::json(status, json!({"name": "x", "message": "try later"}))).await;
        let e = result.unwrap_err();
        assert!(matches!(e, NotifyError::Retryable(_)), "{status}: {e}");
        assert!(e.to_string().contains(&status.to_string()) && e.to_string().contains("try later"), "{e}");
        assert_no_key(&e);
    }
    let (result, _) = send_with(|| Reply::text(429, "").with_header("Retry-After", "5")).await;
    let e = result.unwrap_err();
    assert!(matches!(e, NotifyError::Retryable(_)) && e.to_string().ends_with("HTTP 429 Too Many Requests"), "{e}");
    let (result, _) = send_with(|| {
        Reply::json(409, json!({"statusCode": 409, "name": "concurrent_idempotent_requests", "message": "in progress"}))
    })
    .await;
    assert!(matches!(result, Err(NotifyError::Retryable(_))), "{result:?}");
}

#[tokio::test]
async fn slow_closed_and_refused_are_retryable() {
    let (result, _) = send_with(|| Reply::Slow(Duration::from_secs(3), Box::new(Reply::json(200, json!({}))))).await;
    let e = result.unwrap_err();
    assert!(matches!(e, NotifyError::Retryable(_)) && e.to_string().contains("timed out"), "{e}");
    assert_no_key(&e);

    let (result, _) = send_with(|| Reply::Close).await;
    let e = result.unwrap_err();
    assert!(matches!(e, NotifyError::Retryable(_)), "{e}");
    assert_no_key(&e);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let started = Instant::now();
    let e = notifier(&url).send(&welcome()).await.unwrap_err();
    assert!(matches!(e, NotifyError::Retryable(_)) && e.to_string().contains("connect"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn client_errors_are_permanent() {
    for status in [400u16, 401, 403, 404, 422] {
        let (result, _) = send_with(move || {
            Reply::json(status, json!({"name": "validation_error", "message": format!("bad key {KEY}")}))
        })
        .await;
        let e = result.unwrap_err();
        assert!(matches!(e, NotifyError::Permanent(_)), "{status}: {e}");
        assert!(e.to_string().contains("validation_error") && e.to_string().contains("[redacted]"), "{e}");
        assert_no_key(&e);
    }
    let (result, _) = send_with(|| {
        Reply::json(409, json!({"name": "invalid_idempotent_request", "message": "same key, different payload"}))
    })
    .await;
    assert!(matches!(result, Err(NotifyError::Permanent(_))), "{result:?}");
}

#[tokio::test]
async fn bad_notifications_are_permanent_without_a_request() {
    let stub = Stub::start(|_, _| Reply::json(200, json!({}))).await;
    let n = notifier(&stub.url);
    let mut no_recipient = welcome();
    no_recipient.to = " ".into();
    assert!(matches!(n.send(&no_recipient).await, Err(NotifyError::Permanent(_))));
    let mut long_key = welcome();
    long_key.idempotency_key = "k".repeat(257);
    assert!(matches!(n.send(&long_key).await, Err(NotifyError::Permanent(_))));
    assert!(stub.requests().is_empty());
}

#[test]
fn debug_output_redacts_the_api_key() {
    let config = ResendConfig::new(KEY, FROM).with_base_url("http://127.0.0.1:9");
    let text = format!("{config:?} {config:#?}");
    assert!(!text.contains(KEY), "{text}");
    assert!(text.contains("billing@mindroom.chat"), "{text}");
    let n = ResendNotifier::new(config).unwrap();
    let text = format!("{n:?} {n:#?}");
    assert!(!text.contains(KEY), "{text}");
}

#[test]
fn construction_is_validated() {
    assert!(ResendNotifier::new(ResendConfig::new("", FROM)).is_err());
    assert!(ResendNotifier::new(ResendConfig::new(KEY, "")).is_err());
    assert!(ResendNotifier::new(ResendConfig::new(KEY, FROM).with_base_url("not a url")).is_err());
    assert_eq!(
        ResendNotifier::new(ResendConfig::new(KEY, FROM)).unwrap().config().base_url(),
        "https://api.resend.com"
    );
}
