{#-
    Custom schemas are used as they are: a model configured with schema `marts` lands in
    `marts`, not `<target schema>_marts` (dbt's default). CONTRACT.md section 4 fixes the
    schema names other programs read.
-#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema }}
    {%- else -%}
        {{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}
