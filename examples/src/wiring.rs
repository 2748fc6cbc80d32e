//! Choosing the adapters from the configuration. Each port has one function, so wiring in the
//! Supabase / Postgres store, the Dokku provisioner or the Resend notifier is a few lines here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use mindroom_billing_core::dryrun::{DryRunProvisioner, LogNotifier};
use mindroom_billing_core::stripe_api::StripeApi;
use mindroom_billing_core::transfer::TransferCounts;
use mindroom_billing_core::{
    Billing, BillingConfig, MemoryLimits, MemoryStore, Notifier, OperatorStore, Policy, Provisioner, RetentionPolicy,
    Store, Verifier, WebhookSecret,
};
use mindroom_billing_dokku::{DokkuConfig, DokkuProvisioner};
use mindroom_billing_resend::{ResendConfig, ResendNotifier};
use mindroom_billing_sqlite::{OpenError, ServeLock, SqliteOptions, SqliteStore};
use mindroom_billing_stripe::{StripeClient, StripeConfig};
use mindroom_billing_supabase::{PgStore, PgStoreOptions, PostgrestOptions, PostgrestStore};
use secrecy::ExposeSecret;
use tracing::{info, warn};

use crate::config::{Config, ConfigError, StoreTarget};

/// The configured store, seen through the billing port and through the operator port (one object).
pub(crate) struct Stores {
    /// What billing records, decides and commits through.
    pub(crate) store: Arc<dyn Store>,
    /// What the operator console reads and audits through.
    pub(crate) ops: Arc<dyn OperatorStore>,
}

impl Stores {
    fn of<S: Store + OperatorStore>(store: S) -> Self {
        let store = Arc::new(store);
        Self { ops: store.clone(), store }
    }
}

/// The store: `DATABASE_URL` (direct Postgres, a SQLite file or memory), `SUPABASE_URL` (PostgREST),
/// else the default SQLite file.
///
/// The direct store is checked before anything else: one connection attempt (its own error in one
/// line: refused, no such database, bad password) and the schema (pending migrations stop the start
/// with a configuration error, or are applied first when `migrate` is set). Once running, a database
/// outage gives 503s and `/ready` 503 until it is back. A SQLite file is created (`create`, for
/// `serve` and `migrate`) or must exist (the read commands), and is migrated when it is opened.
pub(crate) async fn build_store(cfg: &Config, migrate: bool, create: bool) -> Result<Stores> {
    match cfg.store_target() {
        StoreTarget::Postgres(url) => {
            if cfg.supabase_url.is_some() {
                info!("both DATABASE_URL and SUPABASE_URL are set: using the direct Postgres store");
            }
            let store = connect_postgres(url.expose_secret(), migrate).await?;
            info!("store: PostgreSQL (direct, DATABASE_URL)");
            Ok(Stores::of(store))
        }
        StoreTarget::Sqlite { path, default } => {
            let store = open_sqlite(path, create).await?;
            if default {
                info!(
                    "store: SQLite {} (the default when nothing is configured; DATABASE_URL chooses another)",
                    path.display()
                );
            } else {
                info!("store: SQLite {} (DATABASE_URL)", path.display());
            }
            Ok(Stores::of(store))
        }
        StoreTarget::Supabase { url, key } => {
            let store = PostgrestStore::new(url, key.clone(), PostgrestOptions::default())
                .context("SUPABASE_URL: building the PostgREST client")?;
            // The schema cannot be read through PostgREST; a ping through the store's own function can.
            match store.ping().await {
                Ok(()) => {}
                Err(e) if e.is_retryable() => {
                    return Err(anyhow::Error::new(e).context("SUPABASE_URL: PostgREST does not answer"));
                }
                Err(e) => {
                    return Err(ConfigError {
                        var: "SUPABASE_URL",
                        message: format!(
                            "the store's functions do not answer ({}): check SUPABASE_SERVICE_KEY and that the \
                             migrations are applied (`mindroom-billing migrate` with the project's DATABASE_URL, or \
                             `supabase db push`)",
                            mindroom_billing_core::service::error_chain(&e)
                        ),
                    }
                    .into());
                }
            }
            info!(url = %url, "store: Supabase (PostgREST RPC, SUPABASE_URL)");
            Ok(Stores::of(store))
        }
        StoreTarget::Memory => {
            warn!("************************************************************************");
            warn!("STORE IS IN MEMORY AND NOT DURABLE (DATABASE_URL=memory:): events,");
            warn!("subscriptions, instances and jobs are lost on restart. For tests and");
            warn!("demos only: leave DATABASE_URL unset for the SQLite file, or use postgres://.");
            warn!("************************************************************************");
            Ok(Stores::of(MemoryStore::with_limits(MemoryLimits::default().with_max_payloads(cfg.memory_events))))
        }
    }
}

