//! Per-request processing: auth, request parsing, resolution, the transaction, the response.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value};
use sqlx::{Connection, PgConnection};

use super::State;
use super::error::{ErrorResponse, PgError, from_pg_error};
use super::routine::{self, BodyKind, ReturnKind, Routine};
use crate::testing::jwt::{self, JwtError};

const JSON_UTF8: &str = "application/json; charset=utf-8";

/// Response for a request whose handler task panicked.
pub(crate) fn internal_error() -> Response<Full<Bytes>> {
    error_response(ErrorResponse::pgrst(500, "PGRSTX00", "Internal gateway error", None, None), false)
}

fn error_response(err: ErrorResponse, head: bool) -> Response<Full<Bytes>> {
    let body = err.body.as_ref().map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let mut builder =
        Response::builder().status(StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    if err.body.is_some() {
        builder = builder.header("Content-Type", JSON_UTF8);
    }
    if let Some(code) = &err.proxy_code {
        builder = builder.header("Proxy-Status", format!("PostgREST; error={code}"));
    }
    for (k, v) in &err.headers {
        if let (Ok(name), Ok(value)) = (hyper::header::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            builder = builder.header(name, value);
        }
    }
    builder
        .body(Full::new(if head { Bytes::new() } else { body }))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `application/x-www-form-urlencoded` / query string → ordered pairs.
fn parse_urlencoded(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let dec = |x: &str| {
                let x = x.replace('+', " ");
                percent_decode(&x).unwrap_or(x)
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Identity established by the auth layers.
struct Auth {
    role: String,
    claims: Value,
}

/// Kong's `apikey` check, then PostgREST's JWT check.
fn authenticate(state: &State, req_headers: &HeaderMap, query: &str) -> Result<Auth, ErrorResponse> {
    let apikey = header(req_headers, "apikey")
        .map(str::to_owned)
        .or_else(|| parse_urlencoded(query).into_iter().find(|(k, _)| k == "apikey").map(|(_, v)| v));
    let Some(apikey) = apikey else {
        return Err(ErrorResponse::kong_401(
            "No API key found in request",
            Some("No `apikey` request header or url param was found."),
        ));
    };
    if !state.api_keys.iter().any(|k| k == &apikey) {
        return Err(ErrorResponse::kong_401(
            "Invalid API key",
            Some("Double check your Supabase `anon` or `service_role` API key."),
        ));
    }
    let is_secret_key = apikey.starts_with("sb_secret_");
    if is_secret_key && header(req_headers, "user-agent").is_some_and(|ua| ua.contains("Mozilla/")) {
        return Err(ErrorResponse::kong_401("Forbidden use of secret API key in browser", None));
    }
    let service_role = || Auth {
        role: "service_role".to_owned(),
        claims: serde_json::json!({"role": "service_role", "iss": "supabase"}),
    };
    let token = match header(req_headers, "authorization") {
        None => {
            if is_secret_key {
                // The platform gateway injects a short-lived service_role JWT.
                return Ok(service_role());
            }
            // Legacy key without Authorization: supabase-js falls back to the key as Bearer.
            apikey.clone()
        }
        Some(value) => {
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .map(str::trim)
                .ok_or_else(|| ErrorResponse::jwt("PGRST301", "Expected 3 parts in JWT; got 1"))?;
            if is_secret_key && token == apikey {
                return Ok(service_role());
            }
            token.to_owned()
        }
    };
    if !jwt::looks_like_jwt(&token) {
        let parts = token.split('.').count();
        return Err(ErrorResponse::jwt("PGRST301", &format!("Expected 3 parts in JWT; got {parts}")));
    }
    match jwt::verify_hs256(&token, &state.config.jwt_secret) {
        Ok(claims) => {
            let role = match claims.get("role") {
                Some(Value::String(r)) => r.clone(),
                None => state.config.anon_role.clone(),
                Some(_) => {
                    return Err(ErrorResponse::jwt("PGRST303", "The JWT 'role' claim must be a string"));
                }
            };
            Ok(Auth { role, claims })
        }
        Err(JwtError::Invalid(m)) => Err(ErrorResponse::jwt("PGRST301", &m)),
        Err(JwtError::Claims(m)) => Err(ErrorResponse::jwt("PGRST303", &m)),
    }
}

/// The parsed RPC request.
struct RpcRequest {
    method: Method,
    fn_name: String,
    schema: String,
    body_kind: BodyKind,
    keys: BTreeSet<String>,
    /// Raw JSON text passed to PG (arguments object/array), or the raw single-parameter body.
    payload: Bytes,
    singular: bool,
    headers_json: String,
    path: String,
}

fn invalid_json(msg: &str) -> ErrorResponse {
    ErrorResponse::pgrst(400, "PGRST102", msg, None, None)
}

/// Keys of a JSON body (object, or array of objects with the same keys).
fn json_keys(raw: &[u8]) -> Result<BTreeSet<String>, ErrorResponse> {
    // Only the keys are taken from this parse; the raw text goes to PostgreSQL untouched.
    let v: Value = serde_json::from_slice(raw).map_err(|_| invalid_json("Empty or invalid json"))?;
    match v {
        Value::Object(m) => Ok(m.keys().cloned().collect()),
        Value::Array(items) => {
            let mut iter = items.iter();
            let Some(first) = iter.next() else {
                return Ok(BTreeSet::new());
            };
            let first_keys: BTreeSet<String> =
                first.as_object().ok_or_else(|| invalid_json("Empty or invalid json"))?.keys().cloned().collect();
            for item in iter {
                let keys: BTreeSet<String> =
                    item.as_object().ok_or_else(|| invalid_json("Empty or invalid json"))?.keys().cloned().collect();
                if keys != first_keys {
                    return Err(invalid_json("All object keys must match"));
                }
            }
            Ok(first_keys)
        }
        _ => Err(invalid_json("Empty or invalid json")),
    }
}

fn pairs_to_json(pairs: &[(String, String)]) -> (BTreeSet<String>, Bytes) {
    let mut map = Map::new();
    for (k, v) in pairs {
        map.insert(k.clone(), Value::String(v.clone()));
    }
    let keys = map.keys().cloned().collect();
    (keys, Bytes::from(Value::Object(map).to_string()))
}

const RESERVED_QUERY: [&str; 8] = ["select", "columns", "order", "limit", "offset", "on_conflict", "apikey", "and"];

async fn parse_request(state: &State, req: Request<Incoming>) -> Result<RpcRequest, ErrorResponse> {
    let method = req.method().clone();
    let raw_path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let path = raw_path.strip_prefix("/rest/v1").unwrap_or(&raw_path).to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let fn_name = match segments.as_slice() {
        ["rpc", name] if !name.is_empty() => percent_decode(name),
        _ => None,
    }
    .ok_or_else(|| ErrorResponse::pgrst(404, "PGRST125", "Invalid path specified in request URL", None, None))?;

    let read_only_method = method == Method::GET || method == Method::HEAD;
    if method == Method::PUT || method == Method::PATCH || method == Method::DELETE {
        return Err(ErrorResponse::pgrst(
            405,
            "PGRST101",
            format!("Cannot use the {method} method on RPC"),
            None,
            None,
        ));
    }
    if !read_only_method && method != Method::POST && method != Method::OPTIONS {
        return Err(ErrorResponse::pgrst(405, "PGRST117", format!("Unsupported HTTP method: {method}"), None, None));
    }

    let headers = req.headers().clone();
    let profile_header = if read_only_method { "accept-profile" } else { "content-profile" };
    let exposed = &state.config.exposed_schemas;
    let schema = match header(&headers, profile_header) {
        Some(s) => {
            if !exposed.iter().any(|e| e == s) {
                return Err(ErrorResponse::pgrst(
                    406,
                    "PGRST106",
                    format!("Invalid schema: {s}"),
                    None,
                    Some(format!("Only the following schemas are exposed: {}", exposed.join(", "))),
                ));
            }
            s.to_owned()
        }
        None => exposed.first().cloned().unwrap_or_else(|| "public".to_owned()),
    };

    let mut singular = false;
    if let Some(accept) = header(&headers, "accept") {
        let mut ok = false;
        for item in accept.split(',') {
            let mt = item.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            match mt.as_str() {
                "" | "*/*" | "application/json" | "application/*" => {
                    ok = true;
                    break;
                }
                "application/vnd.pgrst.object+json" | "application/vnd.pgrst.object" => {
                    ok = true;
                    singular = true;
                    break;
                }
                _ => {}
            }
        }
        if !ok {
            return Err(ErrorResponse::pgrst(
                406,
                "PGRST107",
                format!("None of these media types are available: {accept}"),
                None,
                None,
            ));
        }
    }

    let mut headers_map = Map::new();
    for (k, v) in &headers {
        if let Ok(v) = v.to_str() {
            headers_map.insert(k.as_str().to_ascii_lowercase(), Value::String(v.to_owned()));
        }
    }
    let headers_json = Value::Object(headers_map).to_string();

    let (body_kind, keys, payload) = if read_only_method || method == Method::OPTIONS {
        let pairs: Vec<(String, String)> =
            parse_urlencoded(&query).into_iter().filter(|(k, _)| !RESERVED_QUERY.contains(&k.as_str())).collect();
        let (keys, payload) = pairs_to_json(&pairs);
        (BodyKind::Query, keys, payload)
    } else {
        let ct = header(&headers, "content-type")
            .map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
            .unwrap_or_else(|| "application/json".to_owned());
        let kind = match ct.as_str() {
            "application/json" | "" => BodyKind::Json,
            "application/x-www-form-urlencoded" => BodyKind::Form,
            "text/plain" => BodyKind::Text,
            "text/xml" | "application/xml" => BodyKind::Xml,
            "application/octet-stream" => BodyKind::Octet,
            _ => {
                return Err(invalid_json(&format!(
                    "Content-Type not acceptable: {}",
                    header(&headers, "content-type").unwrap_or("")
                )));
            }
        };
        let body = req
            .into_body()
            .collect()
            .await
            .map_err(|e| invalid_json(&format!("Error reading the request body: {e}")))?
            .to_bytes();
        match kind {
            BodyKind::Json => {
                if body.iter().all(u8::is_ascii_whitespace) {
                    // An empty body is `{}` (an unnamed json parameter still gets '').
                    (kind, BTreeSet::new(), body)
                } else {
                    (kind, json_keys(&body)?, body)
                }
            }
            BodyKind::Form => {
                let pairs = parse_urlencoded(&String::from_utf8_lossy(&body));
                let (keys, payload) = pairs_to_json(&pairs);
                (kind, keys, payload)
            }
            _ => (kind, BTreeSet::new(), body),
        }
    };

    Ok(RpcRequest { method, fn_name, schema, body_kind, keys, payload, singular, headers_json, path })
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What is bound as `$1` of the call query.
enum CallArg {
    None,
    Json(String),
    Text(String),
    Bytes(Vec<u8>),
}

/// Builds the §2 response SQL (`WITH pgrst_source AS (...) SELECT ...`).
fn build_call_sql(routine: &Routine, req: &RpcRequest, max_rows: Option<u64>) -> (String, CallArg) {
    let qi = format!("{}.{}", quote_ident(&routine.schema), quote_ident(&routine.name));
    let scalar = matches!(routine.ret, ReturnKind::Scalar | ReturnKind::SetScalar | ReturnKind::Void);
    let call_it = |args: &str| {
        if scalar {
            format!("(SELECT {qi}({args}) pgrst_scalar) pgrst_call")
        } else {
            format!("{qi}({args}) pgrst_call")
        }
    };
    let select_cols = if scalar { "pgrst_call.pgrst_scalar" } else { "pgrst_call.*" };
    let (from, arg) = if let Some(ty) = routine.single_unnamed_type() {
        let raw = req.payload.clone();
        let arg = match ty {
            "bytea" => CallArg::Bytes(raw.to_vec()),
            "json" | "jsonb" => CallArg::Json(String::from_utf8_lossy(&raw).into_owned()),
            _ => CallArg::Text(String::from_utf8_lossy(&raw).into_owned()),
        };
        let cast = match ty {
            "bytea" => "$1".to_owned(),
            "json" | "jsonb" => format!("$1::{ty}"),
            _ => format!("$1::text::{ty}"),
        };
        (format!("FROM {}", call_it(&cast)), arg)
    } else {
        let params: Vec<_> = routine.params.iter().filter(|p| req.keys.contains(&p.name)).collect();
        if params.is_empty() {
            (format!("FROM {}", call_it("")), CallArg::None)
        } else {
            let coldefs =
                params.iter().map(|p| format!("{} {}", quote_ident(&p.name), p.ty)).collect::<Vec<_>>().join(", ");
            let args = params
                .iter()
                .map(|p| {
                    format!(
                        "{}{} := pgrst_body.{}",
                        if p.variadic { "VARIADIC " } else { "" },
                        quote_ident(&p.name),
                        quote_ident(&p.name)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let payload = if req.payload.iter().all(u8::is_ascii_whitespace) {
                "{}".to_owned()
            } else {
                String::from_utf8_lossy(&req.payload).into_owned()
            };
            (
                format!(
                    "FROM (SELECT $1::json AS json_data) pgrst_payload, \
                     LATERAL (SELECT CASE WHEN json_typeof(pgrst_payload.json_data) = 'array' \
                     THEN pgrst_payload.json_data ELSE json_build_array(pgrst_payload.json_data) END AS val) pgrst_uniform_json, \
                     LATERAL (SELECT * FROM json_to_recordset(pgrst_uniform_json.val) AS _({coldefs}) LIMIT 1) pgrst_body, \
                     LATERAL {}",
                    call_it(&args)
                ),
                CallArg::Json(payload),
            )
        }
    };
    let set = matches!(routine.ret, ReturnKind::SetScalar | ReturnKind::SetComposite);
    let col = if scalar { "_postgrest_t.pgrst_scalar" } else { "_postgrest_t" };
    let body = match routine.ret {
        ReturnKind::Void => "'null'::text".to_owned(),
        _ if !set || req.singular => {
            format!("coalesce((json_agg({col})->0)::text, 'null')")
        }
        _ => format!("coalesce(json_agg({col}), '[]')::text"),
    };
    let limit = match (set, max_rows) {
        (true, Some(n)) => format!(" LIMIT {n}"),
        _ => String::new(),
    };
    let sql = format!(
        "WITH pgrst_source AS (SELECT {select_cols} {from}) \
         SELECT pg_catalog.count(_postgrest_t)::int8 AS page_total, {body} AS body, \
         nullif(current_setting('response.headers', true), '') AS response_headers, \
         nullif(current_setting('response.status', true), '') AS response_status \
         FROM (SELECT * FROM pgrst_source{limit}) _postgrest_t"
    );
    (sql, arg)
}

/// `statement_timeout`, `lock_timeout` ... from `pg_db_role_setting` for the authenticator and
/// the impersonated role (the latter wins).
async fn role_settings(
    conn: &mut PgConnection,
    authenticator: &str,
    role: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select case when r.rolname = $1 then 0 else 1 end::int4::text || s.setdatabase::text, c \
           from pg_catalog.pg_db_role_setting s \
           join pg_catalog.pg_roles r on r.oid = s.setrole, \
           unnest(s.setconfig) c \
          where r.rolname in ($1, $2) \
            and s.setdatabase in (0, (select oid from pg_catalog.pg_database where datname = current_database())) \
          order by 1",
    )
    .bind(authenticator)
    .bind(role)
    .fetch_all(conn)
    .await?;
    const APPLIED: [&str; 4] =
        ["statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout", "default_transaction_isolation"];
    let mut out: Vec<(String, String)> = Vec::new();
    for (_, c) in rows {
        if let Some((k, v)) = c.split_once('=') {
            if APPLIED.contains(&k) {
                out.retain(|(ek, _)| ek != k);
                out.push((k.to_owned(), v.to_owned()));
            }
        }
    }
    Ok(out)
}

fn db_error(e: &sqlx::Error) -> Option<PgError> {
    match e {
        sqlx::Error::Database(db) => {
            let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
            Some(PgError {
                code: db.code().map(|c| c.into_owned()).unwrap_or_default(),
                message: db.message().to_owned(),
                detail: pg.and_then(|p| p.detail().map(str::to_owned)),
                hint: pg.and_then(|p| p.hint().map(str::to_owned)),
            })
        }
        _ => None,
    }
}

fn client_error(e: &sqlx::Error) -> ErrorResponse {
    ErrorResponse::pgrst(503, "PGRST001", "Database client error. Retrying the connection.", Some(e.to_string()), None)
}

fn sql_error(e: &sqlx::Error, role: &str, anon_role: &str) -> ErrorResponse {
    match db_error(e) {
        Some(pg) => from_pg_error(&pg, role, anon_role),
        None => client_error(e),
    }
}

/// The successful result of the main query.
struct CallResult {
    page_total: i64,
    body: Option<String>,
    response_headers: Option<String>,
    response_status: Option<String>,
}

fn run_call<'a>(
    state: &'a State,
    auth: &'a Auth,
    req: &'a RpcRequest,
    routine: &'a Routine,
    conn: &'a mut PgConnection,
) -> BoxFuture<'a, Result<CallResult, ErrorResponse>> {
    Box::pin(run_call_inner(state, auth, req, routine, conn))
}

async fn run_call_inner(
    state: &State,
    auth: &Auth,
    req: &RpcRequest,
    routine: &Routine,
    conn: &mut PgConnection,
) -> Result<CallResult, ErrorResponse> {
    let cfg = &state.config;
    let role_err = |e: &sqlx::Error| sql_error(e, &auth.role, &cfg.anon_role);
    let settings = role_settings(conn, &cfg.authenticator_role, &auth.role).await.map_err(|e| role_err(&e))?;

    let read_write = req.method == Method::POST && routine.volatile;
    let isolation = routine
        .setting("default_transaction_isolation")
        .or_else(|| settings.iter().find(|(k, _)| k == "default_transaction_isolation").map(|(_, v)| v.as_str()))
        .map(|v| v.trim_matches('\'').to_ascii_uppercase())
        .filter(|v| matches!(v.as_str(), "READ COMMITTED" | "REPEATABLE READ" | "SERIALIZABLE"))
        .unwrap_or_else(|| "READ COMMITTED".to_owned());
    let begin = format!("BEGIN ISOLATION LEVEL {isolation} {}", if read_write { "READ WRITE" } else { "READ ONLY" });
    let mut tx = conn.begin_with(begin).await.map_err(|e| role_err(&e))?;

    // The set_config batch, in txVarQuery order.
    let mut search_path = vec![quote_ident(&routine.schema)];
    search_path.extend(cfg.extra_search_path.iter().map(|s| quote_ident(s)));
    let mut gucs: Vec<(String, String)> = vec![("search_path".to_owned(), search_path.join(", "))];
    gucs.extend(settings.into_iter().filter(|(k, _)| k != "default_transaction_isolation"));
    gucs.push(("role".to_owned(), auth.role.clone()));
    gucs.push(("request.jwt.claims".to_owned(), auth.claims.to_string()));
    gucs.push(("request.method".to_owned(), req.method.to_string()));
    gucs.push(("request.path".to_owned(), req.path.clone()));
    gucs.push(("request.headers".to_owned(), req.headers_json.clone()));
    gucs.push(("request.cookies".to_owned(), "{}".to_owned()));
    // Hoisted function settings (db-hoisted-tx-settings).
    if let Some(v) = routine.setting("statement_timeout") {
        gucs.push(("statement_timeout".to_owned(), v.to_owned()));
    }
    let batch = gucs
        .iter()
        .map(|(k, v)| format!("set_config({}, {}, true)", quote_literal(k), quote_literal(v)))
        .collect::<Vec<_>>()
        .join(", ");
    let batch_sql = format!("select {batch}");
    let batch_result = sqlx::query(&batch_sql).persistent(false).execute(&mut *tx).await;
    if let Err(e) = batch_result {
        let _ = tx.rollback().await;
        return Err(role_err(&e));
    }

    let (sql, arg) = build_call_sql(routine, req, cfg.max_rows);
    let query = sqlx::query_as::<_, (i64, Option<String>, Option<String>, Option<String>)>(&sql).persistent(false);
    let query = match arg {
        CallArg::None => query,
        CallArg::Json(s) | CallArg::Text(s) => query.bind(s),
        CallArg::Bytes(b) => query.bind(b),
    };
    let row = match query.fetch_one(&mut *tx).await {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.rollback().await;
            return Err(role_err(&e));
        }
    };
    let result = CallResult { page_total: row.0, body: row.1, response_headers: row.2, response_status: row.3 };
    if req.singular && result.page_total != 1 {
        let _ = tx.rollback().await;
        return Err(ErrorResponse::pgrst(
            406,
            "PGRST116",
            "JSON object requested, multiple (or no) rows returned",
            Some(format!("The result contains {} rows", result.page_total)),
            None,
        ));
    }
    tx.commit().await.map_err(|e| role_err(&e))?;
    Ok(result)
}

fn success_response(
    state: &State,
    req: &RpcRequest,
    routine: &Routine,
    result: CallResult,
) -> Result<Response<Full<Bytes>>, ErrorResponse> {
    let mut status = if routine.ret == ReturnKind::Void { 204 } else { 200 };
    if let Some(s) = &result.response_status {
        status = s
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
            .ok_or_else(|| ErrorResponse::pgrst(500, "PGRST112", "Invalid response.status", None, None))?;
    }
    let mut extra: Vec<(String, String)> = Vec::new();
    if let Some(h) = &result.response_headers {
        let invalid = || ErrorResponse::pgrst(500, "PGRST111", "Invalid response.headers", None, None);
        let v: Value = serde_json::from_str(h).map_err(|_| invalid())?;
        for item in v.as_array().ok_or_else(invalid)? {
            for (k, v) in item.as_object().ok_or_else(invalid)? {
                extra.push((k.clone(), v.as_str().ok_or_else(invalid)?.to_owned()));
            }
        }
    }
    let mut builder = Response::builder().status(StatusCode::from_u16(status).unwrap_or(StatusCode::OK));
    let content_range = if result.page_total > 0 { format!("0-{}/*", result.page_total - 1) } else { "*/*".to_owned() };
    builder = builder.header("Content-Range", content_range);
    if state.config.exposed_schemas.len() > 1 {
        builder = builder.header("Content-Profile", req.schema.as_str());
    }
    let body = if routine.ret == ReturnKind::Void || status == 204 {
        Bytes::new()
    } else {
        builder = builder.header("Content-Type", JSON_UTF8);
        Bytes::from(result.body.unwrap_or_else(|| "null".to_owned()))
    };
    for (k, v) in extra {
        if let (Ok(name), Ok(value)) = (hyper::header::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(&v))
        {
            builder = builder.header(name, value);
        }
    }
    let body = if req.method == Method::HEAD { Bytes::new() } else { body };
    builder.body(Full::new(body)).map_err(|e| ErrorResponse::pgrst(500, "PGRSTX00", e.to_string(), None, None))
}

async fn process(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ErrorResponse> {
    let query = req.uri().query().unwrap_or("").to_owned();
    let auth = authenticate(&state, req.headers(), &query)?;
    let rpc = parse_request(&state, req).await?;

    let acquired = state.pool.acquire().await;
    if let Err(sqlx::Error::PoolTimedOut) = &acquired {
        if state.pool.size() == 0 {
            // sqlx reports failed connection attempts as a pool timeout: find out why.
            let why = match tokio::time::timeout(
                std::time::Duration::from_secs(2),
                PgConnection::connect_with(&state.connect_options),
            )
            .await
            {
                Ok(Ok(c)) => {
                    let _ = c.close().await;
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("connection attempt timed out".to_owned()),
            };
            if let Some(why) = why {
                return Err(ErrorResponse::pgrst(
                    503,
                    "PGRST000",
                    "Database connection error. Retrying the connection.",
                    Some(why),
                    None,
                ));
            }
        }
    }
    let mut conn = acquired.map_err(|e| match e {
        sqlx::Error::PoolTimedOut => {
            ErrorResponse::pgrst(504, "PGRST003", "Timed out acquiring connection from connection pool.", None, None)
        }
        e => match db_error(&e) {
            // e.g. 57P03 cannot_connect_now, 53300 too_many_connections, 3D000 no database.
            Some(pg) if !pg.code.starts_with("08") => from_pg_error(&pg, &auth.role, &state.config.anon_role),
            _ => ErrorResponse::pgrst(
                503,
                "PGRST000",
                "Database connection error. Retrying the connection.",
                Some(e.to_string()),
                None,
            ),
        },
    })?;
    let routines = match routine::load(&mut conn, &rpc.schema, &rpc.fn_name).await {
        Ok(r) => r,
        Err(e) => {
            if db_error(&e).is_none() {
                conn.close_on_drop();
            }
            return Err(sql_error(&e, &auth.role, &state.config.anon_role));
        }
    };
    let routine = routine::find_proc(&rpc.schema, &rpc.fn_name, routines, &rpc.keys, rpc.body_kind)?;

    if rpc.method == Method::OPTIONS {
        let allow = if routine.volatile { "OPTIONS,POST" } else { "OPTIONS,GET,HEAD,POST" };
        return Response::builder()
            .status(200)
            .header("Allow", allow)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ErrorResponse::pgrst(500, "PGRSTX00", e.to_string(), None, None));
    }

    let result = match run_call(&state, &auth, &rpc, &routine, &mut conn).await {
        Ok(r) => r,
        Err(err) => {
            if err.proxy_code.as_deref() == Some("PGRST001") {
                conn.close_on_drop();
            }
            return Err(err);
        }
    };
    success_response(&state, &rpc, &routine, result)
}

/// Handles one HTTP request.
pub(crate) async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    match process(state, req).await {
        Ok(resp) => resp,
        Err(err) => error_response(err, head),
    }
}
