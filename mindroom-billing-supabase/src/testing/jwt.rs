//! Minimal HS256 JWT support (mint and verify) for the test gateway.
//!
//! Only what Supabase's legacy keys need: `{"alg":"HS256","typ":"JWT"}` headers signed with the
//! project JWT secret.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const B64_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Encodes bytes as unpadded base64url (RFC 4648 §5).
pub fn base64url_encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let idx = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        let emit = chunk.len() + 1;
        for i in idx.iter().take(emit) {
            out.push(char::from(B64_ALPHABET[*i as usize]));
        }
    }
    out
}

fn b64_value(c: u8) -> Option<u32> {
    match c {
        b'A'..=b'Z' => Some(u32::from(c - b'A')),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
        b'-' | b'+' => Some(62),
        b'_' | b'/' => Some(63),
        _ => None,
    }
}

/// Decodes unpadded (or padded) base64url. Returns `None` on invalid input.
pub fn base64url_decode(input: &str) -> Option<Vec<u8>> {
    let trimmed = input.trim_end_matches('=');
    let bytes = trimmed.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n: u32 = 0;
        for (i, c) in chunk.iter().enumerate() {
            n |= b64_value(*c)? << (18 - 6 * i);
        }
        let [_, b0, b1, b2] = n.to_be_bytes();
        out.push(b0);
        if chunk.len() > 2 {
            out.push(b1);
        }
        if chunk.len() > 3 {
            out.push(b2);
        }
    }
    Some(out)
}

/// Signs `claims` as an HS256 JWT with `secret`.
pub fn sign_hs256(claims: &serde_json::Value, secret: &str) -> String {
    let header = base64url_encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = base64url_encode(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{payload}");
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key size");
    mac.update(signing_input.as_bytes());
    let sig = base64url_encode(&mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Why a bearer token was rejected; maps to PGRST301 / PGRST303.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// Not decodable / bad signature / bad algorithm (PGRST301).
    Invalid(String),
    /// Claims invalid, e.g. expired (PGRST303).
    Claims(String),
}

/// Returns true if `token` looks like a JWT (three dot-separated parts).
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

/// Verifies an HS256 JWT and returns its claims object.
pub fn verify_hs256(token: &str, secret: &str) -> Result<serde_json::Value, JwtError> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(JwtError::Invalid(format!("Expected 3 parts in JWT; got {}", parts.len())));
    }
    let header = base64url_decode(parts[0])
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .ok_or_else(|| JwtError::Invalid("JWT header is not valid JSON".to_owned()))?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err(JwtError::Invalid("No suitable key or wrong key type".to_owned()));
    }
    let sig =
        base64url_decode(parts[2]).ok_or_else(|| JwtError::Invalid("JWT cryptographic operation failed".to_owned()))?;
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key size");
    mac.update(parts[0].as_bytes());
    mac.update(b".");
    mac.update(parts[1].as_bytes());
    mac.verify_slice(&sig).map_err(|_| JwtError::Invalid("JWT cryptographic operation failed".to_owned()))?;
    let claims = base64url_decode(parts[1])
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
        .filter(serde_json::Value::is_object)
        .ok_or_else(|| JwtError::Invalid("JWT claims are not a JSON object".to_owned()))?;
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    // PostgREST allows 30 s of clock skew.
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_f64().ok_or_else(|| JwtError::Claims("The JWT 'exp' claim must be a number".to_owned()))?;
        if now - 30.0 > exp {
            return Err(JwtError::Claims("JWT expired".to_owned()));
        }
    }
    if let Some(nbf) = claims.get("nbf").and_then(serde_json::Value::as_f64) {
        if now + 30.0 < nbf {
            return Err(JwtError::Claims("JWT not yet valid".to_owned()));
        }
    }
    if let Some(iat) = claims.get("iat").and_then(serde_json::Value::as_f64) {
        if now + 30.0 < iat {
            return Err(JwtError::Claims("JWT issued at future".to_owned()));
        }
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_roundtrip() {
        for len in 0..40u8 {
            let data: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37).wrapping_add(250)).collect();
            let enc = base64url_encode(&data);
            assert!(!enc.contains('='));
            assert_eq!(base64url_decode(&enc).unwrap(), data);
        }
        assert_eq!(base64url_encode(b"hello"), "aGVsbG8");
        assert_eq!(base64url_encode(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn sign_verify() {
        let claims = serde_json::json!({"role": "service_role", "iss": "supabase"});
        let token = sign_hs256(&claims, "secret");
        assert_eq!(verify_hs256(&token, "secret").unwrap(), claims);
        assert!(matches!(verify_hs256(&token, "other"), Err(JwtError::Invalid(_))));
        let expired = sign_hs256(&serde_json::json!({"role": "anon", "exp": 1000}), "secret");
        assert_eq!(verify_hs256(&expired, "secret"), Err(JwtError::Claims("JWT expired".to_owned())));
    }

    #[test]
    fn known_vector() {
        // jwt.io's canonical HS256 example.
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        let claims = verify_hs256(token, "your-256-bit-secret").unwrap();
        assert_eq!(claims["name"], "John Doe");
    }
}
