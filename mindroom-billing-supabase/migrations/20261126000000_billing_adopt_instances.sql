-- mindroom-billing: cut-over adoption. Idempotent (create or replace; the grants of
-- 20261125000100_billing_functions stay: replacing a function keeps its privileges).
--
-- On a database the original Node service wrote, a subscription billing has no instance record for
-- may already have an app: a public.instances row joined through subscriptions.stripe_subscription_id.
-- load_instance adopts that row (the newest one still up, else the newest) as the instance record, with
-- its dokku_app_name, status and URLs and the row's own id, before the worker decides: billing then
-- resizes or removes that app instead of provisioning a second one next to it. The adopted record has
-- no known limits, so a running desired state sends one PUT /update that states them.

-- load_instance: p = {subscription_id} → instance record (adopted from public.instances if needed) or null
create or replace function public.billing_load_instance(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_sub text := p ->> 'subscription_id';
    v_record jsonb;
begin
    select i.record into v_record from public.billing_instances i where i.subscription_id = v_sub;
    if found then
        return v_record;
    end if;
    insert into public.billing_instances (subscription_id, instance_id, record, updated_at)
    select v_sub, i.id,
           jsonb_build_object(
               'subscription_id', v_sub,
               'app_name', i.dokku_app_name,
               'status', i.status,
               'generation', 1,
               'tier', null,
               'limits', null,
               'subdomain', i.subdomain,
               'frontend_url', i.frontend_url,
               'backend_url', i.backend_url,
               'deprovisioned_at', i.deprovisioned_at,
               'updated_at', coalesce(i.updated_at, i.created_at, pg_catalog.now())
           ),
           coalesce(i.updated_at, i.created_at, pg_catalog.now())
    from public.instances i
    join public.subscriptions s on s.id = i.subscription_id
    where s.stripe_subscription_id = v_sub
      and i.dokku_app_name is not null
      and i.status in ('provisioning', 'running', 'failed', 'deprovisioning', 'deprovisioned')
      and not exists (select 1 from public.billing_instances b where b.instance_id = i.id)
    order by i.status <> 'deprovisioned' desc, i.created_at desc nulls last, i.id
    limit 1
    on conflict (subscription_id) do nothing;
    select i.record into v_record from public.billing_instances i where i.subscription_id = v_sub;
    return v_record;
end
$$;
