-- Fragment of the floors (bench/bench_floors.py expands `-- include: _purchases.sql`):
-- the purchases of int_purchases_unified as of as_of: paid or delivered online orders,
-- and offline receipts matched to a customer by loyalty card, else by phone (each
-- identifying exactly one customer existing as of as_of; unmatched receipts left out).
-- One row per purchase: purchase_id, source ('online' / 'offline'), customer_id,
-- purchased_at, revenue (the order's or receipt's total_amount).
-- include: _customers.sql

purchases as (

    select order_id as purchase_id, 'online' as source, customer_id,
           ordered_at as purchased_at, total_amount as revenue
    from raw.orders
    where ordered_at <= {as_of} and status in ('paid', 'delivered')
    union all
    select r.receipt_id, 'offline', coalesce(card_owner.customer_id, phone_owner.customer_id),
           r.purchased_at, r.total_amount
    from raw.offline_receipts as r
    left join card_owner on card_owner.loyalty_card_id = nullif(trim(r.loyalty_card_id), '')
    left join phone_owner on phone_owner.phone_digits = substring(regexp_replace(regexp_replace(
        regexp_replace(coalesce(nullif(trim(r.phone), ''), ''), '[^0-9]', '', 'g'), '^00', ''),
        '^8?0([1-9][0-9]{{8}})$', '380\1') from '^[0-9]{{8,15}}$')
    where r.purchased_at <= {as_of}
      and coalesce(card_owner.customer_id, phone_owner.customer_id) is not null

),
