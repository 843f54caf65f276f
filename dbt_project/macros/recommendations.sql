{#-
    Functions product_recommendations calls on the interaction arrays of
    int_customer_product_interactions (created in the intermediate schema by the project's
    on-run-start hook, before any model runs).

    Each is a function rather than a subquery in the model: a correlated subquery
    (SubPlan) makes every plan node that reads it parallel-restricted, so the model's
    join of first purchases with later interactions would run on one core; a function
    declared PARALLEL SAFE lets PostgreSQL run that join, its sort and its grouping in
    parallel workers. (SQL functions with an aggregate or a subquery are not inlined.)
    The arrays are in time order (starts: by start, then end; bought: ascending).

    - recs_spans_meet(starts, ends, lo, hi): some span [s, t] has t > lo and s <= hi
    - recs_any_between(times, lo, hi): some time t has lo < t <= hi
    - recs_starts_upto(starts, upto): the starts <= upto, in order
    - recs_ends_upto(starts, ends, upto): the ends of those spans, each at most upto
    - recs_ends_max_upto(starts, ends, upto): the latest of those ends
    - recs_last_upto(times, upto): the latest time <= upto
    - recs_times_upto(times, upto): the times <= upto, in order
    Each returns NULL where the aggregate over no element does (max, array_agg).
-#}
{% macro create_recommendation_functions() -%}
    {%- set schema = generate_schema_name('intermediate', none) | trim -%}
    create schema if not exists {{ schema }};
    create or replace function {{ schema }}.recs_spans_meet(
        starts timestamptz[], ends timestamptz[], lo timestamptz, hi timestamptz)
        returns boolean language sql immutable parallel safe
        as $$ select exists (select from unnest(starts, ends) as span(s, t)
                             where span.t > lo and span.s <= hi) $$;
    create or replace function {{ schema }}.recs_any_between(
        times timestamptz[], lo timestamptz, hi timestamptz)
        returns boolean language sql immutable parallel safe
        as $$ select exists (select from unnest(times) as p(at) where p.at > lo and p.at <= hi) $$;
    create or replace function {{ schema }}.recs_starts_upto(
        starts timestamptz[], upto timestamptz)
        returns timestamptz[] language sql immutable parallel safe
        as $$ select array_agg(s order by i) from unnest(starts) with ordinality as x(s, i)
              where s <= upto $$;
    create or replace function {{ schema }}.recs_ends_upto(
        starts timestamptz[], ends timestamptz[], upto timestamptz)
        returns timestamptz[] language sql immutable parallel safe
        as $$ select array_agg(least(t, upto) order by i)
              from unnest(starts, ends) with ordinality as x(s, t, i) where s <= upto $$;
    create or replace function {{ schema }}.recs_ends_max_upto(
        starts timestamptz[], ends timestamptz[], upto timestamptz)
        returns timestamptz language sql immutable parallel safe
        as $$ select max(least(t, upto)) from unnest(starts, ends) as x(s, t) where s <= upto $$;
    create or replace function {{ schema }}.recs_last_upto(
        times timestamptz[], upto timestamptz)
        returns timestamptz language sql immutable parallel safe
        as $$ select max(at) from unnest(times) as p(at) where at <= upto $$;
    create or replace function {{ schema }}.recs_times_upto(
        times timestamptz[], upto timestamptz)
        returns timestamptz[] language sql immutable parallel safe
        as $$ select array_agg(at order by i) from unnest(times) with ordinality as x(at, i)
              where at <= upto $$
{%- endmacro %}


{% macro recs_function(name) -%}
    {{ generate_schema_name('intermediate', none) | trim }}.{{ name }}
{%- endmacro %}
