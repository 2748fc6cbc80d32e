-- mindroom-billing: decisions at the edges (issue 10). Idempotent.
--
-- * accounts.billing_email_observed_at: the account's e-mail is the one of the newest fact by the
--   event's `created`, not of the event processed last (billing_commit, as in
--   billing_entitlement_status otherwise).
-- * billing_finish_job: a `skipped` resolution (an e-mail whose content no longer holds) is stored as
--   `done` with `skipped: <reason>` as its last error.
-- * billing_extend_lease: the worker renews a job's lease while a slow provisioner call is in flight.

alter table public.accounts add column if not exists billing_email_observed_at timestamptz;

-- extend_lease: p = {job_id, attempt, locked_until} → true when the job is still running at that attempt
create or replace function public.billing_extend_lease(p jsonb)
returns jsonb
language sql
volatile
security invoker
set search_path = ''
as $$
    with renewed as (
        update public.billing_jobs j
        set locked_until = (p ->> 'locked_until')::timestamptz
        where j.id = (p ->> 'job_id')::bigint
          and j.state = 'running'
          and j.attempts = (p ->> 'attempt')::integer
        returning 1
    )
    select to_jsonb(exists (select 1 from renewed));
$$;

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
        -- The e-mail of the newest fact (by the event's `created`) wins, whatever the processing order.
        insert into public.accounts as a
            (id, stripe_customer_id, email, client_reference_id, billing_email_observed_at)
        values ((v_acc ->> 'account_id')::uuid, v_acc ->> 'stripe_customer_id', v_acc ->> 'email',
                v_acc ->> 'reference',
                case when v_acc ->> 'email' is not null then (v_acc ->> 'observed_at')::timestamptz end)
        on conflict (stripe_customer_id) do update
        set email = case
                when excluded.email is not null
                     and (a.billing_email_observed_at is null
                          or excluded.billing_email_observed_at >= a.billing_email_observed_at)
                then excluded.email
                else a.email
            end,
            billing_email_observed_at = case
                when excluded.email is not null
                     and (a.billing_email_observed_at is null
                          or excluded.billing_email_observed_at >= a.billing_email_observed_at)
                then excluded.billing_email_observed_at
                else a.billing_email_observed_at
            end,
            client_reference_id = coalesce(excluded.client_reference_id, a.client_reference_id),
            updated_at = v_now;
    end if;

    if jsonb_typeof(v_sub) = 'object' then
        -- The public row other services read, kept in step in the same transaction.
        v_pub := v_sub -> 'public';
        select a.id into v_account_id from public.accounts a where a.stripe_customer_id = v_sub ->> 'customer_id';
        insert into public.subscriptions as s
            (account_id, stripe_subscription_id, stripe_price_id, tier, status, max_agents,
             max_messages_per_day, entitlement_status, current_period_end, trial_ends_at, cancelled_at,
             grace_period_ends_at, created_at, updated_at)
        values (
            v_account_id, v_sub ->> 'id', v_pub ->> 'stripe_price_id', v_pub ->> 'tier', v_pub ->> 'status',
            (v_pub ->> 'max_agents')::integer, (v_pub ->> 'max_messages_per_day')::integer,
            v_pub ->> 'entitlement_status',
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
            entitlement_status = excluded.entitlement_status,
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
    set state = case v_kind when 'done' then 'done' when 'skipped' then 'done' when 'retry' then 'pending'
                    else 'dead' end,
        run_after = case when v_kind = 'retry' then (v_res ->> 'run_after')::timestamptz else j.run_after end,
        last_error = case when v_kind in ('retry', 'dead', 'skipped') then v_res ->> 'error' else j.last_error end,
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

-- Restricts every billing_* function to the service role (a new function is executable by PUBLIC
-- by default; `create or replace` keeps the grants of an existing one). Later migrations call it
-- after creating functions.
create or replace function public.billing_restrict_functions()
returns void
language plpgsql
volatile
security invoker
set search_path = ''
as $$
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
end
$$;

select public.billing_restrict_functions();
