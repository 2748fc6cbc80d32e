-- Account change notifications for per-replica entitlement caches.
--
-- billing_commit now sends `pg_notify('billing_account_changed', <account id>)` when it writes a
-- subscription aggregate: the notification is delivered at commit (never for a rolled-back or lost
-- compare-and-swap), to every session listening on the channel — each replica's PgStore keeps one
-- such session and drops its cached entitlements of that account. The aggregate's account and the
-- `accounts` row of its customer are both named (they differ for rows adopted from the Node service).
-- The rest of the function is unchanged from 20261201000200_billing_edges.

create or replace function public.billing_commit(p jsonb)
returns jsonb
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_now timestamptz := (p ->> 'now')::timestamptz;
    v_event_id text := p ->> 'event_id';
    v_event_status text;
    v_sub jsonb := p -> 'subscription';
    v_pub jsonb;
    v_acc jsonb := p -> 'account';
    v_expected bigint;
    v_rows bigint;
    v_account_id uuid;
begin
    if v_event_id is not null then
        -- Serializes commits of one event across replicas.
        select e.status into v_event_status from public.billing_events e where e.id = v_event_id for update;
        if v_event_status in ('applied', 'stale', 'ignored') then
            return jsonb_build_object('result', 'already_done');
        end if;
    end if;

    if jsonb_typeof(v_sub) = 'object' then
        -- Compare-and-swap first, so that a lost race has written nothing.
        v_expected := (v_sub ->> 'expected_version')::bigint;
        if v_expected = 0 then
            insert into public.billing_subscription_state
                (subscription_id, customer_id, account_id, version, state, grace_ends_at,
                 grace_expiry_handled, terminal, updated_at)
            values (
                v_sub ->> 'id', v_sub ->> 'customer_id', (v_sub ->> 'account_id')::uuid, 1, v_sub -> 'state',
                (v_sub ->> 'grace_ends_at')::timestamptz, (v_sub ->> 'grace_expiry_handled')::boolean,
                (v_sub ->> 'terminal')::boolean, v_now
            )
            on conflict (subscription_id) do nothing;
        else
            update public.billing_subscription_state s
            set version = s.version + 1,
                customer_id = v_sub ->> 'customer_id',
                account_id = (v_sub ->> 'account_id')::uuid,
                state = v_sub -> 'state',
                grace_ends_at = (v_sub ->> 'grace_ends_at')::timestamptz,
                grace_expiry_handled = (v_sub ->> 'grace_expiry_handled')::boolean,
                terminal = (v_sub ->> 'terminal')::boolean,
                updated_at = v_now
            where s.subscription_id = v_sub ->> 'id' and s.version = v_expected;
        end if;
        get diagnostics v_rows = row_count;
        if v_rows = 0 then
            return jsonb_build_object('result', 'conflict');
        end if;
        insert into public.accounts (id, stripe_customer_id)
        values ((v_sub ->> 'account_id')::uuid, v_sub ->> 'customer_id')
        on conflict do nothing;
    end if;

    if jsonb_typeof(v_acc) = 'object' then
        -- The e-mail of the newest fact (by the event's `created`) wins, whatever the processing order.
        insert into public.accounts as a
            (id, stripe_customer_id, email, client_reference_id, billing_email_observed_at)
        values ((v_acc ->> 'account_id')::uuid, v_acc ->> 'stripe_customer_id', v_acc ->> 'email',
                v_acc ->> 'reference',
                case when v_acc ->> 'email' is not null then (v_acc ->> 'observed_at')::timestamptz end)
        on conflict (stripe_customer_id) do update
        set email = case
                when excluded.email is not null
                     and (a.billing_email_observed_at is null
                          or excluded.billing_email_observed_at >= a.billing_email_observed_at)
                then excluded.email
                else a.email
            end,
            billing_email_observed_at = case
                when excluded.email is not null
                     and (a.billing_email_observed_at is null
                          or excluded.billing_email_observed_at >= a.billing_email_observed_at)
                then excluded.billing_email_observed_at
                else a.billing_email_observed_at
            end,
            client_reference_id = coalesce(excluded.client_reference_id, a.client_reference_id),
            updated_at = v_now;
    end if;

    if jsonb_typeof(v_sub) = 'object' then
        -- The public row other services read, kept in step in the same transaction.
        v_pub := v_sub -> 'public';
        select a.id into v_account_id from public.accounts a where a.stripe_customer_id = v_sub ->> 'customer_id';
        insert into public.subscriptions as s
            (account_id, stripe_subscription_id, stripe_price_id, tier, status, max_agents,
             max_messages_per_day, entitlement_status, current_period_end, trial_ends_at, cancelled_at,
             grace_period_ends_at, created_at, updated_at)
        values (
            v_account_id, v_sub ->> 'id', v_pub ->> 'stripe_price_id', v_pub ->> 'tier', v_pub ->> 'status',
            (v_pub ->> 'max_agents')::integer, (v_pub ->> 'max_messages_per_day')::integer,
            v_pub ->> 'entitlement_status',
            (v_pub ->> 'current_period_end')::timestamptz, (v_pub ->> 'trial_ends_at')::timestamptz,
            (v_pub ->> 'cancelled_at')::timestamptz, (v_pub ->> 'grace_period_ends_at')::timestamptz,
            v_now, v_now
        )
        on conflict (stripe_subscription_id) do update
        set account_id = excluded.account_id,
            stripe_price_id = excluded.stripe_price_id,
            tier = excluded.tier,
            status = excluded.status,
            max_agents = excluded.max_agents,
            max_messages_per_day = excluded.max_messages_per_day,
            entitlement_status = excluded.entitlement_status,
            current_period_end = excluded.current_period_end,
            trial_ends_at = excluded.trial_ends_at,
            cancelled_at = excluded.cancelled_at,
            grace_period_ends_at = excluded.grace_period_ends_at,
            updated_at = excluded.updated_at;
        perform pg_catalog.pg_notify('billing_account_changed', v_sub ->> 'account_id');
        if v_account_id is not null and v_account_id::text <> v_sub ->> 'account_id' then
            perform pg_catalog.pg_notify('billing_account_changed', v_account_id::text);
        end if;
    end if;

    perform public.billing_insert_jobs(p -> 'jobs', v_now);

    if v_event_id is not null then
        update public.billing_events e
        set status = p ->> 'outcome', reason = p ->> 'reason', processed_at = v_now
        where e.id = v_event_id;
    end if;
    return jsonb_build_object('result', 'committed');
end
$$;

select public.billing_restrict_functions();
