#![doc = include_str!("../README.md")]

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

/// The longest `Retry-After` honoured; longer requests are capped to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
/// How many bytes of an error response body [`snippet`] quotes.
pub const SNIPPET_BYTES: usize = 256;
/// What stands in for a secret in `Debug` output and quoted bodies.
pub const REDACTED: &str = "[redacted]";

/// How to build a reqwest client. The defaults are reqwest's own pool settings, 30 s per request
/// and 5 s to connect.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    user_agent: String,
    timeout: Duration,
    connect_timeout: Duration,
    pool_idle_timeout: Option<Duration>,
    pool_max_idle_per_host: usize,
}

impl ClientSettings {
    /// Settings sending `user_agent` (e.g. `mindroom-billing-dokku/0.1.0`).
    pub fn new(user_agent: impl Into<String>) -> Self {
        Self {
            user_agent: user_agent.into(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Some(Duration::from_secs(90)),
            pool_max_idle_per_host: usize::MAX,
        }
    }

    /// Sets the whole-request timeout (connect, send, and read the answer).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    #[must_use]
    pub fn with_connect_timeout(mut self, connect_timeout: Duration) -> Self {
        self.connect_timeout = connect_timeout;
        self
    }

    /// How long an idle pooled connection is kept (`None`: for ever; default 90 s).
    #[must_use]
    pub fn with_pool_idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.pool_idle_timeout = idle;
        self
    }

    /// How many idle connections per host are kept (default: no limit).
    #[must_use]
    pub fn with_pool_max_idle_per_host(mut self, max: usize) -> Self {
        self.pool_max_idle_per_host = max;
        self
    }

    /// The whole-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Builds a reqwest client with rustls that never follows redirects (a redirect is an answer the
/// caller classifies, and following one could carry a secret header to another host).
pub fn build_client(settings: &ClientSettings) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.connect_timeout)
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(settings.user_agent.as_str())
        .build()
}

/// Why a base URL was refused by [`parse_base_url`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BaseUrlError(String);

/// Checks a configured base URL (absolute, `http` or `https`, no query or fragment) and returns it
/// trimmed, without trailing slashes, ready for `format!("{base}/path")`.
pub fn parse_base_url(raw: &str) -> Result<String, BaseUrlError> {
    let base = raw.trim().trim_end_matches('/').to_owned();
    let url = reqwest::Url::parse(&base).map_err(|e| BaseUrlError(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(BaseUrlError(format!("unsupported scheme {:?}", url.scheme())));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(BaseUrlError("a query or fragment is not allowed".into()));
    }
    Ok(base)
}

/// Why a secret cannot be sent as a header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretHeaderError {
    /// The secret is empty.
    #[error("empty")]
    Empty,
    /// The secret holds characters a header cannot carry (control characters, non-ASCII).
    #[error("not a valid header value")]
    NotAHeaderValue,
}

impl SecretHeaderError {
    /// The reason as a static string (for adapters' `InvalidApiKey(&'static str)`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::NotAHeaderValue => "not a valid header value",
        }
    }
}

/// The secret as a header value marked sensitive.
pub fn secret_header(secret: &str) -> Result<HeaderValue, SecretHeaderError> {
    if secret.is_empty() {
        return Err(SecretHeaderError::Empty);
    }
    let mut value = HeaderValue::from_str(secret).map_err(|_| SecretHeaderError::NotAHeaderValue)?;
    value.set_sensitive(true);
    Ok(value)
}

/// `Bearer <token>` as a header value marked sensitive.
pub fn bearer(token: &str) -> Result<HeaderValue, SecretHeaderError> {
    if token.is_empty() {
        return Err(SecretHeaderError::Empty);
    }
    secret_header(&format!("Bearer {token}"))
}

/// 408, 429 and 5xx are worth retrying; every other status that is not a success is not.
pub fn is_retryable_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT
}

/// What went wrong with a request that got no complete answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportFailure {
    /// The request or the answer took longer than the timeout.
    Timeout,
    /// No connection could be made.
    Connect,
    /// The connection was reset or closed before a complete answer (a stale keep-alive
    /// connection, a restarting proxy).
    Reset,
    /// The request could not be built: retrying cannot help.
    InvalidRequest,
    /// Anything else on the way (retryable).
    Other,
}

