//! Passwords (argon2), session tokens, CSRF tokens, the console's origin and the login throttle.
//!
//! Sessions live in the store ([`mindroom_billing_core::OperatorStore`]): the cookie carries only a
//! random token; the store keys the session by a SHA-256 digest of it (so the store's rows do not
//! give anyone a session) and knows its operator, role, login time, last request and end. The
//! server decides whether it is still live (logout, a password change, the operator's removal, the
//! idle timeout and the lifetime end it), whatever the cookie says. The CSRF token is bound to the
//! session: an HMAC of its token under the [`SessionKey`], so it cannot be forged without the key.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ConsoleError;

type HmacSha256 = Hmac<Sha256>;

/// Hashes a password into an argon2id PHC string (`$argon2id$v=19$…`) with a random salt and the
/// crate's default parameters (19 MiB, 2 passes): what `BILLING_CONSOLE_PASSWORD_HASH` and the
/// operators kept in the store take.
pub fn hash_password(password: &str) -> Result<String, ConsoleError> {
    if password.is_empty() {
        return Err(ConsoleError::Config("the password is empty".into()));
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ConsoleError::Config(format!("cannot hash the password: {e}")))
}

/// A validated argon2 PHC string.
#[derive(Clone)]
pub(crate) struct PasswordDigest(String);

impl PasswordDigest {
    pub(crate) fn parse(phc: &str, what: &str) -> Result<Self, ConsoleError> {
        let phc = phc.trim();
        let parsed = PasswordHash::new(phc)
            .map_err(|e| ConsoleError::Config(format!("{what} is not a PHC password hash: {e}")))?;
        if !parsed.algorithm.as_str().starts_with("argon2") {
            return Err(ConsoleError::Config(format!("{what} is not an argon2 hash ({})", parsed.algorithm)));
        }
        Ok(Self(phc.to_owned()))
    }

    /// Checks a password (CPU-bound, tens of milliseconds: call it off the async threads).
    pub(crate) fn verify(&self, password: &str) -> bool {
        PasswordHash::new(&self.0).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
    }
}

impl fmt::Debug for PasswordDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordDigest(<redacted>)")
    }
}

/// The key that derives CSRF tokens from session tokens.
pub struct SessionKey(SecretSlice<u8>);

impl SessionKey {
    /// A random key (forms rendered before a restart must be reloaded after it; one replica only).
    pub fn random() -> Self {
        let mut bytes = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(SecretSlice::from(bytes))
    }

    /// A key from a configured secret of at least 32 bytes (every replica configured with it
    /// accepts the forms of the others).
    pub fn from_secret(secret: &str) -> Result<Self, ConsoleError> {
        if secret.len() < 32 {
            return Err(ConsoleError::Config("the session key must be at least 32 characters".into()));
        }
        Ok(Self(SecretSlice::from(secret.as_bytes().to_vec())))
    }

