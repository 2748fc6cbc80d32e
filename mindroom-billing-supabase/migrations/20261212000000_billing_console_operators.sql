-- mindroom-billing: named console operators and their sessions (the OperatorStore port).
-- Additive: two tables and their functions.
--
-- A session row is keyed by a digest of the cookie's secret (the console never sends the secret
-- itself), so reading this table does not give anyone a session.
create table if not exists public.billing_operators (
    name text primary key,
    role text not null check (role in ('admin', 'read-only')),
    password_hash text not null,
    created_at timestamptz not null
);

create table if not exists public.billing_operator_sessions (
    id text primary key,
    operator text not null,
    role text not null check (role in ('admin', 'read-only')),
    created_at timestamptz not null,
    last_seen timestamptz not null,
    ended_at timestamptz
);
create index if not exists billing_operator_sessions_live_idx
    on public.billing_operator_sessions (operator) where ended_at is null;

alter table public.billing_operators enable row level security;
alter table public.billing_operator_sessions enable row level security;
do $$
begin
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
        grant select, insert, update, delete on public.billing_operators, public.billing_operator_sessions
            to service_role;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
        revoke all on public.billing_operators, public.billing_operator_sessions from anon;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
        revoke all on public.billing_operators, public.billing_operator_sessions from authenticated;
    end if;
end
$$;

create or replace function public.billing_operator_json(o public.billing_operators)
returns jsonb
language sql
immutable
security invoker
set search_path = ''
as $$
    select jsonb_build_object('name', o.name, 'role', o.role, 'password_hash', o.password_hash,
                              'created_at', o.created_at)
$$;

create or replace function public.billing_operator_session_json(s public.billing_operator_sessions)
returns jsonb
language sql
immutable
security invoker
set search_path = ''
as $$
    select jsonb_build_object('id', s.id, 'operator', s.operator, 'role', s.role, 'created_at', s.created_at,
                              'last_seen', s.last_seen, 'ended_at', s.ended_at)
$$;

-- add_operator: p = {name, role, password_hash, created_at} → true, or false when the name is taken
create or replace function public.billing_add_operator(p jsonb)
returns jsonb
language sql
volatile
security invoker
set search_path = ''
as $$
    with added as (
        insert into public.billing_operators (name, role, password_hash, created_at)
        values (p ->> 'name', p ->> 'role', p ->> 'password_hash', (p ->> 'created_at')::timestamptz)
        on conflict (name) do nothing
        returning 1
    )
    select to_jsonb(exists (select 1 from added))
$$;

-- load_operator: p = {name} → operator or null
create or replace function public.billing_load_operator(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select public.billing_operator_json(o) from public.billing_operators o where o.name = p ->> 'name'
$$;

-- list_operators: p = {} → operators by name
create or replace function public.billing_list_operators(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(public.billing_operator_json(o) order by o.name), '[]'::jsonb)
    from public.billing_operators o
$$;

-- set_operator_password: p = {name, password_hash, now} → true, or false for an unknown name.
-- Ends the operator's live sessions in the same transaction.
create or replace function public.billing_set_operator_password(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    update public.billing_operators o set password_hash = p ->> 'password_hash' where o.name = p ->> 'name';
    if not found then
        return 'false'::jsonb;
    end if;
    update public.billing_operator_sessions s set ended_at = (p ->> 'now')::timestamptz
    where s.operator = p ->> 'name' and s.ended_at is null;
    return 'true'::jsonb;
end
$$;

-- remove_operator: p = {name, now} → true, or false for an unknown name. Ends its live sessions.
create or replace function public.billing_remove_operator(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    delete from public.billing_operators o where o.name = p ->> 'name';
    if not found then
        return 'false'::jsonb;
    end if;
    update public.billing_operator_sessions s set ended_at = (p ->> 'now')::timestamptz
    where s.operator = p ->> 'name' and s.ended_at is null;
    return 'true'::jsonb;
end
$$;

-- create_session: p = {id, operator, role, created_at, last_seen} → true
create or replace function public.billing_create_session(p jsonb)
returns jsonb
language sql
volatile
security invoker
set search_path = ''
as $$
    insert into public.billing_operator_sessions (id, operator, role, created_at, last_seen)
    values (p ->> 'id', p ->> 'operator', p ->> 'role', (p ->> 'created_at')::timestamptz,
            (p ->> 'last_seen')::timestamptz)
    returning 'true'::jsonb
$$;

-- touch_session: p = {id, now, idle_since, opened_since} → the live session (last_seen = now), or
-- null; a session idle or old past the cutoffs is ended at now.
create or replace function public.billing_touch_session(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    s public.billing_operator_sessions;
begin
    select * into s from public.billing_operator_sessions x
    where x.id = p ->> 'id' and x.ended_at is null
    for update;
    if not found then
        return null;
    end if;
    if s.last_seen < (p ->> 'idle_since')::timestamptz or s.created_at < (p ->> 'opened_since')::timestamptz then
        update public.billing_operator_sessions x set ended_at = (p ->> 'now')::timestamptz where x.id = s.id;
        return null;
    end if;
    update public.billing_operator_sessions x
    set last_seen = greatest(x.last_seen, (p ->> 'now')::timestamptz)
    where x.id = s.id
    returning * into s;
    return public.billing_operator_session_json(s);
end
$$;

-- end_session: p = {id, now} → true, or false when it was not live
create or replace function public.billing_end_session(p jsonb)
returns jsonb
language sql
volatile
security invoker
set search_path = ''
as $$
    with ended as (
        update public.billing_operator_sessions s set ended_at = (p ->> 'now')::timestamptz
        where s.id = p ->> 'id' and s.ended_at is null
        returning 1
    )
    select to_jsonb(exists (select 1 from ended))
$$;

-- load_job: p = {job_id} → the job, or null
create or replace function public.billing_load_job(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select public.billing_job_json(j) from public.billing_jobs j where j.id = (p ->> 'job_id')::bigint
$$;

-- search_customers: p = {text, limit} → customer ids, sorted: accounts whose e-mail or reference
-- contains the text (ignoring case, literally), and, for an invoice id (`in_…`), subscriptions whose
-- failed or paid invoices include it. Both are scans (accounts, subscription aggregates): an
-- operator's search, not a hot path.
create or replace function public.billing_search_customers(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    with q as (
        select p ->> 'text' as text,
               '%' || pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.lower(p ->> 'text'),
                   '\', '\\'), '%', '\%'), '_', '\_') || '%' as pattern
    ),
    found as (
        select a.stripe_customer_id as customer
        from public.accounts a, q
        where q.text <> '' and a.stripe_customer_id is not null
          and (pg_catalog.lower(a.email) like q.pattern or pg_catalog.lower(a.client_reference_id) like q.pattern)
        union
        select s.customer_id
        from public.billing_subscription_state s, q
        where q.text like 'in\_%'
          and (s.state -> 'failures' @> pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object('invoice_id', q.text))
               or s.state -> 'paid_invoices'
                  @> pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object('invoice_id', q.text)))
    )
    select coalesce(jsonb_agg(x.customer order by x.customer), '[]'::jsonb)
    from (select f.customer from found f order by f.customer limit (p ->> 'limit')::bigint) x
$$;

select public.billing_restrict_functions();
