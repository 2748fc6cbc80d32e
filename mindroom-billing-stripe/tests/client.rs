//! The Stripe API client against a local stub of the Stripe API that speaks its list contract:
//! paging, byte-exact raw JSON, retries on 429 / 5xx / slowness, the rate limiter, the wrong key,
//! `Stripe-Should-Retry`, 404 → `None`, redaction and metrics.

use std::time::Duration;

use chrono::DateTime;
use mindroom_billing_core::stripe_api::{ApiEvent, EventsQuery, StripeApi, StripeApiError};
use mindroom_billing_stripe::{RateLimit, RetryPolicy, StripeClient, StripeConfig};
use serde_json::{Value, json};

mod common;
#[path = "../../testsupport/stripe_stub.rs"]
mod stub;

use stub::{API_VERSION, Fault, StripeStub};

const KEY: &str = "sk_test_SUPERSECRET_0123456789abcdef";
const T0: i64 = 1_785_000_000;
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/stripe");

fn config(url: &str) -> StripeConfig {
    common::quick_config(url, KEY)
}

fn client(url: &str) -> StripeClient {
    StripeClient::new(config(url)).unwrap()
}

fn fixture(path: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{path}")).unwrap()
}

/// All pages of `query`, following `has_more` with `starting_after`.
async fn all_events(c: &StripeClient, mut query: EventsQuery) -> (Vec<ApiEvent>, usize) {
    let mut events = Vec::new();
    let mut pages = 0;
    loop {
        let page = c.list_events(&query).await.unwrap();
        pages += 1;
        events.extend(page.data);
        if !page.has_more {
            return (events, pages);
        }
        query.starting_after = Some(events.last().unwrap().id.clone());
    }
}

fn assert_no_key(e: &StripeApiError) {
    let text = format!("{e} {e:?}");
    assert!(!text.contains(KEY), "key leaked: {text}");
}

#[tokio::test]
async fn events_are_paged_newest_first_with_types_and_created_filters() {
    let stub = StripeStub::start(KEY).await;
    for i in 0..230i64 {
        let kind = if i % 10 == 3 { "charge.succeeded" } else { "customer.subscription.updated" };
        stub.add_event(
            &format!("evt_{i:04}"),
            kind,
            T0 + i,
            json!({"id": format!("sub_{i}"), "object": "subscription"}),
        );
    }
    let c = client(&stub.url);
    let query = EventsQuery {
        types: vec!["customer.subscription.updated".into(), "invoice.paid".into()],
        created_gte: Some(DateTime::from_timestamp(T0 + 10, 0).unwrap()),
        created_lt: None,
        starting_after: None,
        limit: 100,
    };
    let window = EventsQuery { created_lt: DateTime::from_timestamp(T0 + 20, 0), ..query.clone() };
    let (events, pages) = all_events(&c, query).await;
    let expected: Vec<String> = (10..230).rev().filter(|i| i % 10 != 3).map(|i| format!("evt_{i:04}")).collect();
    assert_eq!(events.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), expected);
    assert_eq!(pages, 2, "198 events in pages of 100");
    assert!(events.iter().all(|e| e.event_type == "customer.subscription.updated"));
    assert_eq!(events[0].created, DateTime::from_timestamp(T0 + 229, 0).unwrap());

    let requests = stub.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.method, "GET");
        assert_eq!(r.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
        assert_eq!(r.header("stripe-version"), Some(API_VERSION));
        let url = reqwest::Url::parse(&format!("http://x{}", r.path)).unwrap();
        let q: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert!(q.contains(&("types[]".into(), "customer.subscription.updated".into())), "{q:?}");
        assert!(q.contains(&("types[]".into(), "invoice.paid".into())), "{q:?}");
        assert!(q.contains(&("created[gte]".into(), (T0 + 10).to_string())), "{q:?}");
        assert!(q.contains(&("limit".into(), "100".into())), "{q:?}");
    }
    assert!(requests[1].path.contains(&format!("starting_after={}", expected[99])), "{}", requests[1].path);

    // A time window: `created[lt]` bounds it above.
    let (events, _) = all_events(&c, window).await;
    let expected: Vec<String> = (10..20).rev().filter(|i| i % 10 != 3).map(|i| format!("evt_{i:04}")).collect();
    assert_eq!(events.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), expected);
    let url = reqwest::Url::parse(&format!("http://x{}", stub.requests()[2].path)).unwrap();
    let q: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    assert!(q.contains(&("created[lt]".into(), (T0 + 20).to_string())), "{q:?}");
}

