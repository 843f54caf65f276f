-- Fragment of the floors of customer_lifetime and customer_stage_history (bench/bench_floors.py
-- expands `-- include: _lifecycle.sql`): per buyer, the purchase counts, LTV, first,
-- second (order purchased_at, source, purchase_id) and last purchase, days to the second
-- purchase and the mean days between purchases; the customers subscribed to a channel as
-- of as_of; the norm of the lifecycle clock (the median days to a second purchase among
-- buyers, 60 when none). {as_of} is replaced by a timestamptz literal.
-- include: _purchases.sql

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

