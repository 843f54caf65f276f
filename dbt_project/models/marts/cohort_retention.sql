-- One row per first-purchase cohort month (UTC): how many of the cohort bought a second
-- time within 30, 60 and 90 days, whether each window is complete as of as_of, and how
-- the first two purchases looked. Rules in cohort_retention.yml.
{%- set windows = [30, 60, 90] %}
with

customers as (

    select * from {{ ref('int_customer_purchases_aggregated') }}

),

cohorts_assigned as (

    select
        *,
        date_trunc('month', first_purchase_at at time zone 'UTC')::date as cohort_month

    from customers

),

cohorts_aggregated as (

    select
        cohort_month,
        count(*) as customers,
        {%- for days in windows %}
        count(*) filter (where days_to_second_purchase <= {{ days }}) as second_purchase_{{ days }}d_customers,
        {%- endfor %}
        count(second_purchase_at) as second_purchase_customers,
        avg(first_purchase_categories)::float8 as avg_first_purchase_categories,
        avg(second_purchase_categories)::float8 as avg_second_purchase_categories,
        percentile_cont(0.5) within group (order by days_to_second_purchase) as median_days_to_second_purchase,
        -- summed exactly (numeric seconds), so the mean never depends on the order the
        -- rows are read in (the per-customer tables are rewritten in place)
        (avg(extract(epoch from second_purchase_at - first_purchase_at)) / 86400)::float8
            as mean_days_to_second_purchase

    from cohorts_assigned
    group by cohort_month

),

final as (

    select
        cohort_month,
        customers,
        {%- for days in windows %}
        second_purchase_{{ days }}d_customers::float8 / customers as second_purchase_{{ days }}d_rate,
        {%- endfor %}
        {%- for days in windows %}
        -- the cohort's last possible first purchase is just before the next month starts
        {{ utc_midnight("cohort_month + interval '1 month'") }} + {{ days_interval(days) }} <= {{ as_of() }}
            as is_complete_{{ days }}d,
        {%- endfor %}
        {%- for days in windows %}
        second_purchase_{{ days }}d_customers,
        {%- endfor %}
        second_purchase_customers,
        avg_first_purchase_categories,
        avg_second_purchase_categories,
        median_days_to_second_purchase,
        mean_days_to_second_purchase

    from cohorts_aggregated

)

select * from final
