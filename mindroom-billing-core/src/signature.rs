//! Stripe webhook signature verification and signing.
//!
//! The `Stripe-Signature` header has the form `t=<unix>,v1=<hex>[,v1=<hex>…][,v0=<hex>]`. The signed
//! string is `"{t}.{raw body}"`, MACed with HMAC-SHA256 keyed by the endpoint secret's bytes exactly as
//! given (the `whsec_` prefix included). Verification is pure: the caller passes the current time.

use std::fmt;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Default replay window, as in Stripe's official libraries.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;

/// Why a request's signature was rejected. Each variant is a distinct reason Stripe's dashboard shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// No `Stripe-Signature` header, or an empty one.
    #[error("missing Stripe-Signature header")]
    MissingHeader,
    /// The header does not have the `t=…,v1=…` shape.
    #[error("malformed Stripe-Signature header: {0}")]
    MalformedHeader(&'static str),
    /// The header carries no `v1` signature (only `v0` or unknown schemes).
    #[error("no v1 signature in Stripe-Signature header")]
    NoV1Signature,
    /// No `v1` signature matches any configured secret.
    #[error("no signature matches the expected signature for the payload")]
    NoMatchingSignature,
    /// The timestamp is older (or further in the future) than the tolerance allows.
    #[error("timestamp outside the tolerance window ({skew_secs} s from now, tolerance {tolerance_secs} s)")]
    TimestampOutsideTolerance {
        /// `now - t`, negative for a timestamp in the future.
        skew_secs: i64,
        /// The configured tolerance.
        tolerance_secs: u64,
    },
}

impl SignatureError {
    /// A short, stable label for metrics (`reason` label of verification failures).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingHeader => "missing_header",
            Self::MalformedHeader(_) => "malformed_header",
            Self::NoV1Signature => "no_v1_signature",
            Self::NoMatchingSignature => "no_matching_signature",
            Self::TimestampOutsideTolerance { .. } => "timestamp_outside_tolerance",
        }
    }
}

/// One webhook signing secret (`whsec_…`). Its `Debug` output is redacted.
#[derive(Clone)]
pub struct WebhookSecret {
    secret: SecretString,
    /// HMAC state with the key already absorbed: cloning it skips the key schedule per request.
    keyed: HmacSha256,
}

impl WebhookSecret {
    /// Wraps a secret exactly as Stripe shows it (prefix included).
    pub fn new(secret: impl Into<String>) -> Self {
        let secret: String = secret.into();
        let keyed = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
        Self { secret: SecretString::from(secret), keyed }
    }

    /// The secret itself, for callers that must hand it on (never log it).
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    fn mac(&self, timestamp: &[u8], body: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(timestamp);
        mac.update(b".");
        mac.update(body);
        mac
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(\"whsec_[REDACTED]\")")
    }
}

/// The configured secrets (several during a rotation) and the replay tolerance.
#[derive(Clone, Debug)]
pub struct Verifier {
    secrets: Vec<WebhookSecret>,
    tolerance_secs: u64,
}

impl Verifier {
    /// A verifier for the given secrets with the default 300 s tolerance.
    pub fn new(secrets: impl IntoIterator<Item = WebhookSecret>) -> Self {
        Self { secrets: secrets.into_iter().collect(), tolerance_secs: DEFAULT_TOLERANCE_SECS }
    }

    /// Parses `STRIPE_WEBHOOK_SECRET`-style input: one or more secrets, comma-separated.
    pub fn from_comma_separated(secrets: &str) -> Self {
        Self::new(secrets.split(',').map(str::trim).filter(|s| !s.is_empty()).map(WebhookSecret::new))
    }

    /// Sets the replay tolerance in seconds (applied both to the past and the future).
    #[must_use]
    pub fn with_tolerance_secs(mut self, tolerance_secs: u64) -> Self {
        self.tolerance_secs = tolerance_secs;
        self
    }

    /// The number of configured secrets.
    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }

    /// Verifies `body` (the raw request bytes) against the `Stripe-Signature` header at time `now`
    /// (unix seconds). Returns the header's timestamp on success.
    ///
    /// Accepts when ANY `v1` signature matches ANY secret (compared in constant time); `v0` is ignored.
    pub fn verify(&self, header: Option<&str>, body: &[u8], now: i64) -> Result<i64, SignatureError> {
        let header = header.map(str::trim).filter(|h| !h.is_empty()).ok_or(SignatureError::MissingHeader)?;
        let parsed = SignatureHeader::parse(header)?;
        if parsed.v1.is_empty() {
            return Err(SignatureError::NoV1Signature);
        }
        let matched = self.secrets.iter().any(|secret| {
            let mac = secret.mac(parsed.timestamp_raw.as_bytes(), body);
            // `verify_slice` consumes the MAC; compare each candidate against its own clone.
            parsed.v1.iter().any(|candidate| mac.clone().verify_slice(candidate).is_ok())
        });
        if !matched {
            return Err(SignatureError::NoMatchingSignature);
        }
        let skew = now.saturating_sub(parsed.timestamp);
        if skew.unsigned_abs() > self.tolerance_secs {
            return Err(SignatureError::TimestampOutsideTolerance {
                skew_secs: skew,
                tolerance_secs: self.tolerance_secs,
            });
        }
        Ok(parsed.timestamp)
    }

    /// Signs `body` at `timestamp` with the first secret, giving a header Stripe would send.
    ///
    /// # Panics
    /// If no secret is configured.
    pub fn sign(&self, body: &[u8], timestamp: i64) -> String {
        sign(&self.secrets[0], body, timestamp)
    }
}

