{#-
    affinity_score: how strongly a customer is drawn to a category, as of as_of.

        score = ( affinity_purchase_weight * purchases          (all time)
                + affinity_cart_weight     * carts_90d
                + affinity_wishlist_weight * wishlists_90d
                + affinity_view_weight     * views_90d )
                * 0.5 ^ (days since last_interaction_at / affinity_half_life_days)

    rounded to 6 decimals (double precision). Defaults 5 / 3 / 2 / 1 and a 90-day half-life: a purchase
    weighs as much as five recent views, and interest fades by half every 90 quiet days.
    The windowed counts cover (as_of - affinity_views_window_days, as_of].
-#}
{% macro affinity_score(purchases, carts, wishlists, views, last_interaction_at) -%}
    round((
        (
            {{ var('affinity_purchase_weight') }} * {{ purchases }}
            + {{ var('affinity_cart_weight') }} * {{ carts }}
            + {{ var('affinity_wishlist_weight') }} * {{ wishlists }}
            + {{ var('affinity_view_weight') }} * {{ views }}
        )::float8
        * power(
            0.5::float8,
            ({{ days_between(last_interaction_at, as_of()) }})::float8 / {{ var('affinity_half_life_days') }}::float8
        )
    )::numeric, 6)::float8
{%- endmacro %}