#[tokio::test]
async fn raw_event_json_is_kept_byte_for_byte() {
    let stub = StripeStub::start(KEY).await;
    // Odd spacing, key order, escapes and number spellings that any re-serialization would change.
    let odd = "{ \"type\":\"customer.updated\" ,\"id\":\"evt_odd\",\"created\":1785000001,\n  \"data\":{\"object\":\
               {\"email\":\"j\\u00e9nny@example.com\",\"n\":1.50,\"big\":12345678901234567890,\"e\":1e3}},\"z\":[ ]}";
    stub.add_event_raw(odd);
    let fixture_raws: Vec<String> = ["customer.subscription.updated", "invoice.payment_failed"]
        .iter()
        .map(|t| fixture(&format!("events/2026-07-29.dahlia/{t}.json")).trim_end().to_owned())
        .collect();
    for raw in &fixture_raws {
        stub.add_event_raw(raw);
    }
    let (events, _) = all_events(&client(&stub.url), EventsQuery::default()).await;
    let by_id = |id: &str| events.iter().find(|e| e.id == id).unwrap().raw.clone();
    assert_eq!(by_id("evt_odd"), odd);
    for raw in &fixture_raws {
        let id = serde_json::from_str::<Value>(raw).unwrap()["id"].as_str().unwrap().to_owned();
        assert_eq!(by_id(&id), *raw, "{id}");
    }
    // Newest first: the failed payment (T0+30d) before the update (T0+10d) before the odd one.
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].event_type, "invoice.payment_failed");
    assert_eq!(events[2].id, "evt_odd");
}

#[tokio::test]
async fn subscriptions_are_listed_with_every_status_and_the_latest_invoice_expanded() {
    let stub = StripeStub::start(KEY).await;
    let list: Value = serde_json::from_str(&fixture("api/subscriptions.list.expanded.json")).unwrap();
    let mut sub = list["data"][0].clone();
    let invoice = sub["latest_invoice"].take();
    stub.add_subscription(sub.clone(), Some(invoice.clone()));
    for i in 0..150 {
        let status = if i % 3 == 0 { "canceled" } else { "active" };
        stub.add_subscription(
            json!({"id": format!("sub_{i:03}"), "object": "subscription", "status": status,
                                     "created": T0 + i}),
            None,
        );
    }
    let c = client(&stub.url);
    let first = c.list_subscriptions(None).await.unwrap();
    assert_eq!(first.data.len(), 100);
    assert!(first.has_more);
    let second = c.list_subscriptions(Some(&first.data[99].id)).await.unwrap();
    assert!(!second.has_more);
    let all: Vec<_> = first.data.into_iter().chain(second.data).collect();
    assert_eq!(all.len(), 151, "canceled ones included (status=all)");
    assert_eq!(all[0].id, "sub_149");
    let fixture_sub = all.iter().find(|s| s.id == sub["id"]).unwrap();
    let parsed: Value = serde_json::from_str(&fixture_sub.raw).unwrap();
    assert_eq!(parsed["latest_invoice"], invoice, "expanded");
    let path = &stub.requests()[0].path;
    assert!(path.contains("status=all") && path.contains("limit=100"), "{path}");
    assert!(path.contains("expand%5B%5D=data.latest_invoice"), "{path}");

    let one = c.get_subscription(sub["id"].as_str().unwrap()).await.unwrap().unwrap();
    let parsed: Value = serde_json::from_str(&one.raw).unwrap();
    assert_eq!(parsed["latest_invoice"]["id"], invoice["id"], "expanded on the single GET too");
}

