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
    With `meta.unique_key` (the columns that identify a row), only the rows that differ
    are written: replace_keyed_rows_sql below.
-#}
{% macro get_incremental_replace_partitions_sql(arg_dict) %}
    {%- set meta = config.get("meta") or {} -%}
    {%- set partition_column = meta.get("partition_column") -%}
    {%- set row_key_column = meta.get("row_key_column") -%}
    {%- if not partition_column or not row_key_column -%}
        {{ exceptions.raise_compiler_error("incremental_strategy replace_partitions needs meta.partition_column and meta.row_key_column") }}
    {%- endif -%}
    {{ replace_keyed_rows_sql(arg_dict, [partition_column], row_key_column, meta.get("unique_key")) }}
{% endmacro %}


{#-
    The statements of both replace strategies (replace_partitions, replace_rows): the
    target rows whose `key_columns` occur in the temp table are replaced by the temp rows
    whose `row_key_column` is not NULL (the others are tombstones).

    Without `unique_key`: delete every such target row, insert every such temp row.
    With `unique_key` (the columns that identify a row in the target): a recomputed row
    equal to the stored one in every column (IS NOT DISTINCT FROM) is left as it is; only
    the stored rows without an equal new row are deleted and only the new rows without an
    equal stored row inserted. A daily build recomputes many more rows than it changes (a
    customer with one session leaving the history keeps most of their rows), and a row
    not rewritten costs neither a new heap tuple, nor index entries, nor a dead tuple.
    One statement: the stored rows of the recomputed keys are read once (`stored`, through
    the index on the keys) and compared with the temp rows by hash on the unique key; the
    rows to delete are fetched by their ctid; the insert sees the table as it was before
    the delete (a data-modifying CTE), so the two sides of the comparison agree.
-#}
{% macro replace_keyed_rows_sql(arg_dict, key_columns, row_key_column, unique_key=none) %}
    {%- set target_relation = arg_dict["target_relation"] -%}
    {%- set temp_relation = arg_dict["temp_relation"] -%}
    {%- set column_names = arg_dict["dest_columns"] | map(attribute="name") | list -%}
    {%- set columns = get_quoted_csv(column_names) -%}
    {%- set keys = get_quoted_csv(key_columns) -%}
    {%- if not unique_key %}
    delete from {{ target_relation }}
    where ({{ keys }}) in (
        select {{ keys }} from {{ temp_relation }}
    );

    insert into {{ target_relation }} ({{ columns }})
    select {{ columns }}
    from {{ temp_relation }}
    where {{ adapter.quote(row_key_column) }} is not null;
    {%- else %}
    {%- set same = [] -%}
    {%- for column in unique_key -%}
        {%- do same.append('recomputed.' ~ adapter.quote(column) ~ ' = stored.' ~ adapter.quote(column)) -%}
    {%- endfor -%}
    {%- for column in column_names if column not in unique_key -%}
        {%- do same.append('recomputed.' ~ adapter.quote(column) ~ ' is not distinct from stored.' ~ adapter.quote(column)) -%}
    {%- endfor %}
    with stored as materialized (
        select ctid as stored_ctid, {{ columns }}
        from {{ target_relation }}
        where ({{ keys }}) in (
            select {{ keys }} from {{ temp_relation }}
        )
    ),

    deleted as (
        delete from {{ target_relation }}
        where ctid = any (array(
            select stored.stored_ctid
            from stored
            where not exists (
                select 1 from {{ temp_relation }} as recomputed
                where {{ same | join(' and ') }}
            )
        ))
    )

    insert into {{ target_relation }} ({{ columns }})
    select {{ columns }}
    from {{ temp_relation }} as recomputed
    where recomputed.{{ adapter.quote(row_key_column) }} is not null
      and not exists (
          select 1 from stored
          where {{ same | join(' and ') }}
      );
    {%- endif %}
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
