//! Property tests: delivery order and duplicates do not change the outcome; the level-triggered
//! reconcile provisions once per generation; bad input never panics.

mod common;

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use common::{DAY, T0, at, ev, fixture_bytes, invoice_json, policy, price_json_subscription};
use mindroom_billing_core::signature::{SignatureError, SignatureHeader, Verifier, WebhookSecret, sign};
use mindroom_billing_core::{DesiredInstance, Event, JobKind, ParseError, SubscriptionState, Tier, decide, parse};
use proptest::prelude::*;

const SUB: &str = "sub_prop";
const STATUSES: [&str; 8] =
    ["incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused"];

/// Known prices: configured ids, a lookup key and a metadata tier.
fn price_object(i: usize) -> String {
    match i % 4 {
        0 => format!(r#"{{"id":"{}","object":"price"}}"#, common::PRICE_STARTER),
        1 => format!(r#"{{"id":"{}","object":"price"}}"#, common::PRICE_PRO),
        2 => r#"{"id":"price_lk","object":"price","lookup_key":"pro"}"#.to_owned(),
        _ => r#"{"id":"price_md","object":"price","metadata":{"tier":"enterprise"}}"#.to_owned(),
    }
}

#[derive(Debug, Clone)]
enum Spec {
    Snapshot { kind: usize, status: usize, price: usize },
    Invoice { kind: usize, invoice: usize },
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        (0usize..4, 0usize..8, 0usize..4).prop_map(|(kind, status, price)| Spec::Snapshot { kind, status, price }),
        (0usize..3, 0usize..3).prop_map(|(kind, invoice)| Spec::Invoice { kind, invoice }),
    ]
}

fn build(n: usize, spec: &Spec, created: i64) -> Event {
    let id = format!("evt_{n}");
    let basil = n % 2 == 0;
    let json = match *spec {
        Spec::Snapshot { kind, status, price } => {
            let (kind, status) = match kind {
                0 => ("customer.subscription.created", STATUSES[status]),
                1 => ("customer.subscription.updated", STATUSES[status]),
                2 => ("customer.subscription.trial_will_end", STATUSES[status]),
                _ => ("customer.subscription.deleted", "canceled"),
            };
            price_json_subscription(&id, kind, created, SUB, status, &price_object(price), basil)
        }
        Spec::Invoice { kind, invoice } => {
            let kind = ["invoice.paid", "invoice.payment_succeeded", "invoice.payment_failed"][kind];
            invoice_json(&id, kind, created, &format!("in_{invoice}"), SUB, basil)
        }
    };
    ev(&json)
}

/// A history with distinct `created` times (in order), a delivery order with duplicates, and `now`.
fn scenario() -> impl Strategy<Value = (Vec<Event>, Vec<usize>, DateTime<Utc>)> {
    (
        prop::collection::vec((spec(), 1i64..(3 * DAY)), 1..10),
        prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        0i64..(40 * DAY),
    )
        .prop_flat_map(|(specs, dups, now_offset)| {
            let mut created = T0;
            let events: Vec<Event> = specs
                .iter()
                .enumerate()
                .map(|(n, (spec, gap))| {
                    created += gap;
                    build(n, spec, created)
                })
                .collect();
            let mut delivery: Vec<usize> = (0..events.len()).collect();
            delivery.extend(dups.iter().map(|i| i.index(events.len())));
            (Just(events), Just(delivery).prop_shuffle(), Just(at(T0 + now_offset)))
        })
}

/// The instance as a level-triggered reconciler keeps it.
#[derive(Debug, Default)]
struct Instance {
    running: Option<Tier>,
    generation: u32,
    provisions: Vec<String>,
    deprovisions: u32,
}

impl Instance {
    /// What the worker does for one reconcile job: compare desired with recorded.
    fn reconcile(&mut self, state: Option<&SubscriptionState>, now: DateTime<Utc>) {
        let desired = state.map_or(DesiredInstance::Absent, |s| s.desired(now));
        match (desired, self.running) {
            (DesiredInstance::Running { tier, .. }, None) => {
                self.generation += 1;
                self.provisions.push(format!("provision:{SUB}:{}", self.generation));
                self.running = Some(tier);
            }
            (DesiredInstance::Running { tier, .. }, Some(_)) => self.running = Some(tier),
            (DesiredInstance::Absent, Some(_)) => {
                self.deprovisions += 1;
                self.running = None;
            }
            (DesiredInstance::Absent, None) => {}
        }
    }

    fn matches(&self, state: Option<&SubscriptionState>, now: DateTime<Utc>) -> bool {
        match state.map_or(DesiredInstance::Absent, |s| s.desired(now)) {
            DesiredInstance::Running { tier, .. } => self.running == Some(tier),
            DesiredInstance::Absent => self.running.is_none(),
        }
    }
}

/// Folds `decide` over `order`, running each newly queued reconcile job (keys deduplicated as the
/// store does) and checking the instance converges after every step.
fn deliver(events: &[Event], order: &[usize], now: DateTime<Utc>) -> (Option<SubscriptionState>, Instance) {
    let policy = policy();
    let mut state: Option<SubscriptionState> = None;
    let mut keys = HashSet::new();
    let mut instance = Instance::default();
    for &i in order {
        let d = decide(&policy, state.as_ref(), &events[i], now);
        assert!(!matches!(d.outcome, mindroom_billing_core::Outcome::Failed(_)), "known prices only: {:?}", d.outcome);
        if let Some(next) = d.subscription {
            assert_ne!(state.as_ref(), Some(&next), "an unchanged aggregate is not handed back");
            state = Some(next);
        }
        for job in d.jobs {
            if keys.insert(job.key.clone()) && matches!(job.kind, JobKind::Reconcile { .. }) {
                instance.reconcile(state.as_ref(), now);
            }
        }
        assert!(
            instance.matches(state.as_ref(), now),
            "after {}: the instance did not converge (a desired change queued no reconcile): {instance:?} vs {:?}",
            events[i].id,
            state.as_ref().map(|s| s.desired(now))
        );
    }
    (state, instance)
}

fn without_version(state: Option<SubscriptionState>) -> Option<SubscriptionState> {
    state.map(|mut s| {
        s.version = 0;
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_order_with_duplicates_equals_in_order((events, order, now) in scenario()) {
        let in_order: Vec<usize> = (0..events.len()).collect();
        let (expected, _) = deliver(&events, &in_order, now);
        let (actual, instance) = deliver(&events, &order, now);
        prop_assert_eq!(without_version(actual.clone()), without_version(expected));
        // Each provisioning effect once per generation; provisions and deprovisions alternate.
        let unique: HashSet<&String> = instance.provisions.iter().collect();
        prop_assert_eq!(unique.len(), instance.provisions.len());
        let provisions = u32::try_from(instance.provisions.len()).unwrap();
        prop_assert!(provisions == instance.deprovisions || provisions == instance.deprovisions + 1);
        prop_assert!(instance.matches(actual.as_ref(), now));
    }

    #[test]
    fn header_parser_never_panics(header in ".{0,200}") {
        match SignatureHeader::parse(&header) {
            Ok(h) => prop_assert!(h.v1.len() <= header.len() / 64 + 1),
            Err(e) => prop_assert!(matches!(e, SignatureError::MalformedHeader(_))),
        }
    }

    #[test]
    fn header_parser_handles_header_like_input(
        parts in prop::collection::vec(("(t|v1|v0|x|)", "[0-9a-f=,-]{0,70}"), 0..6)
    ) {
        let header: String = parts.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let _ = SignatureHeader::parse(&header);
        let v = Verifier::new([WebhookSecret::new("whsec_p")]);
        let _ = v.verify(Some(&header), b"{}", T0);
    }

    #[test]
    fn verify_never_panics_and_only_accepts_the_signed_bytes(
        header in prop::option::of(".{0,120}"),
        body in prop::collection::vec(any::<u8>(), 0..512),
        now in any::<i64>(),
        t in any::<i64>(),
    ) {
        let secret = WebhookSecret::new("whsec_prop");
        let v = Verifier::new([secret.clone()]);
        let result = v.verify(header.as_deref(), &body, now);
        prop_assert!(result.is_err() || header.is_some());
        // A correct signature verifies exactly when the timestamp is within tolerance.
        let signed = sign(&secret, &body, t);
        let within = now.checked_sub(t).is_some_and(|d| d.unsigned_abs() <= 300);
        match v.verify(Some(&signed), &body, now) {
            Ok(ts) => { prop_assert!(within); prop_assert_eq!(ts, t); }
            Err(SignatureError::TimestampOutsideTolerance { .. }) => prop_assert!(!within || now.checked_sub(t).is_none()),
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
        let mut tampered = body.clone();
        tampered.push(b' ');
        prop_assert_eq!(v.verify(Some(&signed), &tampered, t), Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = parse(&body);
    }

    #[test]
    fn parse_never_panics_on_mutated_events(
        version in 0usize..2,
        name in 0usize..8,
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let names = ["customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted",
            "invoice.paid", "invoice.payment_succeeded", "invoice.payment_failed", "checkout.session.completed",
            "customer.updated"];
        let mut bytes = fixture_bytes(common::VERSIONS[version], names[name]);
        for (at, byte) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *byte;
        }
        let truncated = &bytes[..cut.index(bytes.len() + 1)];
        for input in [&bytes[..], truncated] {
            match parse(input) {
                Ok(_) | Err(ParseError::Json(_) | ParseError::MissingField(_) | ParseError::InvalidField { .. }) => {}
                Err(other) => prop_assert!(false, "untyped error {other:?}"),
            }
        }
    }

    #[test]
    fn parse_handles_json_of_the_wrong_shapes(
        value in prop_oneof![Just("null"), Just("1"), Just("\"s\""), Just("[]"), Just("{}"), Just("true"), Just("{\"id\":1}")],
        field in prop_oneof![Just("id"), Just("type"), Just("created"), Just("data"), Just("object"), Just("customer"),
            Just("status"), Just("items"), Just("price"), Just("current_period_end"), Just("subscription"), Just("parent")],
        version in 0usize..2,
        name in prop_oneof![Just("customer.subscription.updated"), Just("invoice.payment_failed"), Just("checkout.session.completed")],
    ) {
        let text = String::from_utf8(fixture_bytes(common::VERSIONS[version], name)).unwrap();
        let needle = format!("\"{field}\": ");
        let Some(start) = text.find(&needle) else { return Ok(()) };
        let rest = &text[start + needle.len()..];
        let end = rest.find([',', '\n']).unwrap_or(rest.len());
        let mutated = format!("{}{}{}", &text[..start + needle.len()], value, &rest[end..]);
        let _ = parse(mutated.as_bytes());
    }
}