#[tokio::test]
async fn unknown_ids_are_none_and_known_customers_are_returned() {
    let stub = StripeStub::start(KEY).await;
    let customer: Value = serde_json::from_str(&fixture("objects/customer.json")).unwrap();
    stub.add_customer(customer.clone());
    let c = client(&stub.url);
    assert_eq!(c.get_subscription("sub_missing").await.unwrap(), None);
    assert_eq!(c.get_customer("cus_missing").await.unwrap(), None);
    let found = c.get_customer(customer["id"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!(serde_json::from_str::<Value>(&found.raw).unwrap(), customer);
    assert_eq!(stub.requests().len(), 3, "a 404 is an answer, not retried");
    // An id that is not a Stripe id never reaches the wire.
    assert!(matches!(c.get_customer("../v1/charges").await, Err(StripeApiError::Invalid(_))));
    assert_eq!(stub.requests().len(), 3);
}

#[tokio::test]
async fn a_disputed_charge_is_read_for_its_customer() {
    let stub = StripeStub::start(KEY).await;
    let charge =
        serde_json::json!({"id": "ch_3PgcA1B7WZ01zgkW0fdqL6I", "object": "charge", "customer": "cus_QXg1o8vcGmoR32"});
    stub.add_charge(charge.clone());
    let c = client(&stub.url);
    assert_eq!(c.get_charge("ch_missing").await.unwrap(), None);
    let found = c.get_charge("ch_3PgcA1B7WZ01zgkW0fdqL6I").await.unwrap().unwrap();
    assert_eq!(found.id, "ch_3PgcA1B7WZ01zgkW0fdqL6I");
    let customer = mindroom_billing_core::event::parse_charge_customer(&found.raw).unwrap();
    assert_eq!(customer.as_deref(), Some("cus_QXg1o8vcGmoR32"));
    assert_eq!(stub.requests()[1].path, "/v1/charges/ch_3PgcA1B7WZ01zgkW0fdqL6I");
}

#[tokio::test]
async fn rate_limits_then_server_errors_then_a_slow_answer_still_succeed() {
    let stub = StripeStub::start(KEY).await;
    stub.add_customer(json!({"id": "cus_1", "object": "customer", "email": "a@example.com"}));
    stub.fail_next(Fault::RateLimited { retry_after: None }, 2);
    stub.fail_next(Fault::RateLimited { retry_after: Some(1) }, 1);
    stub.fail_next(Fault::RateLimited { retry_after: None }, 2);
    stub.fail_next(Fault::ServerError, 2);
    stub.fail_next(Fault::Slow(Duration::from_millis(300)), 1);
    let found = client(&stub.url).get_customer("cus_1").await.unwrap();
    assert_eq!(found.unwrap().id, "cus_1");
    let requests = stub.requests();
    assert_eq!(requests.len(), 8, "5 × 429, 2 × 500, then the slow answer");
    // `Retry-After: 1` on the third answer was honoured before the fourth request.
    let gap = requests[3].at.duration_since(requests[2].at);
    assert!(gap >= Duration::from_secs(1), "{gap:?}");
}

#[tokio::test]
async fn retries_are_bounded_and_end_unavailable() {
    let stub = StripeStub::start(KEY).await;
    stub.fail_next(Fault::ServerError, 10);
    let c = StripeClient::new(config(&stub.url).with_retry(RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
    }))
    .unwrap();
    let e = c.get_customer("cus_1").await.unwrap_err();
    assert!(matches!(e, StripeApiError::Unavailable(_)) && e.is_retryable(), "{e}");
    assert!(e.to_string().contains("500") && e.to_string().contains("3 attempts"), "{e}");
    assert_eq!(stub.requests().len(), 3);

    // No server at all: connection errors are retried the same way.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let e = StripeClient::new(config(&url).with_retry(RetryPolicy {
        max_attempts: 2,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
    }))
    .unwrap()
    .get_customer("cus_1")
    .await
    .unwrap_err();
    assert!(matches!(e, StripeApiError::Unavailable(_)) && e.to_string().contains("connect"), "{e}");
}

