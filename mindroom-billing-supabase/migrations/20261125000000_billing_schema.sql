-- mindroom-billing: schema. Idempotent: every statement can run again on an up-to-date database.
--
-- Shared tables other MindRoom services read: public.accounts, public.subscriptions, public.instances.
-- The store's own tables: public.billing_*. Row level security is on everywhere with no policies, so
-- only the service role (bypassrls) and the owner reach them.

create table if not exists public.accounts (
    id uuid primary key,
    stripe_customer_id text unique,
    email text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
alter table public.accounts add column if not exists stripe_customer_id text;
alter table public.accounts add column if not exists email text;
alter table public.accounts add column if not exists client_reference_id text;
alter table public.accounts add column if not exists created_at timestamptz not null default now();
alter table public.accounts add column if not exists updated_at timestamptz not null default now();
create unique index if not exists accounts_stripe_customer_id_key on public.accounts (stripe_customer_id);

create table if not exists public.subscriptions (
    id uuid primary key default gen_random_uuid(),
    account_id uuid references public.accounts (id),
    stripe_subscription_id text unique,
    stripe_price_id text,
    tier text,
    status text,
    max_agents integer,
    max_messages_per_day integer,
    current_period_end timestamptz,
    trial_ends_at timestamptz,
    cancelled_at timestamptz,
    grace_period_ends_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
alter table public.subscriptions add column if not exists account_id uuid;
alter table public.subscriptions add column if not exists stripe_subscription_id text;
alter table public.subscriptions add column if not exists stripe_price_id text;
alter table public.subscriptions add column if not exists tier text;
alter table public.subscriptions add column if not exists status text;
alter table public.subscriptions add column if not exists max_agents integer;
alter table public.subscriptions add column if not exists max_messages_per_day integer;
alter table public.subscriptions add column if not exists current_period_end timestamptz;
alter table public.subscriptions add column if not exists trial_ends_at timestamptz;
alter table public.subscriptions add column if not exists cancelled_at timestamptz;
alter table public.subscriptions add column if not exists grace_period_ends_at timestamptz;
alter table public.subscriptions add column if not exists created_at timestamptz not null default now();
alter table public.subscriptions add column if not exists updated_at timestamptz not null default now();
create unique index if not exists subscriptions_stripe_subscription_id_key
    on public.subscriptions (stripe_subscription_id);
create index if not exists subscriptions_account_id_idx on public.subscriptions (account_id);

create table if not exists public.instances (
    id uuid primary key default gen_random_uuid(),
    subscription_id uuid references public.subscriptions (id),
    dokku_app_name text,
    subdomain text,
    status text,
    frontend_url text,
    backend_url text,
    memory_limit_mb integer,
    cpu_limit numeric,
    deprovisioned_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
alter table public.instances add column if not exists subscription_id uuid;
alter table public.instances add column if not exists dokku_app_name text;
alter table public.instances add column if not exists subdomain text;
alter table public.instances add column if not exists status text;
alter table public.instances add column if not exists frontend_url text;
alter table public.instances add column if not exists backend_url text;
alter table public.instances add column if not exists memory_limit_mb integer;
alter table public.instances add column if not exists cpu_limit numeric;
alter table public.instances add column if not exists deprovisioned_at timestamptz;
alter table public.instances add column if not exists created_at timestamptz not null default now();
alter table public.instances add column if not exists updated_at timestamptz not null default now();
create index if not exists instances_subscription_id_idx on public.instances (subscription_id);
do $$
begin
    if not exists (
        select 1 from pg_catalog.pg_constraint
        where conrelid = 'public.instances'::regclass and conname = 'instances_status_check'
    ) then
        alter table public.instances add constraint instances_status_check
            check (status in ('provisioning', 'running', 'failed', 'deprovisioning', 'deprovisioned'));
    end if;
end
$$;

-- Raw events: the exact bytes received (text, not only jsonb, which reorders keys).
create table if not exists public.billing_events (
    id text primary key,
    type text not null,
    created timestamptz not null,
    api_version text,
    livemode boolean not null default false,
    status text not null default 'received'
        check (status in ('received', 'applied', 'stale', 'ignored', 'failed')),
    reason text,
    payload text not null,
    received_at timestamptz not null,
    processed_at timestamptz,
    deliveries integer not null default 1
);
create index if not exists billing_events_unapplied_idx
    on public.billing_events (received_at) where status = 'received';
create index if not exists billing_events_received_at_idx on public.billing_events (received_at);
create index if not exists billing_events_status_received_at_idx on public.billing_events (status, received_at);

-- The subscription aggregate (the full core value as jsonb) with its compare-and-swap version.
-- Columns the sweeper filters on are kept next to it.
create table if not exists public.billing_subscription_state (
    subscription_id text primary key,
    customer_id text not null,
    account_id uuid not null,
    version bigint not null check (version > 0),
    state jsonb not null,
    grace_ends_at timestamptz,
    grace_expiry_handled boolean not null default false,
    terminal boolean not null default false,
    updated_at timestamptz not null
);
create index if not exists billing_subscription_state_account_idx
    on public.billing_subscription_state (account_id);
create index if not exists billing_subscription_state_customer_idx
    on public.billing_subscription_state (customer_id);
create index if not exists billing_subscription_state_grace_idx
    on public.billing_subscription_state (grace_ends_at)
    where grace_ends_at is not null and not grace_expiry_handled and not terminal;

-- The instance record as the reconcile jobs last wrote it; projected into public.instances.
create table if not exists public.billing_instances (
    subscription_id text primary key,
    instance_id uuid not null default gen_random_uuid(),
    record jsonb not null,
    updated_at timestamptz not null
);

-- Durable jobs: lease (locked_until) + attempts as the fencing token; grp orders a subscription's jobs.
create table if not exists public.billing_jobs (
    id bigserial primary key,
    key text not null unique,
    grp text,
    kind jsonb not null,
    state text not null default 'pending' check (state in ('pending', 'running', 'done', 'dead')),
    attempts integer not null default 0,
    run_after timestamptz not null,
    locked_until timestamptz,
    last_error text,
    created_at timestamptz not null,
    updated_at timestamptz not null
);
create index if not exists billing_jobs_active_idx
    on public.billing_jobs (id) where state in ('pending', 'running');
create index if not exists billing_jobs_due_idx
    on public.billing_jobs (run_after) where state = 'pending';
create index if not exists billing_jobs_group_idx
    on public.billing_jobs (grp, id) where grp is not null and state in ('pending', 'running');
create index if not exists billing_jobs_state_created_idx on public.billing_jobs (state, created_at);
create index if not exists billing_jobs_created_idx on public.billing_jobs (created_at);

-- Usage counters per account, metric and UTC day.
create table if not exists public.billing_usage (
    account_id uuid not null,
    metric text not null,
    day date not null,
    count bigint not null default 0 check (count >= 0),
    primary key (account_id, metric, day)
);

-- Row level security on, no policies.
alter table public.accounts enable row level security;
alter table public.subscriptions enable row level security;
alter table public.instances enable row level security;
alter table public.billing_events enable row level security;
alter table public.billing_subscription_state enable row level security;
alter table public.billing_instances enable row level security;
alter table public.billing_jobs enable row level security;
alter table public.billing_usage enable row level security;
