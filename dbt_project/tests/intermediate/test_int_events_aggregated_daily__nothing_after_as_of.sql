-- The incremental aggregate never holds events after as_of, also right after a build
-- for an as_of earlier than the previous one (the replace_window strategy's promise).
select customer_id, event_date, last_event_at
from {{ ref('int_events_aggregated_daily') }}
where last_event_at > {{ as_of() }}
   or event_date > {{ utc_date(as_of()) }}
