-- Floor of marts.customer_stage_history (bench/bench_floors.py): the snapshot of one
-- as_of (the mart keeps one per build; the bench compares the rows of this as_of), one
-- statement from raw: bench/floors/customer_lifetime.sql without the columns the history
-- does not keep (the preferred category, its costliest part, is not computed).
-- {as_of} is replaced by a timestamptz literal. Every column is compared exactly.
with

-- include: _lifecycle.sql

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
