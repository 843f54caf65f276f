-- depends_on: {{ ref('int_send_time_customers_changed') }}
-- One row per site session (customer_id, session_id) with events in the
-- send_time_history_days before as_of: its first and last event in that history.
-- int_send_time_signals counts a session at started_at; reading these rows for the
-- customers it recomputes costs a fraction of reading their events. Rules in
-- int_send_time_sessions.yml.
--
-- Incremental per session (strategy replace_rows): with `earlier` and `later` the
-- smaller and the greater of the previous build's as_of and this one, every event that
-- entered, left or may have arrived late lies in the moved stretches
--     M = (earlier - lookback, later]  and  (earlier - history, later - history],
-- and the rest of both histories, U = (later - history, earlier - lookback], holds the
-- same events as at the previous build. A session with events in M is recomputed as the
-- bounds of its events in M within the new history and of its events in U; the latter
-- are the stored bounds where they lie in U, and are read through the index on
-- (customer_id, occurred_at) only for a session whose stored span crosses an end of U
-- (a session straddling the history's start or the lookback's). Sessions without events
-- in M keep their row.
{%- set history = "interval '" ~ var('send_time_history_days') ~ " days'" %}
{%- set lookback = days_interval(var('incremental_lookback_days') | int) %}
{%- set previous_as_of = none %}
{%- if is_incremental() %}
    {%- set previous_as_of = recorded_incremental_as_of([this.identifier]) %}
{%- endif %}
{%- set columns = ['customer_id', 'session_id', 'started_at', 'ended_at'] %}
with

{% if previous_as_of is none %}
sessions as (

    select customer_id, session_id, min(occurred_at) as started_at, max(occurred_at) as ended_at
    from {{ ref('stg_events') }}
    where customer_id is not null
      and session_id is not null
      and occurred_at <= {{ as_of() }}
      and occurred_at > {{ as_of() }} - {{ history }}
    group by customer_id, session_id

)

{% if is_incremental() %}
-- no consistent previous build: every session is recomputed, and the stored ones that
-- are gone become tombstones
select {{ columns | join(', ') }} from sessions
union all
select stored.customer_id, stored.session_id, null, null
from {{ this }} as stored
where not exists (
    select 1 from sessions
    where sessions.customer_id = stored.customer_id and sessions.session_id = stored.session_id
)
{% else %}
select {{ columns | join(', ') }} from sessions
{% endif %}

{% else %}
{%- set earlier = 'least(' ~ previous_as_of ~ ', ' ~ as_of() ~ ')' %}
{%- set later = 'greatest(' ~ previous_as_of ~ ', ' ~ as_of() ~ ')' %}
{%- set u_low = '(' ~ later ~ ' - ' ~ history ~ ')' %}
{%- set u_high = '(' ~ earlier ~ ' - ' ~ lookback ~ ')' %}
moved as (

    -- the sessions with events in M, and the bounds of those events within the new
    -- history; stg_events stops at this as_of, so in a build for an earlier as_of the
    -- sessions with events after it are found in the stored rows (a constant condition
    -- first: a build going forward does not scan the table)
    select customer_id, session_id, min(in_history) as moved_min, max(in_history) as moved_max
    from (
        select
            customer_id,
            session_id,
            case when occurred_at > {{ as_of() }} - {{ history }} then occurred_at end as in_history
        from {{ ref('stg_events') }}
        where customer_id is not null
          and session_id is not null
          and ((occurred_at > {{ earlier }} - {{ lookback }} and occurred_at <= {{ later }})
               or (occurred_at > {{ earlier }} - {{ history }} and occurred_at <= {{ later }} - {{ history }}))
        union all
        select customer_id, session_id, null
        from {{ this }}
        where {{ as_of() }} < {{ previous_as_of }}
          and ended_at > {{ as_of() }}
    ) as keys
    group by customer_id, session_id

),

with_stored as (

    select m.customer_id, m.session_id, m.moved_min, m.moved_max,
           s.started_at as stored_start, s.ended_at as stored_end,
           coalesce(s.started_at > {{ u_low }} and s.ended_at <= {{ u_high }}, false) as stored_in_u
    from moved as m
    left join {{ this }} as s
        on s.customer_id = m.customer_id and s.session_id = m.session_id

),

bounded as (

    -- the session's events in U: none when it had no stored row or its stored span
    -- misses U; the stored bounds where both lie in U; else read from the events,
    -- between the stored bounds (U lies in the previous history, so the stored span
    -- holds every event of the session in U)
    select
        w.customer_id,
        w.session_id,
        w.moved_min,
        w.moved_max,
        case when w.stored_in_u then w.stored_start else u.u_min end as u_min,
        case when w.stored_in_u then w.stored_end else u.u_max end as u_max
    from with_stored as w
    left join lateral (
        select min(e.occurred_at) as u_min, max(e.occurred_at) as u_max
        from {{ ref('stg_events') }} as e
        where e.customer_id = w.customer_id
          and e.session_id = w.session_id
          and e.occurred_at > {{ u_low }} and e.occurred_at <= {{ u_high }}
          and e.occurred_at >= w.stored_start and e.occurred_at <= w.stored_end
          -- conditions on the outer row alone: the index is not read for the others
          and not w.stored_in_u
          and w.stored_start <= {{ u_high }}
          and w.stored_end > {{ u_low }}
    ) as u on true

)

-- a session with no event in the new history comes back as a tombstone (started_at
-- NULL), so the strategy removes its row
select
    customer_id,
    session_id,
    least(moved_min, u_min) as started_at,
    greatest(moved_max, u_max) as ended_at
from bounded
{% endif %}
