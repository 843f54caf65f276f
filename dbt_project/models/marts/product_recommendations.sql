-- One row per product X and product Y that customers who bought X went on to view or buy
-- (within var recommendations_window_days of their first purchase of X): "customers who
-- bought X then viewed or bought Y". Every trigger chain that shows products reads it
-- (plugins/retention/triggers/recommend.py), best rank first. Rules in
-- product_recommendations.yml.
--
-- A weekly snapshot: computed as of `recommendations_as_of` (as_of rounded down to the
-- grid of var recommendations_refresh_days, default 7: Mondays 00:00 UTC), from the data
-- up to that moment. An incremental build whose snapshot moment is the one already
-- stored (intermediate.incremental_state) computes nothing; any other replaces the table
-- (strategy replace_all, macros/incremental_replace_all.sql).
{%- set window_days = var('recommendations_window_days', 90) %}
{%- set min_customers = var('recommendations_min_customers', 1) %}
{%- set per_product = var('recommendations_per_product', 20) %}
{%- set purchase_weight = var('recommendations_purchase_weight', 2) %}
{%- set snapshot = recommendations_as_of() %}
-- One statement. Products are numbered first (in code-point order of their ids), so
-- that each (X, Y, customer) row of the join below becomes one bigint: X's number, Y's
-- number and one bit for "bought Y". PostgreSQL sorts a single bigint column as bare
-- values, several times faster than rows of two ids, and the sorted values are counted
-- by equal value, then the two counts of a pair (with and without the bit) are put
-- together by comparing each value with its neighbours, so no second sort of the
-- 20 million rows of 1,000,000 customers is needed. The ranking sorts the pairs.
-- work_mem (`set local`: this statement only) is what keeps the bigint sort of
-- 1,000,000 customers in memory; mergejoin is off so that each customer's first
-- purchases meet that customer's rows by hash.
{{ config(pre_hook=["set local work_mem = '512MB'",
                    "set local enable_mergejoin = off",
                    "{{ record_rewrite(recommendations_as_of()) }}"],
          post_hook="{{ record_incremental_state(recommendations_as_of()) }}") }}
with

products_per_customer as not materialized (

    -- per customer and product: the bounds of the interactions (spans: a purchase the
    -- moment it was made, a day of views its first to its last view), the first and last
    -- purchase, and every span and purchase (read only when the bounds cannot decide,
    -- below), up to the snapshot moment. int_customer_product_interactions holds them
    -- as of the build's as_of, maintained by the daily build for the customers and
    -- products that changed: its rows that end by the snapshot are taken as they are;
    -- the few with an interaction after it (the days since the snapshot) are clipped to
    -- it. The snapshot is a UTC midnight (or as_of itself, when nothing is after it),
    -- and a day's views lie within one UTC day, so a span that starts by the snapshot
    -- and ends after it starts exactly at it: its end becomes the snapshot moment, the
    -- last view at or before it.
    select customer_id, product_id, starts_min, ends_max, first_bought_at, last_bought_at,
           starts, ends, bought
    from {{ ref('int_customer_product_interactions') }}
    where ends_max <= {{ snapshot }}

    union all

    select
        clipped.customer_id,
        clipped.product_id,
        spans.starts_min,
        spans.ends_max,
        purchases.first_bought_at,
        purchases.last_bought_at,
        spans.starts,
        spans.ends,
        purchases.bought

    from {{ ref('int_customer_product_interactions') }} as clipped
    cross join lateral (
        select min(s.starts_at) as starts_min,
               max(least(s.ends_at, {{ snapshot }})) as ends_max,
               array_agg(s.starts_at order by s.starts_at, least(s.ends_at, {{ snapshot }})) as starts,
               array_agg(least(s.ends_at, {{ snapshot }}) order by s.starts_at, least(s.ends_at, {{ snapshot }})) as ends
        from unnest(clipped.starts, clipped.ends) as s(starts_at, ends_at)
        where s.starts_at <= {{ snapshot }}
    ) as spans
    cross join lateral (
        select min(p.at) as first_bought_at, max(p.at) as last_bought_at,
               array_agg(p.at order by p.at) as bought
        from unnest(clipped.bought) as p(at)
        where p.at <= {{ snapshot }}
    ) as purchases
    where clipped.ends_max > {{ snapshot }}
      and clipped.starts_min <= {{ snapshot }}

),

product_numbers as materialized (

    -- every product of the rows above, numbered in code-point order of its id, so that
    -- ordering by number orders by id
    select product_id, (row_number() over (order by product_id collate "C"))::bigint as product_no
    from (select distinct product_id from products_per_customer) as products

),

first_purchases_of_product as materialized (

    select
        purchase.customer_id,
        numbered.product_no,
        purchase.first_bought_at,
        -- the window's end, computed once per first purchase, not once per pair
        purchase.first_bought_at + {{ days_interval(window_days) }} as window_ends_at

    from products_per_customer as purchase
    inner join product_numbers as numbered
        on numbered.product_id = purchase.product_id
    where purchase.first_bought_at is not null

),

