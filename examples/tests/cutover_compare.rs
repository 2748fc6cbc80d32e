//! The cut-over rehearsal through the real binary: billing runs in shadow on its own PostgreSQL
//! database (dry-run provisioner, no e-mail provider) and is fed real signed events; the Node
//! service's database holds its three tables (its columns only) with the same customers and a few
//! hand-made differences. `mindroom-billing cutover compare` must list exactly those, with the
//! calls and e-mails the switch would make, in text and in JSON, and exit 1; on identical databases
//! it lists nothing and exits 0; a database it cannot read exits 2 naming that database.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use mindroom_billing_core::service::app_name_for;
use mindroom_billing_supabase::testing::TestDb;
use support::{
    Cluster, ClusterOptions, Life, NODE_SCHEMA, SentEvent, StubProvisioner, binary, life_events, now_secs, scratch_dir,
    subscription_event,
};

const STARTER: &str = "price_compare_starter";
const PRO: &str = "price_compare_pro";

fn life(name: &str, start: i64) -> Life {
    Life::new(format!("sub_{name}"), format!("cus_{name}"), start, STARTER)
}

/// One Node subscription row with its instance (if any).
struct NodeRow {
    sub: &'static str,
    tier: &'static str,
    status: &'static str,
    max_agents: i32,
    max_messages: i32,
    /// `(app, status, memory MB, CPU)`.
    instance: Option<(&'static str, &'static str, i32, f64)>,
}

impl NodeRow {
    /// A starter subscription that is active, with its app running at the starter limits.
    fn starter(sub: &'static str, app: &'static str) -> Self {
        Self {
            sub,
            tier: "starter",
            status: "active",
            max_agents: 3,
            max_messages: 1000,
            instance: Some((app, "running", 512, 0.5)),
        }
    }
}

/// A database with the Node service's schema and `rows`.
async fn node_database(rows: &[NodeRow]) -> TestDb {
    let db = TestDb::create().await.expect("node database");
    let pool = db.pool();
    sqlx::raw_sql(NODE_SCHEMA).execute(pool).await.unwrap();
    for row in rows {
        let customer = row.sub.replace("sub_", "cus_");
        let account: uuid::Uuid =
            sqlx::query_scalar("insert into accounts (stripe_customer_id, email) values ($1, $2) returning id")
                .bind(&customer)
                .bind(format!("{customer}@example.com"))
                .fetch_one(pool)
                .await
                .unwrap();
        let subscription: uuid::Uuid = sqlx::query_scalar(
            "insert into subscriptions (account_id, stripe_subscription_id, stripe_price_id, tier, status, max_agents,
                                        max_messages_per_day, current_period_end)
             values ($1, $2, 'price_node', $3, $4, $5, $6, now() + interval '20 days') returning id",
        )
        .bind(account)
        .bind(row.sub)
        .bind(row.tier)
        .bind(row.status)
        .bind(row.max_agents)
        .bind(row.max_messages)
        .fetch_one(pool)
        .await
        .unwrap();
        if let Some((app, status, memory, cpu)) = row.instance {
            sqlx::query(
                "insert into instances (subscription_id, dokku_app_name, subdomain, status, memory_limit_mb, cpu_limit)
                 values ($1, $2, $2, $3, $4, $5::numeric)",
            )
            .bind(subscription)
            .bind(app)
            .bind(status)
            .bind(memory)
            .bind(cpu)
            .execute(pool)
            .await
            .unwrap();
        }
    }
    db
}

/// Runs `cutover compare` with billing's database from `DATABASE_URL`.
fn compare(billing_url: &str, node_url: &str, json: bool) -> (i32, String, String) {
    let mut command = binary(&scratch_dir("cutover-compare"));
    command.args(["cutover", "compare", "--node-database-url", node_url]).env("DATABASE_URL", billing_url);
    if json {
        command.arg("--json");
    }
    let out = command.output().unwrap();
    let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap());
    (out.status.code().expect("exited"), stdout, stderr)
}

