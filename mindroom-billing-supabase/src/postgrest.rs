//! The PostgREST store (`SUPABASE_URL` + `SUPABASE_SERVICE_KEY`): the same SQL functions, called as
//! `POST {url}/rest/v1/rpc/<fn>` with body `{"p": …}` (see `POSTGREST.md` §1–§5).

use std::time::Duration;

use async_trait::async_trait;
use mindroom_billing_core::StoreError;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::wire::{Rpc, impl_store_via_rpc};

/// Settings of a [`PostgrestStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgrestOptions {
    /// Whole-request timeout (Supabase's platform limit is 60 s; RPCs run under an 8 s statement
    /// timeout).
    pub timeout: Duration,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Schema to call the functions in (`Content-Profile`); `None`: the first exposed one (`public`).
    pub schema: Option<String>,
    /// `User-Agent` sent (never a browser-like one: Supabase then refuses secret keys).
    pub user_agent: String,
}

impl Default for PostgrestOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            schema: None,
            user_agent: concat!("mindroom-billing/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

impl PostgrestOptions {
    /// Sets the request timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the schema (`Content-Profile`).
    #[must_use]
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }
}

/// The [`Store`](mindroom_billing_core::Store) over Supabase's Data API (PostgREST).
#[derive(Clone)]
pub struct PostgrestStore {
    client: reqwest::Client,
    rpc_base: String,
    key: SecretString,
    bearer: bool,
    schema: Option<String>,
}

impl std::fmt::Debug for PostgrestStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgrestStore")
            .field("rpc_base", &self.rpc_base)
            .field("key", &"[REDACTED]")
            .field("bearer", &self.bearer)
            .field("schema", &self.schema)
            .finish()
    }
}

/// Why a PostgREST call failed (the source of the [`StoreError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgrestError {
    /// The key was refused (any 401).
    #[error("{function}: authentication refused (401): {message}")]
    Unauthorized {
        /// The function called.
        function: &'static str,
        /// The gateway's message, if any.
        message: String,
    },
    /// An error answer, with PostgREST's `{code, message, details, hint}` as far as present.
    #[error("{function}: HTTP {status} {code}: {message}")]
    Api {
        /// The function called.
        function: &'static str,
        /// HTTP status.
        status: u16,
        /// SQLSTATE or `PGRSTxxx` (empty when absent).
        code: String,
        /// Message.
        message: String,
        /// Details.
        details: Option<String>,
        /// Hint.
        hint: Option<String>,
    },
    /// The request could not be sent or its answer not read (connect error, timeout…).
    #[error("{function}: request failed")]
    Transport {
        /// The function called.
        function: &'static str,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// A success answer whose body is not JSON.
    #[error("{function}: response is not JSON: {detail}")]
    Body {
        /// The function called.
        function: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Invalid configuration.
    #[error("invalid PostgREST configuration: {0}")]
    Config(String),
}

/// How an error answer is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Retry later.
    Unavailable,
    /// The key was refused.
    Unauthorized,
    /// Anything else.
    Other,
}

/// POSTGREST.md §3: 503/504 (PGRST000/001/002/003, 08*, 53300, 57P01) and 502/429 are
/// temporary; so are 500 with 40001/40P01 (PostgREST v16 no longer retries them) and 57014
/// (statement timeout under load); any 401 is an auth error; everything else is permanent.
pub(crate) fn classify(status: u16, code: &str) -> Class {
    if status == 401 {
        return Class::Unauthorized;
    }
    if matches!(status, 429 | 502 | 503 | 504)
        || matches!(code, "PGRST000" | "PGRST001" | "PGRST002" | "PGRST003")
        || crate::wire::retryable_sqlstate(code)
    {
        return Class::Unavailable;
    }
    Class::Other
}

fn looks_like_jwt(key: &str) -> bool {
    !key.starts_with("sb_") && key.split('.').count() == 3 && key.split('.').all(|part| !part.is_empty())
}

fn string_field(body: &Value, field: &str) -> Option<String> {
    match body.get(field)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

impl PostgrestStore {
    /// A store calling `{supabase_url}/rest/v1/rpc/<fn>` with `service_key` (a legacy
    /// `service_role` JWT, sent as `apikey` and `Authorization: Bearer`, or an `sb_secret_…` key,
    /// sent as `apikey` only). No request is made here.
    pub fn new(
        supabase_url: &str,
        service_key: SecretString,
        options: PostgrestOptions,
    ) -> Result<PostgrestStore, StoreError> {
        let config = |m: String| StoreError::Other(Box::new(PostgrestError::Config(m)));
        let base = supabase_url.trim().trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(config(format!("SUPABASE_URL must start with http:// or https://, got {base:?}")));
        }
        if service_key.expose_secret().trim().is_empty() {
            return Err(config("the service key is empty".into()));
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(options.user_agent.clone())
            .timeout(options.timeout)
            .connect_timeout(options.connect_timeout)
            .build()
            .map_err(|e| config(e.to_string()))?;
        let bearer = looks_like_jwt(service_key.expose_secret());
        Ok(PostgrestStore {
            client,
            rpc_base: format!("{base}/rest/v1/rpc/"),
            key: service_key,
            bearer,
            schema: options.schema,
        })
    }

    /// Whether the key is sent as a Bearer token too (legacy JWT keys only).
    pub fn sends_bearer(&self) -> bool {
        self.bearer
    }

    fn auth_headers(&self) -> Result<HeaderMap, StoreError> {
        let bad = || StoreError::Other(Box::new(PostgrestError::Config("the key is not a valid header value".into())));
        let key = self.key.expose_secret();
        let mut headers = HeaderMap::new();
        let mut apikey = HeaderValue::from_str(key).map_err(|_| bad())?;
        apikey.set_sensitive(true);
        headers.insert("apikey", apikey);
        if self.bearer {
            let mut auth = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| bad())?;
            auth.set_sensitive(true);
            headers.insert(AUTHORIZATION, auth);
        }
        if let Some(schema) = &self.schema {
            headers.insert("content-profile", HeaderValue::from_str(schema).map_err(|_| bad())?);
        }
        Ok(headers)
    }
}

