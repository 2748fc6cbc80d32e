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
        (id, type, created, api_version, livemode, payload, received_at, source, status, reason, processed_at)
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
        (v_commit ->> 'now')::timestamptz
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

select public.billing_restrict_functions();
