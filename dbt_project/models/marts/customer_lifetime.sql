-- One row per customer in raw.customers (existing as of as_of): purchase history, LTV,
-- timing, preferred category, RFM scores and segment, lifecycle stage.
-- Every rule is documented in customer_lifetime.yml.
{%- set frequency_thresholds = var('rfm_frequency_thresholds') %}
{%- set one_time_norm_days = var('lifecycle_one_time_norm_days', none) %}
with

customers as (

    select * from {{ ref('stg_customers') }}

),

purchases as (

    select * from {{ ref('int_customer_purchases_aggregated') }}

),

subscriptions as (

    select * from {{ ref('stg_channel_subscriptions') }}

),

active_subscribers as (

    select distinct customer_id
    from subscriptions
    where is_subscribed

),

customers_and_purchases_joined as (

    select
        customers.customer_id,
        {{ as_of() }} as as_of,
        purchases.first_purchase_at,
        purchases.second_purchase_at,
        purchases.last_purchase_at,
        coalesce(purchases.purchases, 0) as purchases,
        coalesce(purchases.online_purchases, 0) as online_purchases,
        coalesce(purchases.offline_purchases, 0) as offline_purchases,
        coalesce(purchases.ltv, 0) as ltv,
        round(purchases.ltv / purchases.purchases, 2) as avg_order_value,
        purchases.days_to_second_purchase,
        purchases.avg_days_between_purchases,
        {{ days_between('purchases.last_purchase_at', as_of()) }} as days_since_last_purchase,
        purchases.preferred_category,
        active_subscribers.customer_id is not null as is_subscribed

    from customers
    left join purchases
        on purchases.customer_id = customers.customer_id
    left join active_subscribers
        on active_subscribers.customer_id = customers.customer_id

),

buyers_ranked as (

    -- ranks count the buyers at or before this one in the order (ties share a rank)
    select
        customer_id,
        purchases,
        count(*) over (order by last_purchase_at desc) as recency_rank,
        count(*) over (order by ltv) as monetary_rank,
        count(*) over () as buyers

    from customers_and_purchases_joined
    where purchases > 0

),

rfm_scored as (

    select
        customer_id,
        -- quintiles: score = ceil(5 * rank / buyers), integer arithmetic
        6 - (5 * recency_rank + buyers - 1) / buyers as r_score,
        1
        {%- for threshold in frequency_thresholds %}
            + (purchases >= {{ threshold }})::int
        {%- endfor %} as f_score,
        (5 * monetary_rank + buyers - 1) / buyers as m_score

    from buyers_ranked

),

rfm_segmented as (

    select
        *,
        case
            when r_score >= 4 and f_score >= 4 then 'champions'
            when r_score >= 3 and f_score >= 3 then 'loyal'
            when r_score >= 3 and f_score = 2 then 'potential_loyalist'
            when r_score >= 4 and f_score = 1 then 'new'
            when r_score = 3 and f_score = 1 then 'promising'
            when f_score >= 4 and m_score >= 4 then 'cant_lose'
            when f_score >= 3 then 'at_risk'
            when r_score = 2 then 'hibernating'
            else 'lost'
        end as rfm_segment

    from rfm_scored

),

one_time_norm as (

    select coalesce(
        {{ one_time_norm_days if one_time_norm_days is not none else 'null' }}::float8,
        percentile_cont(0.5) within group (order by days_to_second_purchase),
        {{ var('lifecycle_default_norm_days') }}::float8
    ) as norm_days
    from purchases

),

clock_added as (

    -- how long this customer may stay quiet before it means something: their own average
    -- gap between purchases, or for one-time buyers the shop's norm days to a second
    -- purchase; never less than lifecycle_min_gap_days
    select
        customers_and_purchases_joined.*,
        case
            when purchases = 1 then greatest(one_time_norm.norm_days, {{ var('lifecycle_min_gap_days') }}::float8)
            when purchases > 1 then greatest(avg_days_between_purchases, {{ var('lifecycle_min_gap_days') }}::float8)
        end as lifecycle_clock_days

    from customers_and_purchases_joined
    cross join one_time_norm

),

staged as (

    select
        clock_added.*,
        case
            when purchases = 0 and is_subscribed then 'subscriber_no_purchase'
            when purchases = 0 then 'prospect'
            when purchases = 1
                and {{ days_between('first_purchase_at', as_of()) }} <= {{ var('lifecycle_new_days') }} then 'new'
            when days_since_last_purchase > {{ var('lifecycle_lapsed_multiple') }} * lifecycle_clock_days then 'lapsed'
            when days_since_last_purchase > {{ var('lifecycle_at_risk_multiple') }} * lifecycle_clock_days then 'at_risk'
            when purchases = 1 then 'one_time'
            when purchases >= {{ var('lifecycle_loyal_min_purchases') }} then 'loyal'
            else 'repeat'
        end as lifecycle_stage

    from clock_added

),

final as (

    select
        staged.customer_id,
        staged.as_of,
        staged.first_purchase_at,
        staged.second_purchase_at,
        staged.last_purchase_at,
        staged.purchases,
        staged.online_purchases,
        staged.offline_purchases,
        staged.ltv,
        staged.avg_order_value,
        staged.days_to_second_purchase,
        staged.avg_days_between_purchases,
        staged.days_since_last_purchase,
        staged.preferred_category,
        coalesce(rfm_segmented.rfm_segment, 'no_purchase') as rfm_segment,
        staged.lifecycle_stage,
        rfm_segmented.r_score,
        rfm_segmented.f_score,
        rfm_segmented.m_score,
        staged.lifecycle_clock_days,
        staged.is_subscribed

    from staged
    left join rfm_segmented
        on rfm_segmented.customer_id = staged.customer_id

)

select * from final
