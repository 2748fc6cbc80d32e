//! Sample events bundled into the binary (Stripe API version 2026-07-29.dahlia), for `send`.

macro_rules! sample {
    ($name:literal) => {
        ($name, include_str!(concat!("../../testdata/stripe/events/2026-07-29.dahlia/", $name, ".json")))
    };
}

/// `(event type, payload)` of every bundled sample.
pub(crate) const SAMPLES: &[(&str, &str)] = &[
    sample!("checkout.session.completed"),
    sample!("customer.subscription.created"),
    sample!("customer.subscription.updated"),
    sample!("customer.subscription.deleted"),
    sample!("customer.updated"),
    sample!("invoice.paid"),
    sample!("invoice.payment_failed"),
    sample!("invoice.payment_succeeded"),
    sample!("invoice.payment_action_required"),
    sample!("charge.dispute.created"),
    sample!("charge.dispute.updated"),
    sample!("charge.dispute.closed"),
];

/// The bundled sample of `event_type`.
pub(crate) fn find(event_type: &str) -> Option<&'static str> {
    SAMPLES.iter().find(|(t, _)| *t == event_type).map(|(_, body)| *body)
}
