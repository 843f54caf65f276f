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
    {#- a key identifies one row: only the rows that differ are written -#}
    {{ replace_keyed_rows_sql(arg_dict, key_columns, row_key_column, key_columns) }}
{% endmacro %}