/// Connects to PostgreSQL and checks (or, with `migrate`, brings up to date) its schema.
async fn connect_postgres(url: &str, migrate: bool) -> Result<PgStore> {
    let store = PgStore::connect(url, PgStoreOptions::default()).await.context("DATABASE_URL: cannot connect")?;
    let pending = store.pending_migrations().await.context("DATABASE_URL: reading the schema version")?;
    if !pending.is_empty() && migrate {
        let report = store.migrate().await.context("DATABASE_URL: applying migrations")?;
        info!(applied = ?report.applied, "migrations applied (--migrate)");
    } else if let Some(first) = pending.first() {
        return Err(ConfigError {
            var: "DATABASE_URL",
            message: format!(
                "the database lacks {} of {} migrations (from {}_{}): run `mindroom-billing migrate` first, or \
                 start with `serve --migrate`",
                pending.len(),
                mindroom_billing_supabase::migrations::MIGRATIONS.len(),
                first.version,
                first.name
            ),
        }
        .into());
    }
    Ok(store)
}

/// Opens (with `create`, creating) the SQLite file and migrates it. A file that is missing for a
/// read, corrupt, another application's or newer than this binary stops with one line naming it.
pub(crate) async fn open_sqlite(path: &Path, create: bool) -> Result<SqliteStore> {
    let options = SqliteOptions::default().with_create(create);
    let file = path.to_owned();
    let opened = tokio::task::spawn_blocking(move || SqliteStore::open(file, options)).await?;
    opened.map_err(|e| match e {
        OpenError::Missing(path) => ConfigError {
            var: "DATABASE_URL",
            message: format!("no SQLite file at {} (nothing has been stored there yet)", path.display()),
        }
        .into(),
        other => anyhow::Error::new(other),
    })
}

/// The provisioner: the Dokku provisioner service when `DOKKU_PROVISIONER_URL` is set, else dry run.
pub(crate) fn build_provisioner(cfg: &Config) -> Result<Arc<dyn Provisioner>> {
    if let (Some(url), Some(key)) = (&cfg.provisioner_url, &cfg.provisioner_api_key) {
        let config = DokkuConfig::new(url.clone(), key.expose_secret()).with_timeout(cfg.provisioner_timeout);
        let provisioner =
            DokkuProvisioner::new(config).context("DOKKU_PROVISIONER_URL: building the provisioner client")?;
        info!(url = %url, "provisioning through the Dokku provisioner service");
        return Ok(Arc::new(provisioner));
    }
    warn!("no DOKKU_PROVISIONER_URL: dry-run provisioner (logs what it would do, provisions nothing)");
    Ok(Arc::new(DryRunProvisioner::default()))
}

/// The notifier: Resend when `RESEND_API_KEY` is set, else e-mails are only logged.
pub(crate) fn build_notifier(cfg: &Config) -> Result<Arc<dyn Notifier>> {
    if let (Some(key), Some(from)) = (&cfg.resend_api_key, &cfg.email_from) {
        let mut config = ResendConfig::new(key.expose_secret(), from.clone());
        if let Some(base) = &cfg.resend_api_base {
            config = config.with_base_url(base.as_str());
        }
        info!(from = %from, "e-mail through Resend");
        return Ok(Arc::new(ResendNotifier::new(config).context("RESEND_API_KEY: building the Resend client")?));
    }
    info!("no RESEND_API_KEY: e-mails are logged, not sent");
    Ok(Arc::new(LogNotifier))
}

