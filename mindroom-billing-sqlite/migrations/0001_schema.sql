-- mindroom-billing on SQLite: the store's tables. Instants are integer microseconds since the Unix
-- epoch (UTC); aggregates, instance records and job kinds are the core's values as JSON text.

-- Raw events: the exact bytes received. `customer` is the customer the payload names (set while the
-- payload is kept), for the operator's timeline.
create table events (
    id text primary key,
    type text not null,
    created integer not null,
    api_version text,
    livemode integer not null,
    status text not null check (status in ('received', 'applied', 'stale', 'ignored', 'failed')),
    reason text,
    payload text not null,
    received_at integer not null,
    processed_at integer,
    deliveries integer not null,
    source text not null,
    customer text
) without rowid;
create index events_received_at_idx on events (received_at);
create index events_status_received_at_idx on events (status, received_at);
create index events_customer_idx on events (customer, received_at) where customer is not null;

-- The subscription aggregate with its compare-and-swap version, and the columns queries filter on.
create table subscriptions (
    subscription_id text primary key,
    customer_id text not null,
    account_id text not null,
    version integer not null check (version > 0),
    state text not null,
    grace_ends_at integer,
    grace_expiry_handled integer not null,
    terminal integer not null,
    updated_at integer not null
) without rowid;
create index subscriptions_account_idx on subscriptions (account_id);
create index subscriptions_customer_idx on subscriptions (customer_id);
create index subscriptions_grace_idx on subscriptions (grace_ends_at)
    where grace_ends_at is not null and not grace_expiry_handled and not terminal;

-- Accounts by Stripe customer. `email_lower` is the e-mail lower-cased (the look-up ignores case);
-- `email_observed_at` is when the fact the e-mail came from was created (the newest wins).
create table accounts (
    stripe_customer_id text primary key,
    id text not null unique,
    email text,
    email_lower text,
    email_observed_at integer,
    reference text,
    reference_lower text
) without rowid;
create index accounts_email_idx on accounts (email_lower) where email_lower is not null;
create index accounts_reference_idx on accounts (reference) where reference is not null;

-- The instance record as the reconcile jobs last wrote it.
create table instances (
    subscription_id text primary key,
    app_name text not null,
    record text not null,
    updated_at integer not null
) without rowid;
create index instances_app_idx on instances (app_name);

-- Durable jobs: lease (locked_until) + attempts as the fencing token; grp orders a subscription's jobs.
-- `about` is the subscription the job's work names (its reconciles and e-mails).
create table jobs (
    id integer primary key autoincrement,
    key text not null unique,
    grp text,
    kind text not null,
    about text,
    state text not null check (state in ('pending', 'running', 'done', 'dead')),
    attempts integer not null,
    run_after integer not null,
    locked_until integer,
    last_error text,
    created_at integer not null,
    updated_at integer not null
);
create index jobs_active_idx on jobs (id) where state in ('pending', 'running');
create index jobs_group_idx on jobs (grp, id) where grp is not null and state in ('pending', 'running');
create index jobs_state_created_idx on jobs (state, created_at);
create index jobs_created_idx on jobs (created_at);
create index jobs_about_idx on jobs (about) where about is not null;
create index jobs_grp_all_idx on jobs (grp) where grp is not null;
create index jobs_done_idx on jobs (updated_at) where state = 'done';

-- Usage counters per account, metric and UTC day (`day` as YYYY-MM-DD).
create table usage (
    account_id text not null,
    metric text not null,
    day text not null,
    count integer not null check (count >= 0),
    primary key (account_id, metric, day)
) without rowid;

-- Allowed usage calls with an idempotency key, per account, metric and key: when the first was made
-- (remembered for 48 hours from then), what it counted, and its answer.
create table usage_keys (
    account_id text not null,
    metric text not null,
    key text not null,
    requested_at integer not null,
    count integer not null,
    used integer not null,
    primary key (account_id, metric, key)
) without rowid;
create index usage_keys_account_requested_idx on usage_keys (account_id, requested_at);

-- Named cursors (Stripe catch-up) and singleton leases.
create table cursors (
    name text primary key,
    created integer not null,
    saved_at integer not null
) without rowid;
create table leases (
    name text primary key,
    holder text not null,
    until integer not null
) without rowid;

-- Operator actions and the drift the last reconciliation found.
create table audit (
    id integer primary key autoincrement,
    at integer not null,
    actor text not null,
    action text not null,
    target text not null,
    customer_id text,
    ok integer not null,
    result text not null
);
create index audit_customer_idx on audit (customer_id, id) where customer_id is not null;
create table drift (
    subscription_id text not null,
    field text not null,
    before text not null,
    after text not null,
    found_at integer not null
);
create index drift_subscription_idx on drift (subscription_id);

-- Console operators and their sessions.
create table operators (
    name text primary key,
    role text not null,
    password_hash text not null,
    created_at integer not null
) without rowid;
create table sessions (
    id text primary key,
    operator text not null,
    role text not null,
    created_at integer not null,
    last_seen integer not null,
    ended_at integer
) without rowid;
create index sessions_live_idx on sessions (operator) where ended_at is null;
