-- When the loyalty card identifies a customer, the receipt is that customer's, whatever
-- the phone says; a phone of several customers never matches.
select receipt_id, customer_id, card_customer_id, phone_customer_id, matched_by
from {{ ref('int_receipts_matched') }}
where (card_customer_id is not null
       and (customer_id is distinct from card_customer_id or matched_by <> 'loyalty_card'))
   or (card_customer_id is null and phone_owners > 1 and customer_id is not null)
