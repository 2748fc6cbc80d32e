-- mindroom-billing: what the operator console reads and writes (the OperatorStore port).
-- Additive: new tables, indexes and functions (billing_events.customer_id and the record functions
-- that fill it come from 20261204000100_billing_record_and_commit).
--
-- A customer's events are found by `billing_events.customer_id`: the customer their payload names,
-- stored when the event is recorded (the binary has parsed the event already and sends it; otherwise
-- the record functions of 20261204000100 derive it with public.billing_event_customer). An
-- expression index on the payload was tried first: it parsed every 3.9 KB payload again on the
-- webhook's hot path (0.044 ms per new event, 16 % of billing_record_and_commit) and lost the
-- customer when retention empties a payload.
create index if not exists billing_events_customer_id_idx
    on public.billing_events (customer_id, received_at desc) where customer_id is not null;

-- The subscription a job is about: its work's subscription_id, else its group.
create index if not exists billing_jobs_subscription_idx
    on public.billing_jobs ((coalesce(kind ->> 'subscription_id', grp)), id desc);

create index if not exists billing_instances_app_name_idx on public.billing_instances ((record ->> 'app_name'));
create index if not exists accounts_email_lower_idx on public.accounts (pg_catalog.lower(email));

-- Operator actions: who did what, when, and how it ended.
create table if not exists public.billing_audit (
    id bigserial primary key,
    at timestamptz not null,
    actor text not null,
    action text not null,
    target text not null,
    customer_id text,
    ok boolean not null,
    result text not null
);
create index if not exists billing_audit_customer_idx on public.billing_audit (customer_id, id desc);

-- The drift the last reconciliation of each subscription found (replaced per reconciliation).
create table if not exists public.billing_drift (
    subscription_id text not null,
    field text not null,
    before text not null,
    after text not null,
    found_at timestamptz not null,
    primary key (subscription_id, field)
);
create index if not exists billing_drift_found_at_idx on public.billing_drift (found_at desc);

alter table public.billing_audit enable row level security;
alter table public.billing_drift enable row level security;
do $$
begin
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
        grant select, insert, update, delete on public.billing_audit, public.billing_drift to service_role;
        grant usage, select on sequence public.billing_audit_id_seq to service_role;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
        revoke all on public.billing_audit, public.billing_drift from anon;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
        revoke all on public.billing_audit, public.billing_drift from authenticated;
    end if;
end
$$;

-- accounts_by_email: p = {email, limit} → accounts whose e-mail equals it, ignoring case
create or replace function public.billing_accounts_by_email(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(x.account order by x.customer), '[]'::jsonb)
    from (
        select a.stripe_customer_id as customer,
               jsonb_build_object('id', a.id, 'stripe_customer_id', a.stripe_customer_id, 'email', a.email,
                                  'reference', a.client_reference_id) as account
        from public.accounts a
        where pg_catalog.lower(a.email) = pg_catalog.lower(p ->> 'email') and a.stripe_customer_id is not null
        order by a.stripe_customer_id
        limit (p ->> 'limit')::bigint
    ) x
$$;

