{#-
    Fails for every combination of the given columns that occurs more than once
    (NULLs compare equal, as in GROUP BY). The project uses no packages, so this stands
    in for dbt_utils.unique_combination_of_columns.
-#}
{% test unique_combination_of_columns(model, combination_of_columns) %}
    select {{ combination_of_columns | join(', ') }}, count(*) as occurrences
    from {{ model }}
    group by {{ combination_of_columns | join(', ') }}
    having count(*) > 1
{% endtest %}
