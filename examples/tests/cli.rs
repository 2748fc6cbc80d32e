//! The first hour of a new user (issue 11): the real `mindroom-billing` binary as a newcomer runs it,
//! its exit codes and messages, on an empty environment (no `.env`, no shell variables leaking in).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr, missing_docs)]

mod support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use mindroom_billing_supabase::testing::TestDb;
use support::{Logged, binary, scratch_dir};

/// The one exit code of configuration errors (README: "Exit codes").
const EXIT_CONFIG: i32 = 2;

/// A refusing address: nothing listens there.
const REFUSED_DB: &str = "postgres://postgres@127.0.0.1:1/postgres";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must exit by itself (a server that starts instead is killed: `None`).
fn run_to_exit(args: &[&str], env: &[(&str, &str)], dir: &Path) -> (Option<i32>, String) {
    let mut command = binary(dir);
    command.args(args).envs(env.iter().copied());
    let mut child = Logged::spawn(command, "cli");
    let status = child.wait_exit(Duration::from_secs(30));
    (status.map(|s| s.code().unwrap_or(-1)), child.output())
}

fn output(args: &[&str], env: &[(&str, &str)]) -> Output {
    binary(&std::env::temp_dir()).args(args).envs(env.iter().copied()).output().unwrap()
}

/// Asserts a configuration error: exit code 2, one line `error: <VAR>: …`.
fn assert_config_error(args: &[&str], env: &[(&str, &str)], dir: &Path, var: &str) -> String {
    let (code, out) = run_to_exit(args, env, dir);
    assert_eq!(code, Some(EXIT_CONFIG), "{args:?} with {env:?} must stop with a configuration error; output:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one line, got:\n{out}");
    assert!(lines[0].starts_with(&format!("error: {var}: ")), "names {var}: {out}");
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `serve` started as a child, its log in a file shown only on failure.
struct Server {
    child: Logged,
    port: u16,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut command = binary(&scratch_dir("serve"));
        command.arg("serve").args(args).env("PORT", port.to_string()).envs(env.iter().copied());
        let mut server = Server { child: Logged::spawn(command, "serve"), port };
        let started = Instant::now();
        while !server.child.output().contains("listening") {
            assert!(!server.child.exited(), "serve exited:\n{}", server.child.output());
            assert!(started.elapsed() < Duration::from_secs(30), "serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        self.child.output()
    }

    /// Waits until the log contains `needle`.
    fn wait_for_log(&self, needle: &str) {
        let started = Instant::now();
        while !self.log().contains(needle) {
            assert!(started.elapsed() < Duration::from_secs(30), "{needle:?} never logged");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&self, args: &[&str]) -> Output {
        let mut all = vec!["send"];
        all.extend_from_slice(args);
        let url = self.url("/webhooks/stripe");
        all.extend_from_slice(&["--url", &url]);
        output(&all, &[])
    }
}

// ---- 1 + issue 10 defect 6: secrets ------------------------------------------------------------------

#[test]
fn placeholder_and_malformed_secrets_are_refused_naming_the_variable() {
    let dir = scratch_dir("secrets");
    let db = ("DATABASE_URL", REFUSED_DB);
    let real = ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[db, ("STRIPE_WEBHOOK_SECRET", "whsec_replace_me")], "STRIPE_WEBHOOK_SECRET"),
        (&[db, ("STRIPE_WEBHOOK_SECRET", "abc")], "STRIPE_WEBHOOK_SECRET"),
        (&[db, ("STRIPE_WEBHOOK_SECRET", "whsec_ok_one,abc")], "STRIPE_WEBHOOK_SECRET"),
        (&[("STRIPE_WEBHOOK_SECRET", "whsec_xxxxxxxx")], "STRIPE_WEBHOOK_SECRET"),
        (
            &[db, real, ("DOKKU_PROVISIONER_URL", "http://127.0.0.1:1"), ("PROVISIONER_API_KEY", "changeme")],
            "PROVISIONER_API_KEY",
        ),
        (&[db, real, ("BILLING_API_KEY", "replace_me")], "BILLING_API_KEY"),
        (&[db, real, ("BILLING_API_KEY", "xxx")], "BILLING_API_KEY"),
        (&[db, real, ("RESEND_API_KEY", "re_…"), ("EMAIL_FROM", "a@b.c")], "RESEND_API_KEY"),
        (&[db, real, ("RESEND_API_KEY", "re_replace_me"), ("EMAIL_FROM", "a@b.c")], "RESEND_API_KEY"),
    ];
    for (env, var) in cases {
        let out = assert_config_error(&["serve"], env, &dir, var);
        assert!(!out.contains("whsec_0123456789abcdef"), "a secret in the message: {out}");
    }
}

#[test]
fn env_example_copied_as_is_is_no_trap() {
    // As a newcomer does: `cp .env.example .env`, then set a database.
    let dir = scratch_dir("env-example");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../.env.example"), dir.join(".env")).unwrap();
    assert_config_error(&["serve"], &[("DATABASE_URL", REFUSED_DB)], &dir, "STRIPE_WEBHOOK_SECRET");
}

#[test]
fn the_development_secret_only_when_nothing_real_is_configured() {
    let dir = scratch_dir("dev-secret");
    let real: &[&[(&str, &str)]] = &[
        &[("DATABASE_URL", REFUSED_DB)],
        &[("DATABASE_URL", "sqlite://./billing.db")],
        &[("DATABASE_URL", "memory:")],
        &[("SUPABASE_URL", "http://127.0.0.1:1"), ("SUPABASE_SERVICE_KEY", "sb_secret_0123456789")],
        &[("DOKKU_PROVISIONER_URL", "http://127.0.0.1:1"), ("PROVISIONER_API_KEY", "0123456789abcdef")],
        &[("RESEND_API_KEY", "re_0123456789abcdef"), ("EMAIL_FROM", "MindRoom <billing@example.com>")],
        &[("STRIPE_SECRET_KEY", "sk_test_0123456789abcdef")],
    ];
    for env in real {
        let out = assert_config_error(&["serve"], env, &dir, "STRIPE_WEBHOOK_SECRET");
        assert!(out.contains("required"), "{out}");
    }
}

#[test]
fn embedded_serve_binds_loopback_logs_without_colour_and_names_the_missing_prices() {
    let server = Server::start(&[], &[]);
    let log = server.log();
    assert!(log.contains(&format!("127.0.0.1:{}", server.port)), "binds 127.0.0.1 in embedded mode:\n{log}");
    assert!(!log.contains("0.0.0.0"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log that is not a terminal:\n{log}");
    for var in ["STRIPE_PRICE_STARTER", "STRIPE_PRICE_PRO"] {
        assert!(log.contains(var), "the start names {var}:\n{log}");
    }
    drop(server);
    // `--host` says otherwise; with prices set, no price warning.
    let server =
        Server::start(&["--host", "0.0.0.0"], &[("STRIPE_PRICE_STARTER", "price_s"), ("STRIPE_PRICE_PRO", "price_p")]);
    let log = server.log();
    assert!(log.contains(&format!("0.0.0.0:{}", server.port)), "{log}");
    assert!(!log.contains("STRIPE_PRICE_STARTER"), "{log}");
}

// ---- 2: operator commands need the server's database ----------------------------------------------------

#[test]
fn events_and_jobs_without_a_database_say_they_need_the_servers() {
    let dir = scratch_dir("operator");
    for args in [&["events", "list"][..], &["jobs", "list"], &["events", "replay", "evt_1"]] {
        let out = assert_config_error(args, &[], &dir, "DATABASE_URL");
        assert!(out.contains("server's database"), "{out}");
        assert!(out.contains("data/mindroom-billing.db"), "names the file it looked for: {out}");
        assert!(!out.contains("provisioner") && !out.contains("RESEND"), "serve's set-up lines: {out}");
        let out = assert_config_error(args, &[("DATABASE_URL", "memory:")], &dir, "DATABASE_URL");
        assert!(out.contains("in-memory server"), "{out}");
    }
    assert!(!dir.join("data").exists(), "a read command creates no database");
}

// ---- 4: send ---------------------------------------------------------------------------------------------

#[test]
fn send_reports_the_event_and_fails_on_a_non_2xx_answer() {
    let server = Server::start(&[], &[]);
    let ok = server.send(&["customer.subscription.created"]);
    assert!(ok.status.success(), "{}{}", text(&ok.stdout), text(&ok.stderr));
    assert!(text(&ok.stdout).contains("evt_1FxcB7WZ01zgkWrFwUFXakUx"), "{}", text(&ok.stdout));

    let forged = server.send(&["customer.subscription.created", "--secret", "whsec_not_the_servers"]);
    assert_eq!(forged.status.code(), Some(1), "{}{}", text(&forged.stdout), text(&forged.stderr));
    let all = text(&forged.stdout) + &text(&forged.stderr);
    assert!(all.contains("evt_1FxcB7WZ01zgkWrFwUFXakUx") && all.contains("400"), "{all}");

    let help = output(&["send", "--help"], &[]);
    let help = text(&help.stdout);
    for sample in ["checkout.session.completed", "customer.subscription.created", "invoice.payment_failed"] {
        assert!(help.contains(sample), "send --help lists {sample}:\n{help}");
    }
}

// ---- 5: schema and connection ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_an_unmigrated_database_stops_and_serve_migrate_starts() {
    let db = TestDb::create().await.unwrap();
    let env = [("DATABASE_URL", db.url()), ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef")];
    let out = assert_config_error(&["serve"], &env, &scratch_dir("unmigrated"), "DATABASE_URL");
    assert!(out.contains("mindroom-billing migrate") && out.contains("--migrate"), "{out}");

    let server = Server::start(&["--migrate"], &env);
    let ready = reqwest::get(server.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), 200, "{}", server.log());
    drop(server);
    db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgrest_without_the_migrations_stops() {
    use mindroom_billing_supabase::testing::{Gateway, GatewayConfig};
    let db = TestDb::create().await.unwrap();
    let gateway = Gateway::start(db.url(), GatewayConfig::default()).await;
    let env = [
        ("SUPABASE_URL", gateway.base_url()),
        ("SUPABASE_SERVICE_KEY", gateway.secret_key().to_owned()),
        ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef".to_owned()),
    ];
    let dir = scratch_dir("postgrest-unmigrated");
    // The child waits on a thread of its own: the gateway answers on this test's runtime meanwhile.
    let out = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_config_error(&["serve"], &env, &dir, "SUPABASE_URL")
    })
    .await
    .unwrap();
    assert!(out.contains("migrate"), "{out}");
    drop(gateway);
    db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connection_errors_are_one_clear_line() {
    let dir = scratch_dir("connect");
    let secret = ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef");
    for args in [&["migrate"][..], &["serve"], &["events", "list"]] {
        let (code, out) = run_to_exit(args, &[("DATABASE_URL", REFUSED_DB), secret], &dir);
        assert_eq!(code, Some(1), "{args:?}: {out}");
        let errors: Vec<&str> = out.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: one error line:\n{out}");
        assert!(errors[0].starts_with("error: DATABASE_URL: ") && errors[0].contains("refused"), "{out}");
    }
    let db = TestDb::create().await.unwrap();
    let missing = mindroom_billing_supabase::testing::url_with_database(db.url(), "mrb_no_such_database");
    let (code, out) = run_to_exit(&["migrate"], &[("DATABASE_URL", &missing)], &dir);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.lines().count() == 1 && out.contains("mrb_no_such_database\" does not exist"), "{out}");
    db.drop_db().await.unwrap();

    let out =
        assert_config_error(&["migrate"], &[("DATABASE_URL", "mysql://root@127.0.0.1/billing")], &dir, "DATABASE_URL");
    assert!(out.contains("PostgreSQL"), "{out}");
}

// ---- 6: one exit code, RUST_LOG ----------------------------------------------------------------------------

#[test]
fn configuration_errors_share_one_exit_code_and_rust_log_is_validated() {
    let dir = scratch_dir("exit-codes");
    assert_config_error(&["migrate"], &[("DATABASE_URL", "memory:")], &dir, "DATABASE_URL");
    assert_config_error(&["serve"], &[("PORT", "eighty")], &dir, "PORT");
    assert_config_error(&["serve"], &[("LOG_FORMAT", "xml")], &dir, "LOG_FORMAT");
    let out = assert_config_error(&["serve"], &[("RUST_LOG", "info,mindroom_billing_core=loud")], &dir, "RUST_LOG");
    assert!(out.contains("loud"), "{out}");
    // A usage error of the command line has the same code.
    let (code, _) = run_to_exit(&["serve", "--no-such-flag"], &[], &dir);
    assert_eq!(code, Some(EXIT_CONFIG));
}

#[test]
fn a_lease_not_longer_than_two_provisioner_calls_is_refused() {
    // Issue 10, defect 7: a lease that can run out during a slow provisioner call lets two workers
    // call it at once.
    let dir = scratch_dir("lease");
    let out = assert_config_error(
        &["serve"],
        &[("BILLING_JOB_LEASE_SECS", "60"), ("PROVISIONER_TIMEOUT_SECS", "30")],
        &dir,
        "BILLING_JOB_LEASE_SECS",
    );
    assert!(out.contains("PROVISIONER_TIMEOUT_SECS"), "{out}");
    assert_config_error(&["serve"], &[("PROVISIONER_TIMEOUT_SECS", "0")], &dir, "PROVISIONER_TIMEOUT_SECS");
}

#[test]
fn stripe_settings_are_validated_and_stripe_commands_need_the_servers_database() {
    let dir = scratch_dir("stripe");
    let db = ("DATABASE_URL", REFUSED_DB);
    let real = ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef");
    let out =
        assert_config_error(&["serve"], &[db, real, ("STRIPE_SECRET_KEY", "pk_test_123")], &dir, "STRIPE_SECRET_KEY");
    assert!(!out.contains("pk_test_123"), "the key is not echoed: {out}");
    assert_config_error(
        &["serve"],
        &[db, real, ("STRIPE_SECRET_KEY", "sk_test_replace_me")],
        &dir,
        "STRIPE_SECRET_KEY",
    );
    assert_config_error(
        &["serve"],
        &[db, real, ("STRIPE_SECRET_KEY", "rk_test_abc"), ("STRIPE_API_BASE", "api.stripe.com")],
        &dir,
        "STRIPE_API_BASE",
    );
    assert_config_error(&["serve"], &[("STRIPE_CATCH_UP_INTERVAL_SECS", "0")], &dir, "STRIPE_CATCH_UP_INTERVAL_SECS");
    assert_config_error(&["stripe", "catch-up"], &[("STRIPE_SECRET_KEY", "sk_test_abc")], &dir, "DATABASE_URL");
}

// ---- 8: replay -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_says_which_configuration_decided_and_claims_no_new_alert() {
    let db = TestDb::create().await.unwrap();
    support::migrate(db.url());
    // The server had no price configured: the event is recorded as failed.
    let server = Server::start(&[], &[("DATABASE_URL", db.url()), ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef")]);
    let sent = output(
        &["send", "customer.subscription.created", "--url", &server.url("/webhooks/stripe")],
        &[("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef")],
    );
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    drop(server);
    let id = "evt_1FxcB7WZ01zgkWrFwUFXakUx";

    let again = output(&["events", "replay", id], &[("DATABASE_URL", db.url())]);
    let all = text(&again.stdout) + &text(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "an event that fails again exits 1 for scripts: {all}");
    assert!(all.contains(&format!("{id}: failed")), "{all}");
    assert!(all.contains("this shell's configuration"), "{all}");
    assert!(!all.contains("admin alert queued"), "no alert is queued by a replay: {all}");

    // Closing the output early (`… | head`) ends the command quietly, not with a panic.
    let mut listing = binary(&std::env::temp_dir())
        .args(["events", "show", id])
        .env("DATABASE_URL", db.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(listing.stdout.take());
    let closed = listing.wait_with_output().unwrap();
    assert_eq!(closed.status.code(), Some(0), "{}", text(&closed.stderr));
    assert!(!text(&closed.stderr).contains("panicked"), "{}", text(&closed.stderr));

    let fixed = output(
        &["events", "replay", id],
        &[("DATABASE_URL", db.url()), ("STRIPE_PRICE_STARTER", "price_1PgafmB7WZ01zgkW6dKueIc5")],
    );
    assert!(text(&fixed.stdout).contains(&format!("{id}: applied")), "{}{}", text(&fixed.stdout), text(&fixed.stderr));
    let again = output(&["events", "replay", id], &[("DATABASE_URL", db.url())]);
    assert!(text(&again.stdout).contains(&format!("{id}: already applied; nothing done")), "{}", text(&again.stdout));
    db.drop_db().await.unwrap();
}

// ---- 9 + 3: the README's quick start -----------------------------------------------------------------------

#[test]
fn quick_start_mails_the_samples_address_and_deprovisions() {
    let prices = [
        ("STRIPE_PRICE_STARTER", "price_1PgafmB7WZ01zgkW6dKueIc5"),
        ("STRIPE_PRICE_PRO", "price_1PgagYB7WZ01zgkWq2Lx9Rz4"),
    ];
    // A fast sweeper: the grace of the sample failure is long over, so the deprovisioning is due at once.
    let server = Server::start(&[], &[prices[0], prices[1], ("BILLING_SWEEP_INTERVAL_MS", "200")]);
    // The README's quick start, in its order, at a person's pace (each step's effect seen first).
    let send = |event: &str| {
        let sent = server.send(&[event]);
        assert!(sent.status.success(), "{event}: {}{}", text(&sent.stdout), text(&sent.stderr));
    };
    send("checkout.session.completed");
    send("customer.subscription.created");
    server.wait_for_log("dry run: would provision");
    server.wait_for_log("to=jenny.rosen@example.com Welcome");
    send("customer.subscription.updated");
    server.wait_for_log("dry run: would update limits");
    send("invoice.payment_failed");
    server.wait_for_log("dry run: would deprovision");
    server.wait_for_log("to=jenny.rosen@example.com GraceExpired");
    assert!(!server.log().contains("no e-mail address known"), "{}", server.log());
}

// ---- 11: metrics -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_series_has_help_text() {
    let server = Server::start(
        &[],
        &[("STRIPE_PRICE_STARTER", "price_1PgafmB7WZ01zgkW6dKueIc5"), ("BILLING_SWEEP_INTERVAL_MS", "100")],
    );
    // Exercise every family: events, a forged one, a garbage body, the internal API, jobs.
    assert!(server.send(&["customer.subscription.created"]).status.success());
    assert!(!server.send(&["invoice.paid", "--secret", "whsec_not_the_servers"]).status.success());
    let client = reqwest::Client::new();
    client.post(server.url("/webhooks/stripe")).body("{").send().await.unwrap();
    client.get(server.url("/v1/accounts/cus_1/entitlements")).send().await.unwrap();
    let started = Instant::now();
    let body = loop {
        let body = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if body.contains("billing_jobs_total") && body.contains("billing_jobs_pending") {
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "job metrics never appeared:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lint = lint_metrics(&body);
    assert!(lint.is_empty(), "{lint:#?}\n{body}");
    for family in ["billing_webhook_events_total", "billing_http_requests_total", "billing_webhook_processing_seconds"]
    {
        assert!(body.contains(&format!("# HELP {family} ")), "{family} described:\n{body}");
    }
    promtool_check(&body);
}

/// The `promtool check metrics` rules that apply without promtool: every `# TYPE` family has a
/// non-empty `# HELP`, counters end in `_total`, and every sample belongs to a declared family.
fn lint_metrics(body: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut families = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let help = body.lines().find_map(|l| l.strip_prefix(&format!("# HELP {name} ")));
            if help.is_none_or(|h| h.trim().is_empty()) {
                problems.push(format!("{name}: no help text"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                problems.push(format!("{name}: counter without _total"));
            }
            families.push(name.to_owned());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let sample = line.split(['{', ' ']).next().unwrap_or("");
            let declared = families.iter().any(|f| {
                sample == f || ["_bucket", "_sum", "_count"].iter().any(|s| sample.strip_suffix(s) == Some(f.as_str()))
            });
            if !declared {
                problems.push(format!("{sample}: sample without # TYPE"));
            }
        }
    }
    problems
}

/// `promtool check metrics`, where promtool is installed (CI); skipped here otherwise.
fn promtool_check(body: &str) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: `promtool check metrics` skipped");
        return;
    };
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "promtool: {}{}", text(&out.stdout), text(&out.stderr));
}

// ---- issue 14: the operator console ------------------------------------------------------------------

/// `console hash-password` reading a piped password.
fn console_hash(password: &str) -> String {
    use std::io::Write as _;
    let mut child = binary(&std::env::temp_dir())
        .args(["console", "hash-password"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

#[test]
fn the_console_needs_a_password_hash_and_its_own_port() {
    let dir = scratch_dir("console-config");
    let hash = console_hash("a console password");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let short = binary(&dir).args(["console", "hash-password"]).output().unwrap();
    assert!(!short.status.success(), "an empty password is refused");
    assert_config_error(
        &["serve"],
        &[("BILLING_CONSOLE_ADDR", "127.0.0.1:3999")],
        &dir,
        "BILLING_CONSOLE_PASSWORD_HASH",
    );
    let same = [("BILLING_CONSOLE_ADDR", "127.0.0.1:3005"), ("BILLING_CONSOLE_PASSWORD_HASH", hash.as_str())];
    assert_config_error(&["serve"], &same, &dir, "BILLING_CONSOLE_ADDR");
    let plain = [("BILLING_CONSOLE_ADDR", "127.0.0.1:3999"), ("BILLING_CONSOLE_PASSWORD_HASH", "hunter2")];
    assert_config_error(&["serve"], &plain, &dir, "BILLING_CONSOLE_PASSWORD_HASH");
    let no_port = [("BILLING_CONSOLE_ADDR", "127.0.0.1"), ("BILLING_CONSOLE_PASSWORD_HASH", hash.as_str())];
    assert_config_error(&["serve"], &no_port, &dir, "BILLING_CONSOLE_ADDR");
    for origin in ["ftp://console.example", "console.example", "https://console.example/path"] {
        let bad = [
            ("BILLING_CONSOLE_ADDR", "127.0.0.1:3999"),
            ("BILLING_CONSOLE_PASSWORD_HASH", hash.as_str()),
            ("BILLING_CONSOLE_ORIGIN", origin),
        ];
        assert_config_error(&["serve"], &bad, &dir, "BILLING_CONSOLE_ORIGIN");
    }
    let proxies = [
        ("BILLING_CONSOLE_ADDR", "127.0.0.1:3999"),
        ("BILLING_CONSOLE_PASSWORD_HASH", hash.as_str()),
        ("BILLING_CONSOLE_TRUSTED_PROXIES", "10.0.0.1, proxy.example"),
    ];
    assert_config_error(&["serve"], &proxies, &dir, "BILLING_CONSOLE_TRUSTED_PROXIES");
}

#[test]
fn a_console_reachable_from_the_network_without_https_is_warned_about() {
    let hash = console_hash("a console password");
    let open = format!("0.0.0.0:{}", free_port());
    let env = [("BILLING_CONSOLE_ADDR", open.as_str()), ("BILLING_CONSOLE_PASSWORD_HASH", hash.as_str())];
    let server = Server::start(&["--host", "127.0.0.1"], &env);
    server.wait_for_log("console listening");
    assert!(server.log().contains("without https"), "{}", server.log());
    drop(server);
    let behind_tls = [
        ("BILLING_CONSOLE_ADDR", open.as_str()),
        ("BILLING_CONSOLE_PASSWORD_HASH", hash.as_str()),
        ("BILLING_CONSOLE_ORIGIN", "https://console.example"),
    ];
    let server = Server::start(&["--host", "127.0.0.1"], &behind_tls);
    server.wait_for_log("console listening");
    assert!(!server.log().contains("without https"), "{}", server.log());
    let local = format!("127.0.0.1:{}", free_port());
    let server = Server::start(
        &[],
        &[("BILLING_CONSOLE_ADDR", local.as_str()), ("BILLING_CONSOLE_PASSWORD_HASH", hash.as_str())],
    );
    server.wait_for_log("console listening");
    assert!(!server.log().contains("without https"), "loopback: {}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_on_postgres_shows_a_failed_event_and_replays_it_with_an_audit_row() {
    let db = TestDb::create().await.unwrap();
    support::migrate(db.url());
    let hash = console_hash("a console password");
    let console_port = free_port();
    let console_addr = format!("127.0.0.1:{console_port}");
    let secret = ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef");
    let env = [
        ("DATABASE_URL", db.url()),
        secret,
        ("BILLING_CONSOLE_ADDR", console_addr.as_str()),
        ("BILLING_CONSOLE_PASSWORD_HASH", hash.as_str()),
    ];
    let server = Server::start(&[], &env);
    server.wait_for_log("console listening");
    let sent = output(&["send", "customer.subscription.created", "--url", &server.url("/webhooks/stripe")], &[secret]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    let id = "evt_1FxcB7WZ01zgkWrFwUFXakUx";

    let base = format!("http://{console_addr}");
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let anonymous = http.get(format!("{base}/events/failed")).send().await.unwrap();
    assert_eq!(anonymous.status(), 303, "login first");
    let public = reqwest::get(server.url("/events/failed")).await.unwrap();
    assert_eq!(public.status(), 404, "the console is not on the public port");
    let login = http
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=admin&password=a+console+password")
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303, "{}", server.log());
    let cookie = login.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let get = |path: String| {
        let request = http.get(format!("{base}{path}")).header("cookie", &cookie);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let failed = get("/events/failed".into()).await;
    assert!(failed.contains(id), "{failed}");
    let event = get(format!("/events/{id}")).await;
    assert!(event.contains("unknown price") || event.contains("failed"), "{event}");
    let at = event.find(r#"name="csrf" value=""#).unwrap() + r#"name="csrf" value=""#.len();
    let csrf = event[at..].split('"').next().unwrap().to_owned();
    let replayed = http
        .post(format!("{base}/events/{id}/replay"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&confirm=yes"))
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 303, "POST/redirect/GET");
    let result = get(replayed.headers()["location"].to_str().unwrap().to_owned()).await;
    assert!(result.contains("disposition failed"), "still no price configured: {result}");
    assert!(result.contains(r#"class="failed""#), "a replay that ends failed is shown as a failure");
    let customer = get("/customers/cus_QXg1o8vcGmoR32".into()).await;
    assert!(customer.contains(id) && customer.contains("admin from 127.0.0.1"), "{customer}");
    drop(server);
    db.drop_db().await.unwrap();
}

// ---- the first hour's last traps -----------------------------------------------------------------------

/// A port nothing listens on (bound, then released).
fn closed_port_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// A Stripe API that accepts connections and never answers (they are held open until the test
/// process ends); the counter says how many it accepted.
fn silent_api() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept() {
            open.push(stream);
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (url, accepted)
}

/// Polls `/metrics` until `series` has a sample with `needle` in its line.
async fn wait_for_metric(server: &Server, needle: &str) {
    let started = Instant::now();
    loop {
        let body = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
        if body.lines().any(|l| !l.starts_with('#') && l.contains(needle)) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{needle} never appeared:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_serve_within_the_grace_while_the_stripe_api_is_unreachable() {
    let (silent, accepted) = silent_api();
    for (api, refused) in [(closed_port_url(), true), (silent, false)] {
        let mut server = Server::start(
            &[],
            &[
                ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef"),
                ("STRIPE_SECRET_KEY", "sk_test_unreachable_api"),
                ("STRIPE_API_BASE", &api),
                ("BILLING_SHUTDOWN_GRACE_SECS", "2"),
            ],
        );
        // The start-up catch-up is under way: its first request failed, or hangs unanswered.
        if refused {
            wait_for_metric(&server, r#"status="error"}"#).await;
        } else {
            let started = Instant::now();
            while accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                assert!(started.elapsed() < Duration::from_secs(30), "no request reached the API");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        server.child.terminate();
        // The bound is a guard against hanging, well above the 2 s grace and below Docker's 10 s
        // (the retries alone would take more than a minute).
        let status = server.child.wait_exit(Duration::from_secs(9));
        assert!(status.is_some_and(|s| s.success()), "{api}: serve did not stop in time:\n{}", server.log());
        assert!(server.log().contains("bye"), "{}", server.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_commands_say_each_retry_name_stripe_api_base_and_stop_at_the_timeout() {
    let db = TestDb::create().await.unwrap();
    support::migrate(db.url());
    let dir = scratch_dir("stripe-retries");
    let api = closed_port_url();
    let env = [("DATABASE_URL", db.url()), ("STRIPE_SECRET_KEY", "sk_test_unreachable_api"), ("STRIPE_API_BASE", &api)];
    for command in ["reconcile", "catch-up"] {
        let (code, out) = run_to_exit(&["stripe", command, "--timeout", "3"], &env, &dir);
        assert_eq!(code, Some(1), "stripe {command}: {out}");
        for said in ["attempt 1 of 10", "next try in", "STRIPE_API_BASE", &api, "--timeout 3"] {
            assert!(out.contains(said), "stripe {command} says {said:?}:\n{out}");
        }
        let retry = out.lines().find(|l| l.contains("attempt 1 of 10")).unwrap();
        assert_said_once(retry, "could not connect");
        let error = out.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("an error line:\n{out}"));
        assert!(error.contains("--timeout 3"), "{out}");
    }
    db.drop_db().await.unwrap();
}

/// `line` says `cause` exactly once.
fn assert_said_once(line: &str, cause: &str) {
    assert_eq!(line.matches(cause).count(), 1, "{cause:?} said once: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_says_its_cause_once() {
    let dir = scratch_dir("cause-once");
    let (code, out) = run_to_exit(&["events", "list"], &[("DATABASE_URL", REFUSED_DB)], &dir);
    assert_eq!(code, Some(1), "{out}");
    assert_said_once(&out, "Connection refused");
    let db = TestDb::create().await.unwrap();
    let missing = mindroom_billing_supabase::testing::url_with_database(db.url(), "mrb_no_such_database");
    for args in [&["migrate"][..], &["events", "list"]] {
        let (code, out) = run_to_exit(args, &[("DATABASE_URL", &missing)], &dir);
        assert_eq!(code, Some(1), "{out}");
        assert_said_once(&out, "\"mrb_no_such_database\" does not exist");
    }
    db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_commands_are_quiet_unless_verbose() {
    let db = TestDb::create().await.unwrap();
    support::migrate(db.url());
    let env = [("DATABASE_URL", db.url())];
    for args in [&["events", "list"][..], &["jobs", "list"]] {
        let quiet = output(args, &env);
        assert!(quiet.status.success(), "{}", text(&quiet.stderr));
        assert_eq!(text(&quiet.stderr), "", "{args:?} writes nothing to stderr");
        let mut verbose = vec!["-v"];
        verbose.extend_from_slice(args);
        let loud = output(&verbose, &env);
        assert!(loud.status.success(), "{}", text(&loud.stderr));
        assert!(text(&loud.stderr).contains("INFO"), "-v {args:?} logs:\n{}", text(&loud.stderr));
        assert_eq!(text(&loud.stdout), text(&quiet.stdout));
    }
    db.drop_db().await.unwrap();
}

#[test]
fn send_with_a_wrong_secret_says_which_secret_must_match() {
    let server = Server::start(&[], &[("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef")]);
    let sent = server.send(&["customer.subscription.created", "--secret", "whsec_not_the_servers"]);
    assert!(!sent.status.success());
    let all = text(&sent.stdout) + &text(&sent.stderr);
    assert!(all.contains("no signature matches"), "{all}");
    for hint in ["STRIPE_WEBHOOK_SECRET", "--secret"] {
        assert!(text(&sent.stderr).contains(hint), "the hint names {hint}:\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_list_every_documented_series_at_start() {
    let server = Server::start(&[], &[]);
    let body = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    let samples: Vec<&str> = body.lines().filter(|l| !l.starts_with('#')).collect();
    let has = |needle: &str| samples.iter().any(|l| l.starts_with(needle));
    for series in [
        "billing_webhook_events_total{",
        r#"billing_webhook_verification_failures_total{reason="no_matching_signature"} 0"#,
        r#"billing_webhook_verification_failures_total{reason="timestamp_outside_tolerance"} 0"#,
        "billing_webhook_parse_failures_total 0",
        "billing_webhook_processing_seconds_count 0",
        "billing_webhook_delivery_lag_seconds_count 0",
        "billing_commit_conflicts_total 0",
        "billing_jobs_total{",
        "billing_unapplied_pickup_errors_total 0",
        "billing_jobs_pending 0",
        "billing_jobs_running 0",
        "billing_jobs_dead 0",
        "billing_provisioner_request_seconds_count{",
        "billing_provisioner_errors_total{",
        "billing_http_requests_total{",
        "billing_http_request_seconds_count{",
        r#"billing_retention_pruned_rows_total{kind="payloads"} 0"#,
        "billing_retention_errors_total 0",
        r#"billing_stripe_catch_up_events_total{outcome="applied"} 0"#,
        "billing_stripe_cursor_lag_seconds 0",
        r#"billing_stripe_drift_total{field="tier"} 0"#,
        "billing_stripe_api_requests_total{",
        "billing_stripe_api_request_seconds_count{",
        r#"billing_stripe_sync_errors_total{task="catch_up",kind="api"} 0"#,
    ] {
        assert!(has(series), "{series} at start:\n{body}");
    }
    let lint = lint_metrics(&body);
    assert!(lint.is_empty(), "{lint:#?}\n{body}");
}

#[test]
fn a_checkout_is_logged_without_empty_fields() {
    let server = Server::start(&[], &[("LOG_FORMAT", "json")]);
    let sent = server.send(&["checkout.session.completed"]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    server.wait_for_log("webhook accepted");
    let line = server.log().lines().find(|l| l.contains("webhook accepted")).unwrap().to_owned();
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["span"]["event_type"], "checkout.session.completed", "{line}");
    let fields = entry.as_object().unwrap().iter().chain(entry["span"].as_object().unwrap());
    let empty: Vec<&String> = fields.filter(|(_, v)| *v == "").map(|(k, _)| k).collect();
    assert!(empty.is_empty(), "empty fields {empty:?}: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_api_answers_by_stripe_customer_and_by_reference_on_postgres() {
    let db = TestDb::create().await.unwrap();
    support::migrate(db.url());
    let secret = ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef");
    let key = "api-key-0123456789abcdef";
    let server = Server::start(
        &[],
        &[
            ("DATABASE_URL", db.url()),
            secret,
            ("BILLING_API_KEY", key),
            ("STRIPE_PRICE_STARTER", "price_1PgafmB7WZ01zgkW6dKueIc5"),
        ],
    );
    for sample in ["checkout.session.completed", "customer.subscription.created"] {
        let sent = output(&["send", sample, "--url", &server.url("/webhooks/stripe")], &[secret]);
        assert!(sent.status.success(), "{}", text(&sent.stderr));
    }
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(server.url(path)).bearer_auth(key).send();
    let by_customer = get("/v1/entitlements?customer=cus_QXg1o8vcGmoR32").await.unwrap();
    assert_eq!(by_customer.status(), 200);
    let by_customer: serde_json::Value = by_customer.json().await.unwrap();
    assert_eq!(by_customer["tier"], "starter", "{by_customer}");
    let account = by_customer["account_id"].as_str().unwrap().to_owned();
    let by_id: serde_json::Value =
        get(&format!("/v1/accounts/{account}/entitlements")).await.unwrap().json().await.unwrap();
    assert_eq!(by_id["subscription_id"], by_customer["subscription_id"]);

    let used = client
        .post(server.url("/v1/usage"))
        .bearer_auth(key)
        .json(&serde_json::json!({"reference": "user_123", "metric": "messages", "count": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(used.status(), 200);
    assert_eq!(used.json::<serde_json::Value>().await.unwrap()["used"], 3);
    let by_reference: serde_json::Value =
        get("/v1/entitlements?reference=user_123").await.unwrap().json().await.unwrap();
    assert_eq!(by_reference["account_id"], account.as_str());
    assert_eq!(by_reference["usage_today"]["messages"], 3, "{by_reference}");

    let unknown = get("/v1/entitlements?reference=user_nobody").await.unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.text().await.unwrap(), r#"{"error":"no account with reference \"user_nobody\""}"#);
    drop(server);
    db.drop_db().await.unwrap();
}

/// Runs the binary with `input` on stdin (a piped password).
fn with_stdin(args: &[&str], env: &[(&str, &str)], input: &str) -> Output {
    use std::io::Write as _;
    let mut child = binary(&std::env::temp_dir())
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// A console client from one local address (any of 127.0.0.0/8) that keeps its cookie.
struct ConsoleClient {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

impl ConsoleClient {
    fn new(addr: &str, from: [u8; 4]) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .local_address(std::net::IpAddr::from(from))
            .build()
            .unwrap();
        Self { http, base: format!("http://{addr}"), cookie: None }
    }

    async fn post(&self, path: &str, body: String, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    async fn login(&mut self, name: &str, password: &str) -> u16 {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs([("name", name), ("password", password)])
            .finish();
        let response = self.post("/login", body, &[]).await;
        if let Some(set) = response.headers().get("set-cookie") {
            self.cookie = Some(set.to_str().unwrap().split(';').next().unwrap().to_owned());
        }
        response.status().as_u16()
    }

    async fn get(&self, path: &str, host: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(host) = host {
            request = request.header("host", host);
        }
        request.send().await.unwrap()
    }

    async fn csrf(&self) -> String {
        let page = self.get("/", None).await.text().await.unwrap();
        let at = page.find(r#"name="csrf" value=""#).expect("a form") + r#"name="csrf" value=""#.len();
        page[at..].split('"').next().unwrap().to_owned()
    }
}

/// Through the binary on PostgreSQL: a flood of wrong passwords does not lock the admin out;
/// another Host and another scheme are refused; logging out ends the session; named operators from
/// the command line log in, are named in the audit, and a password change or their removal ends
/// their sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_keeps_named_operators_and_sessions_in_the_store_and_cannot_be_locked() {
    let db = TestDb::create().await.unwrap();
    support::migrate(db.url());
    let hash = console_hash("a console password");
    let console_addr = format!("127.0.0.1:{}", free_port());
    let secret = ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef");
    let env = [
        ("DATABASE_URL", db.url()),
        secret,
        ("BILLING_CONSOLE_ADDR", console_addr.as_str()),
        ("BILLING_CONSOLE_PASSWORD_HASH", hash.as_str()),
    ];
    let server = Server::start(&[], &env);
    server.wait_for_log("console listening");

    // Six addresses, ten wrong passwords each; then the admin from a seventh gets in at once.
    for round in 0..10 {
        for i in 2..8u8 {
            let mut guesser = ConsoleClient::new(&console_addr, [127, 0, 0, i]);
            let status = guesser.login("admin", &format!("guess {round}")).await;
            assert!(status == 401 || status == 429, "{status}");
        }
    }
    let mut admin = ConsoleClient::new(&console_addr, [127, 0, 0, 9]);
    assert_eq!(admin.login("admin", "a console password").await, 303, "not locked out: {}", server.log());

    // DNS rebinding: the same cookie on another Host is refused.
    let port = console_addr.rsplit_once(':').unwrap().1;
    let rebound = admin.get("/", Some(&format!("evil.test:{port}"))).await;
    assert_eq!(rebound.status(), 421, "another Host");
    let token = admin.csrf().await;
    let https = format!("https://{console_addr}");
    let crossed = admin.post("/logout", format!("csrf={token}"), &[("origin", https.as_str())]).await;
    assert_eq!(crossed.status(), 403, "an https Origin against an http console");
    assert_eq!(admin.get("/", None).await.status(), 200, "still logged in");

    // Logout ends the session: the old cookie reads nothing more.
    let own = format!("http://{console_addr}");
    let out = admin.post("/logout", format!("csrf={token}"), &[("origin", own.as_str())]).await;
    assert_eq!(out.status(), 303);
    let replayed = admin.get("/", None).await;
    assert_eq!(replayed.status(), 303, "the cookie after logout");
    assert_eq!(replayed.headers()["location"], "/login");

    // Named operators from the command line, kept in the store.
    let db_env = [("DATABASE_URL", db.url())];
    let added = with_stdin(&["console", "add-operator", "alice", "--role", "admin"], &db_env, "alice's password\n");
    assert!(added.status.success(), "{}", text(&added.stderr));
    let reader =
        with_stdin(&["console", "add-operator", "bob", "--role", "read-only"], &db_env, "bob's long password\n");
    assert!(reader.status.success(), "{}", text(&reader.stderr));
    let twice = with_stdin(&["console", "add-operator", "alice", "--role", "admin"], &db_env, "another password\n");
    assert!(!twice.status.success(), "a name once");
    let listed = output(&["console", "list-operators"], &db_env);
    let listed = text(&listed.stdout);
    assert!(
        listed.contains("alice") && listed.contains("admin") && listed.contains("bob") && listed.contains("read-only")
    );
    assert!(!listed.contains("argon2"), "no hashes printed: {listed}");

    let mut alice = ConsoleClient::new(&console_addr, [127, 0, 0, 1]);
    assert_eq!(alice.login("alice", "alice's password").await, 303);
    let mut bob = ConsoleClient::new(&console_addr, [127, 0, 0, 1]);
    assert_eq!(bob.login("bob", "bob's long password").await, 303);
    let bob_token = bob.csrf().await;
    let refused = bob.post("/jobs/1/retry", format!("csrf={bob_token}&confirm=yes"), &[]).await;
    assert_eq!(refused.status(), 403);
    let token = alice.csrf().await;
    let acted = alice.post("/jobs/999/retry", format!("csrf={token}&confirm=yes"), &[]).await;
    assert_eq!(acted.status(), 303);
    let audit = alice.get("/audit", None).await.text().await.unwrap();
    assert!(audit.contains("alice from 127.0.0.1") && audit.contains("retry_job"), "{audit}");
    assert!(audit.contains("bob from 127.0.0.1") && audit.contains("refused: bob is read-only"), "{audit}");
    assert!(audit.contains("admin from 127.0.0.2") && audit.contains("wrong name or password"), "{audit}");

    let changed = with_stdin(&["console", "set-password", "alice"], &db_env, "alice's new password\n");
    assert!(changed.status.success(), "{}", text(&changed.stderr));
    assert_eq!(alice.get("/", None).await.status(), 303, "the password change ended alice's session");
    assert_eq!(bob.get("/", None).await.status(), 200, "not bob's");
    let removed = output(&["console", "remove-operator", "bob"], &db_env);
    assert!(removed.status.success(), "{}", text(&removed.stderr));
    assert_eq!(bob.get("/", None).await.status(), 303, "the removal ended bob's session");
    assert_eq!(alice.login("alice", "alice's password").await, 401, "the old password");
    assert_eq!(alice.login("alice", "alice's new password").await, 303);
    drop(server);
    db.drop_db().await.unwrap();
}