impl TransportFailure {
    /// Classifies a reqwest error.
    pub fn of(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout
        } else if e.is_connect() {
            Self::Connect
        } else if e.is_builder() {
            Self::InvalidRequest
        } else if is_connection_reset(e) {
            Self::Reset
        } else {
            Self::Other
        }
    }

    /// Everything but an invalid request is worth retrying.
    pub fn is_retryable(self) -> bool {
        self != Self::InvalidRequest
    }

    /// A short description for an error message (`timeout` is the configured one).
    pub fn describe(self, timeout: Duration) -> String {
        match self {
            Self::Timeout => format!("timed out (timeout {timeout:?})"),
            Self::Connect => "could not connect".to_owned(),
            Self::Reset => "connection closed before an answer".to_owned(),
            Self::InvalidRequest => "invalid request".to_owned(),
            Self::Other => "request failed".to_owned(),
        }
    }
}

/// Whether the connection was reset or closed before a complete answer arrived.
fn is_connection_reset(e: &reqwest::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
            if matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof) {
                return true;
            }
        }
        if err.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_incomplete_message() || h.is_canceled()) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Parses `Retry-After`: delay seconds or an HTTP-date (relative to `now`), capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The `Retry-After` of an answer, if present and readable (see [`parse_retry_after`]).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| parse_retry_after(v, now))
}

/// A short, single-line quote of a response body (at most [`SNIPPET_BYTES`] plus `…`), with
/// `secret` masked should the server echo it.
pub fn snippet(body: &[u8], secret: &str) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text.trim().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if !secret.is_empty() && out.contains(secret) {
        out = out.replace(secret, REDACTED);
    }
    if out.len() > SNIPPET_BYTES {
        let mut end = SNIPPET_BYTES;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_785_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(90)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("99999999999", now), Some(MAX_RETRY_AFTER));

        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers, now), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(3)));
    }

    #[test]
    fn statuses() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [301, 400, 401, 403, 404, 409, 422] {
            assert!(!is_retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn snippets_are_short_single_line_and_masked() {
        assert_eq!(snippet(b"  oops\nbad key k3y \r\n", "k3y"), "oops bad key [redacted]");
        let long = "é".repeat(400);
        let s = snippet(long.as_bytes(), "x");
        assert!(s.len() <= SNIPPET_BYTES + '…'.len_utf8());
        assert!(s.ends_with('…'));
    }

    #[test]
    fn base_urls() {
        assert_eq!(parse_base_url("http://x:1/api///").unwrap(), "http://x:1/api");
        assert!(parse_base_url("ftp://x").unwrap_err().to_string().contains("scheme"));
        assert!(parse_base_url("nope").is_err());
        assert!(parse_base_url("http://x/?a=1").is_err());
        assert!(parse_base_url("http://x/#f").is_err());
    }

    #[test]
    fn secret_headers_are_sensitive_and_validated() {
        let v = secret_header("k").unwrap();
        assert!(v.is_sensitive());
        assert!(!format!("{v:?}").contains('k'), "{v:?}");
        assert_eq!(secret_header(""), Err(SecretHeaderError::Empty));
        assert_eq!(secret_header("a\nb"), Err(SecretHeaderError::NotAHeaderValue));
        let b = bearer("sk_test_1").unwrap();
        assert!(b.is_sensitive());
        assert_eq!(b.to_str().unwrap(), "Bearer sk_test_1");
        assert_eq!(bearer(""), Err(SecretHeaderError::Empty));
        assert_eq!(SecretHeaderError::NotAHeaderValue.as_str(), "not a valid header value");
    }

    #[tokio::test]
    async fn transport_failures() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let client = build_client(&ClientSettings::new("t")).unwrap();
        let e = client.get(&url).send().await.unwrap_err();
        assert_eq!(TransportFailure::of(&e), TransportFailure::Connect);
        assert!(TransportFailure::of(&e).is_retryable());

        // A server that accepts and closes without answering: a reset connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                drop(s);
            }
        });
        let e = client.get(&url).send().await.unwrap_err();
        assert_eq!(TransportFailure::of(&e), TransportFailure::Reset, "{e:?}");
        let e = client.get("http://[::1").send().await.unwrap_err();
        assert_eq!(TransportFailure::of(&e), TransportFailure::InvalidRequest, "{e:?}");
        assert!(!TransportFailure::InvalidRequest.is_retryable());
        assert_eq!(TransportFailure::Timeout.describe(Duration::from_secs(2)), "timed out (timeout 2s)");
    }
}
