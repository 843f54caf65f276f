-- Ranks are 1..n per customer without gaps, and a better rank never has a lower score.
with ranked as (
    select
        customer_id,
        affinity_rank,
        affinity_score,
        count(*) over (partition by customer_id) as categories,
        lag(affinity_score) over (partition by customer_id order by affinity_rank) as better_score
    from {{ ref('customer_category_affinity') }}
)
select customer_id, affinity_rank
from ranked
where affinity_rank > categories
   or better_score < affinity_score
