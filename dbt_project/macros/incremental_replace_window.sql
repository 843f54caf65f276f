{#-
    Incremental strategy `replace_window`: recompute a trailing window of days and replace
    exactly those days in the target, as of var as_of.

    A model using it filters its input, when is_incremental(), to
        <time column> >= utc_midnight(incremental_window_start(this, <day column>))
    and names its day column in `meta.window_column`. Each incremental run then
      1. builds the window into a temp table (dbt's incremental materialization),
      2. deletes every target row whose day is >= the same window start,
      3. inserts the temp rows.

    The window starts at   least(newest day in the target - var incremental_lookback_days,
                                 the UTC day of as_of).
    - Forward runs (as_of later than the last one) recompute the last few days, so a
      daily run over 1% new data reads the recent days only, and events that arrive up
      to `incremental_lookback_days` late are still counted.
    - A run for an EARLIER as_of than the data already aggregated deletes every day from
      the as_of day on and rebuilds that day from data up to as_of, so the table holds
      exactly what a full build for that as_of would hold. No full refresh is needed and
      plain `dbt build` (Cosmos, CLI) behaves the same as `retention build`.
    - An empty target has no newest day: the window then starts at 0001-01-01 (everything).
    Both the filter and the delete evaluate the window start before anything is written
    in the run (the temp table is built first, the delete computes it in one statement),
    so they always agree.

    Limit: data that arrives more than the lookback late for days already aggregated is
    only picked up by a full refresh (`retention build --full-refresh`).
-#}
{% macro incremental_window_start(relation, day_column) -%}
    (
        select least(
            coalesce(max({{ day_column }}) - {{ var('incremental_lookback_days') | int }}, date '0001-01-01'),
            {{ utc_date(as_of()) }}
        )
        from {{ relation }}
    )
{%- endmacro %}


{% macro get_incremental_replace_window_sql(arg_dict) %}
    {%- set target_relation = arg_dict["target_relation"] -%}
    {%- set day_column = (config.get("meta") or {}).get("window_column") -%}
    {%- if not day_column -%}
        {{ exceptions.raise_compiler_error("incremental_strategy replace_window needs meta.window_column") }}
    {%- endif -%}
    delete from {{ target_relation }}
    where {{ adapter.quote(day_column) }} >= {{ incremental_window_start(target_relation, adapter.quote(day_column)) }};

    {{ get_insert_into_sql(target_relation, arg_dict["temp_relation"], arg_dict["dest_columns"]) }}
{% endmacro %}
