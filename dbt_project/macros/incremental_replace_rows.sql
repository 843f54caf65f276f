{#-
    Incremental strategy `replace_rows`: replace the rows of the keys a run recomputed.

    `meta.key_columns` lists the columns of a row's key (e.g. customer_id, product_id).
    The model, when is_incremental(), selects the complete new row of every key it
    recomputes, or one "tombstone" row whose `meta.row_key_column` is NULL when the key
    has no row any more. The strategy then
      1. deletes every target row whose key occurs in the temp table,
      2. inserts the temp rows that are not tombstones.
    A full build (first run, --full-refresh) emits no tombstones.
-#}
{% macro get_incremental_replace_rows_sql(arg_dict) %}
    {%- set meta = config.get("meta") or {} -%}
    {%- set key_columns = meta.get("key_columns") or [] -%}
    {%- set row_key_column = meta.get("row_key_column") -%}
    {%- if not key_columns or not row_key_column -%}
        {{ exceptions.raise_compiler_error("incremental_strategy replace_rows needs meta.key_columns and meta.row_key_column") }}
    {%- endif -%}
    {%- set target_relation = arg_dict["target_relation"] -%}
    {%- set temp_relation = arg_dict["temp_relation"] -%}
    {%- set columns = get_quoted_csv(arg_dict["dest_columns"] | map(attribute="name")) -%}
    {%- set keys = get_quoted_csv(key_columns) -%}
    delete from {{ target_relation }}
    where ({{ keys }}) in (
        select {{ keys }} from {{ temp_relation }}
    );

    insert into {{ target_relation }} ({{ columns }})
    select {{ columns }}
    from {{ temp_relation }}
    where {{ adapter.quote(row_key_column) }} is not null;
{% endmacro %}
