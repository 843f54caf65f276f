-- Ranks are 1..n per customer without gaps, and a better rank never has a lower score.
-- Checks the customers this build recomputed (all of them on a full build).
with ranked as (
    select
        customer_id,
        affinity_rank,
        affinity_score,
        count(*) over (partition by customer_id) as categories,
        lag(affinity_score) over (partition by customer_id order by affinity_rank) as better_score
    from {{ ref('customer_category_affinity') }}
    where customer_id in (select customer_id from {{ ref('int_affinity_customers_changed') }})
)
select customer_id, affinity_rank
from ranked
where affinity_rank > categories
   or better_score < affinity_score
