//! Integration tests of the PostgREST-compatible test gateway against a real PostgreSQL
//! (POSTGREST.md §7.6). Each test uses its own fresh `TestDb`.

#![cfg(feature = "test-util")]

use std::time::Duration;

use mindroom_billing_supabase::testing::{Gateway, GatewayConfig, TestDb, mint_jwt};
use serde_json::{Value, json};

struct Env {
    db: TestDb,
    gw: Gateway,
    client: reqwest::Client,
}

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not json ({e}): {:?}", self.text))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn assert_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "body: {}", self.text);
        let body = self.json();
        assert_eq!(body["code"], code, "body: {}", self.text);
        assert_eq!(self.header("content-type"), Some("application/json; charset=utf-8"));
        assert_eq!(self.header("proxy-status"), Some(format!("PostgREST; error={code}").as_str()));
        for k in ["code", "message", "details", "hint"] {
            assert!(body.get(k).is_some(), "missing {k} in {}", self.text);
        }
        body
    }
}

async fn setup_with(sql: &str, config: GatewayConfig) -> Env {
    let db = TestDb::create().await.expect("create test db");
    sqlx::raw_sql(sql).execute(db.pool()).await.expect("fixture sql");
    let gw = Gateway::start(db.url(), config).await;
    Env { db, gw, client: reqwest::Client::new() }
}

async fn setup(sql: &str) -> Env {
    setup_with(sql, GatewayConfig::default()).await
}

async fn send(req: reqwest::RequestBuilder) -> Resp {
    let r = req.send().await.expect("http request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    Resp { status, headers, text }
}

impl Env {
    /// POST with the `sb_secret_…` key (as the store client does).
    fn post(&self, function: &str) -> reqwest::RequestBuilder {
        self.client
            .post(self.gw.rpc_url(function))
            .header("apikey", self.gw.secret_key())
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
    }

    async fn rpc(&self, function: &str, body: &str) -> Resp {
        send(self.post(function).body(body.to_owned())).await
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("select count(*) from {table}")).fetch_one(self.db.pool()).await.unwrap()
    }
}

const ITEMS: &str = "
create table items (id int primary key, name text not null);
grant all on items to service_role;
create function add_item(p_id int, p_name text) returns void language sql as
  $$ insert into items values (p_id, p_name) $$;
";

