//! Helpers shared by the integration tests: fixtures, a policy, event builders and a test clock.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Mutex;

use chrono::{DateTime, Duration, TimeZone, Utc};
use mindroom_billing_core::{Clock, Event, Policy, PriceCatalog, Tier, parse};

/// Starter price of the fixtures.
pub(crate) const PRICE_STARTER: &str = "price_1PgafmB7WZ01zgkW6dKueIc5";
/// Professional price of the fixtures.
pub(crate) const PRICE_PRO: &str = "price_1PgagYB7WZ01zgkWq2Lx9Rz4";
/// Subscription of the fixtures.
pub(crate) const SUB: &str = "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw";
/// Customer of the fixtures.
pub(crate) const CUS: &str = "cus_QXg1o8vcGmoR32";
/// Both API versions of the fixtures.
pub(crate) const VERSIONS: [&str; 2] = ["2023-10-16", "2026-07-29.dahlia"];

pub(crate) fn stripe_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/stripe")
}

/// The raw bytes of `events/<version>/<name>.json`.
pub(crate) fn fixture_bytes(version: &str, name: &str) -> Vec<u8> {
    std::fs::read(stripe_dir().join("events").join(version).join(format!("{name}.json"))).unwrap()
}

/// A parsed fixture.
pub(crate) fn fixture(version: &str, name: &str) -> Event {
    parse(&fixture_bytes(version, name)).unwrap_or_else(|e| panic!("{version}/{name}: {e}"))
}

/// Starter and Professional configured, 7-day grace.
pub(crate) fn policy() -> Policy {
    Policy::default().with_prices(
        PriceCatalog::new().with_price(PRICE_STARTER, Tier::Starter).with_price(PRICE_PRO, Tier::Professional),
    )
}

/// Unix seconds to a time.
pub(crate) fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).unwrap()
}

/// The base instant of synthetic events.
pub(crate) const T0: i64 = 1_785_000_000;
/// One day in seconds.
pub(crate) const DAY: i64 = 86_400;

/// JSON of a subscription event (pre-basil shape when `basil` is false).
pub(crate) fn subscription_json(
    id: &str,
    kind: &str,
    created: i64,
    sub: &str,
    status: &str,
    price: &str,
    basil: bool,
) -> String {
    price_json_subscription(id, kind, created, sub, status, &format!(r#"{{"id":"{price}","object":"price"}}"#), basil)
}

/// Like [`subscription_json`], with the price object given verbatim.
pub(crate) fn price_json_subscription(
    id: &str,
    kind: &str,
    created: i64,
    sub: &str,
    status: &str,
    price_object: &str,
    basil: bool,
) -> String {
    let period_end = created + 30 * DAY;
    let (top_period, item_period) = if basil {
        (String::new(), format!(r#","current_period_end":{period_end}"#))
    } else {
        (format!(r#""current_period_end":{period_end},"#), String::new())
    };
    let canceled_at = if status == "canceled" { created.to_string() } else { "null".to_owned() };
    let api = if basil { "2026-07-29.dahlia" } else { "2023-10-16" };
    format!(
        r#"{{"id":"{id}","object":"event","api_version":"{api}","created":{created},"data":{{"object":{{"id":"{sub}","object":"subscription","customer":"{CUS}","status":"{status}",{top_period}"cancel_at_period_end":false,"canceled_at":{canceled_at},"trial_end":null,"items":{{"object":"list","data":[{{"id":"si_1","object":"subscription_item","price":{price_object},"quantity":1{item_period}}}]}},"metadata":{{}}}}}},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"{kind}"}}"#
    )
}

/// JSON of an invoice event (basil shape puts the subscription under `parent`).
pub(crate) fn invoice_json(id: &str, kind: &str, created: i64, invoice: &str, sub: &str, basil: bool) -> String {
    let link = if basil {
        format!(
            r#""parent":{{"type":"subscription_details","quote_details":null,"subscription_details":{{"metadata":{{}},"subscription":"{sub}"}}}}"#
        )
    } else {
        format!(r#""subscription":"{sub}""#)
    };
    format!(
        r#"{{"id":"{id}","object":"event","api_version":"2023-10-16","created":{created},"data":{{"object":{{"id":"{invoice}","object":"invoice","customer":"{CUS}","customer_email":"jenny@example.com","amount_due":4900,"currency":"usd","hosted_invoice_url":"https://invoice.stripe.com/i/{invoice}",{link},"status":"open"}}}},"livemode":false,"type":"{kind}"}}"#
    )
}

/// Parses a JSON string built by the helpers above.
pub(crate) fn ev(json: &str) -> Event {
    parse(json.as_bytes()).unwrap_or_else(|e| panic!("{e}: {json}"))
}

/// A clock tests move by hand.
#[derive(Debug)]
pub(crate) struct TestClock(Mutex<DateTime<Utc>>);

impl TestClock {
    pub(crate) fn new(now: DateTime<Utc>) -> Self {
        Self(Mutex::new(now))
    }

    pub(crate) fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }

    pub(crate) fn set(&self, now: DateTime<Utc>) {
        *self.0.lock().unwrap() = now;
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}
