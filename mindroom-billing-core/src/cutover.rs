//! The cut-over rehearsal (DESIGN §9): billing's state, run in shadow beside the Node service, is
//! compared with the Node service's `subscriptions` / `instances` rows, and the provisioner calls
//! and e-mails billing would make on the switch are predicted. Pure: both sides and the time are
//! arguments.
//!
//! **What "on the switch" means.** At the switch billing runs on the shared database, adopts each
//! subscription's Node `instances` row (the row [`NodeSubscription::adopted`] picks, as the store's
//! adoption does: same app, no known limits) and its job worker reconciles that record against the
//! instance billing's state wants ([`SubscriptionState::desired`]). [`worker_step`] is that
//! reconcile decision on a first attempt; the e-mail that follows a provision of an app billing did
//! not adopt is the welcome e-mail (an adopted app's customer gets none).
//! E-mails the first reconciliation from Stripe may queue for facts billing learns then are not
//! predicted here: they follow the rule "a late fact is not news".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::model::{DesiredInstance, InstanceRecord, InstanceStatus, SubscriptionState};
use crate::service::app_name_for;
use crate::tier::{Limits, Tier};

/// One `public.instances` row of the Node service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInstance {
    /// `instances.id`.
    pub id: Uuid,
    /// `dokku_app_name`.
    pub app_name: Option<String>,
    /// `status` as stored.
    pub status: Option<String>,
    /// `memory_limit_mb`.
    pub memory_mb: Option<i64>,
    /// `cpu_limit` in thousandths of a core (`0.5` → 500).
    pub cpu_millis: Option<i64>,
    /// `created_at`.
    pub created_at: Option<DateTime<Utc>>,
}

/// One `public.subscriptions` row of the Node service, with its customer and instance rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSubscription {
    /// `stripe_subscription_id`.
    pub subscription_id: String,
    /// The account's `stripe_customer_id`.
    pub customer_id: Option<String>,
    /// `tier` as stored.
    pub tier: Option<String>,
    /// `status` as stored.
    pub status: Option<String>,
    /// `max_agents` (`-1`: unlimited).
    pub max_agents: Option<i64>,
    /// `max_messages_per_day` (`-1`: unlimited).
    pub max_messages_per_day: Option<i64>,
    /// Its `instances` rows, in any order.
    pub instances: Vec<NodeInstance>,
}

impl NodeSubscription {
    /// The row billing's store adopts as the instance record: one with an app name and a known
    /// status, the newest not deprovisioned, else the newest (ties by id).
    pub fn adopted(&self) -> Option<&NodeInstance> {
        self.instances
            .iter()
            .filter(|i| i.app_name.is_some() && i.status.as_deref().and_then(InstanceStatus::parse).is_some())
            .min_by(|a, b| {
                let up = |i: &NodeInstance| i.status.as_deref() == Some("deprovisioned");
                up(a)
                    .cmp(&up(b))
                    .then_with(|| match (a.created_at, b.created_at) {
                        (Some(x), Some(y)) => y.cmp(&x),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        (None, Some(_)) => std::cmp::Ordering::Greater,
                        (None, None) => std::cmp::Ordering::Equal,
                    })
                    .then_with(|| a.id.cmp(&b.id))
            })
    }

    /// The instance record billing's store makes of [`Self::adopted`]: its app and status, no known
    /// tier or limits, generation 1, marked adopted.
    pub fn adopted_record(&self, now: DateTime<Utc>) -> Option<InstanceRecord> {
        let row = self.adopted()?;
        Some(InstanceRecord {
            subscription_id: self.subscription_id.clone(),
            app_name: row.app_name.clone()?,
            status: InstanceStatus::parse(row.status.as_deref()?)?,
            generation: 1,
            tier: None,
            limits: None,
            subdomain: None,
            frontend_url: None,
            backend_url: None,
            deprovisioned_at: None,
            updated_at: now,
            adopted: true,
        })
    }
}

