-- mindroom-billing: disputes (chargebacks). Idempotent.
--
-- A dispute is kept in the aggregate of the subscription it is booked on (state -> 'disputes', an
-- array present only once a subscription has had one), so the commit path is unchanged. The
-- operator console and the billing_disputes_open gauge list the subscriptions with an open one.

create index if not exists billing_subscription_state_disputes_idx
    on public.billing_subscription_state (subscription_id)
    where state ? 'disputes';

-- open_disputes: p = {limit} → aggregates with at least one open dispute (not won, lost or closed),
-- earliest evidence deadline of their open disputes first (no deadline last).
create or replace function public.billing_open_disputes(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(x.state order by x.due nulls last, x.subscription_id), '[]'::jsonb)
    from (
        select s.subscription_id, d.due, s.state || jsonb_build_object('version', s.version) as state
        from public.billing_subscription_state s
        cross join lateral (
            select min((e ->> 'evidence_due_by')::timestamptz) as due, count(*) as open
            from jsonb_array_elements(s.state -> 'disputes') e
            where (e ->> 'status') not in ('won', 'lost', 'warning_closed', 'prevented')
        ) d
        where s.state ? 'disputes' and d.open > 0
        order by d.due nulls last, s.subscription_id
        limit (p ->> 'limit')::bigint
    ) x
$$;

select public.billing_restrict_functions();
