-- depends_on: {{ ref('int_purchases_customers_changed') }}
-- One row per purchase with its number in the customer's history (1 = first purchase).
-- Two purchases at the same moment are ordered by source ('offline' before 'online'),
-- then by purchase_id, so the numbering never depends on the query plan.
-- Incremental per customer (strategy replace_partitions): a build renumbers the
-- customers of int_purchases_customers_changed, from all their purchases.
with

purchases as (

    select * from {{ ref('int_purchases_unified') }}
    {% if is_incremental() %}
    where customer_id in (select customer_id from {{ ref('int_purchases_customers_changed') }})
    {% endif %}

),

numbered as (

    select
        purchase_id,
        source,
        customer_id,
        purchased_at,
        revenue,
        row_number() over customer_history as purchase_number,
        lag(purchased_at) over customer_history as previous_purchased_at

    from purchases
    window customer_history as (
        partition by customer_id
        order by purchased_at, source, purchase_id
    )

),

gaps_added as (

    select
        *,
        {{ days_between('previous_purchased_at', 'purchased_at') }} as days_since_previous_purchase

    from numbered

)

{% if is_incremental() %}
-- every recomputed customer is listed, with a NULL row for one who has no purchase any
-- more, so the strategy replaces (or removes) all their rows
{{ replace_partitions_select('gaps_added', ['purchase_id', 'source', 'customer_id', 'purchased_at', 'revenue', 'purchase_number', 'previous_purchased_at', 'days_since_previous_purchase'], ref('int_purchases_customers_changed')) }}
{% else %}
select
    purchase_id, source, customer_id, purchased_at, revenue, purchase_number,
    previous_purchased_at, days_since_previous_purchase
from gaps_added
{% endif %}
