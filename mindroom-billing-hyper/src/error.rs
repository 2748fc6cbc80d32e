//! Every error answer, mapped to a status and a short JSON body in one place.

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::ResponseBody;

/// An error answer. Messages are meant for the client (Stripe shows webhook errors in its dashboard);
/// internals are logged where the error happens and never put here.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiError {
    /// 400 with the given message (signature, parse or body errors).
    BadRequest(String),
    /// 401: missing or wrong bearer token.
    Unauthorized,
    /// 404: no such route.
    NotFound,
    /// 404 with the given message: the route exists, the account it names does not.
    UnknownAccount(String),
    /// 409 with the given message: the request names more than one account.
    Ambiguous(String),
    /// 405 with the allowed method.
    MethodNotAllowed(&'static str),
    /// 408: the request body did not arrive in time.
    BodyTimeout,
    /// 413: the body is larger than the limit.
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// 503: a dependency (the store) is unavailable or too slow; retry later.
    Unavailable(&'static str),
    /// 500: anything else; the cause was logged.
    Internal,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl ApiError {
    /// The status code of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound | Self::UnknownAccount(_) => StatusCode::NOT_FOUND,
            Self::Ambiguous(_) => StatusCode::CONFLICT,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The client-facing message.
    pub fn message(&self) -> String {
        match self {
            Self::BadRequest(m) | Self::UnknownAccount(m) | Self::Ambiguous(m) => m.clone(),
            Self::Unauthorized => "missing or invalid bearer token".to_owned(),
            Self::NotFound => "not found".to_owned(),
            Self::MethodNotAllowed(allow) => format!("method not allowed (allowed: {allow})"),
            Self::BodyTimeout => "request body not received in time".to_owned(),
            Self::PayloadTooLarge { limit } => format!("request body larger than {limit} bytes"),
            Self::Unavailable(m) => (*m).to_owned(),
            Self::Internal => "internal error".to_owned(),
        }
    }

    /// The full HTTP answer.
    pub fn into_response(self) -> Response<ResponseBody> {
        let mut response = json(self.status(), &ErrorBody { error: &self.message() });
        match self {
            Self::MethodNotAllowed(allow) => {
                response.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
            }
            Self::Unauthorized => {
                response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::PayloadTooLarge { .. } | Self::BodyTimeout => {
                // The rest of the body is not read: the connection cannot be reused.
                response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status().as_u16(), self.message())
    }
}

impl std::error::Error for ApiError {}

/// A JSON answer.
pub(crate) fn json(status: StatusCode, body: &impl Serialize) -> Response<ResponseBody> {
    match serde_json::to_vec(body) {
        Ok(bytes) => raw(status, "application/json", Bytes::from(bytes)),
        Err(e) => {
            tracing::error!(error = %e, "response serialization failed");
            raw(
                StatusCode::INTERNAL_SERVER_ERROR,
                "application/json",
                Bytes::from_static(br#"{"error":"internal error"}"#),
            )
        }
    }
}

/// An answer with a fixed body.
pub(crate) fn raw(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
