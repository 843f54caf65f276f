-- Floor of marts.ropo_purchases (bench/bench_floors.py): one statement from raw.
-- Receipts matched as in int_receipts_matched (loyalty card, else phone, each
-- identifying exactly one customer existing as of as_of); is_ropo when the customer
-- viewed (raw.events, event_type 'view') a product of the receipt, or a product or
-- category whose category_path (the event's own, else the catalogue's) is one of the
-- receipt's lines' category_path, in [purchased_at - 30 x 24 hours, purchased_at).
-- {as_of} is replaced by a timestamptz literal. Every column is compared exactly.
with

customers as (

    select
        c.customer_id,
        nullif(trim(c.loyalty_card_id), '') as loyalty_card_id,
        substring(regexp_replace(regexp_replace(regexp_replace(coalesce(nullif(trim(c.phone), ''), ''),
            '[^0-9]', '', 'g'), '^00', ''), '^8?0([1-9][0-9]{{8}})$', '380\1')
            from '^[0-9]{{8,15}}$') as phone_digits
    from raw.customers as c
    where c.created_at is null or c.created_at <= {as_of}
       or exists (select 1 from raw.orders as o
                  where o.customer_id = c.customer_id and o.ordered_at <= {as_of})

),

card_owner as (

    select loyalty_card_id, min(customer_id) as customer_id
    from customers where loyalty_card_id is not null
    group by loyalty_card_id having count(*) = 1

),

phone_owner as (

    select phone_digits, min(customer_id) as customer_id
    from customers where phone_digits is not null
    group by phone_digits having count(*) = 1

),

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

),

products as (

    select product_id, nullif(trim(category_path), '') as category_path from raw.products

),

receipt_items as (

    select distinct r.receipt_id, r.customer_id, r.purchased_at, i.product_id, p.category_path
    from receipts as r
    join raw.offline_receipt_items as i on i.receipt_id = r.receipt_id
    left join products as p on p.product_id = i.product_id

),

views as (

    select e.customer_id, e.occurred_at, e.product_id,
           coalesce(nullif(trim(e.category_path), ''), p.category_path) as category_path
    from raw.events as e
    left join products as p on p.product_id = e.product_id
    where e.event_type = 'view' and e.customer_id is not null and e.occurred_at <= {as_of}

),

last_views as (

    -- two equality joins (a view of the product, a view in the category) instead of one
    -- join on an OR, so each can hash
    select receipt_id, max(occurred_at) as last_online_view_at
    from (
        select i.receipt_id, v.occurred_at
        from receipt_items as i
        join views as v
          on v.customer_id = i.customer_id and v.product_id = i.product_id
         and v.occurred_at >= i.purchased_at - 30 * interval '24 hours'
         and v.occurred_at < i.purchased_at
        union all
        select i.receipt_id, v.occurred_at
        from receipt_items as i
        join views as v
          on v.customer_id = i.customer_id and v.category_path = i.category_path
         and v.occurred_at >= i.purchased_at - 30 * interval '24 hours'
         and v.occurred_at < i.purchased_at
    ) as hits
    group by receipt_id

)

select
    r.receipt_id,
    r.customer_id,
    r.matched_by,
    r.purchased_at,
    r.total_amount,
    l.receipt_id is not null as is_ropo,
    l.last_online_view_at,
    r.store_id
from receipts as r
left join last_views as l on l.receipt_id = r.receipt_id
