-- mindroom-billing: POST /v1/usage idempotency keys. Idempotent (if not exists; create or replace, which
-- keeps the grants of 20261125000100_billing_functions).
--
-- A consume_usage call may time out after it committed; the client's retry would count twice. With an
-- idempotency key, an allowed call is remembered per account, UTC day and key in the same transaction
-- as its increment, and a retry answers the remembered result without counting.

create table if not exists public.billing_usage_requests (
    account_id uuid not null,
    day date not null,
    key text not null,
    metric text not null,
    count bigint not null,
    used bigint not null,
    primary key (account_id, day, key)
);
alter table public.billing_usage_requests enable row level security;
do $$
begin
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
        grant select, insert, update, delete on public.billing_usage_requests to service_role;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
        revoke all on public.billing_usage_requests from anon;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
        revoke all on public.billing_usage_requests from authenticated;
    end if;
end
$$;

-- consume_usage: p = {account_id, metric, day, count, limit (-1 = unlimited), idempotency_key|null}
-- → {allowed, used}. One conditional upsert: concurrent callers serialize on the counter row. With a
-- key, the request row is inserted first: a concurrent call with the same key waits on it and then
-- answers its result; a refused call deletes it again (nothing was counted, a retry decides anew).
-- Request rows of the account older than the day before are removed on the way.
create or replace function public.billing_consume_usage(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_account uuid := (p ->> 'account_id')::uuid;
    v_metric text := p ->> 'metric';
    v_day date := (p ->> 'day')::date;
    v_count bigint := (p ->> 'count')::bigint;
    v_limit bigint := (p ->> 'limit')::bigint;
    v_key text := p ->> 'idempotency_key';
    v_used bigint;
begin
    if v_key is not null then
        insert into public.billing_usage_requests (account_id, day, key, metric, count, used)
        values (v_account, v_day, v_key, v_metric, v_count, -1)
        on conflict (account_id, day, key) do nothing;
        if not found then
            select r.used into v_used
            from public.billing_usage_requests r
            where r.account_id = v_account and r.day = v_day and r.key = v_key;
            return jsonb_build_object('allowed', true, 'used', v_used::text);
        end if;
        delete from public.billing_usage_requests r
        where r.account_id = v_account and r.day < v_day - 1;
    end if;
    if v_limit < 0 or v_count <= v_limit then
        insert into public.billing_usage as u (account_id, metric, day, count)
        values (v_account, v_metric, v_day, v_count)
        on conflict (account_id, metric, day) do update
        set count = u.count + excluded.count
        where v_limit < 0 or u.count + excluded.count <= v_limit
        returning u.count into v_used;
        if found then
            if v_key is not null then
                update public.billing_usage_requests r
                set used = v_used
                where r.account_id = v_account and r.day = v_day and r.key = v_key;
            end if;
            return jsonb_build_object('allowed', true, 'used', v_used::text);
        end if;
    end if;
    if v_key is not null then
        delete from public.billing_usage_requests r
        where r.account_id = v_account and r.day = v_day and r.key = v_key;
    end if;
    select u.count into v_used
    from public.billing_usage u
    where u.account_id = v_account and u.metric = v_metric and u.day = v_day;
    return jsonb_build_object('allowed', false, 'used', coalesce(v_used, 0)::text);
end
$$;
