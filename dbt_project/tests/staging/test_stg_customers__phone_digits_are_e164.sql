-- Normalised phones are E.164 digits (8 to 15 digits, no '+'), and every phone that
-- already is E.164 ('+' and digits) normalises to exactly its digits.
with customers as materialized (
    -- evaluate the view's normalisation once per row, not once per condition
    select customer_id, phone, phone_digits
    from {{ ref('stg_customers') }}
)
select customer_id, phone, phone_digits
from customers
where (phone_digits is not null and phone_digits !~ '^[0-9]{8,15}$')
   or (phone ~ '^\+[0-9]{8,15}$' and phone_digits is distinct from substr(phone, 2))
