//! `mindroom-billing cutover compare`: reads billing's side through the configured store's operator
//! port and the Node service's tables through the Supabase crate's reader, and prints the core's
//! comparison (see `docs/cutover.md`).

use std::process::ExitCode;

use anyhow::{Context, Result};
use mindroom_billing_core::cutover::{self, Report};
use mindroom_billing_core::{Clock, SubscriptionState, SystemClock};
use mindroom_billing_supabase::NodeDatabase;

use crate::config::Config;
use crate::wiring;

/// Exit code when the two sides differ (0: identical; 2: an error, as configuration errors).
const EXIT_DIFFERS: u8 = 1;
/// Exit code of an error reading either database.
const EXIT_ERROR: u8 = 2;
/// Aggregates read per page from billing's store.
const PAGE: u32 = 1000;

/// Runs the comparison and prints it; the exit code says whether anything differs.
pub(crate) async fn compare(config: &Config, node_url: &str, json: bool) -> ExitCode {
    let report = match read_and_compare(config, node_url).await {
        Ok(report) => report,
        Err(e) => {
            crate::print_error(&e);
            return ExitCode::from(EXIT_ERROR);
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => say!("{text}"),
            Err(e) => {
                eprintln!("error: cannot encode the report: {e}");
                return ExitCode::from(EXIT_ERROR);
            }
        }
    } else {
        print_report(&report);
    }
    if report.differs() { ExitCode::from(EXIT_DIFFERS) } else { ExitCode::SUCCESS }
}

async fn read_and_compare(config: &Config, node_url: &str) -> Result<Report> {
    const BILLING: &str = "billing's database (DATABASE_URL / SUPABASE_URL)";
    const NODE: &str = "the Node service's database (--node-database-url)";
    config.require_database("cutover compare").context(BILLING)?;
    let node = NodeDatabase::connect(node_url).await.context("cannot connect").context(NODE)?;
    let node_rows = node.subscriptions().await.context("reading accounts, subscriptions, instances").context(NODE)?;
    node.close().await;
    let ops = wiring::build_store(config, false, false).await.context(BILLING)?.ops;
    let mut billing: Vec<SubscriptionState> = Vec::new();
    loop {
        let after = billing.last().map(|s| s.subscription_id.clone());
        let page =
            ops.list_subscriptions(after.as_deref(), PAGE).await.context("listing subscriptions").context(BILLING)?;
        let short = page.len() < PAGE as usize;
        billing.extend(page);
        if short {
            break;
        }
    }
    Ok(cutover::compare(&billing, &node_rows, SystemClock.now()))
}

fn print_report(report: &Report) {
    if !report.rows.is_empty() {
        say!("{:<32}  {:<20}  DIFFERENCES (billing/node)  =>  ON THE SWITCH", "SUBSCRIPTION", "CUSTOMER");
    }
    for row in &report.rows {
        let differences: Vec<String> =
            row.differences.iter().map(|d| format!("{} {}/{}", d.field.label(), d.billing, d.node)).collect();
        let mut effects: Vec<String> = row.calls.iter().map(ToString::to_string).collect();
        effects.extend(row.emails.iter().map(|e| format!("e-mail {}", e.kind)));
        say!(
            "{:<32}  {:<20}  {}  =>  {}",
            row.subscription_id,
            row.customer_id.as_deref().unwrap_or("-"),
            differences.join(", "),
            if effects.is_empty() { "nothing".to_owned() } else { effects.join(", ") }
        );
    }
    let c = &report.counts;
    say!(
        "{} subscriptions compared: {} identical, {} differ ({} only in billing, {} only in the Node service)",
        c.subscriptions,
        c.identical,
        c.differing,
        c.only_in_billing,
        c.only_in_node
    );
    if !c.fields.is_empty() {
        let fields: Vec<String> = c.fields.iter().map(|(f, n)| format!("{} {n}", f.label())).collect();
        say!("differing fields: {}", fields.join(", "));
    }
    say!(
        "on the switch: {} POST /provision, {} PUT /update, {} DELETE /deprovision, {} e-mail{} \
         (+ {} restating PUT /update of identical subscriptions' adopted apps)",
        c.provisions,
        c.updates,
        c.deprovisions,
        c.emails,
        if c.emails == 1 { "" } else { "s" },
        c.restating_updates
    );
}
