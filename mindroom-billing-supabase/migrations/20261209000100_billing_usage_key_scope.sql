-- mindroom-billing: POST /v1/usage idempotency keys are per account, metric and key, remembered for
-- 48 hours from the first call (also across midnight UTC). Idempotent.
--
-- The keys were per account, UTC day and key: a retry after midnight counted again, and the same key
-- for another metric answered the first metric's result. billing_usage_keys replaces
-- billing_usage_requests (request rows are short-lived: dropping the old table forgets at most the
-- keys of the last two days at the upgrade).

create table if not exists public.billing_usage_keys (
    account_id uuid not null,
    metric text not null,
    key text not null,
    requested_at timestamptz not null,
    count bigint not null,
    used bigint not null,
    primary key (account_id, metric, key)
);
create index if not exists billing_usage_keys_account_requested_idx
    on public.billing_usage_keys (account_id, requested_at);
alter table public.billing_usage_keys enable row level security;
do $$
begin
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
        grant select, insert, update, delete on public.billing_usage_keys to service_role;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
        revoke all on public.billing_usage_keys from anon;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
        revoke all on public.billing_usage_keys from authenticated;
    end if;
end
$$;
drop table if exists public.billing_usage_requests;

-- consume_usage: p = {account_id, metric, day, count, limit (-1 = unlimited), idempotency_key|null,
-- at (the call's time; now() when absent)} → {allowed, used}. One conditional upsert: concurrent
-- callers serialize on the counter row. With a key, a request row of that key older than 48 hours
-- is forgotten, then the request row is inserted first: a concurrent call with the same key waits
-- on it and then answers its result; a refused call deletes it again (nothing was counted, a retry
-- decides anew). The account's expired request rows are removed on the way.
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
    v_at timestamptz := coalesce((p ->> 'at')::timestamptz, now());
    v_expired timestamptz := coalesce((p ->> 'at')::timestamptz, now()) - interval '48 hours';
    v_used bigint;
begin
    if v_key is not null then
        delete from public.billing_usage_keys r
        where r.account_id = v_account and r.requested_at <= v_expired;
        insert into public.billing_usage_keys (account_id, metric, key, requested_at, count, used)
        values (v_account, v_metric, v_key, v_at, v_count, -1)
        on conflict (account_id, metric, key) do nothing;
        if not found then
            select r.used into v_used
            from public.billing_usage_keys r
            where r.account_id = v_account and r.metric = v_metric and r.key = v_key;
            return jsonb_build_object('allowed', true, 'used', v_used::text);
        end if;
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
                update public.billing_usage_keys r
                set used = v_used
                where r.account_id = v_account and r.metric = v_metric and r.key = v_key;
            end if;
            return jsonb_build_object('allowed', true, 'used', v_used::text);
        end if;
    end if;
    if v_key is not null then
        delete from public.billing_usage_keys r
        where r.account_id = v_account and r.metric = v_metric and r.key = v_key;
    end if;
    select u.count into v_used
    from public.billing_usage u
    where u.account_id = v_account and u.metric = v_metric and u.day = v_day;
    return jsonb_build_object('allowed', false, 'used', coalesce(v_used, 0)::text);
end
$$;

-- Only the service role may execute billing's functions.
select public.billing_restrict_functions();