    fn mac(&self, domain: &[u8], message: &str) -> HmacSha256 {
        // HMAC takes keys of any length.
        #[allow(clippy::expect_used)]
        let mut mac = HmacSha256::new_from_slice(self.0.expose_secret()).expect("any key length");
        mac.update(domain);
        mac.update(&[0]);
        mac.update(message.as_bytes());
        mac
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

/// The secret a session cookie carries: 32 random bytes, hex.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SessionToken(String);

impl SessionToken {
    /// A new random token.
    pub(crate) fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(hex::encode(bytes))
    }

    /// A token from a cookie value: 64 hex digits, else nothing.
    pub(crate) fn from_cookie(value: &str) -> Option<Self> {
        (value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Self(value.to_ascii_lowercase()))
    }

    /// The cookie value.
    pub(crate) fn cookie_value(&self) -> &str {
        &self.0
    }

    /// The session's key in the store: a digest of the token, never the token itself.
    pub(crate) fn store_id(&self) -> String {
        let mut digest = Sha256::new();
        digest.update(b"mindroom-billing console session\0");
        digest.update(self.0.as_bytes());
        hex::encode(digest.finalize())
    }

    /// The CSRF token of this session.
    pub(crate) fn csrf_token(&self, key: &SessionKey) -> String {
        hex::encode(key.mac(b"csrf", &self.0).finalize().into_bytes())
    }

    /// Whether `token` is this session's CSRF token (constant time).
    pub(crate) fn csrf_ok(&self, key: &SessionKey, token: &str) -> bool {
        let expected = self.csrf_token(key);
        expected.len() == token.len() && bool::from(expected.as_bytes().ct_eq(token.as_bytes()))
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

/// The console's public origin: scheme, host and port, as a browser names it in `Origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConsoleOrigin {
    https: bool,
    /// `host[:port]`, lower case, without the scheme's default port.
    authority: String,
}

impl ConsoleOrigin {
    /// Parses `http://host[:port]` or `https://host[:port]` (nothing after the authority but an
    /// optional `/`).
    pub(crate) fn parse(origin: &str) -> Result<Self, ConsoleError> {
        let bad = || ConsoleError::Config(format!("the console origin {origin:?} is not http(s)://host[:port]"));
        let (scheme, rest) = origin.trim().split_once("://").ok_or_else(bad)?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(bad()),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad());
        }
        Ok(Self { https, authority: normalize_authority(authority, https) })
    }

    /// The origin of a console bound to `addr` with plain HTTP.
    pub(crate) fn of_addr(addr: std::net::SocketAddr) -> Self {
        Self { https: false, authority: normalize_authority(&addr.to_string(), false) }
    }

    pub(crate) fn is_https(&self) -> bool {
        self.https
    }

    /// Whether a request's `Host` header names this console.
    pub(crate) fn host_ok(&self, host: &str) -> bool {
        normalize_authority(host, self.https) == self.authority
    }

    /// Whether an `Origin` header is this console's origin (scheme included).
    pub(crate) fn origin_ok(&self, origin: &str) -> bool {
        Self::parse(origin).is_ok_and(|o| o == *self)
    }
}

impl fmt::Display for ConsoleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", if self.https { "https" } else { "http" }, self.authority)
    }
}

/// `host[:port]` in lower case, without the scheme's default port.
fn normalize_authority(authority: &str, https: bool) -> String {
    let lower = authority.trim().to_ascii_lowercase();
    let default = if https { ":443" } else { ":80" };
    match lower.strip_suffix(default) {
        // Not the tail of an IPv6 literal without brackets.
        Some(host) if !host.is_empty() && (host.ends_with(']') || !host.contains(':')) => host.to_owned(),
        _ => lower,
    }
}

/// How hard the login throttle slows failed logins.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThrottlePolicy {
    /// Failures from one address before its delays start.
    pub(crate) address_free: u32,
    /// Failures on one operator name before its delays start (for the addresses that failed on it).
    pub(crate) operator_free: u32,
    /// The longest delay.
    pub(crate) max_delay: Duration,
    /// Failures older than this (since the last one) are forgotten.
    pub(crate) forget_after: Duration,
}

