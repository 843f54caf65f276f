-- Floor of marts.ropo_purchases (bench/bench_floors.py): one statement from raw.
-- Receipts matched as in int_receipts_matched (loyalty card, else phone, each
-- identifying exactly one customer existing as of as_of); is_ropo when the customer
-- viewed (raw.events, event_type 'view') a product of the receipt, or a product or
-- category whose category_path (the event's own, else the catalogue's) is one of the
-- receipt's lines' category_path, in [purchased_at - 30 x 24 hours, purchased_at).
-- The views are read per receipt through raw.events' (customer_id, occurred_at) index.
-- {as_of} is replaced by a timestamptz literal. Every column is compared exactly.
with

-- include: _customers.sql

receipts as (

    select r.receipt_id, r.store_id, r.purchased_at, r.total_amount,
           coalesce(card_owner.customer_id, phone_owner.customer_id) as customer_id,
           case when card_owner.customer_id is not null then 'loyalty_card' else 'phone' end
               as matched_by
    from raw.offline_receipts as r
    left join card_owner on card_owner.loyalty_card_id = nullif(trim(r.loyalty_card_id), '')
    left join phone_owner on phone_owner.phone_digits = substring(regexp_replace(regexp_replace(
        regexp_replace(coalesce(nullif(trim(r.phone), ''), ''), '[^0-9]', '', 'g'), '^00', ''),
        '^8?0([1-9][0-9]{{8}})$', '380\1') from '^[0-9]{{8,15}}$')
    where r.purchased_at <= {as_of}
      and coalesce(card_owner.customer_id, phone_owner.customer_id) is not null

)

select
    r.receipt_id,
    r.customer_id,
    r.matched_by,
    r.purchased_at,
    r.total_amount,
    l.last_online_view_at is not null as is_ropo,
    l.last_online_view_at,
    r.store_id
from receipts as r
-- the customer's views in the window, read through raw.events' (customer_id, occurred_at)
-- index: a few rows per receipt instead of a pass over every view
left join lateral (
    select max(e.occurred_at) as last_online_view_at
    from raw.events as e
    left join raw.products as ep on ep.product_id = e.product_id
    where e.customer_id = r.customer_id
      and e.occurred_at >= r.purchased_at - 30 * interval '24 hours'
      and e.occurred_at < r.purchased_at
      and e.event_type = 'view'
      and exists (
          select 1
          from raw.offline_receipt_items as i
          left join raw.products as ip on ip.product_id = i.product_id
          where i.receipt_id = r.receipt_id
            and (i.product_id = e.product_id
                 or nullif(trim(ip.category_path), '') = coalesce(nullif(trim(e.category_path), ''),
                                                                   nullif(trim(ep.category_path), '')))
      )
) as l on true
