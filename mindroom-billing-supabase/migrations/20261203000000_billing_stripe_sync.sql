-- mindroom-billing: the Stripe API as a second source of truth (DESIGN §8). Idempotent.
--
-- * billing_events.source: 'webhook' (a verified delivery) or 'api' (listed by catch-up). The first
--   delivery's source is kept; a later delivery of the same id by the other channel is a duplicate.
-- * billing_sync_state: catch-up's cursor and the singleton leases of the periodic Stripe tasks (one
--   replica at a time).

alter table public.billing_events add column if not exists source text not null default 'webhook';
do $$
begin
    if not exists (
        select 1 from pg_catalog.pg_constraint
        where conrelid = 'public.billing_events'::regclass and conname = 'billing_events_source_check'
    ) then
        alter table public.billing_events add constraint billing_events_source_check
            check (source in ('webhook', 'api'));
    end if;
end
$$;

create table if not exists public.billing_sync_state (
    name text primary key,
    cursor_created timestamptz,
    cursor_saved_at timestamptz,
    holder text,
    leased_until timestamptz
);
alter table public.billing_sync_state enable row level security;

create or replace function public.billing_event_json(e public.billing_events)
returns jsonb
language sql
immutable
security invoker
set search_path = ''
as $$
    select jsonb_build_object(
        'id', e.id,
        'event_type', e.type,
        'created', e.created,
        'status', e.status,
        'reason', e.reason,
        'payload', e.payload,
        'received_at', e.received_at,
        'processed_at', e.processed_at,
        'deliveries', e.deliveries,
        'source', e.source
    )
$$;

-- record_event: p = {id, type, created, api_version, livemode, payload, received_at, source}
-- → {"recorded": "fresh"} | {"recorded": "pending"|"done", "status": <stored status>}
create or replace function public.billing_record_event(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_status text;
begin
    -- No WAL flush wait (see billing_functions): the decision's synchronous commit flushes it.
    perform pg_catalog.set_config('synchronous_commit', 'off', true);
    insert into public.billing_events (id, type, created, api_version, livemode, payload, received_at, source)
    values (
        p ->> 'id',
        p ->> 'type',
        (p ->> 'created')::timestamptz,
        p ->> 'api_version',
        coalesce((p ->> 'livemode')::boolean, false),
        p ->> 'payload',
        (p ->> 'received_at')::timestamptz,
        coalesce(p ->> 'source', 'webhook')
    )
    on conflict (id) do nothing;
    if found then
        return jsonb_build_object('recorded', 'fresh');
    end if;
    update public.billing_events
    set deliveries = deliveries + 1
    where id = p ->> 'id'
    returning status into v_status;
    if v_status in ('applied', 'stale', 'ignored') then
        return jsonb_build_object('recorded', 'done', 'status', v_status);
    end if;
    return jsonb_build_object('recorded', 'pending', 'status', v_status);
end
$$;

-- load_cursor: p = {name} → {created, saved_at} | null
create or replace function public.billing_load_cursor(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select jsonb_build_object('created', s.cursor_created, 'saved_at', s.cursor_saved_at)
    from public.billing_sync_state s
    where s.name = p ->> 'name' and s.cursor_created is not null
$$;

-- save_cursor: p = {name, created, saved_at} → true
create or replace function public.billing_save_cursor(p jsonb)
returns jsonb
language sql
volatile
security invoker
set search_path = ''
as $$
    insert into public.billing_sync_state as s (name, cursor_created, cursor_saved_at)
    values (p ->> 'name', (p ->> 'created')::timestamptz, (p ->> 'saved_at')::timestamptz)
    on conflict (name) do update
    set cursor_created = excluded.cursor_created, cursor_saved_at = excluded.cursor_saved_at
    returning to_jsonb(true)
$$;

-- try_lease: p = {name, holder, now, until} → true when `holder` holds the lease until `until`
create or replace function public.billing_try_lease(p jsonb)
returns jsonb
language sql
volatile
security invoker
set search_path = ''
as $$
    with taken as (
        insert into public.billing_sync_state as s (name, holder, leased_until)
        values (p ->> 'name', p ->> 'holder', (p ->> 'until')::timestamptz)
        on conflict (name) do update
        set holder = excluded.holder, leased_until = excluded.leased_until
        where s.holder is null
           or s.holder = excluded.holder
           or s.leased_until is null
           or s.leased_until <= (p ->> 'now')::timestamptz
        returning 1
    )
    select to_jsonb(exists (select 1 from taken))
$$;

-- Only the service role may execute billing's functions and reach its tables.
select public.billing_restrict_functions();
do $$
begin
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
        grant select, insert, update, delete on public.billing_sync_state to service_role;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
        revoke all on public.billing_sync_state from anon;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
        revoke all on public.billing_sync_state from authenticated;
    end if;
end
$$;
