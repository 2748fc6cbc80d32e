-- mindroom-billing: retention keeps customer e-mail job keys for 35 days whatever the retention.
-- Idempotent.
--
-- A done e-mail job's key is the only de-duplication of its e-mail (the e-mail provider's idempotency
-- lasts a day), and Stripe tells a fact again for up to 35 days (a failed invoice's retries, each a
-- new event; events listed for 30 days). billing_prune now deletes a done e-mail job (kind 'email')
-- only when it is also older than `email_jobs_before` (mindroom-billing-core's RetentionPolicy sends
-- the earlier of the retention and 35 days); other done jobs go at `jobs_before` as before.

-- prune: p = {events_before, payloads_before, jobs_before, email_jobs_before, limit, dry_run}
-- → {events, payloads, jobs} (counts as strings; in a dry run, everything that would go)
create or replace function public.billing_prune(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_events_before timestamptz := (p ->> 'events_before')::timestamptz;
    v_payloads_before timestamptz := (p ->> 'payloads_before')::timestamptz;
    v_jobs_before timestamptz := (p ->> 'jobs_before')::timestamptz;
    -- A caller that does not send it still keeps e-mail keys for 35 days.
    v_email_before timestamptz := least(
        v_jobs_before,
        coalesce((p ->> 'email_jobs_before')::timestamptz, now() - interval '35 days')
    );
    v_limit integer := greatest(coalesce((p ->> 'limit')::integer, 1000), 1);
    v_events bigint := 0;
    v_payloads bigint := 0;
    v_jobs bigint := 0;
begin
    if coalesce((p ->> 'dry_run')::boolean, false) then
        select count(*) into v_events
        from public.billing_events e
        where e.status in ('applied', 'stale', 'ignored') and e.received_at < v_events_before;
        select count(*) into v_payloads
        from public.billing_events e
        where e.status in ('applied', 'stale', 'ignored')
          and e.received_at >= v_events_before and e.received_at < v_payloads_before
          and e.payload <> '';
        select count(*) into v_jobs
        from public.billing_jobs j
        where j.state = 'done' and j.created_at < v_jobs_before and j.updated_at < v_jobs_before
              and (j.kind ->> 'kind' is distinct from 'email'
                   or (j.created_at < v_email_before and j.updated_at < v_email_before));
    else
        -- Oldest first, through an index; `id = any(array(…))` looks the chosen rows up by primary key.
        delete from public.billing_events d
        where d.id = any (array(
            select e.id
            from public.billing_events e
            where e.status in ('applied', 'stale', 'ignored') and e.received_at < v_events_before
            order by e.received_at
            limit v_limit
            for update skip locked
        ));
        get diagnostics v_events = row_count;
        update public.billing_events u
        set payload = ''
        where u.id = any (array(
            select e.id
            from public.billing_events e
            where e.status in ('applied', 'stale', 'ignored')
              and e.received_at >= v_events_before and e.received_at < v_payloads_before
              and e.payload <> ''
            order by e.received_at
            limit v_limit
            for update skip locked
        ));
        get diagnostics v_payloads = row_count;
        delete from public.billing_jobs d
        where d.id = any (array(
            select j.id
            from public.billing_jobs j
            where j.state = 'done' and j.created_at < v_jobs_before and j.updated_at < v_jobs_before
              and (j.kind ->> 'kind' is distinct from 'email'
                   or (j.created_at < v_email_before and j.updated_at < v_email_before))
            order by j.created_at
            limit v_limit
            for update skip locked
        ));
        get diagnostics v_jobs = row_count;
    end if;
    return jsonb_build_object('events', v_events::text, 'payloads', v_payloads::text, 'jobs', v_jobs::text);
end
$$;

-- Only the service role may execute billing's functions.
select public.billing_restrict_functions();