impl Default for ThrottlePolicy {
    fn default() -> Self {
        Self { address_free: 5, operator_free: 10, max_delay: Duration::minutes(15), forget_after: Duration::hours(1) }
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    addresses: HashMap<Option<IpAddr>, Failures>,
    operators: HashMap<String, Failures>,
    /// (operator, address) pairs that failed: the operator's delay applies to these only.
    pairs: HashSet<(String, Option<IpAddr>)>,
}

/// Slows password guessing with growing delays per client address and per operator name, never a
/// lock that the right password from a clean address cannot pass:
///
/// - an address that failed more than a few times waits 1, 2, 4 … seconds (at most 15 minutes)
///   after its last failure before its next attempt is checked, whatever name it tries;
/// - an operator name that failed more than ten times makes the addresses that failed on it wait
///   the same way (so guessing one account from many addresses is slowed), while an address that
///   has not failed on it is let through: a flood from elsewhere never locks its owner out.
///
/// An attempt is counted as a failure when it starts (so parallel attempts cannot all slip
/// through) and forgiven when the password is right. The state is per process.
#[derive(Debug)]
pub(crate) struct LoginThrottle {
    policy: ThrottlePolicy,
    state: Mutex<ThrottleState>,
}

/// The longest operator name the throttle keeps (longer ones are cut).
const NAME_LIMIT: usize = 64;

impl LoginThrottle {
    pub(crate) fn new(policy: ThrottlePolicy) -> Self {
        Self { policy, state: Mutex::new(ThrottleState::default()) }
    }

    fn delay(&self, failures: Option<&Failures>, free: u32) -> Option<DateTime<Utc>> {
        let f = failures?;
        let over = f.count.checked_sub(free)?;
        let seconds = 1i64.checked_shl(over.min(30)).unwrap_or(i64::MAX);
        Some(f.last + Duration::seconds(seconds).min(self.policy.max_delay))
    }

    /// Starts an attempt of `client` on `name` at `now`: `Err(wait)` when it must wait (nothing is
    /// counted then), else it is counted as a failure until [`Self::succeeded`].
    pub(crate) fn begin(&self, name: &str, client: Option<IpAddr>, now: DateTime<Utc>) -> Result<(), Duration> {
        let name = cut(name);
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let forget = self.policy.forget_after;
        if s.addresses.len() + s.operators.len() > 10_000 || s.pairs.len() > 100_000 {
            s.addresses.retain(|_, f| now - f.last < forget);
            s.operators.retain(|_, f| now - f.last < forget);
            let ThrottleState { operators, pairs, .. } = &mut *s;
            pairs.retain(|(op, _)| operators.contains_key(op));
        }
        let ThrottleState { addresses, operators, .. } = &mut *s;
        for f in addresses.values_mut().chain(operators.values_mut()) {
            if now - f.last >= forget {
                f.count = 0;
            }
        }
        let mut until = self.delay(s.addresses.get(&client), self.policy.address_free);
        if s.pairs.contains(&(name.to_owned(), client)) {
            until = until.max(self.delay(s.operators.get(name), self.policy.operator_free));
        }
        if let Some(until) = until.filter(|u| now < *u) {
            return Err(until - now);
        }
        let bump = |f: &mut Failures| {
            f.count = f.count.saturating_add(1);
            f.last = now;
        };
        bump(s.addresses.entry(client).or_insert(Failures { count: 0, last: now }));
        bump(s.operators.entry(name.to_owned()).or_insert(Failures { count: 0, last: now }));
        s.pairs.insert((name.to_owned(), client));
        Ok(())
    }

