-- mindroom-billing: retention (raw payloads, event ids and finished jobs), and two hot-path queries
-- that did not use an index at scale (see the end). Idempotent.
--
-- billing_prune deletes or empties at most `limit` rows of each kind per call, locking only rows
-- no one else holds (`for update skip locked`), so it never waits on the webhook path and several
-- callers never block each other. A pruned payload leaves the row with an empty payload ('') while
-- its id must still answer "duplicate" (a retention shorter than Stripe's 30-day horizon); past
-- both cut-offs the whole row goes. Only done events (applied, stale, ignored) and done jobs are
-- touched: failed and received events, pending, running and dead jobs never are.
--
-- The cut-offs are computed by the caller (mindroom-billing-core's RetentionPolicy). The scans use
-- billing_events_status_received_at_idx (status, received_at) and billing_jobs_state_created_idx
-- (state, created_at).

-- prune: p = {events_before, payloads_before, jobs_before, limit, dry_run}
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
        where j.state = 'done' and j.created_at < v_jobs_before and j.updated_at < v_jobs_before;
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
            order by j.created_at
            limit v_limit
            for update skip locked
        ));
        get diagnostics v_jobs = row_count;
    end if;
    return jsonb_build_object('events', v_events::text, 'payloads', v_payloads::text, 'jobs', v_jobs::text);
end
$$;

-- Scale (scripts/scale.sh, 1 M subscriptions): two hot-path queries that did not use an index.
--
-- expired_grace: with `order by subscription_id limit n` the planner walked the primary key and
-- filtered every row (the deadline is a parameter, so it guessed a third of the rows match). Now the
-- partial grace index finds the expired ones, earliest deadline first, and only those are sorted.
-- expired_grace: p = {now, limit} → ["sub_…", …]
create or replace function public.billing_expired_grace(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    with due as materialized (
        select s.subscription_id from public.billing_subscription_state s
        where s.grace_ends_at <= (p ->> 'now')::timestamptz
          and s.grace_ends_at is not null
          and not s.grace_expiry_handled
          and not s.terminal
        order by s.grace_ends_at, s.subscription_id
        limit (p ->> 'limit')::bigint
    )
    select coalesce(jsonb_agg(due.subscription_id order by due.subscription_id), '[]'::jsonb) from due
$$;

-- subscriptions_for_account: `account_id = x or customer_id in (subquery)` was a sequential scan of
-- every aggregate (an OR with a subplan cannot use the indexes). Now each side uses its index.
-- subscriptions_for_account: p = {account_id} → [state + {version}, …]
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
    where s.subscription_id in (
        select x.subscription_id from public.billing_subscription_state x
        where x.account_id = (p ->> 'account_id')::uuid
        union
        select x.subscription_id
        from public.accounts a
        join public.billing_subscription_state x on x.customer_id = a.stripe_customer_id
        where a.id = (p ->> 'account_id')::uuid and a.stripe_customer_id is not null
    )
$$;

-- Only the service role may execute billing's functions.
select public.billing_restrict_functions();
