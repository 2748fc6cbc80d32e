-- One pass of the hot-path calls (included by explain.sql; :ex is empty or an EXPLAIN prefix).
\echo '#### new event: record_and_commit (the webhook path: insert with its outcome, version check, compare-and-swap, public row, one job)'
begin;
:ex select public.billing_record_and_commit(jsonb_build_object(
    'id', 'evt_scale_rc_' || :pass, 'type', 'customer.subscription.updated', 'created', now(),
    'api_version', '2026-07-29.dahlia', 'livemode', false,
    'payload', jsonb_build_object('id', 'evt_scale_rc_' || :pass, 'object', 'event', 'data', jsonb_build_object(
        'object', jsonb_build_object('id', s.subscription_id, 'object', 'subscription', 'customer', s.customer_id,
        'padding', repeat('x', 3700))))::text,
    'received_at', now(), 'source', 'webhook',
    'expected', jsonb_build_object('subscription_id', s.subscription_id, 'version', s.version::text),
    'commit', jsonb_build_object(
    'now', now(), 'event_id', 'evt_scale_rc_' || :pass, 'outcome', 'applied', 'reason', null,
    'subscription', jsonb_build_object(
        'id', s.subscription_id, 'customer_id', s.customer_id, 'account_id', s.account_id,
        'expected_version', s.version::text, 'state', s.state, 'grace_ends_at', null,
        'grace_expiry_handled', false, 'terminal', false,
        'public', jsonb_build_object(
            'stripe_price_id', s.state #>> '{snapshot,price_id}', 'tier', s.state #>> '{snapshot,tier}',
            'status', 'active', 'max_agents', 3, 'max_messages_per_day', 1000, 'entitlement_status', 'active',
            'current_period_end', now() + interval '30 days', 'trial_ends_at', null, 'cancelled_at', null,
            'grace_period_ends_at', null)),
    'account', null,
    'jobs', jsonb_build_array(jsonb_build_object(
        'key', 'reconcile:' || s.subscription_id || ':evt_scale_rc_' || :pass, 'group', s.subscription_id,
        'kind', jsonb_build_object('kind', 'reconcile', 'subscription_id', s.subscription_id),
        'run_after', now())))))
from public.billing_subscription_state s where s.subscription_id = :'sub';
rollback;
\echo '#### record_and_load (a new event of an existing subscription)'
begin;
:ex select public.billing_record_and_load(jsonb_build_object(
    'id', 'evt_scale_explain_' || :pass, 'type', 'customer.subscription.updated', 'created', now(),
    'api_version', '2026-07-29.dahlia', 'livemode', false, 'payload', repeat('x', 3900), 'received_at', now(),
    'source', 'webhook', 'subscription_id', :'sub')) is not null as recorded;
\echo '#### commit (its decision: aggregate compare-and-swap, public row, one job, event status)'
:ex select public.billing_commit(jsonb_build_object(
    'now', now(), 'event_id', 'evt_scale_explain_' || :pass, 'outcome', 'applied', 'reason', null,
    'subscription', jsonb_build_object(
        'id', s.subscription_id, 'customer_id', s.customer_id, 'account_id', s.account_id,
        'expected_version', s.version::text, 'state', s.state, 'grace_ends_at', null,
        'grace_expiry_handled', false, 'terminal', false,
        'public', jsonb_build_object(
            'stripe_price_id', s.state #>> '{snapshot,price_id}', 'tier', s.state #>> '{snapshot,tier}',
            'status', 'active', 'max_agents', 3, 'max_messages_per_day', 1000, 'entitlement_status', 'active',
            'current_period_end', now() + interval '30 days', 'trial_ends_at', null, 'cancelled_at', null,
            'grace_period_ends_at', null)),
    'account', null,
    'jobs', jsonb_build_array(jsonb_build_object(
        'key', 'reconcile:' || s.subscription_id || ':evt_scale_explain_' || :pass, 'group', s.subscription_id,
        'kind', jsonb_build_object('kind', 'reconcile', 'subscription_id', s.subscription_id),
        'run_after', now()))))
from public.billing_subscription_state s where s.subscription_id = :'sub';
\echo '#### duplicate delivery (record_and_load of a done event)'
:ex select public.billing_record_and_load(jsonb_build_object(
    'id', 'evt_scale_explain_' || :pass, 'type', 'customer.subscription.updated', 'created', now(),
    'api_version', '2026-07-29.dahlia', 'livemode', false, 'payload', '{}', 'received_at', now(),
    'source', 'webhook', 'subscription_id', :'sub'));
rollback;

begin;
\echo '#### job claim (billing_claim_jobs, one job, as each worker asks)'
:ex select jsonb_array_length(public.billing_claim_jobs(jsonb_build_object(
    'now', now(), 'lease_us', '120000000', 'limit', '1'))) as claimed;
rollback;

\echo '#### grace sweep (billing_expired_grace, limit 100)'
:ex select jsonb_array_length(public.billing_expired_grace(jsonb_build_object('now', now(), 'limit', '100'))) as expired;

\echo '#### unapplied pick-up (billing_unapplied_events, limit 100)'
:ex select jsonb_array_length(public.billing_unapplied_events(jsonb_build_object(
    'before', now() - interval '60 seconds', 'limit', '100'))) as unapplied;

\echo '#### entitlement read: subscriptions of the account'
:ex select jsonb_array_length(public.billing_subscriptions_for_account(jsonb_build_object('account_id', :'acc'))) as subscriptions;
\echo '#### entitlement read: usage today (messages)'
:ex select public.billing_usage(jsonb_build_object(
    'account_id', :'acc', 'metric', 'messages', 'day', (now() at time zone 'UTC')::date));

begin;
\echo '#### usage consume (no idempotency key)'
:ex select public.billing_consume_usage(jsonb_build_object(
    'account_id', :'acc', 'metric', 'messages', 'day', (now() at time zone 'UTC')::date, 'count', '1',
    'limit', '1000', 'idempotency_key', null));
\echo '#### usage consume (with an idempotency key)'
:ex select public.billing_consume_usage(jsonb_build_object(
    'account_id', :'acc', 'metric', 'messages', 'day', (now() at time zone 'UTC')::date, 'count', '1',
    'limit', '1000', 'idempotency_key', 'scale-explain-' || :pass));
rollback;

begin;
\echo '#### prune, one batch of 250 (retention 365 days: rows and jobs past it)'
:ex select public.billing_prune(jsonb_build_object(
    'events_before', now() - interval '365 days', 'payloads_before', now() - interval '365 days',
    'jobs_before', now() - interval '365 days', 'limit', '250', 'dry_run', false));
rollback;
begin;
\echo '#### prune, one batch of 250 (retention 7 days: payloads of 7 to 30 days, ids past 30 days)'
:ex select public.billing_prune(jsonb_build_object(
    'events_before', now() - interval '30 days', 'payloads_before', now() - interval '7 days',
    'jobs_before', now() - interval '7 days', 'limit', '250', 'dry_run', false));
rollback;
\echo '#### end of pass'