    /// Forgives the attempt [`Self::begin`] counted: the password was right.
    pub(crate) fn succeeded(&self, name: &str, client: Option<IpAddr>) {
        let name = cut(name);
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.addresses.remove(&client);
        s.pairs.remove(&(name.to_owned(), client));
        if let Some(f) = s.operators.get_mut(name) {
            f.count = f.count.saturating_sub(1);
        }
    }
}

fn cut(name: &str) -> &str {
    match name.char_indices().nth(NAME_LIMIT) {
        Some((i, _)) => &name[..i],
        None => name,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn a_token_is_random_hex_stored_as_a_digest_and_binds_its_csrf_token() {
        let key = SessionKey::from_secret("0123456789abcdef0123456789abcdef").unwrap();
        let token = SessionToken::generate();
        assert_eq!(SessionToken::from_cookie(token.cookie_value()), Some(token.clone()));
        assert_ne!(token.store_id(), token.cookie_value(), "the store never sees the token");
        assert_eq!(token.store_id().len(), 64);
        assert_eq!(SessionToken::from_cookie("admin.1.2.zz"), None);
        assert_eq!(SessionToken::from_cookie(&"g".repeat(64)), None);
        assert!(token.csrf_ok(&key, &token.csrf_token(&key)));
        assert!(!token.csrf_ok(&key, &SessionToken::generate().csrf_token(&key)), "bound to the session");
        assert!(!token.csrf_ok(&SessionKey::random(), &token.csrf_token(&key)), "bound to the key");
        assert!(!token.csrf_ok(&key, ""));
        assert_eq!(format!("{token:?}"), "SessionToken(<redacted>)");
    }

    #[test]
    fn passwords_hash_and_verify_and_bad_hashes_are_refused() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        let digest = PasswordDigest::parse(&phc, "hash").unwrap();
        assert!(digest.verify("correct horse"));
        assert!(!digest.verify("correct horsE"));
        assert!(PasswordDigest::parse("plaintext", "hash").is_err());
        assert!(hash_password("").is_err());
        assert_eq!(format!("{digest:?}"), "PasswordDigest(<redacted>)");
        assert!(!format!("{:?}", SessionKey::random()).contains('['));
    }

    #[test]
    fn the_origin_compares_scheme_host_and_port() {
        let o = ConsoleOrigin::parse("https://Console.Example/").unwrap();
        assert_eq!(o.to_string(), "https://console.example");
        assert!(o.origin_ok("https://console.example:443") && o.origin_ok("https://console.example"));
        assert!(!o.origin_ok("http://console.example") && !o.origin_ok("https://evil.example") && !o.origin_ok("null"));
        assert!(o.host_ok("console.example") && o.host_ok("CONSOLE.example:443"));
        assert!(!o.host_ok("console.example:80") && !o.host_ok("evil.example"));
        let local = ConsoleOrigin::of_addr("127.0.0.1:3106".parse().unwrap());
        assert!(local.host_ok("127.0.0.1:3106") && !local.host_ok("127.0.0.1") && !local.host_ok("localhost:3106"));
        assert!(local.origin_ok("http://127.0.0.1:3106") && !local.origin_ok("https://127.0.0.1:3106"));
        let v6 = ConsoleOrigin::of_addr("[::1]:80".parse().unwrap());
        assert!(v6.host_ok("[::1]") && v6.host_ok("[::1]:80"));
        for bad in ["ftp://x", "console.example", "https://", "https://a/b", "https://u@a"] {
            assert!(ConsoleOrigin::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_throttle_grows_per_address_and_per_operator_without_locking_a_clean_address_out() {
        let t = LoginThrottle::new(ThrottlePolicy::default());
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        for _ in 0..5 {
            t.begin("admin", a, at(0)).unwrap();
        }
        assert_eq!(t.begin("admin", a, at(0)), Err(Duration::seconds(1)));
        assert_eq!(t.begin("someone", a, at(0)), Err(Duration::seconds(1)), "per address, whatever the name");
        t.begin("admin", a, at(1)).unwrap();
        assert_eq!(t.begin("admin", a, at(1)), Err(Duration::seconds(2)), "growing");
        // Many addresses guessing one name: the operator's delay holds them, not a clean address.
        for i in 2..20u8 {
            let _ = t.begin("admin", Some(IpAddr::from([10, 0, 1, i])), at(2));
        }
        let guesser = Some(IpAddr::from([10, 0, 1, 2]));
        assert!(t.begin("admin", guesser, at(2)).is_err(), "an address that failed on admin waits");
        assert!(t.begin("alice", guesser, at(2)).is_ok(), "but not on another name");
        let clean = Some(IpAddr::from([10, 9, 9, 9]));
        t.begin("admin", clean, at(2)).unwrap();
        t.succeeded("admin", clean);
        t.begin("admin", clean, at(2)).unwrap();
        assert!(t.begin("admin", a, at(2 + 3600)).is_ok(), "failures an hour old are forgotten");
    }
}
