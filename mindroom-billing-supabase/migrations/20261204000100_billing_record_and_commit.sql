-- The customer a Stripe event concerns: data.object.customer, or data.object.id for a customer
-- object; null when the payload is not JSON (or is JSON jsonb refuses, e.g. \u0000) or names none.
-- Must equal mindroom_billing_core::operator::event_customer.
create or replace function public.billing_event_customer(payload text)
returns text
language plpgsql
immutable
security invoker
set search_path = ''
as $$
declare
    v_object jsonb;
    v_value jsonb;
begin
    v_object := payload::jsonb -> 'data' -> 'object';
    if v_object is null or pg_catalog.jsonb_typeof(v_object) <> 'object' then
        return null;
    end if;
    if v_object ->> 'object' = 'customer' then
        v_value := v_object -> 'id';
    else
        v_value := v_object -> 'customer';
    end if;
    if v_value is null or pg_catalog.jsonb_typeof(v_value) <> 'string' then
        return null;
    end if;
    return v_value #>> '{}';
exception when others then
    return null;
end
$$;

-- The customer each event concerns (see billing_record_and_commit below). Rows recorded before are
-- filled from their payload once: that reads every stored payload, so on a large table run this
-- migration in a quiet hour.
alter table public.billing_events add column if not exists customer_id text;
update public.billing_events set customer_id = public.billing_event_customer(payload)
where customer_id is null and payload <> '';

-- record_and_commit: a new webhook event in one round trip and one write of its row.
--
-- The caller decided on an aggregate it already held (its cache of what it last committed) and
-- sends the event with that decision and the version it expects. Atomically:
--   - a new event is inserted with its outcome as its status (no later update of the row), then the
--     decision is committed as billing_commit does;
--   - a known event is a duplicate when done (its delivery counted, nothing else written), or, when
--     still pending (received / failed), is committed as billing_commit does;
--   - when the aggregate is not at the expected version (0: absent), nothing is committed: the event
--     is kept as `received` and the current aggregate is returned to decide again on.
-- p = record_event's p + {expected: {subscription_id, version} | null, commit: billing_commit's p}
-- Both record functions store the customer an event concerns in billing_events.customer_id (added
-- here; the operator console finds a customer's events by it): `customer_id` from p when the caller
-- parsed the event already (the binary does for the types it reads), else derived from the payload.
-- → {result: committed | duplicate | conflict, subscription?: <state or null> (on conflict)}
-- Unlike billing_record_event this commit waits for the WAL flush: it is the decision.
create or replace function public.billing_record_and_commit(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_id text := p ->> 'id';
    v_commit jsonb := p -> 'commit';
    v_expected jsonb := p -> 'expected';
    v_status text;
    v_version bigint;
    v_new boolean;
    v_result jsonb;
begin
    insert into public.billing_events
        (id, type, created, api_version, livemode, payload, received_at, source, status, reason, processed_at,
         customer_id)
    values (
        v_id,
        p ->> 'type',
        (p ->> 'created')::timestamptz,
        p ->> 'api_version',
        coalesce((p ->> 'livemode')::boolean, false),
        p ->> 'payload',
        (p ->> 'received_at')::timestamptz,
        coalesce(p ->> 'source', 'webhook'),
        v_commit ->> 'outcome',
        v_commit ->> 'reason',
        (v_commit ->> 'now')::timestamptz,
        coalesce(p ->> 'customer_id', public.billing_event_customer(p ->> 'payload'))
    )
    on conflict (id) do nothing;
    v_new := found;
    if not v_new then
        update public.billing_events e
        set deliveries = e.deliveries + 1
        where e.id = v_id
        returning e.status into v_status;
        if v_status in ('applied', 'stale', 'ignored') then
            return jsonb_build_object('result', 'duplicate');
        end if;
    end if;

    -- The decision holds only for the aggregate it was made on (also when it writes none).
    if jsonb_typeof(v_expected) = 'object' then
        select s.version into v_version
        from public.billing_subscription_state s
        where s.subscription_id = v_expected ->> 'subscription_id'
        for update;
        if coalesce(v_version, 0) <> (v_expected ->> 'version')::bigint then
            v_result := jsonb_build_object('result', 'conflict');
        end if;
    end if;
    if v_result is null then
        -- A new event already carries its outcome: billing_commit leaves its row alone.
        v_result := public.billing_commit(case when v_new then v_commit - 'event_id' else v_commit end);
    end if;

    if v_result ->> 'result' = 'conflict' then
        if v_new then
            update public.billing_events e
            set status = 'received', reason = null, processed_at = null
            where e.id = v_id;
        end if;
        return jsonb_build_object(
            'result', 'conflict',
            'subscription', case when jsonb_typeof(v_expected) = 'object' then
                public.billing_load_subscription(jsonb_build_object('id', v_expected ->> 'subscription_id'))
            end
        );
    end if;
    if v_result ->> 'result' = 'already_done' then
        return jsonb_build_object('result', 'duplicate');
    end if;
    return v_result;
end
$$;


-- record_event (unchanged from 20261203000000_billing_stripe_sync but for customer_id):
-- p = {id, type, created, api_version, livemode, payload, received_at, source, customer_id?}
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
    insert into public.billing_events
        (id, type, created, api_version, livemode, payload, received_at, source, customer_id)
    values (
        p ->> 'id',
        p ->> 'type',
        (p ->> 'created')::timestamptz,
        p ->> 'api_version',
        coalesce((p ->> 'livemode')::boolean, false),
        p ->> 'payload',
        (p ->> 'received_at')::timestamptz,
        coalesce(p ->> 'source', 'webhook'),
        coalesce(p ->> 'customer_id', public.billing_event_customer(p ->> 'payload'))
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

select public.billing_restrict_functions();
