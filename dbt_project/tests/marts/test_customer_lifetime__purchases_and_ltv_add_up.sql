-- purchases = online + offline, LTV = the sum of the customer's purchase revenue, and the
-- timing columns are NULL exactly when the contract says so.
with purchases as (
    select customer_id, count(*) as purchases, sum(revenue) as ltv
    from {{ ref('int_purchases_unified') }}
    group by customer_id
)
select lifetime.customer_id
from {{ ref('customer_lifetime') }} as lifetime
left join purchases on purchases.customer_id = lifetime.customer_id
where lifetime.purchases <> lifetime.online_purchases + lifetime.offline_purchases
   or lifetime.purchases <> coalesce(purchases.purchases, 0)
   or lifetime.ltv <> coalesce(purchases.ltv, 0)
   or (lifetime.purchases = 0) <> (lifetime.first_purchase_at is null)
   or (lifetime.purchases < 2) <> (lifetime.second_purchase_at is null)
   or (lifetime.purchases < 2) <> (lifetime.days_to_second_purchase is null)
   or (lifetime.purchases < 2) <> (lifetime.avg_days_between_purchases is null)
   or lifetime.last_purchase_at > lifetime.as_of
   or lifetime.as_of <> {{ as_of() }}
