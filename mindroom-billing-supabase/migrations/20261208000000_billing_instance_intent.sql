-- mindroom-billing: the instance intent, and adoption without writes on read. Idempotent.
--
-- * billing_record_instance_intent: a reconcile job records the instance it is about to act on
--   (status provisioning / deprovisioning, app name, the limits the app has if it exists) before its
--   provisioner call, fenced by the job's lease and attempt like billing_finish_job. A later attempt
--   or job converges from "the app may exist" when the call's outcome was never learnt.
-- * billing_load_instance (and billing_instance_by_app) is a read again: a Node service's public.instances row that billing has no
--   record for is answered as an adopted record ('adopted': true) without being written. The adoption
--   is persisted by the first write of the instance (billing_store_instance, used by the intent and
--   by billing_finish_job), which keeps the Node row's id, so billing's record is that same row.

-- adoptable_instance: the Node service's instances row of a subscription billing has not adopted yet
-- (the newest one still up, else the newest), as billing's instance record.
create or replace function public.billing_adoptable_instance(p_sub text)
returns table (instance_id uuid, record jsonb)
language sql
stable
security invoker
set search_path = ''
as $$
    select i.id,
           jsonb_build_object(
               'subscription_id', p_sub,
               'app_name', i.dokku_app_name,
               'status', i.status,
               'generation', 1,
               'tier', null,
               'limits', null,
               'subdomain', i.subdomain,
               'frontend_url', i.frontend_url,
               'backend_url', i.backend_url,
               'deprovisioned_at', i.deprovisioned_at,
               'updated_at', coalesce(i.updated_at, i.created_at, pg_catalog.now()),
               'adopted', true
           )
    from public.instances i
    join public.subscriptions s on s.id = i.subscription_id
    where s.stripe_subscription_id = p_sub
      and i.dokku_app_name is not null
      and i.status in ('provisioning', 'running', 'failed', 'deprovisioning', 'deprovisioned')
      and not exists (select 1 from public.billing_instances b where b.instance_id = i.id)
    order by i.status <> 'deprovisioned' desc, i.created_at desc nulls last, i.id
    limit 1
$$;

-- load_instance: p = {subscription_id} → billing's instance record, else the adoptable one, or null
create or replace function public.billing_load_instance(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(
        (select i.record from public.billing_instances i where i.subscription_id = p ->> 'subscription_id'),
        (select a.record from public.billing_adoptable_instance(p ->> 'subscription_id') a)
    )
$$;

-- instance_by_app: p = {app_name} → billing's instance record of that app, else the adoptable record of
-- the Node service's row of that app (read, not written), or null
create or replace function public.billing_instance_by_app(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(
        (select i.record from public.billing_instances i where i.record ->> 'app_name' = p ->> 'app_name' limit 1),
        (select a.record
         from public.instances i
         join public.subscriptions s on s.id = i.subscription_id
         cross join lateral public.billing_adoptable_instance(s.stripe_subscription_id) a
         where i.dokku_app_name = p ->> 'app_name' and a.instance_id = i.id
         limit 1)
    )
$$;

-- store_instance: writes billing's record of an instance ({subscription_id, record, public}) and
-- projects it into public.instances; a first write adopts the Node service's row (same id).
create or replace function public.billing_store_instance(p_inst jsonb, p_now timestamptz)
returns void
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_sub text := p_inst ->> 'subscription_id';
    v_pub jsonb := p_inst -> 'public';
    v_instance_id uuid;
    v_subscription uuid;
begin
    insert into public.billing_instances as i (subscription_id, instance_id, record, updated_at)
    values (
        v_sub,
        coalesce((select a.instance_id from public.billing_adoptable_instance(v_sub) a), pg_catalog.gen_random_uuid()),
        p_inst -> 'record',
        p_now
    )
    on conflict (subscription_id) do update
    set record = excluded.record, updated_at = excluded.updated_at
    returning i.instance_id into v_instance_id;

    select s.id into v_subscription from public.subscriptions s where s.stripe_subscription_id = v_sub;
    insert into public.instances as i
        (id, subscription_id, dokku_app_name, subdomain, status, frontend_url, backend_url,
         memory_limit_mb, cpu_limit, deprovisioned_at, created_at, updated_at)
    values (
        v_instance_id, v_subscription, v_pub ->> 'dokku_app_name', v_pub ->> 'subdomain',
        v_pub ->> 'status', v_pub ->> 'frontend_url', v_pub ->> 'backend_url',
        (v_pub ->> 'memory_limit_mb')::integer, (v_pub ->> 'cpu_limit')::numeric,
        (v_pub ->> 'deprovisioned_at')::timestamptz, p_now, p_now
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
end
$$;

-- record_instance_intent: p = {job_id, attempt, now, instance} → true when the job is still running at
-- that attempt (the instance is then stored), false (nothing written) otherwise
create or replace function public.billing_record_instance_intent(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    -- The row lock orders the intent with a concurrent claim or finish of the job.
    perform 1
    from public.billing_jobs j
    where j.id = (p ->> 'job_id')::bigint
      and j.state = 'running'
      and j.attempts = (p ->> 'attempt')::integer
    for update;
    if not found then
        return 'false'::jsonb;
    end if;
    perform public.billing_store_instance(p -> 'instance', (p ->> 'now')::timestamptz);
    return 'true'::jsonb;
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
    if jsonb_typeof(p -> 'instance') = 'object' then
        perform public.billing_store_instance(p -> 'instance', v_now);
    end if;
    perform public.billing_insert_jobs(p -> 'enqueue', v_now);
    return 'true'::jsonb;
end
$$;

select public.billing_restrict_functions();