#[async_trait]
impl Rpc for PostgrestStore {
    async fn call(&self, function: &'static str, p: Value) -> Result<Value, StoreError> {
        let transport = |source| StoreError::Unavailable(Box::new(PostgrestError::Transport { function, source }));
        let body = serde_json::json!({ "p": p }).to_string();
        let response = self
            .client
            .post(format!("{}{function}", self.rpc_base))
            .headers(self.auth_headers()?)
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(transport)?;
        if (200..300).contains(&status) {
            if text.trim().is_empty() {
                return Ok(Value::Null); // 204 (void)
            }
            return serde_json::from_str(&text)
                .map_err(|e| StoreError::Other(Box::new(PostgrestError::Body { function, detail: e.to_string() })));
        }
        // Lenient: the body may be PostgREST's object, Kong's {message, hint}, or empty.
        let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let code = string_field(&parsed, "code").unwrap_or_default();
        let mut message = string_field(&parsed, "message").unwrap_or_default();
        if message.is_empty() && !parsed.is_object() {
            message = text.chars().take(200).collect();
        }
        let err = match classify(status, &code) {
            Class::Unauthorized => {
                return Err(StoreError::Other(Box::new(PostgrestError::Unauthorized { function, message })));
            }
            class => (
                class,
                PostgrestError::Api {
                    function,
                    status,
                    code,
                    message,
                    details: string_field(&parsed, "details"),
                    hint: string_field(&parsed, "hint"),
                },
            ),
        };
        tracing::debug!(error = %err.1, "PostgREST call failed");
        Err(match err.0 {
            Class::Unavailable => StoreError::Unavailable(Box::new(err.1)),
            _ => StoreError::Other(Box::new(err.1)),
        })
    }
}

impl_store_via_rpc!(PostgrestStore);
crate::wire::operator::impl_operator_store_via_rpc!(PostgrestStore);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_postgrest_md() {
        assert_eq!(classify(503, "PGRST000"), Class::Unavailable);
        assert_eq!(classify(503, "PGRST001"), Class::Unavailable);
        assert_eq!(classify(504, "PGRST003"), Class::Unavailable);
        assert_eq!(classify(503, "08006"), Class::Unavailable);
        assert_eq!(classify(503, ""), Class::Unavailable);
        assert_eq!(classify(500, "40001"), Class::Unavailable);
        assert_eq!(classify(500, "40P01"), Class::Unavailable);
        assert_eq!(classify(401, ""), Class::Unauthorized);
        assert_eq!(classify(401, "PGRST301"), Class::Unauthorized);
        assert_eq!(classify(409, "23505"), Class::Other);
        assert_eq!(classify(404, "PGRST202"), Class::Other);
        assert_eq!(classify(400, "P0001"), Class::Other);
        assert_eq!(classify(403, "42501"), Class::Other);
        assert_eq!(classify(500, "XX000"), Class::Other);
    }

    #[test]
    fn only_jwt_keys_are_sent_as_bearer() {
        assert!(looks_like_jwt("eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2ln"));
        assert!(!looks_like_jwt("sb_secret_abc"));
        assert!(!looks_like_jwt("sb_secret_a.b.c"));
        assert!(!looks_like_jwt("a..b"));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = "sb_secret_very_secret_value_123";
        let store = PostgrestStore::new("https://x.supabase.co/", SecretString::from(key), PostgrestOptions::default())
            .unwrap();
        let shown = format!("{store:?}");
        assert!(!shown.contains(key), "{shown}");
        assert!(shown.contains("REDACTED"));
        assert!(shown.contains("https://x.supabase.co/rest/v1/rpc/"));
        assert!(!store.sends_bearer());
        let jwt = "aaa.bbb.ccc";
        let store =
            PostgrestStore::new("https://x.supabase.co", SecretString::from(jwt), PostgrestOptions::default()).unwrap();
        assert!(store.sends_bearer());
        assert!(!format!("{store:?}").contains(jwt));
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(PostgrestStore::new("x.supabase.co", SecretString::from("k"), PostgrestOptions::default()).is_err());
        assert!(PostgrestStore::new("https://x", SecretString::from(" "), PostgrestOptions::default()).is_err());
    }
}