/// The report's rows: the first word of each line that starts with a subscription id.
fn row_lines(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter(|l| l.starts_with("sub_"))
        .map(|l| (l.split_whitespace().next().unwrap().to_owned(), l.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_lists_exactly_the_hand_made_differences() {
    let stub = StubProvisioner::start().await;
    // Billing in shadow: the dry-run provisioner (no DOKKU_PROVISIONER_URL) and no e-mail provider.
    let options = ClusterOptions {
        replicas: 1,
        env: vec![("DOKKU_PROVISIONER_URL".into(), String::new())],
        ..ClusterOptions::new(&stub, &[STARTER, PRO])
    };
    let shadow = Cluster::start(options).await;
    let t = now_secs() - 120;
    let same = life("same", t);
    let tier = Life { upgrade_to: Some(PRO.into()), ..life("tier", t) };
    let status = life("status", t);
    let limits = life("limits", t);
    let missing = life("missing", t);
    let cancel = Life { cancelled: true, ..life("cancel", t) };
    let mut events: Vec<SentEvent> = Vec::new();
    for l in [&same, &tier, &status, &limits, &missing, &cancel] {
        events.extend(life_events(l));
    }
    events.push(subscription_event(
        "evt_status_past_due",
        "customer.subscription.updated",
        t + 10,
        &status,
        "past_due",
        STARTER,
    ));
    assert!(shadow.send_once(&events).await.iter().all(|s| *s == 200));
    shadow.wait_for_quiet(Duration::from_secs(30)).await;
    assert!(stub.calls().is_empty(), "the shadow provisions nothing: {:?}", stub.calls());

    // The Node service's view of the same customers, with hand-made differences.
    let node = node_database(&[
        NodeRow::starter("sub_same", "mindroom-same"),
        // Node missed the upgrade.
        NodeRow::starter("sub_tier", "mindroom-tier"),
        // Node missed the failed renewal.
        NodeRow::starter("sub_status", "mindroom-status"),
        // Someone raised the agents by hand.
        NodeRow { max_agents: 5, ..NodeRow::starter("sub_limits", "mindroom-limits") },
        // The app was never created.
        NodeRow { instance: None, ..NodeRow::starter("sub_missing", "-") },
        // Node missed the cancellation: its app still runs.
        NodeRow::starter("sub_cancel", "mindroom-cancel"),
    ])
    .await;

    let (code, stdout, stderr) = compare(shadow.db().url(), node.url(), false);
    assert_eq!(code, 1, "differences exit 1\n{stdout}{stderr}");
    let rows = row_lines(&stdout);
    let expected_rows = ["sub_cancel", "sub_limits", "sub_missing", "sub_status", "sub_tier"];
    assert_eq!(rows.keys().map(String::as_str).collect::<Vec<_>>(), expected_rows, "{stdout}");
    let has = |sub: &str, parts: &[&str]| {
        for part in parts {
            assert!(rows[sub].contains(part), "{sub}: {part:?} missing in\n{}", rows[sub]);
        }
    };
    has(
        "sub_tier",
        &[
            "tier professional/starter",
            "max_agents 10/3",
            "max_messages_per_day 10000/1000",
            "memory 2048/512",
            "cpu 2/0.5",
            "PUT /update mindroom-tier (professional)",
        ],
    );
    has("sub_status", &["status past_due/active", "PUT /update mindroom-status (starter)"]);
    has("sub_limits", &["max_agents 3/5", "PUT /update mindroom-limits (starter)"]);
    let billing_app = app_name_for("sub_missing");
    has("sub_missing", &["instance running/absent", &format!("POST /provision {billing_app} (starter)"), "welcome"]);
    has(
        "sub_cancel",
        &[
            "status canceled/active",
            "max_agents 1/3",
            "max_messages_per_day 100/1000",
            "instance absent/running (mindroom-cancel)",
            "DELETE /deprovision mindroom-cancel",
        ],
    );
    assert!(!rows["sub_status"].contains("tier "), "only the differing fields: {}", rows["sub_status"]);
    assert!(!rows["sub_limits"].contains("memory"), "only the differing fields: {}", rows["sub_limits"]);
    assert!(stdout.contains("6 subscriptions compared: 1 identical, 5 differ"), "counts missing:\n{stdout}");
    assert!(
        stdout.contains("1 POST /provision, 3 PUT /update, 1 DELETE /deprovision, 1 e-mail"),
        "call counts missing:\n{stdout}"
    );
    assert!(stdout.contains("1 restating"), "the identical subscription's restating update:\n{stdout}");

    // The same report for scripts.
    let (code, json, stderr) = compare(shadow.db().url(), node.url(), true);
    assert_eq!(code, 1, "{json}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&json).expect("--json prints one JSON document");
    let json_rows = report["rows"].as_array().unwrap();
    let ids: Vec<&str> = json_rows.iter().map(|r| r["subscription_id"].as_str().unwrap()).collect();
    assert_eq!(ids, expected_rows);
    let row = |sub: &str| json_rows.iter().find(|r| r["subscription_id"] == sub).unwrap();
    let fields = |sub: &str| -> Vec<(String, String, String)> {
        row(sub)["differences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let s = |k: &str| d[k].as_str().unwrap().to_owned();
                (s("field"), s("billing"), s("node"))
            })
            .collect()
    };
    let f = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(fields("sub_status"), [f("status", "past_due", "active")]);
    assert_eq!(fields("sub_limits"), [f("max_agents", "3", "5")]);
    assert_eq!(fields("sub_missing"), [f("instance", "running", "absent")]);
    assert_eq!(
        fields("sub_tier"),
        [
            f("tier", "professional", "starter"),
            f("max_agents", "10", "3"),
            f("max_messages_per_day", "10000", "1000"),
            f("memory", "2048", "512"),
            f("cpu", "2", "0.5"),
        ]
    );
    assert_eq!(
        fields("sub_cancel"),
        [
            f("status", "canceled", "active"),
            f("max_agents", "1", "3"),
            f("max_messages_per_day", "100", "1000"),
            f("instance", "absent", "running (mindroom-cancel)"),
        ]
    );
    assert_eq!(row("sub_cancel")["calls"][0]["call"], "DELETE /deprovision");
    assert_eq!(row("sub_cancel")["calls"][0]["app_name"], "mindroom-cancel");
    assert_eq!(row("sub_missing")["calls"][0]["call"], "POST /provision");
    assert_eq!(row("sub_missing")["calls"][0]["app_name"], billing_app.as_str());
    assert_eq!(row("sub_missing")["emails"][0]["kind"], "welcome");
    let counts = &report["counts"];
    assert_eq!(counts["subscriptions"], 6);
    assert_eq!(counts["identical"], 1);
    assert_eq!(counts["differing"], 5);
    assert_eq!((counts["provisions"].as_u64(), counts["updates"].as_u64()), (Some(1), Some(3)));
    assert_eq!((counts["deprovisions"].as_u64(), counts["emails"].as_u64()), (Some(1), Some(1)));
    assert_eq!(counts["restating_updates"], 1);
    assert_eq!(counts["fields"]["instance"], 2);
    assert_eq!(counts["fields"]["max_agents"], 3);

    // The compare read both databases and wrote to neither.
    let node_rows: i64 = sqlx::query_scalar("select count(*) from instances").fetch_one(node.pool()).await.unwrap();
    assert_eq!(node_rows, 5);
    let tables: i64 = sqlx::query_scalar("select count(*) from pg_tables where schemaname = 'public'")
        .fetch_one(node.pool())
        .await
        .unwrap();
    assert_eq!(tables, 3, "nothing was migrated onto the Node database");

    // A Node database that agrees with billing everywhere: no rows, exit 0.
    let identical = node_database(&[
        NodeRow::starter("sub_same", "mindroom-same"),
        NodeRow {
            tier: "professional",
            max_agents: 10,
            max_messages: 10_000,
            instance: Some(("mindroom-tier", "running", 2048, 2.0)),
            ..NodeRow::starter("sub_tier", "-")
        },
        NodeRow { status: "past_due", ..NodeRow::starter("sub_status", "mindroom-status") },
        NodeRow::starter("sub_limits", "mindroom-limits"),
        NodeRow::starter("sub_missing", "mindroom-missing"),
        NodeRow {
            status: "canceled",
            max_agents: 1,
            max_messages: 100,
            instance: Some(("mindroom-cancel", "deprovisioned", 512, 0.5)),
            ..NodeRow::starter("sub_cancel", "-")
        },
    ])
    .await;
    let (code, stdout, stderr) = compare(shadow.db().url(), identical.url(), false);
    assert_eq!(code, 0, "identical databases exit 0\n{stdout}{stderr}");
    assert!(row_lines(&stdout).is_empty(), "{stdout}");
    assert!(stdout.contains("6 subscriptions compared: 6 identical, 0 differ"), "{stdout}");
    let (code, json, _) = compare(shadow.db().url(), identical.url(), true);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["rows"].as_array().map(Vec::len), Some(0));
    assert_eq!(report["counts"]["restating_updates"], 5, "each running app gets its limits stated once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_cannot_be_read_exits_2_and_is_named() {
    let billing = TestDb::create().await.expect("billing database");
    support::migrate(billing.url());
    let node = node_database(&[]).await;
    let closed = "postgres://postgres@127.0.0.1:1/none";

    let (code, stdout, stderr) = compare(billing.url(), closed, false);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("the Node service's database (--node-database-url)"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    let (code, _, stderr) = compare(closed, node.url(), true);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");

    // A database without the Node service's tables is an error, not "everything differs".
    let empty = TestDb::create().await.expect("empty database");
    let (code, _, stderr) = compare(billing.url(), empty.url(), false);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("the Node service's database") && stderr.contains("subscriptions"), "{stderr}");

    // Both empty: nothing differs. The Node URL may come from NODE_DATABASE_URL instead.
    let out = binary(&scratch_dir("cutover-compare-env"))
        .args(["cutover", "compare"])
        .env("DATABASE_URL", billing.url())
        .env("NODE_DATABASE_URL", node.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("0 subscriptions compared: 0 identical, 0 differ"), "{stdout}");
}
