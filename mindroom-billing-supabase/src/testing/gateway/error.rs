//! PostgREST error responses and the SQLSTATE → HTTP mapping (POSTGREST.md §3).

use serde_json::{Value, json};

/// An error response: status, JSON body, extra headers.
#[derive(Debug, Clone)]
pub(crate) struct ErrorResponse {
    pub(crate) status: u16,
    /// `None` means an empty body.
    pub(crate) body: Option<Value>,
    pub(crate) headers: Vec<(String, String)>,
    /// Code reported in `Proxy-Status` (absent for gateway/Kong errors).
    pub(crate) proxy_code: Option<String>,
}

impl ErrorResponse {
    /// A PostgREST-shaped error `{code,message,details,hint}`.
    pub(crate) fn pgrst(
        status: u16,
        code: &str,
        message: impl Into<String>,
        details: Option<String>,
        hint: Option<String>,
    ) -> Self {
        ErrorResponse {
            status,
            body: Some(json!({
                "code": code,
                "message": message.into(),
                "details": details,
                "hint": hint,
            })),
            headers: Vec::new(),
            proxy_code: Some(code.to_owned()),
        }
    }

    /// The Supabase API gateway's (Kong) 401 body: no `code` field.
    pub(crate) fn kong_401(message: &str, hint: Option<&str>) -> Self {
        let mut body = json!({ "message": message });
        if let Some(h) = hint {
            body["hint"] = Value::String(h.to_owned());
        }
        ErrorResponse { status: 401, body: Some(body), headers: Vec::new(), proxy_code: None }
    }

    pub(crate) fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    /// A JWT failure (PGRST301 / PGRST303) with `WWW-Authenticate`.
    pub(crate) fn jwt(code: &str, message: &str) -> Self {
        let escaped = message.replace('\\', "\\\\").replace('"', "\\\"");
        Self::pgrst(401, code, message, None, None)
            .with_header("WWW-Authenticate", format!("Bearer error=\"invalid_token\", error_description=\"{escaped}\""))
    }
}

/// The fields of a PostgreSQL error.
#[derive(Debug, Clone)]
pub(crate) struct PgError {
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) detail: Option<String>,
    pub(crate) hint: Option<String>,
}

/// `Error.hs pgErrorStatus`, verbatim from the POSTGREST.md §3 table (first match wins).
pub(crate) fn pg_error_status(code: &str, message: &str, authed_non_anon: bool) -> u16 {
    let p2 = code.get(..2).unwrap_or("");
    match code {
        _ if p2 == "08" => 503,
        _ if p2 == "09" => 500,
        _ if p2 == "0L" || p2 == "0P" => 403,
        "23503" | "23505" => 409,
        "25006" => 405,
        "21000" if message.ends_with("requires a WHERE clause") => 400,
        "21000" => 500,
        "22023" if message.starts_with("role ") && message.ends_with(" does not exist") => 401,
        "22023" => 400,
        _ if matches!(p2, "25" | "2D" | "38" | "39" | "3B") => 500,
        _ if p2 == "28" => 403,
        _ if p2 == "40" => 500,
        "53400" => 500,
        _ if p2 == "53" => 503,
        _ if matches!(p2, "54" | "55" | "58" | "F0" | "HV" | "XX") => 500,
        "57P01" => 503,
        _ if p2 == "57" => 500,
        "P0001" => 400,
        _ if p2 == "P0" => 500,
        "42883" if message.starts_with("function xmlagg(") => 406,
        "42883" => 404,
        "42P01" => 404,
        "42P17" => 500,
        "42501" if authed_non_anon => 403,
        "42501" => 401,
        _ if code.starts_with("PT") => code
            .get(2..)
            .filter(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (100..=599).contains(s))
            .unwrap_or(500),
        _ => 400,
    }
}

fn parse_raise_message(msg: &str) -> Option<(String, String, Option<String>, Option<String>)> {
    let v: Value = serde_json::from_str(msg).ok()?;
    let obj = v.as_object()?;
    let code = obj.get("code")?.as_str()?.to_owned();
    let message = obj.get("message")?.as_str()?.to_owned();
    let opt = |k: &str| -> Option<Option<String>> {
        match obj.get(k) {
            None | Some(Value::Null) => Some(None),
            Some(Value::String(s)) => Some(Some(s.clone())),
            Some(_) => None,
        }
    };
    Some((code, message, opt("details")?, opt("hint")?))
}

