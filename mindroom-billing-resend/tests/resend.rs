//! The Resend notifier against a local stub of the Resend API: request shape and headers, the
//! idempotency key, retryable vs permanent classification, and secret redaction.

use std::time::{Duration, Instant};

use mindroom_billing_core::ports::{Message, Notification, Notifier, NotifyError};
use mindroom_billing_core::tier::Tier;
use mindroom_billing_resend::{ResendConfig, ResendNotifier, render};
use serde_json::json;

const KEY: &str = "re_SUPERSECRET_abcdef0123456789";
const FROM: &str = "MindRoom <billing@mindroom.chat>";

/// A tiny HTTP/1.1 server on 127.0.0.1:0 that records every request and answers from a script.
mod stub {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A request as the stub saw it.
    #[derive(Debug, Clone)]
    pub(crate) struct Recorded {
        pub(crate) method: String,
        pub(crate) path: String,
        pub(crate) headers: Vec<(String, String)>,
        pub(crate) body: Vec<u8>,
    }

    impl Recorded {
        pub(crate) fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }

        pub(crate) fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("request body is JSON")
        }
    }

    /// What the stub does with a request.
    pub(crate) enum Reply {
        Respond { status: u16, headers: Vec<(&'static str, String)>, body: String },
        Slow(Duration, Box<Reply>),
        Close,
    }

    impl Reply {
        pub(crate) fn json(status: u16, body: serde_json::Value) -> Self {
            Reply::Respond {
                status,
                headers: vec![("Content-Type", "application/json".into())],
                body: body.to_string(),
            }
        }

        pub(crate) fn text(status: u16, body: &str) -> Self {
            Reply::Respond { status, headers: Vec::new(), body: body.into() }
        }

        pub(crate) fn with_header(self, name: &'static str, value: impl Into<String>) -> Self {
            match self {
                Reply::Respond { status, mut headers, body } => {
                    headers.push((name, value.into()));
                    Reply::Respond { status, headers, body }
                }
                other => other,
            }
        }
    }

    type Handler = dyn Fn(&Recorded, usize) -> Reply + Send + Sync;

    pub(crate) struct Stub {
        pub(crate) url: String,
        requests: Arc<Mutex<Vec<Recorded>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Stub {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Stub {
        /// Starts a stub; the handler gets each request and its index (0-based, in arrival order).
        pub(crate) async fn start(handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let requests = Arc::new(Mutex::new(Vec::new()));
            let handler: Arc<Handler> = Arc::new(handler);
            let recorded = Arc::clone(&requests);
            let task = tokio::spawn(async move {
                loop {
                    let Ok((socket, _)) = listener.accept().await else { return };
                    let handler = Arc::clone(&handler);
                    let recorded = Arc::clone(&recorded);
                    tokio::spawn(async move { serve(socket, &*handler, &recorded).await });
                }
            });
            Self { url, requests, task }
        }

        pub(crate) fn requests(&self) -> Vec<Recorded> {
            self.requests.lock().unwrap().clone()
        }
    }

    async fn serve(mut socket: TcpStream, handler: &Handler, recorded: &Mutex<Vec<Recorded>>) {
        let Some(request) = read_request(&mut socket).await else { return };
        let index = {
            let mut all = recorded.lock().unwrap();
            all.push(request.clone());
            all.len() - 1
        };
        let mut reply = handler(&request, index);
        while let Reply::Slow(delay, inner) = reply {
            tokio::time::sleep(delay).await;
            reply = *inner;
        }
        match reply {
            Reply::Close | Reply::Slow(..) => drop(socket),
            Reply::Respond { status, headers, body } => {
                let mut out =
                    format!("HTTP/1.1 {status} Stub\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                for (name, value) in headers {
                    out.push_str(&format!("{name}: {value}\r\n"));
                }
                out.push_str("\r\n");
                out.push_str(&body);
                let _ = socket.write_all(out.as_bytes()).await;
                let _ = socket.shutdown().await;
            }
        }
    }

    async fn read_request(socket: &mut TcpStream) -> Option<Recorded> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
        let mut lines = head.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?.to_owned();
        let path = first.next()?.to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize =
            headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().unwrap_or(0));
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < length {
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some(Recorded { method, path, headers, body })
    }
}

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
