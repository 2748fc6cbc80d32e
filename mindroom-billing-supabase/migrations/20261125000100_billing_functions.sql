-- mindroom-billing: the store's SQL functions. Both clients call these (PostgREST: POST
-- /rest/v1/rpc/<name> with body {"p": {...}}; direct Postgres: select public.<name>('{...}'::jsonb)).
--
-- Conventions: one named jsonb argument `p`, a jsonb result; ids and counts travel as JSON strings and
-- timestamps as RFC 3339 strings, so no number goes through a float; unique names (no overloads);
-- security invoker with an empty search_path and schema-qualified names; every multi-row write is
-- one function, hence one transaction. Idempotent (create or replace).

-- Row → JSON helpers (not RPC entry points).
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
        'deliveries', e.deliveries
    )
$$;

create or replace function public.billing_job_json(j public.billing_jobs)
returns jsonb
language sql
immutable
security invoker
set search_path = ''
as $$
    select jsonb_build_object(
        'id', j.id,
        'key', j.key,
        'group', j.grp,
        'kind', j.kind,
        'state', j.state,
        'attempts', j.attempts,
        'run_after', j.run_after,
        'locked_until', j.locked_until,
        'last_error', j.last_error,
        'created_at', j.created_at,
        'updated_at', j.updated_at
    )
$$;

-- Inserts jobs in array order, skipping keys that exist (also duplicates within the array).
create or replace function public.billing_insert_jobs(p_jobs jsonb, p_created_at timestamptz)
returns void
language sql
volatile
security invoker
set search_path = ''
as $$
    insert into public.billing_jobs (key, grp, kind, run_after, created_at, updated_at)
    select t.j ->> 'key', t.j ->> 'group', t.j -> 'kind', (t.j ->> 'run_after')::timestamptz,
           p_created_at, p_created_at
    from jsonb_array_elements(case when jsonb_typeof(p_jobs) = 'array' then p_jobs else '[]'::jsonb end)
         with ordinality as t (j, ord)
    order by t.ord
    on conflict (key) do nothing
$$;

