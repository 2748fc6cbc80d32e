//! Passwords (argon2), signed session cookies, CSRF tokens and the login rate limit.
//!
//! Sessions are stateless: the cookie carries the role, its expiry and a random nonce, signed with
//! HMAC-SHA256 under the session key. Nothing is stored server-side, so every replica accepts a
//! cookie signed with the shared key, and changing the key (or a restart with a random key) ends
//! every session. The CSRF token is bound to the session: HMAC of its nonce under the same key (a
//! different domain tag), so it cannot be forged without the key and changes with every login.

use std::collections::HashMap;
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
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::ConsoleError;

type HmacSha256 = Hmac<Sha256>;

/// What a logged-in user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sees every page and may act (replay, retry, reconcile).
    Admin,
    /// Sees every page; every action answers 403.
    ReadOnly,
}

impl Role {
    /// The name in cookies and audit rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::ReadOnly => "readonly",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Self::Admin),
            "readonly" => Some(Self::ReadOnly),
            _ => None,
        }
    }
}

/// Hashes a password into an argon2id PHC string (`$argon2id$v=19$…`) with a random salt and the
/// crate's default parameters (19 MiB, 2 passes), the string `BILLING_CONSOLE_PASSWORD_HASH` takes.
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

/// The key that signs session cookies and derives CSRF tokens.
pub struct SessionKey(SecretSlice<u8>);

impl SessionKey {
    /// A random key (sessions end when the process restarts; one replica only).
    pub fn random() -> Self {
        let mut bytes = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(SecretSlice::from(bytes))
    }

    /// A key from a configured secret of at least 32 bytes (sessions survive restarts and are
    /// accepted by every replica configured with it).
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

/// A verified session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session {
    pub(crate) role: Role,
    pub(crate) expires: DateTime<Utc>,
    nonce: String,
}

impl Session {
    /// A new session for `role` until `expires`.
    pub(crate) fn new(role: Role, expires: DateTime<Utc>) -> Self {
        let mut nonce = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        Self { role, expires, nonce: hex::encode(nonce) }
    }

    fn body(&self) -> String {
        format!("{}.{}.{}", self.role.as_str(), self.expires.timestamp(), self.nonce)
    }

    /// The cookie value: `role.expires.nonce.mac`.
    pub(crate) fn encode(&self, key: &SessionKey) -> String {
        let body = self.body();
        let mac = hex::encode(key.mac(b"session", &body).finalize().into_bytes());
        format!("{body}.{mac}")
    }

    /// Verifies a cookie value: well-formed, signed with `key`, not expired at `now`.
    pub(crate) fn decode(value: &str, key: &SessionKey, now: DateTime<Utc>) -> Option<Self> {
        let (body, mac) = value.rsplit_once('.')?;
        let mac = hex::decode(mac).ok()?;
        key.mac(b"session", body).verify_slice(&mac).ok()?;
        let mut parts = body.split('.');
        let role = Role::parse(parts.next()?)?;
        let expires = DateTime::from_timestamp(parts.next()?.parse().ok()?, 0)?;
        let nonce = parts.next()?.to_owned();
        if parts.next().is_some() || now >= expires {
            return None;
        }
        Some(Self { role, expires, nonce })
    }

    /// The CSRF token of this session.
    pub(crate) fn csrf_token(&self, key: &SessionKey) -> String {
        hex::encode(key.mac(b"csrf", &self.nonce).finalize().into_bytes())
    }

    /// Whether `token` is this session's CSRF token (constant time).
    pub(crate) fn csrf_ok(&self, key: &SessionKey, token: &str) -> bool {
        let expected = self.csrf_token(key);
        expected.len() == token.len() && bool::from(expected.as_bytes().ct_eq(token.as_bytes()))
    }
}

/// Login attempts allowed per client address and minute, and for all clients together (so a
/// password guesser spread over many addresses is slowed too, and argon2 cannot be used to burn CPU).
#[derive(Debug)]
pub(crate) struct LoginLimiter {
    per_client: u32,
    overall: u32,
    windows: Mutex<Windows>,
}

#[derive(Debug, Default)]
struct Windows {
    clients: HashMap<Option<IpAddr>, (DateTime<Utc>, u32)>,
    all: Option<(DateTime<Utc>, u32)>,
}

impl LoginLimiter {
    pub(crate) fn new(per_client: u32) -> Self {
        Self { per_client, overall: per_client.saturating_mul(6), windows: Mutex::new(Windows::default()) }
    }

    /// Counts an attempt of `client` at `now`; `false` when over the limit (then it is not counted).
    pub(crate) fn allow(&self, client: Option<IpAddr>, now: DateTime<Utc>) -> bool {
        let window = Duration::minutes(1);
        let mut w = self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.clients.len() > 10_000 {
            w.clients.retain(|_, (start, _)| now - *start < window);
        }
        let all = match w.all {
            Some((start, n)) if now - start < window => (start, n),
            _ => (now, 0),
        };
        let mine = match w.clients.get(&client) {
            Some(&(start, n)) if now - start < window => (start, n),
            _ => (now, 0),
        };
        if all.1 >= self.overall || mine.1 >= self.per_client {
            return false;
        }
        w.all = Some((all.0, all.1 + 1));
        w.clients.insert(client, (mine.0, mine.1 + 1));
        true
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
    fn a_session_round_trips_and_refuses_tampering_expiry_and_other_keys() {
        let key = SessionKey::from_secret("0123456789abcdef0123456789abcdef").unwrap();
        let session = Session::new(Role::ReadOnly, at(3600));
        let cookie = session.encode(&key);
        assert_eq!(Session::decode(&cookie, &key, at(0)), Some(session.clone()));
        assert_eq!(Session::decode(&cookie, &key, at(3600)), None, "expired");
        assert_eq!(Session::decode(&cookie.replacen("readonly", "admin", 1), &key, at(0)), None, "role changed");
        let other = SessionKey::random();
        assert_eq!(Session::decode(&cookie, &other, at(0)), None, "another key");
        assert_eq!(Session::decode("admin.1.2.zz", &key, at(0)), None);
        assert!(session.csrf_ok(&key, &session.csrf_token(&key)));
        assert!(!session.csrf_ok(&key, &Session::new(Role::ReadOnly, at(1)).csrf_token(&key)), "bound to the session");
        assert!(!session.csrf_ok(&key, ""));
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
    fn the_login_limit_counts_per_client_and_overall_per_minute() {
        let limiter = LoginLimiter::new(2);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        assert!(limiter.allow(a, at(0)));
        assert!(limiter.allow(a, at(1)));
        assert!(!limiter.allow(a, at(2)), "third attempt within the minute");
        assert!(limiter.allow(Some(IpAddr::from([10, 0, 0, 2])), at(2)), "another client");
        assert!(limiter.allow(a, at(61)), "a new minute");
        for i in 3..=13u8 {
            limiter.allow(Some(IpAddr::from([10, 0, 0, i])), at(62));
        }
        assert!(!limiter.allow(Some(IpAddr::from([10, 0, 1, 1])), at(62)), "the overall limit");
    }
}
