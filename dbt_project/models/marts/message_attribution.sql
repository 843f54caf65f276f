{#-
    message_attribution: which message earned which purchase (CONTRACT.md section 5).

    A conversion is a purchase (an online order paid or delivered, or an offline receipt
    matched to the customer: int_purchases_unified) made after a message was sent and
    within its channel's attribution window. Last touch: it is credited to the last sent
    message before it (ties: the larger message_id), so a purchase is credited once.

    Holdout members get a ledger row but no message. Their row earns, as a counterfactual
    (is_holdout = true), every purchase the message would have been credited with had it
    been sent: the purchase falls in the window after the row's time and no sent message
    came between. These rows never take credit away from a real message; they exist so
    that campaign_results can show the holdout's conversions next to the variants'.

    Windows, hours per channel: the defaults below, overridden by the environment variable
    RETENTION_ATTRIBUTION_WINDOWS (JSON, e.g. {"email": 48}; the uplift measurement in
    plugins/retention/results/uplift.py reads the same), then by the var
    `attribution_window_hours`; any other channel gets `attribution_default_window_hours`.
-#}
{%- set default_windows = {'email': 72, 'mobile_push': 24, 'web_push': 24,
                           'telegram': 48, 'sms': 24, 'viber': 24} -%}
{%- set windows = {} -%}
{%- do windows.update(default_windows) -%}
{%- set from_env = env_var('RETENTION_ATTRIBUTION_WINDOWS', '') | trim -%}
{%- if from_env -%}{%- do windows.update(fromjson(from_env)) -%}{%- endif -%}
{%- do windows.update(var('attribution_window_hours', none) or {}) -%}
{%- set fallback_hours = var('attribution_default_window_hours', 24) -%}

with

windows (channel, window_hours) as (
    values
    {%- for channel, hours in windows.items() %}
        ('{{ channel }}'::text, {{ hours | float }}::float8){{ "," if not loop.last }}
    {%- endfor %}
),

ledger as (
    select * from {{ ref('stg_ops_messages') }}
),

touches as (
    -- a sent message touches at its send time; a holdout row at its planned time
    select
        ledger.message_id,
        ledger.campaign_id,
        ledger.run_id,
        ledger.step,
        ledger.channel,
        ledger.variant,
        ledger.customer_id,
        ledger.status = 'holdout' as is_holdout,
        case when ledger.status = 'sent' then ledger.sent_at else ledger.planned_at end
            as touched_at,
        coalesce(windows.window_hours, {{ fallback_hours | float }}::float8) as window_hours
    from ledger
    left join windows on windows.channel = ledger.channel
    where ledger.status in ('sent', 'holdout')
),

touches_until_as_of as (
    select * from touches
    where touched_at is not null and touched_at <= {{ as_of() }}
),

purchases as (
    select
        purchase_id as conversion_id,
        source as conversion_source,
        customer_id,
        purchased_at as converted_at,
        revenue
    from {{ ref('int_purchases_unified') }}
    where purchased_at <= {{ as_of() }}
),

touches_and_purchases_in_window as (
    select
        touches_until_as_of.*,
        purchases.conversion_id,
        purchases.conversion_source,
        purchases.converted_at,
        purchases.revenue
    from touches_until_as_of
    join purchases
        on purchases.customer_id = touches_until_as_of.customer_id
        and purchases.converted_at > touches_until_as_of.touched_at
        and purchases.converted_at
            <= touches_until_as_of.touched_at
               + touches_until_as_of.window_hours * interval '1 hour'
),

last_sent_touch as (
    select distinct on (conversion_source, conversion_id) *
    from touches_and_purchases_in_window
    where not is_holdout
    order by conversion_source, conversion_id, touched_at desc, message_id desc
),

holdout_counterfactual as (
    select holdout.*
    from touches_and_purchases_in_window as holdout
    where holdout.is_holdout
      and not exists (
          select 1
          from touches_and_purchases_in_window as sent
          where not sent.is_holdout
            and sent.conversion_source = holdout.conversion_source
            and sent.conversion_id = holdout.conversion_id
            and (sent.touched_at, sent.message_id) > (holdout.touched_at, holdout.message_id)
      )
),

credited as (
    select * from last_sent_touch
    union all
    select * from holdout_counterfactual
)

select
    message_id || ':' || conversion_source || ':' || conversion_id as attribution_id,
    message_id,
    customer_id,
    conversion_id,
    conversion_source,
    converted_at,
    revenue,
    campaign_id,
    run_id,
    step,
    channel,
    variant,
    is_holdout,
    touched_at as message_at,
    window_hours,
    {{ days_between('touched_at', 'converted_at') }} * 24 as hours_to_conversion,
    conversion_source || ':' || conversion_id as conversion_key,
    {{ as_of() }} as as_of
from credited