/// A call to the provisioner (DESIGN §4, provisioner wire contract).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "call")]
pub enum ProvisionerCall {
    /// `POST /provision`: a new app.
    #[serde(rename = "POST /provision")]
    Provision {
        /// `appName`.
        app_name: String,
        /// The tier.
        tier: Tier,
        /// The instance generation (the welcome e-mail's key names it).
        generation: u32,
    },
    /// `PUT /update`: new limits for an existing app.
    #[serde(rename = "PUT /update")]
    Update {
        /// `appName`.
        app_name: String,
        /// The tier whose limits are sent.
        tier: Tier,
    },
    /// `DELETE /deprovision`: the app is removed.
    #[serde(rename = "DELETE /deprovision")]
    Deprovision {
        /// `appName`.
        app_name: String,
    },
}

impl fmt::Display for ProvisionerCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Provision { app_name, tier, .. } => write!(f, "POST /provision {app_name} ({tier})"),
            Self::Update { app_name, tier } => write!(f, "PUT /update {app_name} ({tier})"),
            Self::Deprovision { app_name } => write!(f, "DELETE /deprovision {app_name}"),
        }
    }
}

/// The provisioner calls the job worker's reconcile makes on its first attempt for a subscription
/// whose desired instance is `desired` and whose instance record is `current` (the same decision as
/// `Billing`'s worker): limits set on a running app whose recorded limits differ; a provision when
/// none runs (a new deterministic app after a removed one, else the recorded app, which may exist:
/// the provisioner answers it as it is, so its limits are set after it unless recorded as the
/// wanted ones); a removal of any recorded app not removed yet when none is wanted; else nothing.
pub fn worker_step(
    subscription_id: &str,
    desired: DesiredInstance,
    current: Option<&InstanceRecord>,
) -> Vec<ProvisionerCall> {
    match (desired, current) {
        (DesiredInstance::Running { tier, limits }, Some(c)) if c.status == InstanceStatus::Running => {
            if c.limits == Some(limits) {
                Vec::new()
            } else {
                vec![ProvisionerCall::Update { app_name: c.app_name.clone(), tier }]
            }
        }
        (DesiredInstance::Running { tier, limits }, current) => match current.filter(|c| c.may_exist()) {
            Some(c) => {
                let mut calls =
                    vec![ProvisionerCall::Provision { app_name: c.app_name.clone(), tier, generation: c.generation }];
                if c.limits != Some(limits) {
                    calls.push(ProvisionerCall::Update { app_name: c.app_name.clone(), tier });
                }
                calls
            }
            None => {
                let generation = current.map_or(1, |c| c.generation + 1);
                vec![ProvisionerCall::Provision { app_name: app_name_for(subscription_id), tier, generation }]
            }
        },
        (DesiredInstance::Absent, Some(c)) if c.may_exist() => {
            vec![ProvisionerCall::Deprovision { app_name: c.app_name.clone() }]
        }
        (DesiredInstance::Absent, _) => Vec::new(),
    }
}

/// A customer e-mail billing would send on the switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SwitchEmail {
    /// Which e-mail (`welcome`).
    pub kind: &'static str,
    /// The job key it is queued under (each key is sent at most once).
    pub key: String,
}

/// A compared field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// The subscription exists on one side only.
    Subscription,
    /// `tier` (Stripe's, what the customer subscribed to).
    Tier,
    /// `status` (Stripe's).
    Status,
    /// `max_agents` (the effective limit).
    MaxAgents,
    /// `max_messages_per_day` (the effective limit).
    MaxMessagesPerDay,
    /// The instance's memory (MB), when both sides run one.
    Memory,
    /// The instance's CPU (cores), when both sides run one.
    Cpu,
    /// The instance: running or absent, and the Node app.
    Instance,
}