#[tokio::test]
async fn the_request_rate_never_exceeds_the_limiter() {
    let stub = StripeStub::start(KEY).await;
    stub.add_customer(json!({"id": "cus_1", "object": "customer"}));
    // Retries go through the limiter too.
    stub.fail_next(Fault::ServerError, 3);
    let limit = RateLimit { per_second: 5.0, burst: 2 };
    let c = StripeClient::new(config(&stub.url).with_rate_limit(limit)).unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    c.get_customer("cus_1").await.unwrap().unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let arrivals: Vec<_> = stub.requests().iter().map(|r| r.at).collect();
    assert_eq!(arrivals.len(), 23);
    // The most requests that arrived within any one second (windows starting at each arrival).
    let most = arrivals
        .iter()
        .map(|start| {
            arrivals.iter().filter(|t| **t >= *start && t.duration_since(*start) < Duration::from_secs(1)).count()
        })
        .max()
        .unwrap();
    let allowed = 5 + 2;
    assert!(most <= allowed, "{most} requests within one second; the limiter allows {allowed}");
}

#[tokio::test]
async fn a_wrong_key_is_one_unauthorized_error_naming_the_variable() {
    let stub = StripeStub::start("sk_test_the_right_one").await;
    let e = client(&stub.url).list_events(&EventsQuery::default()).await.unwrap_err();
    assert!(matches!(e, StripeApiError::Unauthorized(_)) && !e.is_retryable(), "{e}");
    assert!(e.to_string().contains("STRIPE_SECRET_KEY") && e.to_string().contains("401"), "{e}");
    assert_no_key(&e);
    assert_eq!(stub.requests().len(), 1, "no retries");

    let stub = StripeStub::start(KEY).await;
    stub.fail_next(Fault::Status { status: 403, should_retry: Some(true) }, 5);
    let e = client(&stub.url).get_customer("cus_1").await.unwrap_err();
    assert!(matches!(e, StripeApiError::Unauthorized(_)) && e.to_string().contains("STRIPE_SECRET_KEY"), "{e}");
    assert_eq!(stub.requests().len(), 1, "no retries");
}