-- record_event: p = {id, type, created, api_version, livemode, payload, received_at}
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
    -- No WAL flush wait for this transaction (transaction-local, pooler-safe). Safe because the
    -- webhook only answers 200 after the decision's commit, which is synchronous and flushes the WAL
    -- in order, this record included; a record lost in a crash before that is redelivered by Stripe.
    perform pg_catalog.set_config('synchronous_commit', 'off', true);
    insert into public.billing_events (id, type, created, api_version, livemode, payload, received_at)
    values (
        p ->> 'id',
        p ->> 'type',
        (p ->> 'created')::timestamptz,
        p ->> 'api_version',
        coalesce((p ->> 'livemode')::boolean, false),
        p ->> 'payload',
        (p ->> 'received_at')::timestamptz
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

-- load_event: p = {id} → event object or null
create or replace function public.billing_load_event(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select public.billing_event_json(e) from public.billing_events e where e.id = p ->> 'id'
$$;

-- list_events: p = {status|null, limit} → array, newest first
create or replace function public.billing_list_events(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(public.billing_event_json(x) order by x.received_at desc), '[]'::jsonb)
    from (
        select e.* from public.billing_events e
        where p ->> 'status' is null or e.status = p ->> 'status'
        order by e.received_at desc
        limit (p ->> 'limit')::bigint
    ) x
$$;

-- unapplied_events: p = {before, limit} → array, oldest first
create or replace function public.billing_unapplied_events(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(public.billing_event_json(x) order by x.received_at), '[]'::jsonb)
    from (
        select e.* from public.billing_events e
        where e.status = 'received' and e.received_at < (p ->> 'before')::timestamptz
        order by e.received_at
        limit (p ->> 'limit')::bigint
    ) x
$$;

-- load_subscription: p = {id} → aggregate (with "version") or null
create or replace function public.billing_load_subscription(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select s.state || jsonb_build_object('version', s.version)
    from public.billing_subscription_state s
    where s.subscription_id = p ->> 'id'
$$;

-- commit: p = {now, event_id|null, outcome, reason|null,
--              subscription: {id, customer_id, account_id, expected_version, state, grace_ends_at,
--                             grace_expiry_handled, terminal,
--                             public: {stripe_price_id, tier, status, max_agents, max_messages_per_day,
--                                      current_period_end, trial_ends_at, cancelled_at,
--                                      grace_period_ends_at}} | null,
--              account: {account_id, stripe_customer_id, email|null, reference|null} | null,
--              jobs: [{key, group, kind, run_after}]}
-- → {"result": "committed" | "already_done" | "conflict"}; on "conflict" nothing was written.
create or replace function public.billing_commit(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_now timestamptz := (p ->> 'now')::timestamptz;
    v_event_id text := p ->> 'event_id';
    v_event_status text;
    v_sub jsonb := p -> 'subscription';
    v_pub jsonb;
    v_acc jsonb := p -> 'account';
    v_expected bigint;
    v_rows bigint;
    v_account_id uuid;
begin
    if v_event_id is not null then
        -- Serializes commits of one event across replicas.
        select e.status into v_event_status from public.billing_events e where e.id = v_event_id for update;
        if v_event_status in ('applied', 'stale', 'ignored') then
            return jsonb_build_object('result', 'already_done');
        end if;
    end if;

    if jsonb_typeof(v_sub) = 'object' then
        -- Compare-and-swap first, so that a lost race has written nothing.
        v_expected := (v_sub ->> 'expected_version')::bigint;
        if v_expected = 0 then
            insert into public.billing_subscription_state
                (subscription_id, customer_id, account_id, version, state, grace_ends_at,
                 grace_expiry_handled, terminal, updated_at)
            values (
                v_sub ->> 'id', v_sub ->> 'customer_id', (v_sub ->> 'account_id')::uuid, 1, v_sub -> 'state',
                (v_sub ->> 'grace_ends_at')::timestamptz, (v_sub ->> 'grace_expiry_handled')::boolean,
                (v_sub ->> 'terminal')::boolean, v_now
            )
            on conflict (subscription_id) do nothing;
        else
            update public.billing_subscription_state s
            set version = s.version + 1,
                customer_id = v_sub ->> 'customer_id',
                account_id = (v_sub ->> 'account_id')::uuid,
                state = v_sub -> 'state',
                grace_ends_at = (v_sub ->> 'grace_ends_at')::timestamptz,
                grace_expiry_handled = (v_sub ->> 'grace_expiry_handled')::boolean,
                terminal = (v_sub ->> 'terminal')::boolean,
                updated_at = v_now
            where s.subscription_id = v_sub ->> 'id' and s.version = v_expected;
        end if;
        get diagnostics v_rows = row_count;
        if v_rows = 0 then
            return jsonb_build_object('result', 'conflict');
        end if;
        insert into public.accounts (id, stripe_customer_id)
        values ((v_sub ->> 'account_id')::uuid, v_sub ->> 'customer_id')
        on conflict do nothing;
    end if;

    if jsonb_typeof(v_acc) = 'object' then
        insert into public.accounts as a (id, stripe_customer_id, email, client_reference_id)
        values ((v_acc ->> 'account_id')::uuid, v_acc ->> 'stripe_customer_id', v_acc ->> 'email',
                v_acc ->> 'reference')
        on conflict (stripe_customer_id) do update
        set email = coalesce(excluded.email, a.email),
            client_reference_id = coalesce(excluded.client_reference_id, a.client_reference_id),
            updated_at = v_now;
    end if;

    if jsonb_typeof(v_sub) = 'object' then
        -- The public row other services read, kept in step in the same transaction.
        v_pub := v_sub -> 'public';
        select a.id into v_account_id from public.accounts a where a.stripe_customer_id = v_sub ->> 'customer_id';
        insert into public.subscriptions as s
            (account_id, stripe_subscription_id, stripe_price_id, tier, status, max_agents,
             max_messages_per_day, current_period_end, trial_ends_at, cancelled_at, grace_period_ends_at,
             created_at, updated_at)
        values (
            v_account_id, v_sub ->> 'id', v_pub ->> 'stripe_price_id', v_pub ->> 'tier', v_pub ->> 'status',
            (v_pub ->> 'max_agents')::integer, (v_pub ->> 'max_messages_per_day')::integer,
            (v_pub ->> 'current_period_end')::timestamptz, (v_pub ->> 'trial_ends_at')::timestamptz,
            (v_pub ->> 'cancelled_at')::timestamptz, (v_pub ->> 'grace_period_ends_at')::timestamptz,
            v_now, v_now
        )
        on conflict (stripe_subscription_id) do update
        set account_id = excluded.account_id,
            stripe_price_id = excluded.stripe_price_id,
            tier = excluded.tier,
            status = excluded.status,
            max_agents = excluded.max_agents,
            max_messages_per_day = excluded.max_messages_per_day,
            current_period_end = excluded.current_period_end,
            trial_ends_at = excluded.trial_ends_at,
            cancelled_at = excluded.cancelled_at,
            grace_period_ends_at = excluded.grace_period_ends_at,
            updated_at = excluded.updated_at;
    end if;

    perform public.billing_insert_jobs(p -> 'jobs', v_now);

    if v_event_id is not null then
        update public.billing_events e
        set status = p ->> 'outcome', reason = p ->> 'reason', processed_at = v_now
        where e.id = v_event_id;
    end if;
    return jsonb_build_object('result', 'committed');
end
$$;

-- expired_grace: p = {now, limit} → array of subscription ids
create or replace function public.billing_expired_grace(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(x.subscription_id order by x.subscription_id), '[]'::jsonb)
    from (
        select s.subscription_id from public.billing_subscription_state s
        where s.grace_ends_at <= (p ->> 'now')::timestamptz
          and not s.grace_expiry_handled
          and not s.terminal
        order by s.subscription_id
        limit (p ->> 'limit')::bigint
    ) x
$$;

-- subscriptions_for_account: p = {account_id} → array of aggregates
create or replace function public.billing_subscriptions_for_account(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(s.state || jsonb_build_object('version', s.version) order by s.subscription_id),
                    '[]'::jsonb)
    from public.billing_subscription_state s
    where s.account_id = (p ->> 'account_id')::uuid
       or s.customer_id in (
           select a.stripe_customer_id from public.accounts a
           where a.id = (p ->> 'account_id')::uuid and a.stripe_customer_id is not null
       )
$$;

-- load_account: p = {stripe_customer_id} → account or null
create or replace function public.billing_load_account(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select jsonb_build_object('id', a.id, 'stripe_customer_id', a.stripe_customer_id, 'email', a.email,
                              'reference', a.client_reference_id)
    from public.accounts a
    where a.stripe_customer_id = p ->> 'stripe_customer_id'
$$;

-- load_instance: p = {subscription_id} → instance record or null
create or replace function public.billing_load_instance(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select i.record from public.billing_instances i where i.subscription_id = p ->> 'subscription_id'
$$;

-- enqueue: p = {now, jobs: [...]} → true
create or replace function public.billing_enqueue(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    perform public.billing_insert_jobs(p -> 'jobs', (p ->> 'now')::timestamptz);
    return 'true'::jsonb;
end
$$;

-- claim_jobs: p = {now, lease_us, limit} → array of claimed jobs.
-- Due = pending with run_after <= now, or running with an expired lease; only the first unfinished
-- job of a group is eligible. FOR UPDATE SKIP LOCKED: concurrent claimers never wait on, nor take,
-- each other's rows; a row claimed and committed meanwhile fails the re-check (its lease holds).
create or replace function public.billing_claim_jobs(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_now timestamptz := (p ->> 'now')::timestamptz;
    v_lease interval := (p ->> 'lease_us')::bigint * interval '1 microsecond';
    v_result jsonb;
begin
    with candidates as (
        select j.id
        from public.billing_jobs j
        where j.state in ('pending', 'running')
          and case when j.state = 'pending' then j.run_after <= v_now
                   else j.locked_until is null or j.locked_until <= v_now end
          and (j.grp is null or not exists (
                select 1 from public.billing_jobs e
                where e.grp = j.grp and e.state in ('pending', 'running') and e.id < j.id))
        order by j.id
        limit (p ->> 'limit')::bigint
        for update skip locked
    ),
    claimed as (
        update public.billing_jobs j
        set state = 'running',
            attempts = j.attempts + 1,
            locked_until = v_now + v_lease,
            updated_at = v_now
        from candidates c
        where j.id = c.id
        returning j.*
    )
    select coalesce(jsonb_agg(public.billing_job_json(claimed) order by claimed.id), '[]'::jsonb)
    into v_result
    from claimed;
    return v_result;
end
$$;

-- finish_job: p = {job_id, attempt, now,
--                  resolution: {kind: "done"|"retry"|"dead", run_after?, error?},
--                  instance: {subscription_id, record,
--                             public: {dokku_app_name, subdomain, status, frontend_url, backend_url,
--                                      memory_limit_mb, cpu_limit, deprovisioned_at}} | null,
--                  enqueue: [...]}
-- → true, or false (nothing written) when the job is no longer running at `attempt`.
create or replace function public.billing_finish_job(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_now timestamptz := (p ->> 'now')::timestamptz;
    v_res jsonb := p -> 'resolution';
    v_kind text := p -> 'resolution' ->> 'kind';
    v_inst jsonb := p -> 'instance';
    v_pub jsonb;
    v_instance_id uuid;
    v_subscription uuid;
begin
    update public.billing_jobs j
    set state = case v_kind when 'done' then 'done' when 'retry' then 'pending' else 'dead' end,
        run_after = case when v_kind = 'retry' then (v_res ->> 'run_after')::timestamptz else j.run_after end,
        last_error = case when v_kind in ('retry', 'dead') then v_res ->> 'error' else j.last_error end,
        locked_until = null,
        updated_at = v_now
    where j.id = (p ->> 'job_id')::bigint
      and j.state = 'running'
      and j.attempts = (p ->> 'attempt')::integer;
    if not found then
        return 'false'::jsonb;
    end if;

    if jsonb_typeof(v_inst) = 'object' then
        insert into public.billing_instances as i (subscription_id, record, updated_at)
        values (v_inst ->> 'subscription_id', v_inst -> 'record', v_now)
        on conflict (subscription_id) do update
        set record = excluded.record, updated_at = excluded.updated_at
        returning i.instance_id into v_instance_id;

        v_pub := v_inst -> 'public';
        select s.id into v_subscription
        from public.subscriptions s
        where s.stripe_subscription_id = v_inst ->> 'subscription_id';
        insert into public.instances as i
            (id, subscription_id, dokku_app_name, subdomain, status, frontend_url, backend_url,
             memory_limit_mb, cpu_limit, deprovisioned_at, created_at, updated_at)
        values (
            v_instance_id, v_subscription, v_pub ->> 'dokku_app_name', v_pub ->> 'subdomain',
            v_pub ->> 'status', v_pub ->> 'frontend_url', v_pub ->> 'backend_url',
            (v_pub ->> 'memory_limit_mb')::integer, (v_pub ->> 'cpu_limit')::numeric,
            (v_pub ->> 'deprovisioned_at')::timestamptz, v_now, v_now
        )
        on conflict (id) do update
        set subscription_id = coalesce(excluded.subscription_id, i.subscription_id),
            dokku_app_name = excluded.dokku_app_name,
            subdomain = excluded.subdomain,
            status = excluded.status,
            frontend_url = excluded.frontend_url,
            backend_url = excluded.backend_url,
            memory_limit_mb = excluded.memory_limit_mb,
            cpu_limit = excluded.cpu_limit,
            deprovisioned_at = excluded.deprovisioned_at,
            updated_at = excluded.updated_at;
    end if;

    perform public.billing_insert_jobs(p -> 'enqueue', v_now);
    return 'true'::jsonb;
end
$$;

-- list_jobs: p = {state|null, limit} → array, newest first
create or replace function public.billing_list_jobs(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(public.billing_job_json(x) order by x.created_at desc, x.id desc), '[]'::jsonb)
    from (
        select j.* from public.billing_jobs j
        where p ->> 'state' is null or j.state = p ->> 'state'
        order by j.created_at desc, j.id desc
        limit (p ->> 'limit')::bigint
    ) x
$$;

-- job_counts: p = {} → {pending, running, dead, done} (as strings)
create or replace function public.billing_job_counts(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select jsonb_build_object(
        'pending', count(*) filter (where j.state = 'pending')::text,
        'running', count(*) filter (where j.state = 'running')::text,
        'dead', count(*) filter (where j.state = 'dead')::text,
        'done', count(*) filter (where j.state = 'done')::text
    )
    from public.billing_jobs j
$$;

-- consume_usage: p = {account_id, metric, day, count, limit (-1 = unlimited)} → {allowed, used}
-- One conditional upsert: concurrent callers serialize on the counter row.
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
    v_used bigint;
begin
    if v_limit < 0 or v_count <= v_limit then
        insert into public.billing_usage as u (account_id, metric, day, count)
        values (v_account, v_metric, v_day, v_count)
        on conflict (account_id, metric, day) do update
        set count = u.count + excluded.count
        where v_limit < 0 or u.count + excluded.count <= v_limit
        returning u.count into v_used;
        if found then
            return jsonb_build_object('allowed', true, 'used', v_used::text);
        end if;
    end if;
    select u.count into v_used
    from public.billing_usage u
    where u.account_id = v_account and u.metric = v_metric and u.day = v_day;
    return jsonb_build_object('allowed', false, 'used', coalesce(v_used, 0)::text);
end
$$;

-- usage: p = {account_id, metric, day} → count (as a string)
create or replace function public.billing_usage(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select to_jsonb(coalesce((
        select u.count from public.billing_usage u
        where u.account_id = (p ->> 'account_id')::uuid and u.metric = p ->> 'metric'
          and u.day = (p ->> 'day')::date
    ), 0)::text)
$$;

-- ping: p = {} → true
create or replace function public.billing_ping(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select 'true'::jsonb
$$;

-- Privileges: EXECUTE only for service_role; table rights for service_role. The Supabase roles may
-- be missing on a plain PostgreSQL, hence the guards.
do $$
declare
    r record;
begin
    for r in
        select f.oid::regprocedure as sig
        from pg_catalog.pg_proc f
        join pg_catalog.pg_namespace n on n.oid = f.pronamespace
        where n.nspname = 'public' and f.proname like 'billing\_%'
    loop
        execute format('revoke execute on function %s from public', r.sig);
        if exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
            execute format('revoke execute on function %s from anon', r.sig);
        end if;
        if exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
            execute format('revoke execute on function %s from authenticated', r.sig);
        end if;
        if exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
            execute format('grant execute on function %s to service_role', r.sig);
        end if;
    end loop;

    if exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
        grant usage on schema public to service_role;
        grant select, insert, update, delete on
            public.accounts, public.subscriptions, public.instances, public.billing_events,
            public.billing_subscription_state, public.billing_instances, public.billing_jobs,
            public.billing_usage
            to service_role;
        grant usage, select on sequence public.billing_jobs_id_seq to service_role;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
        revoke all on public.billing_events, public.billing_subscription_state, public.billing_instances,
            public.billing_jobs, public.billing_usage from anon;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
        revoke all on public.billing_events, public.billing_subscription_state, public.billing_instances,
            public.billing_jobs, public.billing_usage from authenticated;
    end if;
end
$$;
