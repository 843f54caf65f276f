-- Purchase numbers run 1..n per customer in time order: a later number is never earlier.
-- Only the customers this build renumbered (the others were checked when written).
select customer_id, purchase_number, purchased_at, previous_purchased_at
from {{ ref('int_purchases_numbered') }}
where customer_id in (select customer_id from {{ ref('int_purchases_customers_changed') }})
  and (previous_purchased_at > purchased_at
       or (purchase_number = 1) <> (previous_purchased_at is null))
