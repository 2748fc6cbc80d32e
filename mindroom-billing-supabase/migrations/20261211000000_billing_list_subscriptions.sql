-- mindroom-billing: every subscription aggregate, a page at a time (OperatorStore::list_subscriptions;
-- `mindroom-billing cutover compare` reads billing's side with it). Additive: one function.
--
-- Ordered by the subscription id in byte order (collation "C"), whatever the database's collation,
-- so a page that starts after the last id of the previous one never skips or repeats an aggregate.

-- list_subscriptions: p = {after|null, limit} → aggregates by subscription id
create or replace function public.billing_list_subscriptions(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(x.state order by x.subscription_id collate "C"), '[]'::jsonb)
    from (
        select s.subscription_id, s.state || jsonb_build_object('version', s.version) as state
        from public.billing_subscription_state s
        where p ->> 'after' is null or s.subscription_id collate "C" > (p ->> 'after') collate "C"
        order by s.subscription_id collate "C"
        limit (p ->> 'limit')::bigint
    ) x
$$;

select public.billing_restrict_functions();
