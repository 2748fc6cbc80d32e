-- The three tables as the original Node service created them: its columns only, none of billing's.
create table accounts (
    id uuid primary key default gen_random_uuid(),
    stripe_customer_id text unique,
    email text,
    created_at timestamptz default now(),
    updated_at timestamptz default now()
);
create table subscriptions (
    id uuid primary key default gen_random_uuid(),
    account_id uuid references accounts (id),
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
    created_at timestamptz default now(),
    updated_at timestamptz default now()
);
create table instances (
    id uuid primary key default gen_random_uuid(),
    subscription_id uuid references subscriptions (id),
    dokku_app_name text,
    subdomain text,
    status text,
    frontend_url text,
    backend_url text,
    memory_limit_mb integer,
    cpu_limit numeric,
    deprovisioned_at timestamptz,
    created_at timestamptz default now(),
    updated_at timestamptz default now()
);
