{#-
    The checks of one model's columns in one test (one test node, and the row checks in one
    scan of the table) instead of one test per column and check. Each argument keeps the
    meaning of the test it stands for:
      not_null:        columns that must never be NULL (dbt's not_null);
      not_negative:    columns that must not be below zero, NULL passes (not_negative);
      accepted_values: {column: [values]}: the column holds only these values, NULL passes
                       (dbt's accepted_values; numbers compare unquoted, text quoted);
      unique:          columns whose non-NULL values occur once each (dbt's unique);
      unique_combinations: [[columns], ...]: each combination occurs once, NULLs compare
                       equal (unique_combination_of_columns).
    Fails with one row per failing value or repeated key, naming the check
    (`<column> is null`, `<column> < 0`, `<column> not accepted`, `<columns> repeated`).
    A `where` in the test's config restricts every check to the rows it selects, as for
    any generic test.
-#}
{% test column_checks(model, not_null=[], not_negative=[], accepted_values={}, unique=[], unique_combinations=[]) %}
{%- set checks = [] -%}
{%- for column in not_null -%}
    {%- do checks.append((column ~ " is null", column ~ " is null")) -%}
{%- endfor -%}
{%- for column in not_negative -%}
    {%- do checks.append((column ~ " < 0", column ~ " < 0")) -%}
{%- endfor -%}
{%- for column, values in accepted_values.items() -%}
    {%- set literals = [] -%}
    {%- for value in values -%}
        {%- do literals.append(value if value is number else "'" ~ (value | string | replace("'", "''")) ~ "'") -%}
    {%- endfor -%}
    {%- do checks.append((column ~ " not in (" ~ literals | join(", ") ~ ")", column ~ " not accepted")) -%}
{%- endfor -%}
{%- set keys = [] -%}
{%- for column in unique -%}
    {%- do keys.append(([column], column ~ " is not null")) -%}
{%- endfor -%}
{%- for combination in unique_combinations -%}
    {%- do keys.append((combination, none)) -%}
{%- endfor -%}
{%- if not checks and not keys -%}
    {{ exceptions.raise_compiler_error("column_checks needs at least one check") }}
{%- endif -%}
{%- set parts = [] -%}
{%- if checks -%}
    {%- set part -%}
    select failed_check
    from (
        select unnest(array[
            {%- for condition, label in checks %}
            case when {{ condition }} then '{{ label | replace("'", "''") }}' end{{ "," if not loop.last }}
            {%- endfor %}
        ]) as failed_check
        from {{ model }}
        where {% for condition, _ in checks %}({{ condition }}){{ " or " if not loop.last }}{% endfor %}
    ) as checked
    where failed_check is not null
    {%- endset -%}
    {%- do parts.append(part) -%}
{%- endif -%}
{%- for columns, condition in keys -%}
    {%- set part -%}
    select '{{ columns | join(", ") }} repeated' as failed_check
    from {{ model }}
    {%- if condition %}
    where {{ condition }}
    {%- endif %}
    group by {{ columns | join(", ") }}
    having count(*) > 1
    {%- endset -%}
    {%- do parts.append(part) -%}
{%- endfor %}
{{ parts | join("\nunion all\n") }}
{% endtest %}