/// Produces a `Stripe-Signature` header value (`t=…,v1=…`) for `body` at `timestamp`.
pub fn sign(secret: &WebhookSecret, body: &[u8], timestamp: i64) -> String {
    let t = timestamp.to_string();
    let tag = secret.mac(t.as_bytes(), body).finalize().into_bytes();
    format!("t={t},v1={}", hex::encode(tag))
}

/// A parsed `Stripe-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    /// The `t` value, as sent (it is part of the signed string).
    pub timestamp_raw: &'a str,
    /// The `t` value as unix seconds.
    pub timestamp: i64,
    /// Every well-formed `v1` signature, decoded (32 bytes each).
    pub v1: Vec<[u8; 32]>,
}

impl<'a> SignatureHeader<'a> {
    /// Parses the header. Unknown schemes and `v0` are skipped; a `v1` that is not 64 hex digits can
    /// never match, so it is skipped too (as Stripe's libraries effectively do).
    pub fn parse(header: &'a str) -> Result<Self, SignatureError> {
        let mut timestamp = None;
        let mut v1 = Vec::new();
        for item in header.split(',') {
            let (key, value) =
                item.trim().split_once('=').ok_or(SignatureError::MalformedHeader("expected key=value pairs"))?;
            match key {
                "t" => {
                    let parsed = value
                        .parse::<i64>()
                        .map_err(|_| SignatureError::MalformedHeader("timestamp is not an integer"))?;
                    timestamp = Some((value, parsed));
                }
                "v1" => {
                    let mut sig = [0u8; 32];
                    if hex::decode_to_slice(value, &mut sig).is_ok() {
                        v1.push(sig);
                    }
                }
                _ => {}
            }
        }
        let (timestamp_raw, timestamp) = timestamp.ok_or(SignatureError::MalformedHeader("no timestamp"))?;
        Ok(Self { timestamp_raw, timestamp, v1 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let v = Verifier::from_comma_separated("whsec_abc123,whsec_def456");
        let shown = format!("{v:?}");
        assert!(!shown.contains("abc123") && !shown.contains("def456"), "{shown}");
        assert_eq!(v.secret_count(), 2);
    }

    #[test]
    fn sign_then_verify_roundtrips_and_rotation_accepts_either_secret() {
        let old = WebhookSecret::new("whsec_old");
        let new = WebhookSecret::new("whsec_new");
        let v = Verifier::new([old.clone(), new.clone()]);
        for s in [&old, &new] {
            let h = sign(s, b"{}", 1000);
            assert_eq!(v.verify(Some(&h), b"{}", 1000), Ok(1000));
        }
        let other = sign(&WebhookSecret::new("whsec_other"), b"{}", 1000);
        assert_eq!(v.verify(Some(&other), b"{}", 1000), Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn future_beyond_tolerance_is_rejected() {
        let s = WebhookSecret::new("whsec_x");
        let v = Verifier::new([s.clone()]).with_tolerance_secs(10);
        let h = sign(&s, b"x", 1011);
        assert!(matches!(
            v.verify(Some(&h), b"x", 1000),
            Err(SignatureError::TimestampOutsideTolerance { skew_secs: -11, .. })
        ));
        let h = sign(&s, b"x", 1010);
        assert_eq!(v.verify(Some(&h), b"x", 1000), Ok(1010));
    }

    #[test]
    fn malformed_headers_have_distinct_errors() {
        let v = Verifier::from_comma_separated("whsec_x");
        assert_eq!(v.verify(None, b"", 0), Err(SignatureError::MissingHeader));
        assert_eq!(v.verify(Some("  "), b"", 0), Err(SignatureError::MissingHeader));
        assert!(matches!(v.verify(Some("garbage"), b"", 0), Err(SignatureError::MalformedHeader(_))));
        assert!(matches!(v.verify(Some("t=abc,v1=00"), b"", 0), Err(SignatureError::MalformedHeader(_))));
        assert_eq!(v.verify(Some("t=1,v0=00"), b"", 0), Err(SignatureError::NoV1Signature));
    }
}
