{#-
    Incremental strategy `replace_all`: replace the whole table, or leave it untouched.

    The model, when is_incremental(), selects either nothing (nothing to recompute: the
    target is kept as it is, at the cost of checking its condition) or every row of the
    new table plus one "tombstone" row whose `meta.row_key_column` is NULL (so that a
    recomputation with no rows at all still empties the target). The strategy then
      1. deletes every target row, if the temp table has any row,
      2. inserts the temp rows that are not tombstones.
    Used by product_recommendations, a snapshot recomputed when its moment moves.
-#}
{% macro get_incremental_replace_all_sql(arg_dict) %}
    {%- set meta = config.get("meta") or {} -%}
    {%- set row_key_column = meta.get("row_key_column") -%}
    {%- if not row_key_column -%}
        {{ exceptions.raise_compiler_error("incremental_strategy replace_all needs meta.row_key_column") }}
    {%- endif -%}
    {%- set target_relation = arg_dict["target_relation"] -%}
    {%- set temp_relation = arg_dict["temp_relation"] -%}
    {%- set columns = get_quoted_csv(arg_dict["dest_columns"] | map(attribute="name")) -%}
    delete from {{ target_relation }}
    where exists (select 1 from {{ temp_relation }});

    insert into {{ target_relation }} ({{ columns }})
    select {{ columns }}
    from {{ temp_relation }}
    where {{ adapter.quote(row_key_column) }} is not null;
{% endmacro %}