impl Field {
    /// The label in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Self::Subscription => "subscription",
            Self::Tier => "tier",
            Self::Status => "status",
            Self::MaxAgents => "max_agents",
            Self::MaxMessagesPerDay => "max_messages_per_day",
            Self::Memory => "memory",
            Self::Cpu => "cpu",
            Self::Instance => "instance",
        }
    }
}

/// One field that differs: billing's value and the Node service's (`-` for none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// Which field.
    pub field: Field,
    /// Billing's value.
    pub billing: String,
    /// The Node service's value.
    pub node: String,
}

/// A subscription that differs, with what the switch would do to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// `sub_…`
    pub subscription_id: String,
    /// `cus_…`, when either side knows it.
    pub customer_id: Option<String>,
    /// The fields that differ (never empty).
    pub differences: Vec<Difference>,
    /// The provisioner calls billing would make on the switch.
    pub calls: Vec<ProvisionerCall>,
    /// The customer e-mails that would follow.
    pub emails: Vec<SwitchEmail>,
}

/// The totals of a comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Subscriptions on either side.
    pub subscriptions: usize,
    /// Identical on both sides.
    pub identical: usize,
    /// With at least one difference (the rows).
    pub differing: usize,
    /// Known to billing only.
    pub only_in_billing: usize,
    /// Known to the Node service only.
    pub only_in_node: usize,
    /// Rows per differing field.
    pub fields: BTreeMap<Field, usize>,
    /// `POST /provision` calls billing would make.
    pub provisions: usize,
    /// `PUT /update` calls that change something (in the rows).
    pub updates: usize,
    /// `DELETE /deprovision` calls.
    pub deprovisions: usize,
    /// `PUT /update` calls on identical subscriptions: the adopted record has no known limits, so
    /// billing states the limits the app already runs with once (no change; not listed as rows).
    pub restating_updates: usize,
    /// Customer e-mails billing would send.
    pub emails: usize,
}

/// What [`compare`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The time the comparison was made at (desired instances and grace periods are read at it).
    pub now: DateTime<Utc>,
    /// One row per subscription that differs, by subscription id.
    pub rows: Vec<Row>,
    /// The totals.
    pub counts: Counts,
}

impl Report {
    /// Whether any subscription differs (restating updates of identical ones do not count).
    pub fn differs(&self) -> bool {
        !self.rows.is_empty()
    }
}

fn show<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `cpu` in cores from thousandths (`500` → `0.5`).
fn cores(millis: i64) -> String {
    let (whole, frac) = (millis.div_euclid(1000), millis.rem_euclid(1000));
    if frac == 0 { format!("{whole}") } else { format!("{whole}.{}", format!("{frac:03}").trim_end_matches('0')) }
}

/// The Node instance as compared: `running (app)`, another status with its app, or `absent` (no
/// row, or a deprovisioned one).
fn node_instance_label(row: Option<&NodeInstance>) -> (bool, String) {
    let Some(row) = row else { return (false, "absent".to_owned()) };
    let app = row.app_name.as_deref().unwrap_or("-");
    match row.status.as_deref() {
        Some("running") => (true, format!("running ({app})")),
        Some("deprovisioned") => (false, "absent".to_owned()),
        other => (false, format!("{} ({app})", other.unwrap_or("-"))),
    }
}

