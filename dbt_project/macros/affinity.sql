{#-
    affinity_score: how strongly a customer is drawn to a category, as of as_of.

        score = ( affinity_purchase_weight * purchases          (all time)
                + affinity_cart_weight     * carts_90d
                + affinity_wishlist_weight * wishlists_90d
                + affinity_view_weight     * views_90d )
                * 0.5 ^ (days from last_interaction_at to the customer's latest
                         interaction in any category / affinity_half_life_days)

    rounded to 6 decimals (double precision). Defaults 5 / 3 / 2 / 1 and a 90-day
    half-life: a purchase weighs as much as five recent views, and a category the
    customer left 90 days before their latest activity counts half. The counts of the
    window cover (as_of - affinity_views_window_days, as_of].

    The decay is relative to the customer's own latest interaction, not to as_of: the
    ranking of a customer's categories would not change with a decay to as_of (it is the
    same factor for all of them), and this way a customer's scores change only when
    their data or their 90-day window does, which lets the marts be maintained per
    changed customer.
-#}
{% macro affinity_score(purchases, carts, wishlists, views, last_interaction_at, latest_interaction_at) -%}
    round((
        (
            {{ var('affinity_purchase_weight') }} * {{ purchases }}
            + {{ var('affinity_cart_weight') }} * {{ carts }}
            + {{ var('affinity_wishlist_weight') }} * {{ wishlists }}
            + {{ var('affinity_view_weight') }} * {{ views }}
        )::float8
        * power(
            0.5::float8,
            {{ days_between(last_interaction_at, latest_interaction_at) }} / {{ var('affinity_half_life_days') }}::float8
        )
    )::numeric, 6)::float8
{%- endmacro %}
