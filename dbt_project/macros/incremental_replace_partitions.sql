{#-
    Incremental strategy `replace_partitions`: replace every row of the partitions (e.g.
    customers) a run recomputed.

    The model, when is_incremental(), selects the complete new rows of each partition it
    recomputes, plus one "tombstone" row per recomputed partition whose
    `meta.row_key_column` is NULL, so that a partition that has no rows any more (e.g.
    after a build for an earlier as_of) is emptied too. The strategy then
      1. deletes every target row whose `meta.partition_column` occurs in the temp table,
      2. inserts the temp rows that are not tombstones.
    A full build (first run, --full-refresh) emits no tombstones.
-#}
{% macro get_incremental_replace_partitions_sql(arg_dict) %}
    {%- set meta = config.get("meta") or {} -%}
    {%- set partition_column = meta.get("partition_column") -%}
    {%- set row_key_column = meta.get("row_key_column") -%}
    {%- if not partition_column or not row_key_column -%}
        {{ exceptions.raise_compiler_error("incremental_strategy replace_partitions needs meta.partition_column and meta.row_key_column") }}
    {%- endif -%}
    {{ replace_keyed_rows_sql(arg_dict, [partition_column], row_key_column) }}
{% endmacro %}


{#-
    The statements of both replace strategies (replace_partitions, replace_rows): delete the
    target rows whose `key_columns` occur in the temp table, then insert the temp rows whose
    `row_key_column` is not NULL (the others are tombstones).
-#}
{% macro replace_keyed_rows_sql(arg_dict, key_columns, row_key_column) %}
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


{#-
    The select of an incremental run of a replace_partitions model: every partition listed
    in `changed` (a relation with the partition column), joined to its new rows in the CTE
    `rows`, so a partition without rows any more comes back as one tombstone (NULL in
    every other column). `columns`: the model's columns in order; the partition column
    is taken from `changed`.
-#}
{% macro replace_partitions_select(rows, columns, changed, partition_column='customer_id') -%}
select
    {%- for column in columns %}
    {{ 'changed.' ~ column if column == partition_column else rows ~ '.' ~ column }}{{ ',' if not loop.last }}
    {%- endfor %}
from {{ changed }} as changed
left join {{ rows }}
    on {{ rows }}.{{ partition_column }} = changed.{{ partition_column }}
{%- endmacro %}