/// Compares billing's aggregates with the Node service's rows at `now`: one [`Row`] per subscription
/// whose tier, status, effective limits (`max_agents`, `max_messages_per_day`), instance limits
/// (memory, CPU) or instance differs, or that one side does not know, with the provisioner calls
/// ([`worker_step`] against the adopted Node row) and e-mails the switch would make.
pub fn compare(billing: &[SubscriptionState], node: &[NodeSubscription], now: DateTime<Utc>) -> Report {
    let billing_by_id: BTreeMap<&str, &SubscriptionState> =
        billing.iter().map(|s| (s.subscription_id.as_str(), s)).collect();
    let node_by_id: BTreeMap<&str, &NodeSubscription> = node.iter().map(|s| (s.subscription_id.as_str(), s)).collect();
    let ids: BTreeSet<&str> = billing_by_id.keys().chain(node_by_id.keys()).copied().collect();
    let mut report = Report { now, rows: Vec::new(), counts: Counts { subscriptions: ids.len(), ..Counts::default() } };
    for id in ids {
        let row = compare_one(id, billing_by_id.get(id).copied(), node_by_id.get(id).copied(), now);
        let counts = &mut report.counts;
        if row.differences.is_empty() {
            counts.identical += 1;
            counts.restating_updates += row.calls.len();
            continue;
        }
        counts.differing += 1;
        for d in &row.differences {
            *counts.fields.entry(d.field).or_default() += 1;
        }
        for call in &row.calls {
            match call {
                ProvisionerCall::Provision { .. } => counts.provisions += 1,
                ProvisionerCall::Update { .. } => counts.updates += 1,
                ProvisionerCall::Deprovision { .. } => counts.deprovisions += 1,
            }
        }
        counts.emails += row.emails.len();
        report.rows.push(row);
    }
    report.counts.only_in_billing = billing_by_id.keys().filter(|id| !node_by_id.contains_key(*id)).count();
    report.counts.only_in_node = node_by_id.keys().filter(|id| !billing_by_id.contains_key(*id)).count();
    report
}

fn compare_one(
    id: &str,
    billing: Option<&SubscriptionState>,
    node: Option<&NodeSubscription>,
    now: DateTime<Utc>,
) -> Row {
    let customer_id = billing.map(|s| s.customer_id.clone()).or_else(|| node.and_then(|n| n.customer_id.clone()));
    let mut row =
        Row { subscription_id: id.to_owned(), customer_id, differences: vec![], calls: vec![], emails: vec![] };
    let mut differ = |field, billing: String, node: String| {
        if billing != node {
            row.differences.push(Difference { field, billing, node });
        }
    };
    let Some(state) = billing else {
        // Billing has no aggregate: its worker does nothing for it until Stripe tells it something.
        differ(Field::Subscription, "unknown".to_owned(), "present".to_owned());
        return row;
    };
    let desired = state.desired(now);
    let adopted = node.and_then(|n| n.adopted());
    match node {
        None => differ(Field::Subscription, "present".to_owned(), "unknown".to_owned()),
        Some(node) => {
            let entitlement = state.entitlement(now);
            let node_tier =
                node.tier.as_deref().map(|t| t.parse::<Tier>().map_or_else(|_| t.to_owned(), |t| t.to_string()));
            differ(Field::Tier, show(state.tier()), show(node_tier));
            let node_status = node.status.as_deref().map(|s| s.trim().to_ascii_lowercase());
            differ(Field::Status, show(state.status().map(|s| s.as_str())), show(node_status));
            differ(Field::MaxAgents, entitlement.limits.agents.to_wire().to_string(), show(node.max_agents));
            differ(
                Field::MaxMessagesPerDay,
                entitlement.limits.messages_per_day.to_wire().to_string(),
                show(node.max_messages_per_day),
            );
        }
    }
    let (node_runs, node_label) = node_instance_label(adopted);
    match desired {
        DesiredInstance::Running { limits, .. } => {
            if node_runs {
                let row_limits = adopted.map(|a| (a.memory_mb, a.cpu_millis));
                instance_limits(&mut differ, limits, row_limits.unwrap_or_default());
            }
            let app = adopted.filter(|_| node_runs).and_then(|a| a.app_name.as_deref());
            differ(Field::Instance, app.map_or_else(|| "running".to_owned(), |a| format!("running ({a})")), node_label);
        }
        DesiredInstance::Absent => differ(Field::Instance, "absent".to_owned(), node_label),
    }
    let record = node.and_then(|n| n.adopted_record(now));
    for call in worker_step(id, desired, record.as_ref()) {
        // A provision that answers the adopted app welcomes nobody.
        let adopted = record.as_ref().is_some_and(|r| r.adopted && r.may_exist());
        if let ProvisionerCall::Provision { generation, .. } = &call {
            if !adopted {
                row.emails.push(SwitchEmail { kind: "welcome", key: format!("email:welcome:{id}:{generation}") });
            }
        }
        row.calls.push(call);
    }
    row
}

