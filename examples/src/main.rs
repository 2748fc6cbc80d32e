//! The `mindroom-billing` server binary: wires the core, the hyper adapter and the store /
//! provisioner / notifier adapters from environment variables, plus operator and developer tools.

#![allow(clippy::print_stdout, clippy::print_stderr)]

/// `println!` that ends the process quietly when stdout is closed early (`… | head`) instead of
/// panicking, and with exit code 1 on any other write error.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: writing to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

mod config;
mod cutover;
mod samples;
mod wiring;

/// mimalloc instead of the system allocator: under a steady write load the in-memory store frees and
/// allocates payloads of every size from many threads, and glibc's malloc kept ~160 MB more resident
/// at its bound (measured with `scripts/load.sh distinct`, see the README's scale notes).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use metrics_exporter_prometheus::PrometheusBuilder;
use mindroom_billing_core::model::{EventStatus, JobState};
use mindroom_billing_core::ports::{EventFilter, JobFilter};
use mindroom_billing_core::signature::sign;
use mindroom_billing_core::{Billing, WebhookSecret};
use mindroom_billing_hyper::{AppState, serve};
use secrecy::ExposeSecret;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, ConfigError, LogFormat};

/// Stripe billing for MindRoom: verifies webhooks, keeps subscriptions, tiers and instances in step.
///
/// Configuration comes from environment variables (a `.env` file is read if present); see `.env.example`.
#[derive(Debug, Parser)]
#[command(name = "mindroom-billing", version, about)]
struct Cli {
    /// Log at info level also for the read commands (`events list|show`, `jobs list`), which only
    /// log warnings otherwise (`RUST_LOG`, when set, decides for every command).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the webhook server, the job worker and the grace sweeper.
    Serve {
        /// Address to bind (the port comes from `PORT`, default 3005). Default: 0.0.0.0, or 127.0.0.1 in
        /// the fully embedded mode (development signing secret).
        #[arg(long)]
        host: Option<IpAddr>,
        /// Apply pending SQL migrations to `DATABASE_URL` first (otherwise `serve` stops when any is pending).
        #[arg(long)]
        migrate: bool,
    },
    /// Print a valid `Stripe-Signature` header value for a payload file.
    Sign {
        /// The payload file (signed byte for byte).
        file: PathBuf,
        /// Signing secret (default: the first of `STRIPE_WEBHOOK_SECRET`).
        #[arg(long)]
        secret: Option<String>,
        /// Unix timestamp to sign at (default: now).
        #[arg(long)]
        timestamp: Option<i64>,
    },
    /// Sign a payload file, or a bundled sample event of the given type, and POST it to the server
    /// (a local substitute for `stripe trigger`). Prints the event id, the status and the body; exits
    /// non-zero when the server does not answer 2xx.
    Send {
        /// A payload file, or an event type with a bundled sample (e.g. `customer.subscription.created`).
        event: String,
        /// Webhook URL (default: `http://127.0.0.1:$PORT/webhooks/stripe`).
        #[arg(long)]
        url: Option<String>,
        /// Signing secret (default: the first of `STRIPE_WEBHOOK_SECRET`).
        #[arg(long)]
        secret: Option<String>,
        /// Give the event a fresh random id, so a repeated send is not a duplicate.
        #[arg(long)]
        new_id: bool,
    },
    /// Apply the migrations to the store (`DATABASE_URL`; idempotent). A SQLite file is created.
    Migrate,
    /// Write a consistent copy of the SQLite store to a new file, also while `serve` runs (for
    /// PostgreSQL use its own tools, e.g. `pg_dump`).
    Backup {
        /// The copy (must not exist).
        file: PathBuf,
    },
    /// Move the store: `store copy --to postgres://…` copies everything in the SQLite file into an
    /// empty PostgreSQL database (migrated first) and checks the counts.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Inspect and replay stored events (in the server's database: the SQLite file, `DATABASE_URL` or
    /// `SUPABASE_URL`).
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Inspect jobs (in the server's database: the SQLite file, `DATABASE_URL` or `SUPABASE_URL`).
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// The operator console (served by `serve` on `BILLING_CONSOLE_ADDR`).
    Console {
        #[command(subcommand)]
        command: ConsoleCommand,
    },
    /// The cut-over from the Node service (see docs/cutover.md).
    Cutover {
        #[command(subcommand)]
        command: CutoverCommand,
    },
    /// Read the Stripe API (`STRIPE_SECRET_KEY`, read-only) into the server's database: catch up on
    /// missed events, or reconcile subscriptions. `serve` runs both by itself when the key is set.
    Stripe {
        #[command(subcommand)]
        command: StripeCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CutoverCommand {
    /// Compare billing's database (run in shadow: `DATABASE_URL` or `SUPABASE_URL`) with the Node
    /// service's: one row per subscription whose tier, status, limits or instance differ, with the
    /// provisioner calls and e-mails billing would make on the switch. Reads both, writes neither.
    /// Exits 0 when identical, 1 when anything differs, 2 when a database cannot be read.
    Compare {
        /// The Node service's database (`postgres://…`): its `accounts`, `subscriptions` and
        /// `instances` tables. From `NODE_DATABASE_URL` when not given (keeps the password out of the
        /// process list).
        #[arg(long, env = "NODE_DATABASE_URL", hide_env_values = true)]
        node_database_url: String,
        /// Print one JSON document (rows and counts) instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy everything (events with their raw payloads, aggregates, accounts, instances, jobs,
    /// usage, cursors, audit, drift) into PostgreSQL; `serve` must be stopped meanwhile.
    Copy {
        /// The PostgreSQL database (empty; its migrations are applied first).
        #[arg(long)]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConsoleCommand {
    /// Read a password (from the terminal without echo, or the first line of a pipe) and print its
    /// argon2id hash for `BILLING_CONSOLE_PASSWORD_HASH` / `BILLING_CONSOLE_READONLY_PASSWORD_HASH`.
    HashPassword,
    /// Add a named operator to the server's store; the password is read like `hash-password`'s.
    AddOperator {
        /// The login name (letters, digits, `.`, `_`, `-`, `@`; at most 64).
        name: String,
        /// `admin` (may act) or `read-only`.
        #[arg(long)]
        role: String,
    },
    /// List the operators in the server's store.
    ListOperators,
    /// Remove an operator; its sessions end at once.
    RemoveOperator {
        /// The login name.
        name: String,
    },
    /// Set an operator's password (read like `hash-password`'s); its sessions end at once.
    SetPassword {
        /// The login name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum StripeCommand {
    /// Apply the events Stripe lists since the stored cursor (or `--since`), oldest first; events
    /// already received by webhook are duplicates. Without a cursor within Stripe's 30-day event
    /// retention, reconciles instead.
    CatchUp {
        /// Start from this time (RFC 3339, e.g. 2026-11-20T00:00:00Z) instead of the stored cursor.
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Give up after this many seconds (each failed request is retried with backoff for about
        /// two minutes otherwise; the retries are logged).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Compare every subscription at Stripe (or one) with billing's record and fix the drift.
    Reconcile {
        /// Only this subscription (`sub_…`).
        #[arg(long)]
        subscription: Option<String>,
        /// Print the drift table and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Give up after this many seconds (each failed request is retried with backoff for about
        /// two minutes otherwise; the retries are logged).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// List events, newest first.
    List {
        /// Only this status: received, applied, stale, ignored, failed.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one event with its raw payload.
    Show {
        /// `evt_…`
        id: String,
    },
    /// Apply a stored event again (e.g. a failed one after fixing the price configuration). The
    /// decision uses THIS shell's configuration (`STRIPE_PRICE_*`, `GRACE_PERIOD_DAYS`), so run it with the
    /// server's environment.
    Replay {
        /// `evt_…`
        id: String,
    },
    /// Prune what `BILLING_EVENT_RETENTION_DAYS` lets go now (the server does it by itself every 10
    /// minutes): done events' payloads and rows, and done jobs. Failed and received events and
    /// pending, running and dead jobs are never pruned.
    Prune {
        /// Count what would go and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only this state: pending, running, done, dead.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// Exit code of every configuration error (an invalid or missing variable, a database whose schema
/// is not migrated): the same as a command-line usage error. Failures at run time exit 1.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    if let Err(e) = dotenvy::dotenv() {
        if !e.not_found() {
            eprintln!("error: .env: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let cli = parse_cli();
    if let Command::Console { command: ConsoleCommand::HashPassword } = cli.command {
        // Before reading the configuration: the hash is what a console configuration lacks.
        return match hash_password() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                print_error(&e);
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let read_only = matches!(
        cli.command,
        Command::Events { command: EventsCommand::List { .. } | EventsCommand::Show { .. } } | Command::Jobs { .. }
    );
    init_tracing(&config, read_only && !cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Cutover { command: CutoverCommand::Compare { node_database_url, json } } = &cli.command {
        return runtime.block_on(cutover::compare(&config, node_database_url, *json));
    }
    let result = runtime.block_on(run(cli.command, config));
    // Tasks still running (abandoned at the end of the shutdown grace) are dropped; a blocking one
    // (a DNS look-up) is not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            if e.chain().any(|cause| cause.is::<ConfigError>()) {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Prints `error: <the error and its causes, each said once>` on stderr.
pub(crate) fn print_error(e: &anyhow::Error) {
    let chain: &(dyn std::error::Error + 'static) = e.as_ref();
    eprintln!("error: {}", mindroom_billing_core::service::error_chain(chain));
}

/// `console hash-password`: the password from the terminal (no echo) or the first line of stdin.
fn hash_password() -> Result<()> {
    say!("{}", read_password_hash()?);
    Ok(())
}

/// A new password from the terminal (no echo, twice) or the first line of stdin, hashed.
fn read_password_hash() -> Result<String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Console password: ").context("reading the password")?;
        let again = rpassword::prompt_password("Again: ").context("reading the password")?;
        if first != again {
            bail!("the two passwords differ");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    if password.chars().count() < 12 {
        bail!("use at least 12 characters");
    }
    Ok(mindroom_billing_console::hash_password(&password)?)
}

/// The `console` operator commands, on the server's store.
async fn operators(config: &Config, command: ConsoleCommand) -> Result<()> {
    let ops = wiring::build_store(config, false, true).await?.ops;
    let now = chrono::Utc::now();
    let valid_name = |name: &str| {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
        if ok { Ok(()) } else { Err(anyhow!("{name:?}: use 1 to 64 letters, digits, '.', '_', '-' or '@'")) }
    };
    match command {
        ConsoleCommand::HashPassword => hash_password()?,
        ConsoleCommand::AddOperator { name, role } => {
            valid_name(&name)?;
            let role = mindroom_billing_core::OperatorRole::parse(&role)
                .ok_or_else(|| anyhow!("unknown role {role:?} (admin, read-only)"))?;
            if ops.load_operator(&name).await?.is_some() {
                bail!("an operator named {name} exists already (set-password changes its password)");
            }
            let operator = mindroom_billing_core::Operator {
                name: name.clone(),
                role,
                password_hash: read_password_hash()?,
                created_at: now,
            };
            if !ops.add_operator(&operator).await? {
                bail!("an operator named {name} exists already");
            }
            say!("added {name} ({})", role.as_str());
        }
        ConsoleCommand::ListOperators => {
            let all = ops.list_operators().await?;
            say!("{:<32}  {:<9}  ADDED", "NAME", "ROLE");
            for o in &all {
                say!("{:<32}  {:<9}  {}", o.name, o.role.as_str(), o.created_at.format("%Y-%m-%d %H:%M:%S"));
            }
            say!("({} operators)", all.len());
        }
        ConsoleCommand::RemoveOperator { name } => {
            if !ops.remove_operator(&name, now).await? {
                bail!("no operator named {name}");
            }
            say!("removed {name}; its sessions have ended");
        }
        ConsoleCommand::SetPassword { name } => {
            if ops.load_operator(&name).await?.is_none() {
                bail!("no operator named {name}");
            }
            let hash = read_password_hash()?;
            if !ops.set_operator_password(&name, &hash, now).await? {
                bail!("no operator named {name}");
            }
            say!("password of {name} set; its sessions have ended");
        }
    }
    Ok(())
}

/// The command line, with the bundled samples listed in `send --help`.
fn parse_cli() -> Cli {
    let samples: Vec<&str> = samples::SAMPLES.iter().map(|(t, _)| *t).collect();
    let command = Cli::command().mut_subcommand("send", |send| {
        send.after_help(format!("Bundled samples (Stripe API 2026-07-29.dahlia):\n  {}", samples.join("\n  ")))
    });
    Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
}

/// Installs the logger; `quiet` (a read command without `-v`) logs warnings only unless `RUST_LOG`
/// says otherwise.
fn init_tracing(config: &Config, quiet: bool) {
    // Validated in `Config::from_env`.
    let filter = if quiet && !config.log_filter_set { "warn" } else { &config.log_filter };
    let filter = EnvFilter::builder().parse_lossy(filter);
    // Colour codes only for a person at a terminal (logs go to stderr), never into files or pipes.
    let ansi = !config.no_color && std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log_format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

async fn run(command: Command, config: Config) -> Result<()> {
    match command {
        Command::Serve { host, migrate } => run_serve(config, host, migrate).await,
        Command::Console { command: ConsoleCommand::HashPassword } => hash_password(),
        Command::Cutover { command: CutoverCommand::Compare { .. } } => unreachable!("run by main"),
        Command::Console { command } => operators(&config, command).await,
        Command::Sign { file, secret, timestamp } => {
            let body = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let secret = signing_secret(&config, secret)?;
            say!("{}", sign(&secret, &body, timestamp.unwrap_or_else(|| chrono::Utc::now().timestamp())));
            Ok(())
        }
        Command::Send { event, url, secret, new_id } => {
            let body = load_event(&event, new_id)?;
            let secret = signing_secret(&config, secret)?;
            let url = url.unwrap_or_else(|| format!("http://127.0.0.1:{}/webhooks/stripe", config.port));
            let signature = sign(&secret, &body, chrono::Utc::now().timestamp());
            let (id, kind) = event_identity(&body);
            let response = reqwest::Client::new()
                .post(&url)
                .header("Content-Type", "application/json")
                .header("Stripe-Signature", signature)
                .body(body)
                .send()
                .await
                .with_context(|| format!("POST {url}: is the server running?"))?;
            let status = response.status();
            let answer = response.text().await.unwrap_or_default();
            say!("{id} ({kind}) → {status}");
            say!("{answer}");
            if !status.is_success() {
                // The hint is for the person sending, not in the server's answer: that body is what
                // Stripe's dashboard shows for real deliveries, and it names no server settings.
                let hint = if status == reqwest::StatusCode::BAD_REQUEST && answer.contains("no signature matches") {
                    "\nhint: the server verifies with its STRIPE_WEBHOOK_SECRET; sign with the same secret (set \
                     STRIPE_WEBHOOK_SECRET in this shell as the server has it, or pass --secret)"
                } else {
                    ""
                };
                bail!("{id}: the server answered {status}: {}{hint}", answer.trim());
            }
            Ok(())
        }
        Command::Migrate => {
            match wiring::migrate(&config).await? {
                wiring::Migrated::Postgres(report) => {
                    say!(
                        "migrations: {} applied, {} already present ({} ms)",
                        report.applied.len(),
                        report.skipped.len(),
                        report.elapsed.as_millis()
                    );
                    for version in &report.applied {
                        say!("  applied {version}");
                    }
                }
                wiring::Migrated::Sqlite(path) => {
                    say!("SQLite {}: schema version {}", path.display(), mindroom_billing_sqlite::SCHEMA_VERSION);
                }
            }
            Ok(())
        }
        Command::Backup { file } => {
            let config::StoreTarget::Sqlite { path, .. } = config.store_target() else {
                return Err(ConfigError {
                    var: "DATABASE_URL",
                    message: "`backup` copies a SQLite store (sqlite://…, or the default file); back PostgreSQL up \
                              with pg_dump"
                        .into(),
                }
                .into());
            };
            config.require_database("backup")?;
            let store = wiring::open_sqlite(path, false).await?;
            store
                .backup(&file)
                .await
                .with_context(|| format!("backing up {} to {}", path.display(), file.display()))?;
            let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            say!("backed up {} to {} ({size} bytes)", path.display(), file.display());
            Ok(())
        }
        Command::Store { command: StoreCommand::Copy { to } } => {
            let (expected, copied) = wiring::copy_store(&config, &to).await?;
            say!("{:<16} {:>10} {:>10}", "", "SQLITE", "POSTGRES");
            let mut differ = Vec::new();
            for ((kind, from), (_, into)) in expected.named().into_iter().zip(copied.named()) {
                say!("{kind:<16} {from:>10} {into:>10}");
                if from != into {
                    differ.push(kind);
                }
            }
            if !differ.is_empty() {
                bail!("the copy differs in: {}", differ.join(", "));
            }
            say!("copied; point DATABASE_URL at the PostgreSQL database and start `serve` there");
            Ok(())
        }
        Command::Events { command } => {
            config.require_database("events")?;
            if matches!(command, EventsCommand::Replay { .. }) && !config.any_price {
                warn!(
                    "no STRIPE_PRICE_STARTER, STRIPE_PRICE_PRO or STRIPE_PRICE_ENTERPRISE in this shell: replay decides \
                     with this shell's configuration, not the server's; an event whose price only those name fails again"
                );
            }
            events(&*wiring::build_operator_billing(&config).await?, command).await
        }
        Command::Stripe { command } => {
            config.require_database("stripe")?;
            stripe(&*wiring::build_stripe_billing(&config).await?, command).await
        }
        Command::Jobs { command: JobsCommand::List { state, limit } } => {
            config.require_database("jobs")?;
            let billing = wiring::build_operator_billing(&config).await?;
            let state = state
                .map(|s| {
                    JobState::parse(&s).ok_or_else(|| anyhow!("unknown job state {s:?} (pending, running, done, dead)"))
                })
                .transpose()?;
            let jobs = billing.store().list_jobs(&JobFilter { state, limit }).await?;
            say!(
                "{:>8}  {:<8}  {:>8}  {:<20}  {:<12}  KEY / LAST ERROR",
                "ID",
                "STATE",
                "ATTEMPTS",
                "RUN AFTER",
                "KIND"
            );
            for job in &jobs {
                say!(
                    "{:>8}  {:<8}  {:>8}  {:<20}  {:<12}  {}{}",
                    job.id,
                    job.state.as_str(),
                    job.attempts,
                    job.run_after.format("%Y-%m-%d %H:%M:%S"),
                    job.kind.label(),
                    job.key,
                    job.last_error.as_deref().map(|e| format!(" — {e}")).unwrap_or_default()
                );
            }
            say!("({} jobs)", jobs.len());
            Ok(())
        }
    }
}

async fn events(billing: &Billing, command: EventsCommand) -> Result<()> {
    match command {
        EventsCommand::List { status, limit } => {
            let status = status
                .map(|s| {
                    EventStatus::parse(&s).ok_or_else(|| {
                        anyhow!("unknown event status {s:?} (received, applied, stale, ignored, failed)")
                    })
                })
                .transpose()?;
            let events = billing.store().list_events(&EventFilter { status, limit }).await?;
            say!("{:<32}  {:<36}  {:<9}  {:<20}  {:>4}  REASON", "ID", "TYPE", "STATUS", "RECEIVED", "DELIV");
            for e in &events {
                say!(
                    "{:<32}  {:<36}  {:<9}  {:<20}  {:>4}  {}",
                    e.id,
                    e.event_type,
                    e.status.as_str(),
                    e.received_at.format("%Y-%m-%d %H:%M:%S"),
                    e.deliveries,
                    e.reason.as_deref().unwrap_or("")
                );
            }
            say!("({} events)", events.len());
        }
        EventsCommand::Show { id } => {
            let event = billing.store().load_event(&id).await?.ok_or_else(|| anyhow!("no event {id}"))?;
            say!("id:           {}", event.id);
            say!("type:         {}", event.event_type);
            say!("created:      {}", event.created);
            say!("status:       {}", event.status.as_str());
            say!("reason:       {}", event.reason.as_deref().unwrap_or("-"));
            say!("received_at:  {}", event.received_at);
            say!("processed_at: {}", event.processed_at.map(|t| t.to_string()).unwrap_or_else(|| "-".into()));
            say!("deliveries:   {}", event.deliveries);
            if event.payload.is_empty() && event.status.is_done() {
                say!("payload:      (pruned by retention, BILLING_EVENT_RETENTION_DAYS)");
            } else {
                say!("payload:\n{}", event.payload);
            }
        }
        EventsCommand::Prune { dry_run } => {
            let policy = &billing.config().retention;
            let request = policy.request(billing.now(), dry_run);
            let report = billing.prune(dry_run, None).await?;
            let day = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC");
            say!(
                "retention: {} days (BILLING_EVENT_RETENTION_DAYS); event ids are kept at least {} days",
                policy.retention.num_days(),
                mindroom_billing_core::retention::REDELIVERY_HORIZON_DAYS
            );
            say!("{}", if dry_run { "would prune:" } else { "pruned:" });
            say!(
                "  events:   {:>10}  done events received before {} (rows deleted)",
                report.events,
                day(request.events_before)
            );
            say!(
                "  payloads: {:>10}  done events received before {} (payload emptied, id row kept)",
                report.payloads,
                day(request.payloads_before)
            );
            say!("  jobs:     {:>10}  done jobs created before {}", report.jobs, day(request.jobs_before));
            say!("never pruned: failed and received events; pending, running and dead jobs");
            if dry_run {
                say!("(dry run: nothing changed; run without --dry-run to prune)");
            }
        }
        EventsCommand::Replay { id } => {
            let disposition = billing.replay(&id).await?;
            match &disposition {
                mindroom_billing_core::Disposition::Duplicate => say!("{id}: already applied; nothing done"),
                other => say!("{id}: {}", other.label()),
            }
            if let mindroom_billing_core::Disposition::Failed(reason) = disposition {
                say!("reason: {reason}");
                say!(
                    "(decided with this shell's configuration: STRIPE_PRICE_*, GRACE_PERIOD_DAYS. Its admin alert was \
                     queued when it first failed; a replay queues none.)"
                );
                bail!("{id} failed again");
            }
        }
    }
    Ok(())
}

async fn stripe(billing: &Billing, command: StripeCommand) -> Result<()> {
    let (name, timeout) = match &command {
        StripeCommand::CatchUp { timeout, .. } => ("catch-up", *timeout),
        StripeCommand::Reconcile { timeout, .. } => ("reconcile", *timeout),
    };
    match timeout {
        None => stripe_run(billing, command).await,
        Some(secs) => {
            tokio::time::timeout(Duration::from_secs(secs), stripe_run(billing, command)).await.unwrap_or_else(|_| {
                Err(anyhow!(
                    "stripe {name}: no result within --timeout {secs} s (the failed attempts are logged above)"
                ))
            })
        }
    }
}

async fn stripe_run(billing: &Billing, command: StripeCommand) -> Result<()> {
    match command {
        StripeCommand::CatchUp { since, .. } => {
            let report = billing.catch_up(since).await?;
            if let Some(reconciled) = &report.reconciled {
                println!("no catch-up cursor within Stripe's 30-day event retention: reconciled instead");
                print_drift(reconciled);
            }
            println!(
                "caught up: {} listed, {} applied, {} duplicates, {} stale/ignored/failed; cursor {}",
                report.listed,
                report.applied,
                report.duplicates,
                report.other,
                report.cursor.map_or_else(|| "-".to_owned(), |c| c.to_rfc3339())
            );
        }
        StripeCommand::Reconcile { subscription, dry_run, .. } => {
            let report = billing.reconcile_stripe(subscription.as_deref(), dry_run).await?;
            print_drift(&report);
            if dry_run && !report.drift.is_empty() {
                println!("(dry run: nothing changed; run without --dry-run to fix)");
            }
        }
    }
    Ok(())
}

fn print_drift(report: &mindroom_billing_core::service::ReconcileReport) {
    if !report.drift.is_empty() {
        println!("{:<32} {:<9} {:<28} -> STRIPE", "SUBSCRIPTION", "FIELD", "BILLING");
        for drift in &report.drift {
            println!("{drift}");
        }
    }
    println!(
        "{} subscriptions checked, {} with drift ({} fields), {} unreadable",
        report.checked,
        report.drift.iter().map(|d| d.subscription_id.as_str()).collect::<std::collections::BTreeSet<_>>().len(),
        report.drift.len(),
        report.failed
    );
}

fn signing_secret(config: &Config, explicit: Option<String>) -> Result<WebhookSecret> {
    if let Some(secret) = explicit {
        return Ok(WebhookSecret::new(secret));
    }
    let secrets =
        config.webhook_secrets.as_ref().ok_or_else(|| anyhow!("pass --secret or set STRIPE_WEBHOOK_SECRET"))?;
    let first = secrets.expose_secret().split(',').map(str::trim).find(|s| !s.is_empty());
    Ok(WebhookSecret::new(first.ok_or_else(|| anyhow!("STRIPE_WEBHOOK_SECRET: no secret in the list"))?))
}

/// The `id` and `type` of an event payload, for `send`'s report.
fn event_identity(body: &[u8]) -> (String, String) {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |name: &str| value[name].as_str().unwrap_or("?").to_owned();
    (field("id"), field("type"))
}

/// A payload file, or the bundled sample of an event type.
fn load_event(event: &str, new_id: bool) -> Result<Vec<u8>> {
    let body = if Path::new(event).is_file() {
        std::fs::read(event).with_context(|| format!("reading {event}"))?
    } else if let Some(sample) = samples::find(event) {
        sample.as_bytes().to_vec()
    } else {
        let known: Vec<&str> = samples::SAMPLES.iter().map(|(t, _)| *t).collect();
        bail!("{event:?} is neither a file nor a bundled sample; samples: {}", known.join(", "));
    };
    if !new_id {
        return Ok(body);
    }
    let mut value: serde_json::Value = serde_json::from_slice(&body).context("payload is not JSON")?;
    value["id"] = serde_json::Value::String(format!("evt_{}", uuid::Uuid::new_v4().simple()));
    Ok(serde_json::to_vec_pretty(&value)?)
}

async fn run_serve(config: Config, host: Option<IpAddr>, migrate: bool) -> Result<()> {
    config.require_serve()?;
    // One server per SQLite file, for the life of this process (PostgreSQL is the store for several).
    let _serve_lock = match config.store_target() {
        config::StoreTarget::Sqlite { path, .. } => Some(mindroom_billing_sqlite::ServeLock::acquire(path)?),
        _ => None,
    };
    let loopback = IpAddr::from([127, 0, 0, 1]);
    let host = host.unwrap_or(if config.dev_secret { loopback } else { IpAddr::from([0, 0, 0, 0]) });
    if config.dev_secret {
        warn!(
            secret = config::DEV_WEBHOOK_SECRET,
            %host,
            "STRIPE_WEBHOOK_SECRET is unset: using the built-in DEVELOPMENT signing secret (fully embedded mode only; \
             bound to 127.0.0.1 unless --host says otherwise). `mindroom-billing send <event-type>` signs with it; \
             set STRIPE_WEBHOOK_SECRET for real Stripe events"
        );
    }
    // Real histograms (with `_bucket` series), so alerts can aggregate quantiles across replicas.
    let buckets = [
        0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        900.0, 3600.0,
    ];
    let prometheus = PrometheusBuilder::new()
        .set_buckets(&buckets)
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    mindroom_billing_core::describe_metrics();
    mindroom_billing_hyper::describe_metrics();
    mindroom_billing_stripe::describe_metrics();
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });

    let (billing, ops) = wiring::build_billing(&config, migrate).await?;
    if !config.any_price {
        warn!(
            "no STRIPE_PRICE_STARTER, STRIPE_PRICE_PRO or STRIPE_PRICE_ENTERPRISE: only prices whose lookup_key or \
             metadata.tier names a tier can be mapped (the bundled samples need STRIPE_PRICE_STARTER and STRIPE_PRICE_PRO, \
             see the README's quick start)"
        );
    }
    info!(
        secrets = billing.config().verifier.secret_count(),
        tolerance_secs = config.tolerance_secs,
        grace_period_days = config.grace_period_days,
        internal_api = config.api_key.is_some(),
        "configured"
    );
    if config.api_key.is_none() {
        warn!("no BILLING_API_KEY: the internal API (/v1/…) answers 503");
    }
    let (stop_worker, worker_stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(Arc::clone(&billing).run_background(worker_stopped));

    let console = match &config.console {
        Some(settings) => {
            let console_config = settings.console_config()?;
            let listener = tokio::net::TcpListener::bind(settings.addr)
                .await
                .with_context(|| format!("binding {} (BILLING_CONSOLE_ADDR)", settings.addr))?;
            let console = mindroom_billing_console::Console::new(Arc::clone(&billing), ops, console_config);
            if settings.session_key.is_none() {
                info!("no BILLING_CONSOLE_SESSION_KEY: forms opened before a restart must be reloaded after it");
            }
            if !settings.addr.ip().is_loopback() && !settings.origin.starts_with("https://") {
                warn!(
                    addr = %settings.addr,
                    origin = %settings.origin,
                    "the console listens beyond this machine without https: passwords and session cookies cross \
                     the network in clear; put it behind a TLS proxy and set BILLING_CONSOLE_ORIGIN=https://…"
                );
            }
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(mindroom_billing_console::serve(listener, Arc::new(console), async {
                let _ = stopped.await;
            }));
            Some((stop, task))
        }
        None => None,
    };
    let mut state =
        AppState::new(billing).with_metrics(move || prometheus.render()).with_request_timeout(config.request_timeout);
    if let Some(key) = config.api_key.clone() {
        state = state.with_api_key(key);
    }
    let addr = SocketAddr::new(host, config.port);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr} (PORT)"))?;
    serve(listener, Arc::new(state), shutdown_signal()).await;
    let grace = config.shutdown_grace;
    info!(
        grace_secs = grace.as_secs(),
        "stopping the background tasks (job worker, sweeper, Stripe sync, console; BILLING_SHUTDOWN_GRACE_SECS)"
    );
    let _ = stop_worker.send(true);
    // One deadline for everything: whatever still runs at its end is abandoned (a job cut short is
    // taken over by a worker once its lease expires; every store write is atomic).
    let deadline = tokio::time::Instant::now() + grace;
    if let Some((stop, task)) = console {
        let _ = stop.send(());
        stop_within(deadline, task, "console server").await;
    }
    stop_within(deadline, worker, "background tasks").await;
    info!("bye");
    Ok(())
}

/// Waits for `task` until `deadline`, then aborts it.
async fn stop_within<T>(deadline: tokio::time::Instant, mut task: tokio::task::JoinHandle<T>, what: &str) {
    match tokio::time::timeout_at(deadline, &mut task).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %e, "{what} ended abnormally"),
        Err(_) => {
            warn!("{what} still running at the end of the shutdown grace (BILLING_SHUTDOWN_GRACE_SECS); abandoned");
            task.abort();
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("SIGINT received"),
        () = terminate => info!("SIGTERM received"),
    }
}
