{#-
    as_of: the moment every model is computed for (CONTRACT.md section 2).

    `as_of()` renders the moment as a timestamptz literal: the var `as_of` when one is
    given (`--vars '{as_of: ...}'` by hand, a unit test's override), else the environment
    variable RETENTION_DBT_AS_OF, which `retention.warehouse.build` sets. One of them is
    required when models execute (there is no default: the wall clock is never read). It
    must look like an ISO-8601 timestamp with an offset or Z, e.g. 2026-10-31T00:00:00Z;
    anything else stops the build (it is pasted into SQL).

    The environment variable is read only while nodes execute, never while dbt parses the
    project, so a build as of another moment keeps dbt's partial parsing (a var given on
    the command line is part of what dbt checks before reusing its parse, and a new value
    costs a full parse of the project). For the same reason the `where` of a data test
    says `__as_of__` instead of calling as_of(): `get_where_subquery` below puts the
    literal in when the test runs.

    Conventions used everywhere:
    - data stamped at or before as_of counts, data after it is ignored (`<= as_of`);
    - day and month boundaries are UTC;
    - "N days" is N * 24 hours (`days_interval(N)`), never a calendar step that moves
      with daylight saving time.
-#}
{% macro as_of() -%}
    ('{{ as_of_value() }}'::timestamptz)
{%- endmacro %}


{#- as_of() without the literal's quotes and cast: the ISO-8601 text, with an offset. -#}
{% macro as_of_value() -%}
    {%- set value = var('as_of', none) -%}
    {%- if (value is none or (value | string | trim) == '') and execute -%}
        {%- set value = env_var('RETENTION_DBT_AS_OF', '') -%}
    {%- endif -%}
    {%- if value is none or (value | string | trim) == '' -%}
        {%- if execute -%}
            {{ exceptions.raise_compiler_error("as_of is required: set RETENTION_DBT_AS_OF or pass --vars '{as_of: \"2026-10-31T00:00:00Z\"}'") }}
        {%- endif -%}
        {%- set value = '1970-01-01T00:00:00Z' -%}
    {%- endif -%}
    {%- set value = value | string | trim -%}
    {%- if not modules.re.fullmatch('[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?)?(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)?', value) -%}
        {{ exceptions.raise_compiler_error("var 'as_of' is not an ISO-8601 timestamp: " ~ value) }}
    {%- endif -%}
    {%- if value[10:] == '' or not modules.re.search('(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)$', value[10:]) -%}
        {#- a date or a timestamp without offset means UTC -#}
        {%- set value = value ~ ('T00:00:00' if value | length == 10 else '') ~ '+00:00' -%}
    {%- endif -%}
    {{ value }}
{%- endmacro %}


{#- The UTC calendar day of a timestamptz expression. -#}
{% macro utc_date(expression) -%}
    (({{ expression }}) at time zone 'UTC')::date
{%- endmacro %}


{#- The UTC midnight starting a date expression, as timestamptz. -#}
{% macro utc_midnight(date_expression) -%}
    (({{ date_expression }})::timestamp at time zone 'UTC')
{%- endmacro %}


{#- N days as an interval of N * 24 hours. -#}
{% macro days_interval(days) -%}
    (({{ days }}) * interval '24 hours')
{%- endmacro %}


{#- Decimal days between two timestamptz expressions (seconds / 86400), double precision. -#}
{% macro days_between(start, finish) -%}
    ((extract(epoch from ({{ finish }}) - ({{ start }})) / 86400)::float8)
{%- endmacro %}


{#-
    How many of a daily row's events fall after `boundary` (a timestamptz expression),
    exact to the second: whole days after the boundary's UTC day count fully, on the
    boundary day itself the row's time array is checked. Rows of int_events_aggregated_daily
    only ever hold events up to as_of, so "after boundary" means "in (boundary, as_of]".
-#}
{% macro count_after(count_column, times_column, boundary, day_column='event_date') -%}
    case
        when {{ day_column }} > {{ utc_date(boundary) }} then {{ count_column }}
        when {{ day_column }} = {{ utc_date(boundary) }} then (
            select count(*) from unnest({{ times_column }}) as t(at) where t.at > {{ boundary }}
        )
        else 0
    end
{%- endmacro %}


{#-
    The moment product_recommendations is computed for: as_of rounded down to the grid
    of var recommendations_refresh_days (default 7) days that starts on Monday
    1970-01-05 00:00 UTC, so with 7 the Monday 00:00 UTC at or before as_of. 0 means
    as_of itself (recomputed whenever as_of moves).
-#}
{% macro recommendations_as_of() -%}
    {%- set days = var('recommendations_refresh_days', 7) | int -%}
    {%- if days < 0 -%}
        {{ exceptions.raise_compiler_error("var recommendations_refresh_days must be 0 or more, got " ~ days) }}
    {%- elif days == 0 -%}
        {{ as_of() }}
    {%- else -%}
        {#- computed here, not in SQL: a literal is a constant to the planner, where the
            expression (extract is only stable) would be evaluated again for every row it
            filters -#}
        {%- set epoch = modules.datetime.datetime.fromisoformat(as_of_value() | trim | upper).timestamp() -%}
        {%- set step = days * 86400 -%}
        {%- set moment = ((epoch - 345600) // step) * step + 345600 -%}
        ('{{ modules.datetime.datetime.fromtimestamp(moment, modules.pytz.utc).isoformat() }}'::timestamptz)
    {%- endif -%}
{%- endmacro %}


{#-
    The relation a data test reads, narrowed by its `where` config (dbt's own macro, with
    `__as_of__` in the condition replaced by as_of() when the test runs).
-#}
{% macro default__get_where_subquery(relation) -%}
    {%- set where = config.get('where', '') -%}
    {%- if where -%}
        {%- if '__as_of__' in where -%}
            {%- set where = where | replace('__as_of__', as_of()) -%}
        {%- endif -%}
        {%- set filtered -%}
            (select * from {{ relation }} where {{ where }}) dbt_subquery
        {%- endset -%}
        {%- do return(filtered) -%}
    {%- else -%}
        {%- do return(relation) -%}
    {%- endif -%}
{%- endmacro %}
