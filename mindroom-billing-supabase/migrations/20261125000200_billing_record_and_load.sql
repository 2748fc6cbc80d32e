-- record_and_load: the webhook hot path in one round trip.
-- p = record_event's p + {subscription_id|null}
-- → record_event's answer, plus {"subscription": <state or null>} unless the event is already done.
create or replace function public.billing_record_and_load(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_recorded jsonb;
begin
    v_recorded := public.billing_record_event(p);
    if v_recorded ->> 'recorded' = 'done' or p ->> 'subscription_id' is null then
        return v_recorded;
    end if;
    return v_recorded || jsonb_build_object(
        'subscription',
        public.billing_load_subscription(jsonb_build_object('id', p ->> 'subscription_id'))
    );
end
$$;

do $$
begin
    revoke execute on function public.billing_record_and_load(jsonb) from public;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
        revoke execute on function public.billing_record_and_load(jsonb) from anon;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
        revoke execute on function public.billing_record_and_load(jsonb) from authenticated;
    end if;
    if exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
        grant execute on function public.billing_record_and_load(jsonb) to service_role;
    end if;
end
$$;
