-- mindroom-billing scale fill (scripts/scale.sh fill): rows shaped as the store writes them.
-- psql variables: accounts, events, big_events, done_jobs, due_jobs, tpl (a minified 3.9 KB
-- invoice.paid event), tpl_event, tpl_customer, tpl_subscription, tpl_invoice (ids inside tpl).
-- Deterministic: row i of every table derives from i, so the loads can name accounts that exist.
\set ON_ERROR_STOP on
\timing on
set synchronous_commit = off;
set maintenance_work_mem = '1GB';
set work_mem = '64MB';
set max_parallel_maintenance_workers = 2;

-- A Stripe-style timestamp as the core serializes it ("2026-07-25T17:20:00Z").
create or replace function pg_temp.z(t timestamptz) returns text language sql immutable as
$$ select to_char(t at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') $$;

\echo '== accounts'
insert into public.accounts (id, stripe_customer_id, email, created_at, updated_at, billing_email_observed_at)
select md5('cus_scale_' || i)::uuid, 'cus_scale_' || lpad(i::text, 8, '0'), 'user' || i || '@example.com',
       now() - make_interval(days => 1 + i % 390), now() - make_interval(days => i % 30),
       now() - make_interval(days => i % 30)
from generate_series(1, :accounts) i;

\echo '== subscription aggregates (billing_subscription_state): 85 % active, 5 % past_due in grace, 10 % canceled'
-- Kind by i % 100: < 85 active, < 90 past_due (grace running; 50 of them expired and not yet handled,
-- as between two sweeps), else canceled. Tier: every third professional, the rest starter.
create temp table scale_subs as
select i,
       'sub_scale_' || lpad(i::text, 8, '0') as sub,
       'cus_scale_' || lpad(i::text, 8, '0') as cus,
       md5('cus_scale_' || i)::uuid as acc,
       case when i % 100 < 85 then 'active' when i % 100 < 90 then 'past_due' else 'canceled' end as status,
       case when i % 3 = 0 then 'professional' else 'starter' end as tier,
       case when i % 3 = 0 then 'price_1PgagYB7WZ01zgkWq2Lx9Rz4' else 'price_1PgafmB7WZ01zgkW6dKueIc5' end as price,
       now() - make_interval(days => 1 + i % 390, secs => i % 86400) as started,
       case when i % 100 between 85 and 89 then
           case when i % 100 = 85 and i <= 5000 then now() - interval '1 hour'
                else now() + make_interval(days => i % 7, secs => i % 86400) end
       end as grace_end
from generate_series(1, :accounts) i;

insert into public.billing_subscription_state
    (subscription_id, customer_id, account_id, version, state, grace_ends_at, grace_expiry_handled, terminal, updated_at)
select s.sub, s.cus, s.acc, 3,
       jsonb_build_object(
           'grace', case when s.grace_end is null then null else jsonb_build_object(
               'ends_at', pg_temp.z(s.grace_end), 'started_at', pg_temp.z(s.grace_end - interval '7 days')) end,
           'failures', case when s.grace_end is null then '[]'::jsonb else jsonb_build_array(jsonb_build_object(
               'at', pg_temp.z(s.grace_end - interval '7 days'), 'invoice_id', 'in_scale_' || s.i)) end,
           'snapshot', jsonb_build_object(
               'tier', s.tier, 'status', s.status, 'price_id', s.price, 'trial_end', null,
               'canceled_at', case when s.status = 'canceled' then pg_temp.z(s.started + interval '20 days') end,
               'event_created', pg_temp.z(s.started + interval '1 day'), 'tier_from_price', true,
               'current_period_end', pg_temp.z(now() + make_interval(days => s.i % 30))),
           'account_id', s.acc, 'customer_id', s.cus,
           'last_priced', jsonb_build_object('at', pg_temp.z(s.started), 'tier', s.tier),
           'paid_invoices', '[]'::jsonb, 'last_payment_at', null, 'subscription_id', s.sub,
           'good_standing_at', pg_temp.z(s.started), 'grace_expiry_handled', false),
       s.grace_end, false, s.status = 'canceled', s.started + interval '1 day'
from scale_subs s;

\echo '== public.subscriptions (the rows other services read)'
insert into public.subscriptions
    (id, account_id, stripe_subscription_id, stripe_price_id, tier, status, max_agents, max_messages_per_day,
     entitlement_status, current_period_end, trial_ends_at, cancelled_at, grace_period_ends_at, created_at, updated_at)
select md5(s.sub)::uuid, s.acc, s.sub, s.price, s.tier, s.status,
       case when s.status = 'canceled' then 1 when s.tier = 'professional' then 10 else 3 end,
       case when s.status = 'canceled' then 100 when s.tier = 'professional' then 10000 else 1000 end,
       case s.status when 'active' then 'active' when 'past_due' then 'grace' else 'canceled' end,
       now() + make_interval(days => s.i % 30), null,
       case when s.status = 'canceled' then s.started + interval '20 days' end, s.grace_end,
       s.started, s.started + interval '1 day'
from scale_subs s;

\echo '== usage today (a third of the accounts)'
insert into public.billing_usage (account_id, metric, day, count)
select md5('cus_scale_' || i)::uuid, 'messages', (now() at time zone 'UTC')::date, 1 + i % 50
from generate_series(1, :accounts, 3) i;

\echo '== usage idempotency keys (made today and yesterday, one in ten accounts)'
insert into public.billing_usage_keys (account_id, metric, key, requested_at, count, used)
select md5('cus_scale_' || i)::uuid, 'messages', 'req-' || i || '-' || d, now() - make_interval(days => d), 1, 1
from generate_series(1, :accounts, 10) i cross join generate_series(0, 1) d;

\echo '== events: drop the indexes, load, build them again (as the migrations define them)'
create temp table saved_indexes as
select indexname, indexdef from pg_catalog.pg_indexes where schemaname = 'public' and tablename = 'billing_events';
alter table public.billing_events drop constraint billing_events_pkey;
do $$
declare r record;
begin
    for r in select indexname from saved_indexes where indexname <> 'billing_events_pkey' loop
        execute format('drop index public.%I', r.indexname);
    end loop;
end
$$;

-- Spread over the last 395 days (inside the default 400-day retention), oldest first. Row i: a
-- random-looking Stripe id, mostly applied, 1 ‰ ignored, 0.1 ‰ stale, 1 in 100,000 failed, and 50
-- received 2–10 minutes ago (not yet committed: the unapplied pick-up finds them).
\echo '== events: the older ones, short payloads'
insert into public.billing_events
    (id, type, created, api_version, livemode, status, reason, payload, received_at, processed_at, deliveries, source)
select e.id, e.type, e.at - interval '2 seconds', '2026-07-29.dahlia', false,
       case when i % 100000 = 4242 then 'failed' when i % 10000 = 1234 then 'stale'
            when i % 1000 = 999 then 'ignored' else 'applied' end,
       case when i % 100000 = 4242 then 'unknown price price_scale' end,
       '{"id":"' || e.id || '","object":"event","api_version":"2026-07-29.dahlia","created":'
           || extract(epoch from e.at)::bigint || ',"type":"' || e.type
           || '","data":{"object":{"id":"sub_scale_' || lpad((1 + i % :accounts)::text, 8, '0')
           || '","object":"subscription","customer":"cus_scale_' || lpad((1 + i % :accounts)::text, 8, '0')
           || '","status":"active"}},"livemode":false,"pending_webhooks":1}',
       e.at, e.at + interval '50 milliseconds', 1 + (i % 97 = 0)::int, 'webhook'
from generate_series(1, :events - :big_events) i
cross join lateral (
    select 'evt_' || substr(md5('evt' || i), 1, 24) as id,
           now() - interval '395 days' + (interval '395 days' - interval '10 minutes') * (i::float8 / :events) as at,
           (array['customer.subscription.updated', 'invoice.paid', 'invoice.payment_succeeded',
                  'invoice.created', 'customer.updated', 'invoice.finalized'])[1 + i % 6] as type
) e;

\echo '== events: the newest ones, distinct real-sized payloads (3.9 KB invoice.paid)'
insert into public.billing_events
    (id, type, created, api_version, livemode, status, reason, payload, received_at, processed_at, deliveries, source)
select e.id, 'invoice.paid', e.at - interval '2 seconds', '2026-07-29.dahlia', false,
       case when i % 100000 = 4242 then 'failed' when i % 1000 = 999 then 'ignored'
            when i > :events - 50 then 'received' else 'applied' end,
       case when i % 100000 = 4242 then 'unknown price price_scale' end,
       replace(replace(replace(replace(:'tpl', :'tpl_event', e.id), :'tpl_customer', e.cus),
               :'tpl_subscription', e.sub), :'tpl_invoice', 'in_' || substr(md5('in' || i), 1, 24)),
       e.at, case when i <= :events - 50 then e.at + interval '50 milliseconds' end, 1, 'webhook'
from generate_series(:events - :big_events + 1, :events) i
cross join lateral (
    select 'evt_' || substr(md5('evt' || i), 1, 24) as id,
           'cus_scale_' || lpad((1 + i % :accounts)::text, 8, '0') as cus,
           'sub_scale_' || lpad((1 + i % :accounts)::text, 8, '0') as sub,
           case when i > :events - 50 then now() - interval '10 minutes' + interval '8 minutes' * ((i - :events + 50)::float8 / 50)
                else now() - interval '395 days' + (interval '395 days' - interval '10 minutes') * (i::float8 / :events) end as at
) e;

\echo '== events: indexes'
do $$
declare r record;
begin
    for r in select indexdef from saved_indexes loop
        execute r.indexdef;
    end loop;
end
$$;
alter table public.billing_events add constraint billing_events_pkey primary key using index billing_events_pkey;

\echo '== jobs: done (over 395 days), dead, and due now'
insert into public.billing_jobs (key, grp, kind, state, attempts, run_after, locked_until, last_error, created_at, updated_at)
select 'reconcile:sub_scale_' || lpad((1 + i % :accounts)::text, 8, '0') || ':evt_' || substr(md5('evt' || i), 1, 24),
       'sub_scale_' || lpad((1 + i % :accounts)::text, 8, '0'),
       jsonb_build_object('kind', 'reconcile', 'subscription_id', 'sub_scale_' || lpad((1 + i % :accounts)::text, 8, '0')),
       case when i % 1000 = 0 then 'dead' else 'done' end, 1 + (i % 1000 = 0)::int * 9,
       t.at, null, case when i % 1000 = 0 then 'provisioner refused: 400' end, t.at, t.at + interval '1 second'
from generate_series(1, :done_jobs) i
cross join lateral (select now() - interval '395 days' + interval '395 days' * (i::float8 / :done_jobs) as at) t;
insert into public.billing_jobs (key, grp, kind, state, attempts, run_after, created_at, updated_at)
select 'scale:due:' || i, 'sub_scale_' || lpad((900000 + i)::text, 8, '0'),
       jsonb_build_object('kind', 'reconcile', 'subscription_id', 'sub_scale_' || lpad((900000 + i)::text, 8, '0')),
       'pending', 0, now() - interval '1 second', now() - interval '1 minute', now() - interval '1 minute'
from generate_series(1, :due_jobs) i;

\echo '== vacuum analyze (as autovacuum would: statistics and the visibility map)'
vacuum analyze;