#[tokio::test]
async fn stripe_should_retry_is_honoured() {
    let stub = StripeStub::start(KEY).await;
    stub.add_customer(json!({"id": "cus_1", "object": "customer"}));
    let c = client(&stub.url);

    // `true` retries even a 409.
    stub.fail_next(Fault::Status { status: 409, should_retry: Some(true) }, 2);
    assert!(c.get_customer("cus_1").await.unwrap().is_some());
    assert_eq!(stub.requests().len(), 3);

    // Without the header a 409 is permanent.
    stub.fail_next(Fault::Status { status: 409, should_retry: None }, 1);
    let e = c.get_customer("cus_1").await.unwrap_err();
    assert!(matches!(e, StripeApiError::Invalid(_)) && e.to_string().contains("409"), "{e}");
    assert_eq!(stub.requests().len(), 4);

    // `false` stops even a 500 or a 429.
    for status in [500, 429] {
        stub.fail_next(Fault::Status { status, should_retry: Some(false) }, 1);
        let e = c.get_customer("cus_1").await.unwrap_err();
        assert!(matches!(e, StripeApiError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("Stripe-Should-Retry: false"), "{e}");
    }
    assert_eq!(stub.requests().len(), 6);
}

#[tokio::test]
async fn debug_and_errors_never_show_the_key() {
    let stub = StripeStub::start(KEY).await;
    let config = config(&stub.url);
    let c = StripeClient::new(config.clone()).unwrap();
    let text = format!("{config:?} {config:#?} {c:?} {c:#?}");
    assert!(!text.contains(KEY) && !text.contains("SUPERSECRET"), "{text}");
    assert!(text.contains(API_VERSION) && text.contains("[redacted]"), "{text}");
    // A server echoing the key in an error body gets it masked.
    let echo = StripeStub::start("sk_test_other").await;
    let e = client(&echo.url).get_customer("cus_1").await.unwrap_err();
    assert_no_key(&e);
}

#[test]
fn requests_and_latency_are_counted_per_endpoint_and_status() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let stub = StripeStub::start(KEY).await;
            stub.add_customer(json!({"id": "cus_1", "object": "customer"}));
            stub.fail_next(Fault::ServerError, 1);
            let c = client(&stub.url);
            c.get_customer("cus_1").await.unwrap();
            c.get_subscription("sub_missing").await.unwrap();
            c.list_events(&EventsQuery::default()).await.unwrap();
        });
    });
    let text = handle.render();
    for line in [
        r#"billing_stripe_api_requests_total{endpoint="customer",status="500"} 1"#,
        r#"billing_stripe_api_requests_total{endpoint="customer",status="200"} 1"#,
        r#"billing_stripe_api_requests_total{endpoint="subscription",status="404"} 1"#,
        r#"billing_stripe_api_requests_total{endpoint="events",status="200"} 1"#,
        r#"billing_stripe_api_request_seconds_count{endpoint="customer"} 2"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

/// The stub itself keeps to the contract the client (and later catch-up tests) rely on.
#[tokio::test]
async fn the_stub_speaks_the_list_contract() {
    let stub = StripeStub::start(KEY).await;
    for i in 0..25i64 {
        let kind = if i % 2 == 0 { "invoice.paid" } else { "invoice.payment_failed" };
        stub.add_event(&format!("evt_{i:02}"), kind, T0 + i / 2, json!({"id": format!("in_{i}")}));
    }
    let http = reqwest::Client::new();
    let get = |query: &str, version: Option<&str>| {
        let mut request = http.get(format!("{}/v1/events?{query}", stub.url)).bearer_auth(KEY);
        if let Some(v) = version {
            request = request.header("Stripe-Version", v);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let ids = |v: &Value| {
        v["data"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    let shape: Value = serde_json::from_str(&fixture("api/events.list.json")).unwrap();

    let (status, first) = get("", Some(API_VERSION)).await;
    assert_eq!(status, 200);
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&first), keys(&shape), "same envelope as Stripe's");
    assert_eq!((first["object"].as_str(), first["url"].as_str()), (Some("list"), Some("/v1/events")));
    assert_eq!(ids(&first).len(), 10, "default limit");
    assert_eq!(ids(&first)[0], "evt_24", "newest first; same second: added later first");
    assert_eq!(ids(&first)[1], "evt_23");
    assert_eq!(first["has_more"], true);

    let (_, before) = get("ending_before=evt_20&limit=3", Some(API_VERSION)).await;
    assert_eq!(ids(&before), ["evt_23", "evt_22", "evt_21"]);
    assert_eq!(before["has_more"], true);
    let (_, window) =
        get("created%5Bgt%5D=1785000002&created%5Blte%5D=1785000004&type=invoice.paid", Some(API_VERSION)).await;
    assert_eq!(ids(&window), ["evt_08", "evt_06"]);
    let (_, last) = get("starting_after=evt_02&limit=100", Some(API_VERSION)).await;
    assert_eq!((ids(&last), last["has_more"].as_bool()), (vec!["evt_01".to_owned(), "evt_00".to_owned()], Some(false)));

    for (query, version, expected) in [
        ("limit=0", Some(API_VERSION), 400),
        ("limit=101", Some(API_VERSION), 400),
        ("starting_after=evt_nope", Some(API_VERSION), 400),
        ("", None, 400),
        ("", Some("2023-10-16"), 400),
    ] {
        let (status, body) = get(query, version).await;
        assert_eq!(status, expected, "{query} {version:?}");
        assert!(body["error"]["type"].is_string() && body["error"]["message"].is_string(), "{body}");
    }
    let status = http.post(format!("{}/v1/events", stub.url)).bearer_auth(KEY).header("Stripe-Version", API_VERSION);
    assert_eq!(status.send().await.unwrap().status().as_u16(), 405, "read-only");
    let (status, body) = {
        let r = http
            .get(format!("{}/v1/customers/cus_nope", stub.url))
            .bearer_auth(KEY)
            .header("Stripe-Version", API_VERSION);
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let missing: Value = serde_json::from_str(&fixture("api/error.404.json")).unwrap();
    assert_eq!((status, &body["error"]["code"]), (404, &missing["error"]["code"]));
}
