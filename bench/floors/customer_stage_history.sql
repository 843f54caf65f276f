-- Floor of marts.customer_stage_history (bench/bench_floors.py): the snapshot of one
-- as_of (the mart keeps one per build; the bench compares the rows of this as_of), one
-- statement from raw: bench/customer_lifetime_floor.sql without the columns the history
-- does not keep (the preferred category, its costliest part, is not computed).
-- {as_of} is replaced by a timestamptz literal. Every column is compared exactly.
with

customers as (

    -- a customer exists from sign-up or from their first online order, whichever is earlier
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

per_customer as (

    select
        customer_id,
        count(*) as purchases,
        count(*) filter (where source = 'online') as online_purchases,
        count(*) filter (where source = 'offline') as offline_purchases,
        sum(revenue) as ltv,
        min(purchased_at) as first_purchase_at,
        (array_agg(purchased_at order by purchased_at, source, purchase_id))[2] as second_purchase_at,
        max(purchased_at) as last_purchase_at
    from purchases
    group by customer_id

),

timing as (

    select
        *,
        (extract(epoch from second_purchase_at - first_purchase_at) / 86400)::float8
            as days_to_second_purchase,
        case when purchases > 1 then (extract(epoch from last_purchase_at - first_purchase_at)
            / 86400)::float8 / (purchases - 1) end as avg_days_between_purchases
    from per_customer

),

subscribed as (

    select distinct customer_id
    from raw.channel_subscriptions
    where (subscribed_at is null or subscribed_at <= {as_of})
      and coalesce(unsubscribed_at > {as_of}, true)

),

norm as (

    select coalesce(percentile_cont(0.5) within group (order by days_to_second_purchase),
                    60::float8) as norm_days
    from timing

),

joined as (

    select
        c.customer_id,
        {as_of} as as_of,
        t.first_purchase_at, t.second_purchase_at, t.last_purchase_at,
        coalesce(t.purchases, 0) as purchases,
        coalesce(t.online_purchases, 0) as online_purchases,
        coalesce(t.offline_purchases, 0) as offline_purchases,
        coalesce(t.ltv, 0) as ltv,
        round(t.ltv / t.purchases, 2) as avg_order_value,
        t.days_to_second_purchase,
        t.avg_days_between_purchases,
        (extract(epoch from {as_of} - t.last_purchase_at) / 86400)::float8 as days_since_last_purchase,
        s.customer_id is not null as is_subscribed,
        case when t.purchases = 1 then greatest(norm.norm_days, 14::float8)
             when t.purchases > 1 then greatest(t.avg_days_between_purchases, 14::float8)
        end as lifecycle_clock_days,
        -- RFM ranks among buyers (window over the buyers only: null for non-buyers)
        case when t.purchases > 0 then count(*) filter (where t.purchases > 0)
            over (order by t.last_purchase_at desc nulls last) end as recency_rank,
        case when t.purchases > 0 then count(*) filter (where t.purchases > 0)
            over (order by t.ltv nulls first) end as monetary_rank,
        count(*) filter (where t.purchases > 0) over () as buyers
    from customers as c
    left join timing as t on t.customer_id = c.customer_id
    left join subscribed as s on s.customer_id = c.customer_id
    cross join norm

),

scored as (

    select
        joined.*,
        6 - (5 * recency_rank + buyers - 1) / buyers as r_score,
        case when purchases > 0 then 1 + (purchases >= 2)::int + (purchases >= 3)::int
            + (purchases >= 4)::int + (purchases >= 6)::int end as f_score,
        (5 * monetary_rank + buyers - 1) / buyers as m_score
    from joined

)

select
    customer_id, as_of,
    case
        when purchases = 0 then 'no_purchase'
        when r_score >= 4 and f_score >= 4 then 'champions'
        when r_score >= 3 and f_score >= 3 then 'loyal'
        when r_score >= 3 and f_score = 2 then 'potential_loyalist'
        when r_score >= 4 and f_score = 1 then 'new'
        when r_score = 3 and f_score = 1 then 'promising'
        when f_score >= 4 and m_score >= 4 then 'cant_lose'
        when f_score >= 3 then 'at_risk'
        when r_score = 2 then 'hibernating'
        else 'lost'
    end as rfm_segment,
    case
        when purchases = 0 and is_subscribed then 'subscriber_no_purchase'
        when purchases = 0 then 'prospect'
        when purchases = 1
            and (extract(epoch from {as_of} - first_purchase_at) / 86400)::float8 <= 30 then 'new'
        when days_since_last_purchase > 4 * lifecycle_clock_days then 'lapsed'
        when days_since_last_purchase > 2 * lifecycle_clock_days then 'at_risk'
        when purchases = 1 then 'one_time'
        when purchases >= 4 then 'loyal'
        else 'repeat'
    end as lifecycle_stage,
    r_score, f_score, m_score
from scored
