-- A ROPO receipt's last online view lies in the 30 days before the purchase; a receipt
-- that is not ROPO has none. Every matched receipt is in the mart, and no other.
select receipt_id, 'view outside the window' as problem
from {{ ref('ropo_purchases') }}
where is_ropo <> (last_online_view_at is not null)
   or last_online_view_at >= purchased_at
   or last_online_view_at < purchased_at - {{ days_interval(var('ropo_window_days')) }}
union all
select receipt_id, 'matched receipt missing'
from {{ ref('int_receipts_matched') }}
where customer_id is not null
  and receipt_id not in (select receipt_id from {{ ref('ropo_purchases') }})
