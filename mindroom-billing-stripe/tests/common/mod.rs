//! What the integration tests of this crate share: a client configuration for the local stub.
#![allow(dead_code)]

use std::time::Duration;

use mindroom_billing_stripe::{RateLimit, RetryPolicy, StripeConfig};

/// `key` at the stub's `url`: quick retries so the tests do not wait on backoff, and a generous
/// limiter unless a test sets one.
pub(crate) fn quick_config(url: &str, key: &str) -> StripeConfig {
    StripeConfig::new(key)
        .with_base_url(url)
        .with_timeout(Duration::from_secs(5))
        .with_rate_limit(RateLimit { per_second: 1000.0, burst: 100 })
        .with_retry(RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_secs(2),
        })
}