/// The billing service `serve` runs, over the configured adapters (`migrate`: apply pending
/// migrations first), and the operator port of its store (for the console).
pub(crate) async fn build_billing(cfg: &Config, migrate: bool) -> Result<(Arc<Billing>, Arc<dyn OperatorStore>)> {
    let Stores { store, ops } = build_store(cfg, migrate, true).await?;
    let mut billing = Billing::new(store, build_provisioner(cfg)?, build_notifier(cfg)?, billing_config(cfg))
        .with_drift_log(ops.clone());
    match build_stripe_api(cfg)? {
        Some(api) => {
            info!(
                catch_up_every_secs = cfg.stripe_sync.catch_up_interval.as_secs(),
                reconcile_every_secs = cfg.stripe_sync.reconcile_interval.as_secs(),
                "Stripe API configured (STRIPE_SECRET_KEY): catch-up and reconciliation run in the background"
            );
            billing = billing.with_stripe_api(api);
        }
        None => info!("no STRIPE_SECRET_KEY: webhooks only (no catch-up or reconciliation from the Stripe API)"),
    }
    Ok((Arc::new(billing), ops))
}

/// The read-only Stripe API client, when `STRIPE_SECRET_KEY` is set.
pub(crate) fn build_stripe_api(cfg: &Config) -> Result<Option<Arc<dyn StripeApi>>> {
    let Some(key) = &cfg.stripe_secret_key else { return Ok(None) };
    let mut config = StripeConfig::new(key.expose_secret());
    if let Some(base) = &cfg.stripe_api_base {
        config = config.with_base_url(base.clone());
    }
    if let Some(version) = &cfg.stripe_api_version {
        config = config.with_api_version(version.clone());
    }
    let client =
        StripeClient::new(config).context("STRIPE_SECRET_KEY / STRIPE_API_BASE: building the Stripe client")?;
    Ok(Some(Arc::new(client)))
}

/// The billing service of `stripe catch-up` / `stripe reconcile`: the server's store and the Stripe
/// API. Their decisions queue jobs that the server's workers run.
pub(crate) async fn build_stripe_billing(cfg: &Config) -> Result<Arc<Billing>> {
    let api = build_stripe_api(cfg)?.ok_or_else(|| crate::config::ConfigError {
        var: "STRIPE_SECRET_KEY",
        message: "required by `stripe` commands".into(),
    })?;
    let Stores { store, ops } = build_store(cfg, false, false).await?;
    let billing =
        Billing::new(store, Arc::new(DryRunProvisioner::default()), Arc::new(LogNotifier), billing_config(cfg))
            .with_stripe_api(api)
            .with_drift_log(ops);
    Ok(Arc::new(billing))
}

/// The billing service of the operator commands (`events`, `jobs`): the configured store only. They
/// never run jobs (the server's worker does), so the provisioner and notifier are inert stand-ins.
pub(crate) async fn build_operator_billing(cfg: &Config) -> Result<Arc<Billing>> {
    let store = build_store(cfg, false, false).await?.store;
    Ok(Arc::new(Billing::new(
        store,
        Arc::new(DryRunProvisioner::default()),
        Arc::new(LogNotifier),
        billing_config(cfg),
    )))
}

/// The core's configuration. Without webhook secrets (operator commands that never verify), the
/// verifier holds none and rejects everything.
fn billing_config(cfg: &Config) -> BillingConfig {
    let verifier = match &cfg.webhook_secrets {
        Some(secrets) => Verifier::from_comma_separated(secrets.expose_secret()),
        None => Verifier::new(std::iter::empty::<WebhookSecret>()),
    }
    .with_tolerance_secs(cfg.tolerance_secs);
    let mut policy = Policy::default()
        .with_prices(cfg.prices.clone())
        .with_grace_period(chrono::Duration::days(cfg.grace_period_days))
        .with_dispute_policy(cfg.dispute_policy);
    // Admin alerts link to the console's customer page when the console is served.
    if let Some(origin) = cfg.console.as_ref().map(|c| &c.origin) {
        policy = policy.with_console_url(origin.as_str());
    }
    let mut config = BillingConfig::new(verifier)
        .with_policy(policy)
        .with_worker(cfg.worker.clone())
        .with_stripe_sync(cfg.stripe_sync.clone())
        .with_cache(cfg.cache.clone())
        .with_retention(RetentionPolicy::default().with_retention(chrono::Duration::days(cfg.retention_days)));
    if let Some(email) = &cfg.admin_email {
        config = config.with_admin_email(email.clone());
    }
    config
}

