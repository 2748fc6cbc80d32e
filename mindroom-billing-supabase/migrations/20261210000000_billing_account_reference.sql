-- mindroom-billing: accounts found by their platform reference (accounts.client_reference_id, the
-- Checkout `client_reference_id` a calling service knows as its user id), so the internal API can
-- answer `GET /v1/entitlements?reference=…` and `POST /v1/usage {"reference": …}`. Idempotent.

create index if not exists accounts_client_reference_id_idx on public.accounts (client_reference_id);

-- accounts_by_reference: p = {reference, limit} → the accounts whose client_reference_id is
-- `reference`, ordered by stripe_customer_id, at most `limit`
create or replace function public.billing_accounts_by_reference(p jsonb)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select coalesce(jsonb_agg(jsonb_build_object('id', x.id, 'stripe_customer_id', x.stripe_customer_id,
                                                 'email', x.email, 'reference', x.client_reference_id)
                              order by x.stripe_customer_id), '[]'::jsonb)
    from (
        select a.id, a.stripe_customer_id, a.email, a.client_reference_id
        from public.accounts a
        where a.client_reference_id = p ->> 'reference'
        order by a.stripe_customer_id
        limit (p ->> 'limit')::bigint
    ) x
$$;

select public.billing_restrict_functions();
