-- customer_lifetime has exactly the customers existing as of as_of (CONTRACT.md: one row
-- per customer in raw.customers).
select customer_id, 'missing from customer_lifetime' as problem
from {{ ref('stg_customers') }}
where customer_id not in (select customer_id from {{ ref('customer_lifetime') }})
union all
select customer_id, 'not a customer as of as_of'
from {{ ref('customer_lifetime') }}
where customer_id not in (select customer_id from {{ ref('stg_customers') }})