-- instance_by_app: p = {app_name} → instance record or null
create or replace function public.billing_instance_by_app(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select i.record from public.billing_instances i where i.record ->> 'app_name' = p ->> 'app_name' limit 1
$$;

-- subscriptions_for_customer: p = {customer_id} → aggregates
create or replace function public.billing_subscriptions_for_customer(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(s.state || jsonb_build_object('version', s.version) order by s.subscription_id),
                    '[]'::jsonb)
    from public.billing_subscription_state s
    where s.customer_id = p ->> 'customer_id'
$$;

-- events_for_customer: p = {customer_id, limit} → events, newest received first
create or replace function public.billing_events_for_customer(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(public.billing_event_json(x) order by x.received_at desc, x.id), '[]'::jsonb)
    from (
        select e.* from public.billing_events e
        where e.customer_id = p ->> 'customer_id'
        order by e.received_at desc, e.id
        limit (p ->> 'limit')::bigint
    ) x
$$;

-- jobs_for_subscription: p = {subscription_id, limit} → jobs, newest first
create or replace function public.billing_jobs_for_subscription(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(public.billing_job_json(x) order by x.created_at desc, x.id desc), '[]'::jsonb)
    from (
        select j.* from public.billing_jobs j
        where coalesce(j.kind ->> 'subscription_id', j.grp) = p ->> 'subscription_id'
        order by j.created_at desc, j.id desc
        limit (p ->> 'limit')::bigint
    ) x
$$;

-- subscriptions_in_grace: p = {limit} → aggregates, earliest deadline first
create or replace function public.billing_subscriptions_in_grace(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(x.state order by x.grace_ends_at, x.subscription_id), '[]'::jsonb)
    from (
        select s.subscription_id, s.grace_ends_at, s.state || jsonb_build_object('version', s.version) as state
        from public.billing_subscription_state s
        where s.grace_ends_at is not null and not s.grace_expiry_handled and not s.terminal
        order by s.grace_ends_at, s.subscription_id
        limit (p ->> 'limit')::bigint
    ) x
$$;

-- retry_dead_job: p = {job_id, now} → the re-queued job, or null when it is not dead
create or replace function public.billing_retry_dead_job(p jsonb)
returns jsonb
language sql
volatile
security invoker
set search_path = ''
as $$
    update public.billing_jobs j
    set state = 'pending', run_after = (p ->> 'now')::timestamptz, locked_until = null,
        updated_at = (p ->> 'now')::timestamptz
    where j.id = (p ->> 'job_id')::bigint and j.state = 'dead'
    returning public.billing_job_json(j)
$$;

-- record_audit: p = {at, actor, action, target, customer_id, ok, result} → true
create or replace function public.billing_record_audit(p jsonb)
returns jsonb
language sql
volatile
security invoker
set search_path = ''
as $$
    insert into public.billing_audit (at, actor, action, target, customer_id, ok, result)
    values ((p ->> 'at')::timestamptz, p ->> 'actor', p ->> 'action', p ->> 'target', p ->> 'customer_id',
            (p ->> 'ok')::boolean, p ->> 'result')
    returning 'true'::jsonb
$$;

-- list_audit: p = {customer_id|null, limit} → audit rows, newest first
create or replace function public.billing_list_audit(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(jsonb_build_object('at', x.at, 'actor', x.actor, 'action', x.action,
                                                 'target', x.target, 'customer_id', x.customer_id, 'ok', x.ok,
                                                 'result', x.result) order by x.id desc), '[]'::jsonb)
    from (
        select a.* from public.billing_audit a
        where p ->> 'customer_id' is null or a.customer_id = p ->> 'customer_id'
        order by a.id desc
        limit (p ->> 'limit')::bigint
    ) x
$$;

-- save_drift: p = {checked: [subscription ids], drift: [{subscription_id, field, before, after, found_at}]}
-- → true. Replaces the drift of every checked subscription, atomically.
create or replace function public.billing_save_drift(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    delete from public.billing_drift d
    where d.subscription_id in (select pg_catalog.jsonb_array_elements_text(p -> 'checked'));
    insert into public.billing_drift (subscription_id, field, before, after, found_at)
    select x ->> 'subscription_id', x ->> 'field', x ->> 'before', x ->> 'after', (x ->> 'found_at')::timestamptz
    from pg_catalog.jsonb_array_elements(p -> 'drift') x
    where x ->> 'subscription_id' in (select pg_catalog.jsonb_array_elements_text(p -> 'checked'))
    on conflict (subscription_id, field) do update
        set before = excluded.before, after = excluded.after, found_at = excluded.found_at;
    return 'true'::jsonb;
end
$$;

-- list_drift: p = {subscription_id|null, limit} → drift, newest first
create or replace function public.billing_list_drift(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(jsonb_build_object('subscription_id', x.subscription_id, 'field', x.field,
                                                 'before', x.before, 'after', x.after, 'found_at', x.found_at)
                              order by x.found_at desc, x.subscription_id, x.field), '[]'::jsonb)
    from (
        select d.* from public.billing_drift d
        where p ->> 'subscription_id' is null or d.subscription_id = p ->> 'subscription_id'
        order by d.found_at desc, d.subscription_id, d.field
        limit (p ->> 'limit')::bigint
    ) x
$$;

select public.billing_restrict_functions();
