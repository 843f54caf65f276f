{#-
    The two shapes of staging model that read raw rows by a time of their own or of
    their parent (as_of: CONTRACT.md section 2).
-#}

{#- The rows of raw.<table> stamped at or before as_of (`stamp`: the table's own time). -#}
{% macro raw_rows_as_of(table, stamp) -%}
    select * from {{ source('raw', table) }}
    where {{ stamp }} <= {{ as_of() }}
{%- endmacro %}


{#-
    A whole staging model of purchase lines (raw.order_items, raw.offline_receipt_items):
    a line carries no time of its own, so it counts from its parent's (`parent_table`,
    joined on `key`, time `parent_stamp`); the columns are the parent's key, line_no,
    product_id, quantity and unit_price.
-#}
{% macro purchase_lines_as_of(lines_table, parent_table, key, parent_stamp) -%}
with

source as (

    select items.*
    from {{ source('raw', lines_table) }} as items
    where exists (
        select 1
        from {{ source('raw', parent_table) }} as parents
        where parents.{{ key }} = items.{{ key }}
          and parents.{{ parent_stamp }} <= {{ as_of() }}
    )

),

renamed as (

    select
        {{ key }},
        line_no,
        product_id,
        quantity,
        unit_price

    from source

)

select * from renamed
{%- endmacro %}
