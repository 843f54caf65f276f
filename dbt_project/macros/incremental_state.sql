{#-
    intermediate.incremental_state: the as_of each incremental mart was last built for.

    product_recommendations records the moment of its snapshot (recommendations_as_of()),
    and recomputes only when that moment moves; the row `product_recommendations:rewritten`
    exists while the table holds what the last build of it wrote (record_rewrite below),
    so its data tests check the table once per snapshot, not on the days it stands still.
    The affinity marts are maintained per customer; to know which customers' 90-day
    windows moved, int_affinity_customers_changed needs the as_of of the previous build.
    The project's on-run-start hook creates the table (once, before any model: two models
    creating it at once would race); each such model records its as_of in a post-hook,
    inside the model's own transaction, so the record and the data never disagree.
-#}
{% macro incremental_state_relation() -%}
    {{ return(api.Relation.create(database=target.database, schema=generate_schema_name('intermediate', none) | trim, identifier='incremental_state')) }}
{%- endmacro %}


{% macro create_incremental_state() -%}
    create schema if not exists {{ incremental_state_relation().schema }};
    create table if not exists {{ incremental_state_relation() }} (
        model_name text primary key,
        as_of timestamptz not null
    )
{%- endmacro %}


{% macro record_incremental_state(value=none) -%}
    insert into {{ incremental_state_relation() }} (model_name, as_of)
    values ('{{ this.identifier }}', {{ value if value is not none else as_of() }})
    on conflict (model_name) do update set as_of = excluded.as_of
{%- endmacro %}


{#-
    The as_of the given models were last built for, as a timestamptz literal, when every
    one of them has a record and the records agree; else none (first build,
    --full-refresh, one model built without the others). Read when the model runs
    (`execute`), before this build writes any of the records.
-#}
{% macro recorded_incremental_as_of(model_names) -%}
    {%- if not execute or flags.FULL_REFRESH -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set state = adapter.get_relation(database=target.database, schema=incremental_state_relation().schema, identifier=incremental_state_relation().identifier) -%}
    {%- if state is none -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set recorded = run_query(
        "select count(*) as models, count(distinct as_of) as as_ofs, "
        ~ "to_char(min(as_of) at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') as as_of "
        ~ "from " ~ state ~ " where model_name in ('" ~ model_names | join("', '") ~ "')") -%}
    {%- if recorded.rows[0][0] == model_names | length and recorded.rows[0][1] == 1 -%}
        {{ return("('" ~ recorded.rows[0][2] ~ "'::timestamptz)") }}
    {%- endif -%}
    {{ return(none) }}
{%- endmacro %}


{#-
    For a model replaced whole or left untouched (strategy replace_all): a pre-hook, in the
    model's transaction, that leaves the row `<model>:rewritten` in incremental_state
    exactly when this build rewrites the table, i.e. when the table is built from nothing
    (first build, --full-refresh) or its recorded moment differs from `moment`, the
    condition the model itself checks. The model's data tests read it in their `where`, so
    an unchanged table is not tested again (it was tested when written).
-#}
{% macro record_rewrite(moment) -%}
    delete from {{ incremental_state_relation() }} where model_name = '{{ this.identifier }}:rewritten';
    insert into {{ incremental_state_relation() }} (model_name, as_of)
    select '{{ this.identifier }}:rewritten', {{ moment }}
    {%- if is_incremental() %}
    where not exists (
        select 1 from {{ incremental_state_relation() }}
        where model_name = '{{ this.identifier }}' and as_of = {{ moment }}
    )
    {%- endif %}
{%- endmacro %}