#[tokio::test]
async fn unique_violation_is_409() {
    let env = setup(ITEMS).await;
    let r = env.rpc("add_item", r#"{"p_id":1,"p_name":"a"}"#).await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = env.rpc("add_item", r#"{"p_id":1,"p_name":"b"}"#).await;
    let body = r.assert_error(409, "23505");
    assert!(body["message"].as_str().unwrap().contains("duplicate key value violates unique constraint"));
    assert_eq!(body["details"], "Key (id)=(1) already exists.");
    // not_null is "other" → 400.
    let r = env.rpc("add_item", r#"{"p_id":2,"p_name":null}"#).await;
    r.assert_error(400, "23502");
}

#[tokio::test]
async fn raise_exception_is_400_with_fields() {
    let env = setup(
        "create function boom() returns int language plpgsql as $$ begin
           raise exception 'boom %', 1 using detail = 'the detail', hint = 'the hint';
         end $$;",
    )
    .await;
    let r = env.rpc("boom", "{}").await;
    let body = r.assert_error(400, "P0001");
    assert_eq!(body, json!({"code":"P0001","message":"boom 1","details":"the detail","hint":"the hint"}));
}

#[tokio::test]
async fn pt_sqlstate_sets_http_status() {
    let env = setup(
        "create function pay() returns int language plpgsql as $$ begin
           raise sqlstate 'PT402' using message = 'Payment Required';
         end $$;
         create function bad_pt() returns int language plpgsql as $$ begin
           raise sqlstate 'PTABC' using message = 'nope';
         end $$;",
    )
    .await;
    let r = env.rpc("pay", "{}").await;
    let body = r.assert_error(402, "PT402");
    assert_eq!(body["message"], "Payment Required");
    env.rpc("bad_pt", "{}").await.assert_error(500, "PTABC");
}

#[tokio::test]
async fn pgrst_raise_form() {
    let env = setup(
        r#"create function custom() returns int language plpgsql as $$ begin
           raise sqlstate 'PGRST' using
             message = '{"code":"123","message":"Payment Required","details":"Quota exceeded","hint":"Upgrade your plan"}',
             detail = '{"status":402,"headers":{"X-Powered-By":"Nerd Rage"}}';
         end $$;
         create function custom_bad() returns int language plpgsql as $$ begin
           raise sqlstate 'PGRST' using message = 'not json', detail = '{}';
         end $$;"#,
    )
    .await;
    let r = env.rpc("custom", "{}").await;
    let body = r.assert_error(402, "123");
    assert_eq!(
        body,
        json!({"code":"123","message":"Payment Required","details":"Quota exceeded","hint":"Upgrade your plan"})
    );
    assert_eq!(r.header("x-powered-by"), Some("Nerd Rage"));
    env.rpc("custom_bad", "{}").await.assert_error(500, "PGRST121");
}

#[tokio::test]
async fn missing_execute_grant_is_403_for_service_role_401_for_anon() {
    let env = setup(
        "create function secret() returns int language sql as $$ select 1 $$;
         revoke execute on function secret() from public;",
    )
    .await;
    let r = env.rpc("secret", "{}").await;
    let body = r.assert_error(403, "42501");
    assert_eq!(body["message"], "permission denied for function secret");
    // With the anon role it is 401 + WWW-Authenticate: Bearer.
    let anon = env.gw.config().anon_jwt();
    let r = send(
        env.client
            .post(env.gw.rpc_url("secret"))
            .header("apikey", &anon)
            .header("Authorization", format!("Bearer {anon}"))
            .body("{}"),
    )
    .await;
    r.assert_error(401, "42501");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    // After granting, service_role may call it.
    sqlx::raw_sql("grant execute on function secret() to service_role").execute(env.db.pool()).await.unwrap();
    let r = env.rpc("secret", "{}").await;
    assert_eq!((r.status, r.text.as_str()), (200, "1"));
}

#[tokio::test]
async fn statement_timeout_is_500_57014() {
    let env = setup(
        "create function slow() returns int language plpgsql set statement_timeout = '100ms' as
           $$ begin perform pg_sleep(3); return 1; end $$;",
    )
    .await;
    let started = std::time::Instant::now();
    let r = env.rpc("slow", "{}").await;
    let body = r.assert_error(500, "57014");
    assert_eq!(body["message"], "canceling statement due to statement timeout");
    assert!(started.elapsed() < Duration::from_secs(2), "timeout was not hoisted");
}

#[tokio::test]
async fn authenticator_statement_timeout_applies_to_service_role() {
    let env =
        setup("create function st() returns text language sql as $$ select current_setting('statement_timeout') $$;")
            .await;
    let r = env.rpc("st", "{}").await;
    assert_eq!((r.status, r.text.as_str()), (200, "\"8s\""));
}

#[tokio::test]
async fn unknown_function_or_extra_key_is_404_pgrst202() {
    let env = setup("create function add(a int, b int) returns int language sql as $$ select a + b $$;").await;
    let r = env.rpc("nope", "{}").await;
    let body = r.assert_error(404, "PGRST202");
    assert_eq!(
        body,
        json!({
            "code": "PGRST202",
            "message": "Could not find the function public.nope without parameters in the schema cache",
            "details": "Searched for the function public.nope without parameters or with a single unnamed json/jsonb parameter, but no matches were found in the schema cache.",
            "hint": null
        })
    );
    let r = env.rpc("add", r#"{"b":1,"a":2,"c":3}"#).await;
    let body = r.assert_error(404, "PGRST202");
    assert_eq!(body["message"], "Could not find the function public.add(a, b, c) in the schema cache");
    assert_eq!(
        body["details"],
        "Searched for the function public.add with parameters a, b, c or with a single unnamed json/jsonb parameter, but no matches were found in the schema cache."
    );
    // Missing required key.
    env.rpc("add", r#"{"a":2}"#).await.assert_error(404, "PGRST202");
    let r = env.rpc("add", r#"{"a":2,"b":3}"#).await;
    assert_eq!((r.status, r.text.as_str()), (200, "5"));
}

#[tokio::test]
async fn bad_json_is_400_pgrst102() {
    let env = setup("create function one() returns int language sql as $$ select 1 $$;").await;
    let r = env.rpc("one", "{not json").await;
    let body = r.assert_error(400, "PGRST102");
    assert_eq!(body["message"], "Empty or invalid json");
    env.rpc("one", "3").await.assert_error(400, "PGRST102");
    // Empty body is `{}`.
    let r = env.rpc("one", "").await;
    assert_eq!((r.status, r.text.as_str()), (200, "1"));
    // Bad value for an int parameter is PostgreSQL's 22P02 → 400.
    sqlx::raw_sql("create function inc(n int) returns int language sql as $$ select n + 1 $$")
        .execute(env.db.pool())
        .await
        .unwrap();
    env.rpc("inc", r#"{"n":"x"}"#).await.assert_error(400, "22P02");
}

#[tokio::test]
async fn bad_schema_is_406_pgrst106() {
    let env = setup("create function one() returns int language sql as $$ select 1 $$;").await;
    let r = send(env.post("one").header("Content-Profile", "private").body("{}")).await;
    let body = r.assert_error(406, "PGRST106");
    assert_eq!(body["message"], "Invalid schema: private");
    assert_eq!(body["hint"], "Only the following schemas are exposed: public, graphql_public");
    let r = send(env.post("one").header("Content-Profile", "public").body("{}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-profile"), Some("public"));
}

#[tokio::test]
async fn get_on_writer_is_405_25006_and_put_is_405_pgrst101() {
    let env = setup(&format!(
        "{ITEMS}
         create function item_count() returns bigint language sql stable as $$ select count(*) from items $$;"
    ))
    .await;
    let r = send(
        env.client.get(format!("{}?p_id=1&p_name=x", env.gw.rpc_url("add_item"))).header("apikey", env.gw.secret_key()),
    )
    .await;
    r.assert_error(405, "25006");
    assert_eq!(env.count("items").await, 0);
    // GET of a reader works, args from the query string.
    let r = send(env.client.get(env.gw.rpc_url("item_count")).header("apikey", env.gw.secret_key())).await;
    assert_eq!((r.status, r.text.as_str()), (200, "0"));
    let r = send(env.client.put(env.gw.rpc_url("item_count")).header("apikey", env.gw.secret_key()).body("{}")).await;
    let body = r.assert_error(405, "PGRST101");
    assert_eq!(body["message"], "Cannot use the PUT method on RPC");
}

#[tokio::test]
async fn void_is_204_without_content_type() {
    let env = setup(ITEMS).await;
    let r = env.rpc("add_item", r#"{"p_id":7,"p_name":"x"}"#).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.text, "");
    assert!(r.header("content-type").is_none());
    assert_eq!(env.count("items").await, 1);
}

#[tokio::test]
async fn response_shapes() {
    let env = setup(
        "create table pets (id int primary key, name text);
         insert into pets values (1, 'cat'), (2, 'dog');
         grant all on pets to service_role;
         create function s_int() returns int language sql as $$ select 3 $$;
         create function s_text() returns text language sql as $$ select 'abc' $$;
         create function s_null() returns text language sql as $$ select null::text $$;
         create function s_json() returns json language sql as $$ select '{\"a\": [1, 2]}'::json $$;
         create function one_pet() returns pets language sql as $$ select * from pets where id = 1 $$;
         create function set_int() returns setof int language sql as $$ select generate_series(1, 3) $$;
         create function set_none() returns setof int language sql as $$ select 1 where false $$;
         create function all_pets() returns setof pets language sql as $$ select * from pets order by id $$;
         create function tbl() returns table(x int, y text) language sql as $$ values (1, 'a'), (2, 'b') $$;
         create function out1(out z int) language sql as $$ select 5 $$;
         create function out2(a int, out doubled int, out label text) language sql as $$ select a * 2, 'L' $$;",
    )
    .await;
    let cases = [
        ("s_int", "{}", "3"),
        ("s_text", "{}", "\"abc\""),
        ("s_null", "{}", "null"),
        ("s_json", "{}", "{\"a\": [1, 2]}"),
        ("one_pet", "{}", "{\"id\":1,\"name\":\"cat\"}"),
        ("set_int", "{}", "[1, 2, 3]"),
        ("set_none", "{}", "[]"),
        ("all_pets", "{}", "[{\"id\":1,\"name\":\"cat\"}, \n {\"id\":2,\"name\":\"dog\"}]"),
        ("tbl", "{}", "[{\"x\":1,\"y\":\"a\"}, \n {\"x\":2,\"y\":\"b\"}]"),
        ("out1", "{}", "{\"z\":5}"),
        ("out2", "{\"a\":21}", "{\"doubled\":42,\"label\":\"L\"}"),
    ];
    for (f, body, expected) in cases {
        let r = env.rpc(f, body).await;
        assert_eq!(r.status, 200, "{f}: {}", r.text);
        assert_eq!(r.text, expected, "{f}");
        assert_eq!(r.header("content-type"), Some("application/json; charset=utf-8"), "{f}");
        assert_eq!(r.header("content-profile"), Some("public"), "{f}");
    }
    let r = env.rpc("set_int", "{}").await;
    assert_eq!(r.header("content-range"), Some("0-2/*"));
    let r = env.rpc("s_int", "{}").await;
    assert_eq!(r.header("content-range"), Some("0-0/*"));
    let r = env.rpc("set_none", "{}").await;
    assert_eq!(r.header("content-range"), Some("*/*"));
}

#[tokio::test]
async fn raise_rolls_back_earlier_writes() {
    let env = setup(&format!(
        "{ITEMS}
         create function add_two_then_fail() returns void language plpgsql as $$ begin
           insert into items values (1, 'a');
           insert into items values (2, 'b');
           raise exception 'abort now';
         end $$;
         create function add_then_dup() returns void language plpgsql as $$ begin
           insert into items values (3, 'c');
           insert into items values (3, 'c');
         end $$;"
    ))
    .await;
    env.rpc("add_two_then_fail", "{}").await.assert_error(400, "P0001");
    assert_eq!(env.count("items").await, 0);
    env.rpc("add_then_dup", "{}").await.assert_error(409, "23505");
    assert_eq!(env.count("items").await, 0);
    // And a successful call commits.
    assert_eq!(env.rpc("add_item", r#"{"p_id":9,"p_name":"z"}"#).await.status, 204);
    assert_eq!(env.count("items").await, 1);
}

#[tokio::test]
async fn api_key_checks() {
    let env = setup("create function whoami() returns text language sql as $$ select current_user::text $$;").await;
    let url = env.gw.rpc_url("whoami");
    let r = send(env.client.post(&url).body("{}")).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json(),
        json!({"message":"No API key found in request","hint":"No `apikey` request header or url param was found."})
    );
    let r = send(env.client.post(&url).header("apikey", "sb_secret_wrong").body("{}")).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json(),
        json!({"message":"Invalid API key","hint":"Double check your Supabase `anon` or `service_role` API key."})
    );
    // sb_secret key alone, and with the same value as Bearer.
    let r = env.rpc("whoami", "{}").await;
    assert_eq!((r.status, r.text.as_str()), (200, "\"service_role\""));
    let key = env.gw.secret_key().to_owned();
    let r = send(env.post("whoami").header("Authorization", format!("Bearer {key}")).body("{}")).await;
    assert_eq!((r.status, r.text.as_str()), (200, "\"service_role\""));
    // A different non-JWT bearer is rejected by PostgREST.
    let r = send(env.post("whoami").header("Authorization", "Bearer sb_secret_other").body("{}")).await;
    r.assert_error(401, "PGRST301");
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer error=\"invalid_token\""));
    // Legacy service_role JWT as apikey + Bearer.
    let jwt = env.gw.service_role_jwt();
    let r =
        send(env.client.post(&url).header("apikey", &jwt).header("Authorization", format!("Bearer {jwt}")).body("{}"))
            .await;
    assert_eq!((r.status, r.text.as_str()), (200, "\"service_role\""));
    // A JWT signed with another secret → PGRST301; an expired one → PGRST303.
    let forged = mint_jwt(&json!({"role":"service_role"}), "another-secret-another-secret-123");
    let r = send(
        env.client.post(&url).header("apikey", &jwt).header("Authorization", format!("Bearer {forged}")).body("{}"),
    )
    .await;
    r.assert_error(401, "PGRST301");
    let expired = mint_jwt(&json!({"role":"service_role","exp":1000}), &env.gw.config().jwt_secret);
    let r = send(
        env.client.post(&url).header("apikey", &jwt).header("Authorization", format!("Bearer {expired}")).body("{}"),
    )
    .await;
    let body = r.assert_error(401, "PGRST303");
    assert_eq!(body["message"], "JWT expired");
    // Browser-like user agent with a secret key → 401.
    let r = send(env.post("whoami").header("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)").body("{}")).await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn big_integers_pass_through() {
    let env = setup(
        "create function echo_num(n numeric) returns numeric language sql as $$ select n $$;
         create function echo_big(n bigint) returns bigint language sql as $$ select n $$;
         create function echo_json(j jsonb) returns jsonb language sql as $$ select j $$;
         create function echo_raw(json) returns json language sql as $$ select $1 $$;",
    )
    .await;
    let r = env.rpc("echo_num", r#"{"n":9007199254740993}"#).await;
    assert_eq!((r.status, r.text.as_str()), (200, "9007199254740993"));
    let r = env.rpc("echo_num", r#"{"n":123456789012345678901234567890.000000001}"#).await;
    assert_eq!(r.text, "123456789012345678901234567890.000000001");
    let r = env.rpc("echo_big", r#"{"n":9223372036854775807}"#).await;
    assert_eq!(r.text, "9223372036854775807");
    let r = env.rpc("echo_json", r#"{"j":{"n":9007199254740993}}"#).await;
    assert_eq!(r.text, r#"{"n": 9007199254740993}"#);
    // Single unnamed json parameter receives the raw body.
    let r = env.rpc("echo_raw", r#"{"x": 9007199254740993, "y": [1]}"#).await;
    assert_eq!((r.status, r.text.as_str()), (200, r#"{"x": 9007199254740993, "y": [1]}"#));
    // Overflow of bigint is 22003 → 400.
    env.rpc("echo_big", r#"{"n":9223372036854775808}"#).await.assert_error(400, "22003");
}

#[tokio::test]
async fn defaults_overloads_and_claims() {
    let env = setup(
        "create function greet(name text, greeting text default 'hello') returns text
           language sql as $$ select greeting || ' ' || name $$;
         create function amb(a int) returns int language sql as $$ select 1 $$;
         create function amb(a text) returns int language sql as $$ select 2 $$;
         create function claims() returns json language sql stable as
           $$ select json_build_object('role', current_setting('request.jwt.claims', true)::json->>'role',
                'method', current_setting('request.method', true),
                'path', current_setting('request.path', true),
                'ua', current_setting('request.headers', true)::json->>'x-test') $$;",
    )
    .await;
    let r = env.rpc("greet", r#"{"name":"bob"}"#).await;
    assert_eq!(r.text, "\"hello bob\"");
    let r = env.rpc("greet", r#"{"name":"bob","greeting":"hi"}"#).await;
    assert_eq!(r.text, "\"hi bob\"");
    let body = env.rpc("amb", r#"{"a":1}"#).await.assert_error(300, "PGRST203");
    assert!(body["message"].as_str().unwrap().starts_with("Could not choose the best candidate function between: "));
    let r = send(env.post("claims").header("X-Test", "yes").body("{}")).await;
    assert_eq!(r.json(), json!({"role":"service_role","method":"POST","path":"/rpc/claims","ua":"yes"}));
}

#[tokio::test]
async fn pool_timeout_is_504_and_database_down_is_503() {
    let env = setup_with(
        "create function nap() returns int language sql as $$ select 1 from pg_sleep(1.5) $$;
         create function one() returns int language sql as $$ select 1 $$;",
        GatewayConfig {
            pool_max_connections: 1,
            pool_acquire_timeout: Duration::from_millis(300),
            ..GatewayConfig::default()
        },
    )
    .await;
    let slow = env.rpc("nap", "{}");
    let fast = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.rpc("one", "{}").await
    };
    let (slow, fast) = tokio::join!(slow, fast);
    assert_eq!(slow.status, 200, "{}", slow.text);
    fast.assert_error(504, "PGRST003");

    // Nothing listens on this port: connection error → 503 PGRST000.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gw = Gateway::start(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        GatewayConfig { pool_acquire_timeout: Duration::from_secs(2), ..GatewayConfig::default() },
    )
    .await;
    let r = send(env.client.post(gw.rpc_url("one")).header("apikey", gw.secret_key()).body("{}")).await;
    r.assert_error(503, "PGRST000");
}

#[tokio::test]
async fn testdb_drop_removes_database() {
    let db = TestDb::create().await.unwrap();
    let name = db.name().to_owned();
    let admin = sqlx::PgPool::connect(&mindroom_billing_supabase::testing::postgres_admin_url()).await.unwrap();
    let exists = |admin: sqlx::PgPool, name: String| async move {
        sqlx::query_scalar::<_, bool>("select exists(select 1 from pg_database where datname = $1)")
            .bind(name)
            .fetch_one(&admin)
            .await
            .unwrap()
    };
    assert!(exists(admin.clone(), name.clone()).await);
    db.drop_db().await.unwrap();
    assert!(!exists(admin.clone(), name.clone()).await);
    // Best-effort drop in Drop.
    let db = TestDb::create().await.unwrap();
    let name = db.name().to_owned();
    drop(db);
    assert!(!exists(admin.clone(), name).await);
}