fn parse_raise_detail(detail: &str) -> Option<(u16, Vec<(String, String)>)> {
    let v: Value = serde_json::from_str(detail).ok()?;
    let obj = v.as_object()?;
    let status = u16::try_from(obj.get("status")?.as_u64()?).ok()?;
    if !(100..=599).contains(&status) {
        return None;
    }
    if let Some(st) = obj.get("status_text") {
        if !st.is_string() && !st.is_null() {
            return None;
        }
    }
    let headers = obj
        .get("headers")?
        .as_object()?
        .iter()
        .map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
        .collect::<Option<Vec<_>>>()?;
    Some((status, headers))
}

/// Maps a PostgreSQL error to the PostgREST response.
pub(crate) fn from_pg_error(err: &PgError, role: &str, anon_role: &str) -> ErrorResponse {
    if err.code == "PGRST" {
        let Some((code, message, details, hint)) = parse_raise_message(&err.message) else {
            return ErrorResponse::pgrst(
                500,
                "PGRST121",
                "Could not parse JSON in the RAISE SQLSTATE 'PGRST' error",
                Some(format!("Invalid JSON value for MESSAGE: '{}'", err.message)),
                Some(
                    "MESSAGE must be a JSON object with obligatory keys: 'code', 'message' and optional keys: 'details', 'hint'."
                        .to_owned(),
                ),
            );
        };
        let detail = err.detail.clone().unwrap_or_default();
        let Some((status, headers)) = parse_raise_detail(&detail) else {
            return ErrorResponse::pgrst(
                500,
                "PGRST121",
                "Could not parse JSON in the RAISE SQLSTATE 'PGRST' error",
                Some(format!("Invalid JSON value for DETAIL: '{detail}'")),
                Some(
                    "DETAIL must be a JSON object with obligatory keys: 'status', 'headers' and optional key: 'status_text'."
                        .to_owned(),
                ),
            );
        };
        let mut resp = ErrorResponse::pgrst(status, &code, message, details, hint);
        resp.headers = headers;
        return resp;
    }
    let authed_non_anon = role != anon_role;
    let status = pg_error_status(&err.code, &err.message, authed_non_anon);
    let mut resp = ErrorResponse::pgrst(status, &err.code, err.message.clone(), err.detail.clone(), err.hint.clone());
    if status == 401 && err.code == "42501" {
        resp = resp.with_header("WWW-Authenticate", "Bearer");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let s = |c: &str| pg_error_status(c, "x", true);
        assert_eq!(s("08006"), 503);
        assert_eq!(s("09000"), 500);
        assert_eq!(s("0P000"), 403);
        assert_eq!(s("23505"), 409);
        assert_eq!(s("23503"), 409);
        assert_eq!(s("23502"), 400);
        assert_eq!(s("23514"), 400);
        assert_eq!(s("25006"), 405);
        assert_eq!(s("25001"), 500);
        assert_eq!(s("21000"), 500);
        assert_eq!(pg_error_status("21000", "DELETE requires a WHERE clause", true), 400);
        assert_eq!(pg_error_status("22023", "role \"x\" does not exist", true), 401);
        assert_eq!(s("22023"), 400);
        assert_eq!(s("28000"), 403);
        assert_eq!(s("40001"), 500);
        assert_eq!(s("40P01"), 500);
        assert_eq!(s("53400"), 500);
        assert_eq!(s("53300"), 503);
        assert_eq!(s("54000"), 500);
        assert_eq!(s("XX000"), 500);
        assert_eq!(s("57P01"), 503);
        assert_eq!(s("57014"), 500);
        assert_eq!(s("P0001"), 400);
        assert_eq!(s("P0002"), 500);
        assert_eq!(s("42883"), 404);
        assert_eq!(pg_error_status("42883", "function xmlagg(integer) does not exist", true), 406);
        assert_eq!(s("42P01"), 404);
        assert_eq!(s("42P17"), 500);
        assert_eq!(s("42501"), 403);
        assert_eq!(pg_error_status("42501", "x", false), 401);
        assert_eq!(s("PT402"), 402);
        assert_eq!(s("PTABC"), 500);
        assert_eq!(s("22P02"), 400);
        assert_eq!(s("42703"), 400);
    }
}