fn instance_limits(differ: &mut impl FnMut(Field, String, String), limits: Limits, node: (Option<i64>, Option<i64>)) {
    differ(Field::Memory, limits.memory_mb.to_string(), show(node.0));
    differ(Field::Cpu, cores(i64::from(limits.cpu_millis)), show(node.1.map(cores)));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::TimeZone;

    use super::*;
    use crate::event::SubscriptionStatus;
    use crate::model::{AppliedSnapshot, Grace};

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    const NOW: i64 = 1_800_000_000;

    fn billing(sub: &str, status: SubscriptionStatus, tier: Tier) -> SubscriptionState {
        let mut s = SubscriptionState::new(sub, format!("cus_{sub}"));
        s.snapshot = Some(AppliedSnapshot {
            status,
            price_id: format!("price_{tier}"),
            tier,
            tier_from_price: true,
            current_period_end: None,
            trial_end: None,
            canceled_at: None,
            event_created: at(NOW - 100),
        });
        s
    }

    fn instance(app: &str, status: &str, tier: Tier, created: i64) -> NodeInstance {
        let limits = tier.limits();
        NodeInstance {
            id: Uuid::from_u128(u128::try_from(created).unwrap()),
            app_name: Some(app.to_owned()),
            status: Some(status.to_owned()),
            memory_mb: Some(i64::from(limits.memory_mb)),
            cpu_millis: Some(i64::from(limits.cpu_millis)),
            created_at: Some(at(created)),
        }
    }

    /// The Node row that agrees with billing's `state` in every field, with a running app.
    fn node_like(state: &SubscriptionState) -> NodeSubscription {
        let e = state.entitlement(at(NOW));
        let tier = state.tier().unwrap();
        let running = matches!(state.desired(at(NOW)), DesiredInstance::Running { .. });
        NodeSubscription {
            subscription_id: state.subscription_id.clone(),
            customer_id: Some(state.customer_id.clone()),
            tier: Some(tier.to_string()),
            status: state.status().map(|s| s.as_str().to_owned()),
            max_agents: Some(e.limits.agents.to_wire()),
            max_messages_per_day: Some(e.limits.messages_per_day.to_wire()),
            instances: if running { vec![instance("node-app", "running", tier, 10)] } else { vec![] },
        }
    }

    fn fields(row: &Row) -> Vec<(Field, &str, &str)> {
        row.differences.iter().map(|d| (d.field, d.billing.as_str(), d.node.as_str())).collect()
    }

    #[test]
    fn identical_sides_give_no_rows_and_count_the_restating_update() {
        let active = billing("sub_a", SubscriptionStatus::Active, Tier::Starter);
        let canceled = billing("sub_c", SubscriptionStatus::Canceled, Tier::Professional);
        let node = vec![node_like(&active), node_like(&canceled)];
        let report = compare(&[active, canceled], &node, at(NOW));
        assert!(report.rows.is_empty(), "{:#?}", report.rows);
        assert!(!report.differs());
        let c = &report.counts;
        assert_eq!((c.subscriptions, c.identical, c.differing, c.restating_updates), (2, 2, 0, 1));
        assert_eq!((c.provisions, c.updates, c.deprovisions, c.emails), (0, 0, 0, 0));
    }

    /// One case per kind of difference: what differs and what the switch would do.
    #[test]
    fn each_difference_gives_its_row_calls_and_emails() {
        use SubscriptionStatus::{Active, Canceled, PastDue};
        struct Case {
            name: &'static str,
            billing: SubscriptionState,
            node: Box<dyn Fn(&mut NodeSubscription)>,
            fields: Vec<(Field, &'static str, &'static str)>,
            calls: Vec<ProvisionerCall>,
            emails: usize,
        }
        let pro = Tier::Professional;
        let upd = |tier| vec![ProvisionerCall::Update { app_name: "node-app".into(), tier }];
        let mut expired = billing("sub_x", PastDue, pro);
        expired.grace = Some(Grace { started_at: at(NOW - 8 * 86_400), ends_at: at(NOW - 86_400) });
        let cases = vec![
            Case {
                name: "tier",
                billing: billing("sub_x", Active, pro),
                node: Box::new(move |n| {
                    n.tier = Some("starter".into());
                    n.max_agents = Some(3);
                    n.max_messages_per_day = Some(1000);
                    n.instances = vec![instance("node-app", "running", Tier::Starter, 10)];
                }),
                fields: vec![
                    (Field::Tier, "professional", "starter"),
                    (Field::MaxAgents, "10", "3"),
                    (Field::MaxMessagesPerDay, "10000", "1000"),
                    (Field::Memory, "2048", "512"),
                    (Field::Cpu, "2", "0.5"),
                ],
                calls: upd(pro),
                emails: 0,
            },
            Case {
                name: "a short tier name is the same tier",
                billing: billing("sub_x", Active, pro),
                node: Box::new(move |n| n.tier = Some("Pro".into())),
                fields: vec![],
                calls: upd(pro),
                emails: 0,
            },
            Case {
                name: "status",
                billing: billing("sub_x", PastDue, pro),
                node: Box::new(move |n| n.status = Some("active".into())),
                fields: vec![(Field::Status, "past_due", "active")],
                calls: upd(pro),
                emails: 0,
            },
            Case {
                name: "limits only",
                billing: billing("sub_x", Active, Tier::Enterprise),
                node: Box::new(move |n| n.max_agents = Some(50)),
                fields: vec![(Field::MaxAgents, "-1", "50")],
                calls: upd(Tier::Enterprise),
                emails: 0,
            },
            Case {
                name: "a missing instance is provisioned under billing's name and welcomed",
                billing: billing("sub_x", Active, pro),
                node: Box::new(move |n| n.instances.clear()),
                fields: vec![(Field::Instance, "running", "absent")],
                calls: vec![ProvisionerCall::Provision { app_name: app_name_for("sub_x"), tier: pro, generation: 1 }],
                emails: 1,
            },
            Case {
                name: "a removed Node app gets a new generation",
                billing: billing("sub_x", Active, pro),
                node: Box::new(move |n| n.instances = vec![instance("node-app", "deprovisioned", pro, 10)]),
                fields: vec![(Field::Instance, "running", "absent")],
                calls: vec![ProvisionerCall::Provision { app_name: app_name_for("sub_x"), tier: pro, generation: 2 }],
                emails: 1,
            },
            Case {
                name: "a failed Node app is provisioned again under its name and its limits stated",
                billing: billing("sub_x", Active, pro),
                node: Box::new(move |n| n.instances = vec![instance("node-app", "failed", pro, 10)]),
                fields: vec![(Field::Instance, "running", "failed (node-app)")],
                calls: vec![
                    ProvisionerCall::Provision { app_name: "node-app".into(), tier: pro, generation: 1 },
                    ProvisionerCall::Update { app_name: "node-app".into(), tier: pro },
                ],
                emails: 0,
            },
            Case {
                name: "a canceled subscription whose Node app still runs is deprovisioned",
                billing: billing("sub_x", Canceled, pro),
                node: Box::new(move |n| {
                    n.status = Some("canceled".into());
                    n.instances = vec![instance("node-app", "running", pro, 10)];
                }),
                fields: vec![(Field::Instance, "absent", "running (node-app)")],
                calls: vec![ProvisionerCall::Deprovision { app_name: "node-app".into() }],
                emails: 0,
            },
            Case {
                name: "an expired grace period: free limits and the app removed",
                billing: expired,
                node: Box::new(move |n| {
                    n.max_agents = Some(10);
                    n.max_messages_per_day = Some(10_000);
                    n.instances = vec![instance("node-app", "running", pro, 10)];
                }),
                fields: vec![
                    (Field::MaxAgents, "1", "10"),
                    (Field::MaxMessagesPerDay, "100", "10000"),
                    (Field::Instance, "absent", "running (node-app)"),
                ],
                calls: vec![ProvisionerCall::Deprovision { app_name: "node-app".into() }],
                emails: 0,
            },
            Case {
                name: "the newest live row is the adopted one",
                billing: billing("sub_x", Active, pro),
                node: Box::new(move |n| {
                    n.instances = vec![
                        instance("old-app", "deprovisioned", pro, 30),
                        instance("node-app", "running", pro, 20),
                        instance("older-app", "running", pro, 10),
                    ];
                }),
                fields: vec![],
                calls: upd(pro),
                emails: 0,
            },
        ];
        for case in cases {
            let mut node = node_like(&case.billing);
            node.instances = vec![instance("node-app", "running", case.billing.tier().unwrap(), 10)];
            (case.node)(&mut node);
            let report = compare(std::slice::from_ref(&case.billing), &[node], at(NOW));
            let name = case.name;
            if case.fields.is_empty() {
                assert!(report.rows.is_empty(), "{name}: {:#?}", report.rows);
                assert_eq!(report.counts.restating_updates, case.calls.len(), "{name}");
                continue;
            }
            assert_eq!(report.rows.len(), 1, "{name}");
            let row = &report.rows[0];
            assert_eq!(fields(row), case.fields, "{name}");
            assert_eq!(row.calls, case.calls, "{name}");
            assert_eq!(row.emails.len(), case.emails, "{name}");
            assert_eq!(report.counts.emails, case.emails, "{name}");
            assert!(report.differs(), "{name}");
        }
    }

    #[test]
    fn a_subscription_on_one_side_only_is_a_row() {
        let only_billing = billing("sub_b", SubscriptionStatus::Active, Tier::Starter);
        let mut only_node = node_like(&billing("sub_n", SubscriptionStatus::Active, Tier::Starter));
        only_node.customer_id = Some("cus_node".into());
        let report = compare(&[only_billing], &[only_node], at(NOW));
        assert_eq!(report.rows.len(), 2);
        let (b, n) = (&report.rows[0], &report.rows[1]);
        assert_eq!(fields(b), [(Field::Subscription, "present", "unknown"), (Field::Instance, "running", "absent")]);
        assert_eq!(b.calls.len(), 1, "billing provisions its own app");
        assert_eq!(b.emails[0].key, "email:welcome:sub_b:1");
        assert_eq!(fields(n), [(Field::Subscription, "unknown", "present")]);
        assert!(n.calls.is_empty(), "no aggregate: the worker does nothing");
        assert_eq!(n.customer_id.as_deref(), Some("cus_node"));
        let c = &report.counts;
        assert_eq!((c.only_in_billing, c.only_in_node, c.differing, c.provisions), (1, 1, 2, 1));
        assert_eq!(c.fields[&Field::Subscription], 2);
    }

    #[test]
    fn cpu_is_shown_in_cores() {
        assert_eq!(cores(500), "0.5");
        assert_eq!(cores(250), "0.25");
        assert_eq!(cores(2000), "2");
        assert_eq!(cores(1125), "1.125");
    }

    #[test]
    fn the_report_serializes_with_labels() {
        let report = compare(&[billing("sub_b", SubscriptionStatus::Active, Tier::Starter)], &[], at(NOW));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["rows"][0]["differences"][0]["field"], "subscription");
        assert_eq!(json["rows"][0]["calls"][0]["call"], "POST /provision");
        assert_eq!(json["rows"][0]["calls"][0]["tier"], "starter");
        assert_eq!(json["counts"]["fields"]["instance"], 1);
    }
}