purchases_and_later_interactions_joined as (

    -- X bought at b, window (b, e]: Y counts when one of its spans [s, t] (a purchase:
    -- s = t) has t > b and s <= e (exact at the second: a day's views lie within the
    -- day, the window is longer than a day). When every span starts after b, that is
    -- "the earliest start <= e"; when every span ends by e, "the latest end > b";
    -- otherwise the spans are looked at one by one. The same for Y's purchases
    -- (bought_after). One row per (X, Y, customer), as one bigint:
    -- X's number << 32 | Y's number << 1 | bought_after (numbers below 2^31).
    select
        (bought.product_no << 32) | (later_numbered.product_no << 1) | case
            when later.first_bought_at is null then 0
            when later.first_bought_at > bought.first_bought_at
                then (later.first_bought_at <= bought.window_ends_at)::int
            when later.last_bought_at <= bought.window_ends_at
                then (later.last_bought_at > bought.first_bought_at)::int
            else exists (
                select from unnest(later.bought) as p(at)
                where p.at > bought.first_bought_at and p.at <= bought.window_ends_at)::int
        end as pair_row

    from first_purchases_of_product as bought
    inner join products_per_customer as later
        on later.customer_id = bought.customer_id
        and later.ends_max > bought.first_bought_at
        and later.starts_min <= bought.window_ends_at
    inner join product_numbers as later_numbered
        on later_numbered.product_id = later.product_id
    where
        later_numbered.product_no <> bought.product_no
        and case
            when later.starts_min > bought.first_bought_at then true
            when later.ends_max <= bought.window_ends_at then true
            else exists (
                select from unnest(later.starts, later.ends) as span(starts_at, ends_at)
                where span.ends_at > bought.first_bought_at
                  and span.starts_at <= bought.window_ends_at)
        end

),

pair_rows_counted as (

    -- the rows sorted as bare bigints (the ordered subquery: one column, sorted by
    -- value), then counted per value, which keeps that order
    select pair_row, count(*) as customers
    from (
        select pair_row from purchases_and_later_interactions_joined
        order by pair_row offset 0
    ) as sorted
    group by pair_row

),

pair_rows_with_neighbours as (

    -- the order of the counts above, so no sort: a pair (X, Y) is the even value
    -- (customers who did not buy Y), the odd value after it (who did), or both
    select
        pair_row,
        customers,
        lag(pair_row) over by_value as previous_pair_row,
        lead(pair_row) over by_value as next_pair_row,
        lead(customers) over by_value as next_customers
    from pair_rows_counted
    window by_value as (order by pair_row)

),

pairs_aggregated as (

    -- one row per pair: from its even value (adding the odd one after it, if any), or
    -- from an odd value with no even one before it
    select
        pair_row >> 32 as product_no,
        (pair_row >> 1) & 2147483647 as recommended_product_no,
        case when pair_row & 1 = 1 then customers
             when next_pair_row = pair_row + 1 then customers + next_customers
             else customers end as customers,
        case when pair_row & 1 = 1 then customers
             when next_pair_row = pair_row + 1 then next_customers
             else 0 end as customers_bought

    from pair_rows_with_neighbours
    where pair_row & 1 = 0 or previous_pair_row is distinct from pair_row - 1

),

buyers_counted as (

    select product_no, count(*) as buyers
    from first_purchases_of_product
    group by product_no

),

ranked as (

    -- within one X, buyers is the same on every row, so ordering by the integer
    -- numerator orders by score (and sorts far faster than numeric); the score is
    -- computed for the rows kept. Product numbers order as the ids do.
    select
        product_no,
        recommended_product_no,
        customers,
        customers_bought,
        row_number() over (
            partition by product_no
            order by customers + {{ purchase_weight }} * customers_bought desc,
                     customers desc,
                     recommended_product_no
        ) as rank

    from pairs_aggregated
    where customers >= {{ min_customers }}

),

final as (

    select
        product.product_id collate "default" as product_id,
        recommended.product_id collate "default" as recommended_product_id,
        ranked.rank,
        -- a later purchase weighs more than a later view; +1 damps products bought once
        (ranked.customers + {{ purchase_weight }} * ranked.customers_bought)::numeric
            / (buyers_counted.buyers + 1) as score,
        ranked.customers,
        ranked.customers_bought,
        buyers_counted.buyers,
        {{ snapshot }} as as_of

    from ranked
    inner join buyers_counted
        on buyers_counted.product_no = ranked.product_no
    inner join product_numbers as product
        on product.product_no = ranked.product_no
    inner join product_numbers as recommended
        on recommended.product_no = ranked.recommended_product_no
    where ranked.rank <= {{ per_product }}

)

{% if is_incremental() %}
-- computed only when the snapshot moment moved; then one extra all-NULL row makes the
-- strategy replace the table even when there are no pairs at all. The gate is one
-- uncorrelated condition: PostgreSQL checks it once and never starts the plan below
-- when it is false.
{%- set snapshot_moved %}
not exists (
    select 1 from {{ incremental_state_relation() }}
    where model_name = '{{ this.identifier }}' and as_of = {{ snapshot }}
)
{%- endset %}
select * from final
where {{ snapshot_moved }}
union all
select null, null, null, null, null, null, null, null
where {{ snapshot_moved }}
{% else %}
select * from final
{% endif %}
