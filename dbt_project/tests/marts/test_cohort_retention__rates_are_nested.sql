-- Rates are shares (0..1), grow with the window, longer windows complete later, and the
-- cohorts add up to every customer with a purchase.
select cohort_month::text as cohort_month, 'rates or completeness out of order' as problem
from {{ ref('cohort_retention') }}
where not (0 <= second_purchase_30d_rate
           and second_purchase_30d_rate <= second_purchase_60d_rate
           and second_purchase_60d_rate <= second_purchase_90d_rate
           and second_purchase_90d_rate <= 1)
   or (is_complete_90d and not is_complete_60d)
   or (is_complete_60d and not is_complete_30d)
union all
select null, 'cohorts do not add up to the buyers'
where (select coalesce(sum(customers), 0) from {{ ref('cohort_retention') }})
   <> (select count(*) from {{ ref('customer_lifetime') }} where purchases > 0)