/// What `migrate` did.
pub(crate) enum Migrated {
    /// PostgreSQL's migrations.
    Postgres(mindroom_billing_supabase::MigrationReport),
    /// A SQLite file, created if need be, at this binary's schema version.
    Sqlite(PathBuf),
}

/// Applies the migrations to the store of `DATABASE_URL` (idempotent; safe to run from several
/// replicas), or to the SQLite file (the default one when nothing is configured).
pub(crate) async fn migrate(cfg: &Config) -> Result<Migrated> {
    let url = match cfg.store_target() {
        StoreTarget::Postgres(url) => url,
        StoreTarget::Sqlite { path, .. } => {
            drop(open_sqlite(path, true).await?);
            return Ok(Migrated::Sqlite(path.to_owned()));
        }
        StoreTarget::Memory | StoreTarget::Supabase { .. } => {
            return Err(ConfigError {
                var: "DATABASE_URL",
                message: "`migrate` needs a database: postgres://… (a direct connection, not PostgREST) or sqlite://…"
                    .into(),
            }
            .into());
        }
    };
    let store = PgStore::connect(url.expose_secret(), PgStoreOptions::default().with_max_connections(1))
        .await
        .context("DATABASE_URL: cannot connect")?;
    let report = store.migrate().await.context("applying migrations")?;
    store.close().await;
    Ok(Migrated::Postgres(report))
}

/// Copies everything in the SQLite store into the (empty) PostgreSQL database at `to`, migrating
/// it first, and checks that each kind of row arrived: the counts of both. The server must be
/// stopped (the file's serve lock is held meanwhile), so the copy is the store as it was left.
pub(crate) async fn copy_store(cfg: &Config, to: &str) -> Result<(TransferCounts, TransferCounts)> {
    const PAGE: u32 = 1_000;
    let StoreTarget::Sqlite { path, .. } = cfg.store_target() else {
        return Err(ConfigError {
            var: "DATABASE_URL",
            message: "`store copy` copies a SQLite store (sqlite://…, or the default file) into PostgreSQL".into(),
        }
        .into());
    };
    cfg.require_database("store copy")?;
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        bail!("--to: expected a PostgreSQL URL (postgres://…)");
    }
    let _lock = ServeLock::acquire(path).map_err(|e| match e {
        OpenError::Locked(path) => anyhow!("{} is being served: stop `serve` first, then copy", path.display()),
        other => anyhow::Error::new(other),
    })?;
    let source = open_sqlite(path, false).await?;
    let target = PgStore::connect(to, PgStoreOptions::default().with_max_connections(2))
        .await
        .context("--to: cannot connect")?;
    target.migrate().await.context("--to: applying migrations")?;
    target.ensure_empty().await.context("--to")?;
    let expected = source.transfer_counts().await?;
    let mut after = None;
    loop {
        let events = source.export_events(after.clone(), PAGE).await?;
        target.import_events(&events).await.context("copying events")?;
        match events.last() {
            Some(last) if events.len() == PAGE as usize => after = Some(last.event.id.clone()),
            _ => break,
        }
    }
    let mut after = 0;
    loop {
        let jobs = source.export_jobs(after, PAGE).await?;
        target.import_jobs(&jobs).await.context("copying jobs")?;
        match jobs.last() {
            Some(last) if jobs.len() == PAGE as usize => after = last.id,
            _ => break,
        }
    }
    target.import_state(&source.export_state().await?).await.context("copying the rest")?;
    let copied = target.transfer_counts().await?;
    target.close().await;
    Ok((expected, copied))
}
