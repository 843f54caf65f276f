-- Purchase numbers run 1..n per customer in time order: a later number is never earlier.
select customer_id, purchase_number, purchased_at, previous_purchased_at
from {{ ref('int_purchases_numbered') }}
where previous_purchased_at > purchased_at
   or (purchase_number = 1) <> (previous_purchased_at is null)
