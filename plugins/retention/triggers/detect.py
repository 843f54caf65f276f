"""Detection: the SQL that finds each trigger's moments in a scan range.

Every detector selects the same columns:

    customer_id, event_key, subject, hit_at, anchor_at, first_step_at, context

* `hit_at`: when the trigger condition became true (a cart's abandonment is the cart
  plus the window). A detector returns the moments with `lo < hit_at <= hi`; the scan
  range `(lo, hi]` is the run's interval widened back by lateness and over any gap since
  the last scan, so overlapping scans see a moment again: `ops.trigger_hits` makes the
  second sighting a no-op.
* `event_key`: what makes the moment unique for the customer (the cart event's id, the
  product change, the order), the key of `ops.trigger_hits`.
* `subject`: what the chain is about (`cart`, `product:<id>`, `category:<path>`,
  `search:<query>`, `order:<id>`, ...): one active chain per trigger, customer and subject.
* `anchor_at`: the subject event; exit events (purchase, cart, view) count after it.
* `first_step_at`: when the first step is due if not `hit_at` plus the first step's wait
  (the second-purchase nudge is timed by the cohort norm).

Nothing after `hi` is read, so a re-run of a past interval sees what the first run saw
(plus late rows). "Checked out" means a purchase event, any order, or a matched offline
receipt (marts.ropo_purchases, where it exists): the customer finished what the trigger
waits for, whatever became of the order unless it was cancelled (an order cancelled for
a stock-out has its own trigger).

A trigger whose campaign file has a definition (`entry:`, docs/triggers.md) runs the
definition (retention.triggers.definitions) instead of its function here. The functions
of the triggers shipped as definitions stay as the reference the definitions are proven
equal to (tests/test_trigger_definitions.py); `second_purchase_nudge` and `reengagement`
are code only (their docstrings say why). The SQL fragments the definitions share with
them (a checkout, a product bought, an order's products, a cart's contents, product
changes and the customers interested in them) are the public functions here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from retention.triggers.config import TriggerSettings

COLUMNS = ("customer_id", "event_key", "subject", "hit_at", "anchor_at", "first_step_at",
           "context")


#: ends a correlated EXISTS over raw.events or raw.orders so that it stays a probe per
#: candidate row (an index range scan on the customer and time): without it the planner
#: may turn the EXISTS into a (anti-)join over the whole table, which it prefers when it
#: overestimates the candidates (OFFSET keeps a subquery from being pulled up)
PROBE = "offset 0"


def checked_out(customer: str, after: str, until: str, *, inclusive: bool,
                has_ropo: bool) -> str:
    """SQL: the customer checked out in (after, until] (or [after, until]): a purchase
    event, an order that was not cancelled, or a matched offline receipt. Each EXISTS
    is a probe per row (PROBE)."""
    op = ">=" if inclusive else ">"
    ropo = (f"""or exists (select 1 from marts.ropo_purchases rp
                       where rp.customer_id = {customer} and rp.purchased_at {op} {after}
                         and rp.purchased_at <= {until})""" if has_ropo else "")
    return f"""(exists (select 1 from raw.events x
                  where x.customer_id = {customer} and x.event_type = 'purchase'
                    and x.occurred_at {op} {after} and x.occurred_at <= {until} {PROBE})
             or exists (select 1 from raw.orders o
                        where o.customer_id = {customer} and o.status <> 'cancelled'
                          and o.ordered_at {op} {after} and o.ordered_at <= {until} {PROBE})
             {ropo})"""


def bought_product(customer: str, product: str, after: str, until: str) -> str:
    """SQL: the customer bought (purchase event or an order line of) the product in
    [after, until]. Each EXISTS is a probe per row (PROBE)."""
    return f"""(exists (select 1 from raw.events x
                  where x.customer_id = {customer} and x.event_type = 'purchase'
                    and x.product_id = {product}
                    and x.occurred_at >= {after} and x.occurred_at <= {until} {PROBE})
             or exists (select 1 from raw.orders o
                        join raw.order_items oi on oi.order_id = o.order_id
                        where o.customer_id = {customer} and oi.product_id = {product}
                          and o.ordered_at >= {after} and o.ordered_at <= {until} {PROBE}))"""


def order_products(order: str) -> str:
    """SQL: the products of the order's lines in line order (a JSON array, [] for none)."""
    return f"""coalesce((select jsonb_agg(oi.product_id order by oi.line_no)
                                   from raw.order_items oi where oi.order_id = {order}),
                                  '[]'::jsonb)"""


def _later(alias: str, other: str, types: str, until: str) -> str:
    """SQL: the customer has another event of `types` after {alias} (ties broken by id)
    up to `until`: {alias} is not the last of its burst."""
    return f"""exists (select 1 from raw.events {other}
                where {other}.customer_id = {alias}.customer_id and {other}.event_type in ({types})
                  and {other}.occurred_at >= {alias}.occurred_at and {other}.occurred_at <= {until}
                  and ({other}.occurred_at > {alias}.occurred_at
                       or {other}.event_id > {alias}.event_id))"""


def cart_contents_ctes(carts: str, lookback: str, wait: str) -> str:
    """SQL: the CTEs `contents` (the products the cart event of each row of the CTE
    `carts` holds: carted in the lookback up to it, with their last carting time) and
    `in_cart` (those neither removed from the cart nor bought from then until the cart
    event plus `wait`)."""
    return f"""contents as (
      select a.event_id, k.product_id, max(k.occurred_at) as carted_at
      from {carts} a
      join raw.events k on k.customer_id = a.customer_id and k.event_type = 'cart'
       and k.product_id is not null
       and k.occurred_at > a.occurred_at - {lookback} and k.occurred_at <= a.occurred_at
      group by a.event_id, k.product_id
    ),
    in_cart as (
      select ct.event_id, ct.product_id, ct.carted_at
      from contents ct join {carts} a on a.event_id = ct.event_id
      where not exists (select 1 from raw.events r
                        where r.customer_id = a.customer_id and r.product_id = ct.product_id
                          and r.event_type = 'remove_from_cart'
                          and r.occurred_at >= ct.carted_at
                          and r.occurred_at <= a.occurred_at + {wait})
        and not {bought_product('a.customer_id', 'ct.product_id', 'ct.carted_at',
                                f'a.occurred_at + {wait}')}
    )"""


def _scanned(event_type: str, wait: str) -> str:
    """SQL: the FROM and WHERE of the `event_type` events (alias e) of known customers
    whose time plus `wait` falls in the scan range (lo, hi]."""
    return f"""from raw.events e
      where e.event_type = '{event_type}' and e.customer_id is not null
        and e.occurred_at > %(lo)s - {wait} and e.occurred_at <= %(hi)s - {wait}"""


def abandoned_cart(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """A cart event with no later cart and no checkout within the window. Later carts
    within the window extend the wait (the last one decides); the subject is the
    customer's cart, so carts in later sessions extend the active chain."""
    sql = f"""
    with carts as (
      select e.event_id, e.customer_id, e.session_id, e.product_id, e.occurred_at
      {_scanned('cart', '%(window)s')}
    ),
    abandoned as (
      select c.* from carts c
      where not {_later('c', 'l', "'cart'", 'c.occurred_at + %(window)s')}
        and not {checked_out('c.customer_id', 'c.occurred_at', 'c.occurred_at + %(window)s',
                             inclusive=True, has_ropo=has_ropo)}
    ),
    {cart_contents_ctes('abandoned', '%(cart_lookback)s', '%(window)s')}
    select a.customer_id, a.event_id as event_key, 'cart' as subject,
           a.occurred_at + %(window)s as hit_at, a.occurred_at as anchor_at,
           null::timestamptz as first_step_at,
           jsonb_build_object(
             'sessions', jsonb_build_array(a.session_id),
             'products', coalesce((select jsonb_agg(i.product_id order by i.carted_at desc, i.product_id)
                                   from in_cart i where i.event_id = a.event_id), '[]'::jsonb)
           ) as context
    from abandoned a
    -- a cart emptied by removals is not abandoned
    where a.product_id is null or exists (select 1 from in_cart i where i.event_id = a.event_id)
    """
    return sql, {"window": s.abandoned_cart_window, "cart_lookback": s.cart_lookback}


def browse_abandonment(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """The last view of a browsing burst (no view within the window after it), whose
    session viewed one category (or one uncategorised product) at least min_views
    times, with no cart and no checkout from the session's start to the window's end.
    The subject is the most viewed category of the session."""
    sql = f"""
    with views as (
      select e.event_id, e.customer_id, e.session_id, e.occurred_at
      {_scanned('view', '%(window)s')}
    ),
    last_views as (
      select v.* from views v
      where not {_later('v', 'l', "'view'", 'v.occurred_at + %(window)s')}
    ),
    session_views as (
      select lv.event_id, b.product_id, b.occurred_at,
             coalesce('category:' || coalesce(b.category_path, bp.category_path),
                      'product:' || b.product_id) as subject
      from last_views lv
      join raw.events b on b.customer_id = lv.customer_id and b.event_type = 'view'
       and b.occurred_at <= lv.occurred_at and b.occurred_at > lv.occurred_at - %(session_span)s
       and (b.session_id = lv.session_id or lv.session_id is null)
      left join raw.products bp on bp.product_id = b.product_id
      where b.product_id is not null or b.category_path is not null
    ),
    subjects as (
      select event_id, subject, count(*) as views, max(occurred_at) as last_at
      from session_views group by event_id, subject
    ),
    top_subject as (
      select distinct on (event_id) event_id, subject, views
      from subjects where views >= %(min_views)s
      order by event_id, views desc, last_at desc, subject
    ),
    session_start as (
      select event_id, min(occurred_at) as started from session_views group by event_id
    )
    select lv.customer_id, lv.event_id as event_key, ts.subject,
           lv.occurred_at + %(window)s as hit_at, lv.occurred_at as anchor_at,
           null::timestamptz as first_step_at,
           jsonb_build_object(
             'sessions', jsonb_build_array(lv.session_id), 'views', ts.views,
             'products', coalesce((select jsonb_agg(product_id order by n desc, product_id)
                                   from (select sv.product_id, count(*) as n from session_views sv
                                         where sv.event_id = lv.event_id and sv.subject = ts.subject
                                           and sv.product_id is not null
                                         group by sv.product_id) p), '[]'::jsonb)
           ) as context
    from last_views lv
    join top_subject ts on ts.event_id = lv.event_id
    join session_start ss on ss.event_id = lv.event_id
    where not exists (select 1 from raw.events c
                      where c.customer_id = lv.customer_id and c.event_type = 'cart'
                        and c.occurred_at >= ss.started
                        and c.occurred_at <= lv.occurred_at + %(window)s)
      and not {checked_out('lv.customer_id', 'ss.started', 'lv.occurred_at + %(window)s',
                           inclusive=True, has_ropo=has_ropo)}
    """
    return sql, {"window": s.browse_window, "min_views": s.browse_min_views,
                 "session_span": s.cart_lookback}


def search_abandonment(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """A search followed within the window by no view, cart, wishlist, later search or
    checkout (a later search is the one that counts)."""
    sql = f"""
    with searches as (
      select e.event_id, e.customer_id, e.session_id, e.occurred_at,
             lower(btrim(e.search_query)) as query
      {_scanned('search', '%(window)s')}
        and nullif(btrim(e.search_query), '') is not null
    )
    select s.customer_id, s.event_id as event_key, 'search:' || s.query as subject,
           s.occurred_at + %(window)s as hit_at, s.occurred_at as anchor_at,
           null::timestamptz as first_step_at,
           jsonb_build_object('query', s.query, 'sessions', jsonb_build_array(s.session_id)) as context
    from searches s
    where not {_later('s', 'l', "'search', 'view', 'cart', 'wishlist', 'purchase'",
                      's.occurred_at + %(window)s')}
      and not {checked_out('s.customer_id', 's.occurred_at', 's.occurred_at + %(window)s',
                           inclusive=True, has_ropo=has_ropo)}
    """
    return sql, {"window": s.search_window}


def wishlist_reminder(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """A wishlisted product not carted nor bought within the wait (a later wishlist of
    the same product restarts the wait)."""
    sql = f"""
    with wished as (
      select e.event_id, e.customer_id, e.product_id, e.occurred_at
      {_scanned('wishlist', '%(wait)s')}
        and e.product_id is not null
    )
    select w.customer_id, w.event_id as event_key, 'product:' || w.product_id as subject,
           w.occurred_at + %(wait)s as hit_at, w.occurred_at as anchor_at,
           null::timestamptz as first_step_at,
           jsonb_build_object('products', jsonb_build_array(w.product_id)) as context
    from wished w
    where not exists (select 1 from raw.events l
                      where l.customer_id = w.customer_id and l.product_id = w.product_id
                        and l.event_type in ('wishlist', 'cart')
                        and l.occurred_at >= w.occurred_at and l.occurred_at <= w.occurred_at + %(wait)s
                        and (l.occurred_at > w.occurred_at or l.event_id > w.event_id))
      and not {bought_product('w.customer_id', 'w.product_id', 'w.occurred_at',
                              'w.occurred_at + %(wait)s')}
    """
    return sql, {"wait": s.wishlist_wait}


def price_drops(lo: str, hi: str, min_drop: str) -> str:
    """SQL (product_id, changed_at, price, old_price): the price changes in (lo, hi] at
    least min_drop below the previous known price of an in-stock product."""
    return f"""
      select c.product_id, c.changed_at, c.price, prev.price as old_price
      from raw.product_changes c
      cross join lateral (
        select p.price from raw.product_changes p
        where p.product_id = c.product_id and p.changed_at < c.changed_at and p.price is not null
        order by p.changed_at desc limit 1) prev
      where c.changed_at > {lo} and c.changed_at <= {hi} and c.price is not null
        and c.price <= prev.price * (1 - {min_drop}) and coalesce(c.in_stock, true)"""


def back_in_stock_changes(lo: str, hi: str) -> str:
    """SQL (product_id, changed_at, price, old_price): the products whose stock goes from
    false to true in (lo, hi]."""
    return f"""
      select c.product_id, c.changed_at, c.price, null::numeric as old_price
      from raw.product_changes c
      cross join lateral (
        select p.in_stock from raw.product_changes p
        where p.product_id = c.product_id and p.changed_at < c.changed_at and p.in_stock is not null
        order by p.changed_at desc limit 1) prev
      where c.changed_at > {lo} and c.changed_at <= {hi} and c.in_stock and not prev.in_stock"""


def interested_ctes(changes: str, lookback: str, types: str) -> str:
    """SQL: the CTEs `changes` (the product changes of `changes`) and `interested` (the
    customers with an event of `types`, a condition on alias `e`, on a changed product in
    the lookback before the change, and their last such event, `last_interest`)."""
    return f"""
    with changes as ({changes}),
    interested as (
      -- lateral: one index range scan per changed product, whatever the statistics say
      select ch.product_id, ch.changed_at, ch.price, ch.old_price, e.customer_id, e.last_interest
      from changes ch
      cross join lateral (
        select e.customer_id, max(e.occurred_at) as last_interest
        from raw.events e
        where e.product_id = ch.product_id
          and e.occurred_at > ch.changed_at - {lookback} and e.occurred_at <= ch.changed_at
          and {types} and e.customer_id is not null
        group by e.customer_id) e
    )"""


def launch_viewers_ctes(lo: str, hi: str, lookback: str, types: str) -> str:
    """SQL: the CTEs `launches` (new products in (lo, hi]: their first product_changes
    row, in stock, in a category) and `viewers` (the customers with an event of `types`,
    a condition on alias `v`, in the launch's category in the lookback before it, once
    per launch). The events are read in one range scan, from the earliest launch's
    lookback to the latest launch, and matched to the launches by category and time:
    the lookbacks of the launches of one scan overlap almost entirely."""
    return f"""
    with launches as materialized (
      select c.product_id, c.changed_at as launched_at, p.category_path
      from raw.product_changes c join raw.products p on p.product_id = c.product_id
      where c.changed_at > {lo} and c.changed_at <= {hi} and coalesce(c.in_stock, true)
        and p.category_path is not null
        and not exists (select 1 from raw.product_changes e
                        where e.product_id = c.product_id and e.changed_at < c.changed_at)
    ),
    viewers as (
      select distinct l.product_id, l.launched_at, l.category_path, v.customer_id
      from launches l
      join (
        select v.customer_id, v.occurred_at,
               coalesce(v.category_path, vp.category_path) as category_path
        from raw.events v left join raw.products vp on vp.product_id = v.product_id
        where v.occurred_at > (select min(launched_at) from launches) - {lookback}
          and v.occurred_at <= (select max(launched_at) from launches)
          and {types} and v.customer_id is not null) v
        on v.category_path = l.category_path
       and v.occurred_at > l.launched_at - {lookback} and v.occurred_at <= l.launched_at
    )"""


def _interested(changes_cte: str) -> str:
    """Customers who viewed, carted or wishlisted a changed product in the lookback
    before the change and did not buy it since their last interest."""
    return f"""{interested_ctes(changes_cte, '%(lookback)s',
                                "e.event_type in ('view', 'cart', 'wishlist')")}
    select i.customer_id,
           %(prefix)s || i.product_id || '@' || extract(epoch from i.changed_at)::text as event_key,
           'product:' || i.product_id as subject,
           i.changed_at as hit_at, i.changed_at as anchor_at, null::timestamptz as first_step_at,
           jsonb_build_object('products', jsonb_build_array(i.product_id),
                              'old_price', i.old_price, 'new_price', i.price) as context
    from interested i
    where not {bought_product('i.customer_id', 'i.product_id', 'i.last_interest', 'i.changed_at')}
    """


def price_drop(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """A price change at least min_price_drop below the previous known price of an
    in-stock product, for customers interested in it."""
    changes = price_drops("%(lo)s", "%(hi)s", "%(min_drop)s")
    return _interested(changes), {"lookback": s.interest_lookback, "min_drop": s.min_price_drop,
                                  "prefix": "price:"}


def back_in_stock(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """A product whose stock goes from false to true, for customers interested in it."""
    changes = back_in_stock_changes("%(lo)s", "%(hi)s")
    return _interested(changes), {"lookback": s.interest_lookback, "prefix": "stock:"}


def category_replenished(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """A new product (its first product_changes row, in stock) in a category the customer
    viewed in the lookback before it arrived, unless the customer ordered in that time."""
    sql = f"""{launch_viewers_ctes('%(lo)s', '%(hi)s', '%(lookback)s', "v.event_type = 'view'")}
    select w.customer_id, 'new:' || w.product_id as event_key,
           'category:' || w.category_path as subject, w.launched_at as hit_at,
           w.launched_at as anchor_at, null::timestamptz as first_step_at,
           jsonb_build_object('products', jsonb_build_array(w.product_id),
                              'category', w.category_path) as context
    from viewers w
    where not {checked_out('w.customer_id', 'w.launched_at - %(lookback)s', 'w.launched_at',
                           inclusive=False, has_ropo=has_ropo)}
    """
    return sql, {"lookback": s.replenished_lookback}


def order_cancelled_oos(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """An order cancelled because a product was out of stock (the contract has no
    cancellation time: the order's time stands for it)."""
    sql = f"""
    select o.customer_id, 'order:' || o.order_id as event_key, 'order:' || o.order_id as subject,
           o.ordered_at as hit_at, o.ordered_at as anchor_at, null::timestamptz as first_step_at,
           jsonb_build_object(
             'order_id', o.order_id,
             'products', {order_products('o.order_id')}) as context
    from raw.orders o
    where o.status = 'cancelled'
      and regexp_replace(lower(coalesce(o.cancel_reason, '')), '[^a-z]+', '_', 'g') = 'out_of_stock'
      and o.ordered_at > %(lo)s and o.ordered_at <= %(hi)s
    """
    return sql, {}


def welcome_series(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """A customer's first subscription to any channel."""
    sql = """
    select distinct on (cs.customer_id)
           cs.customer_id, 'welcome' as event_key, 'welcome' as subject,
           cs.subscribed_at as hit_at, cs.subscribed_at as anchor_at,
           null::timestamptz as first_step_at,
           jsonb_build_object('channel', cs.channel) as context
    from raw.channel_subscriptions cs
    where cs.subscribed_at > %(lo)s and cs.subscribed_at <= %(hi)s
      and not exists (select 1 from raw.channel_subscriptions e
                      where e.customer_id = cs.customer_id and e.subscribed_at < cs.subscribed_at)
    order by cs.customer_id, cs.subscribed_at, cs.channel
    """
    return sql, {}


def second_purchase_nudge(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """A customer's first purchase (an online order paid or delivered, with no purchase
    before it, offline included). The first step is due after the cohort's norm
    (`%(norms)s`: cohort month -> days, see lifecycle.nudge_days).

    Code, not a definition: the definition language times a first step by a fixed wait,
    and this one is timed per customer by the norm of their cohort, computed in Python
    each run (norms.cohort_norms) from the marts or the raw orders."""
    ropo = ("""and not exists (select 1 from marts.ropo_purchases rp
                               where rp.customer_id = o.customer_id
                                 and rp.purchased_at < o.ordered_at)"""
            if has_ropo else "")
    sql = f"""
    with firsts as (
      select distinct on (o.customer_id) o.customer_id, o.order_id, o.ordered_at
      from raw.orders o
      where o.status in ('paid', 'delivered') and o.ordered_at > %(lo)s and o.ordered_at <= %(hi)s
        and not exists (select 1 from raw.orders e
                        where e.customer_id = o.customer_id and e.status in ('paid', 'delivered')
                          and (e.ordered_at < o.ordered_at
                               or (e.ordered_at = o.ordered_at and e.order_id < o.order_id)))
        {ropo}
      order by o.customer_id, o.ordered_at, o.order_id
    ),
    timed as (
      select f.*,
             coalesce((%(norms)s::jsonb ->> to_char(
                         date_trunc('month', f.ordered_at at time zone 'UTC'), 'YYYY-MM-DD'))::float8,
                      %(default_days)s) as days
      from firsts f
    )
    select t.customer_id, 'first:' || t.order_id as event_key, 'second_purchase' as subject,
           t.ordered_at as hit_at, t.ordered_at as anchor_at,
           t.ordered_at + make_interval(secs => t.days * 86400) as first_step_at,
           jsonb_build_object(
             'order_id', t.order_id, 'nudge_days', round(t.days::numeric, 1),
             'products', {order_products('t.order_id')}) as context
    from timed t
    """
    return sql, {}


def review_request(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """A delivered order, review_delay after it was placed (the contract has no delivery
    time)."""
    sql = f"""
    select o.customer_id, 'review:' || o.order_id as event_key, 'order:' || o.order_id as subject,
           o.ordered_at + %(delay)s as hit_at, o.ordered_at as anchor_at,
           null::timestamptz as first_step_at,
           jsonb_build_object(
             'order_id', o.order_id,
             'products', {order_products('o.order_id')}) as context
    from raw.orders o
    where o.status = 'delivered'
      and o.ordered_at > %(lo)s - %(delay)s and o.ordered_at <= %(hi)s - %(delay)s
    """
    return sql, {"delay": s.review_delay}


def reengagement(s: TriggerSettings, has_ropo: bool) -> tuple[str, dict]:
    """Customers whose silence (days since their last purchase, as of hi) exceeds
    `multiple` times their own average gap between purchases, or the cohort norm
    (`%(norms)s`) for one-time buyers; at least min and at most max silence days. The
    key is the last purchase, so a customer enters once per lapse.

    Code, not a definition: a lapse is no event at a time but the absence of one,
    measured against each customer's own purchase rhythm (or the cohort norm computed in
    Python), and it is scanned as of each daily run rather than over an interval."""
    ropo = ("""union all
               select customer_id, purchased_at from marts.ropo_purchases
               where purchased_at <= %(hi)s""" if has_ropo else "")
    sql = f"""
    with purchases as (
      select customer_id, ordered_at as at from raw.orders
      where status in ('paid', 'delivered') and ordered_at <= %(hi)s
      {ropo}
    ),
    per_customer as (
      select customer_id, count(*) as n, min(at) as first_at, max(at) as last_at
      from purchases group by customer_id
    ),
    gaps as (
      select pc.*,
             extract(epoch from %(hi)s - pc.last_at) / 86400.0 as silence_days,
             case when pc.n >= 2
                  then extract(epoch from pc.last_at - pc.first_at) / 86400.0 / (pc.n - 1)
             end as own_gap,
             coalesce((%(norms)s::jsonb ->> to_char(
                         date_trunc('month', pc.first_at at time zone 'UTC'), 'YYYY-MM-DD'))::float8,
                      %(default_days)s) as cohort_gap
      from per_customer pc
    ),
    lapsed as (
      select g.*, greatest(%(multiple)s * coalesce(nullif(g.own_gap, 0), g.cohort_gap),
                           %(min_silence)s) as threshold_days
      from gaps g
    )
    select l.customer_id, 'lapse@' || extract(epoch from l.last_at)::text as event_key,
           'lapse' as subject, %(hi)s::timestamptz as hit_at, l.last_at as anchor_at,
           null::timestamptz as first_step_at,
           jsonb_build_object('silence_days', round(l.silence_days::numeric, 1),
                              'threshold_days', round(l.threshold_days::numeric, 1),
                              'own_gap_days', round(l.own_gap::numeric, 1),
                              'purchases', l.n) as context
    from lapsed l
    where l.silence_days > l.threshold_days and l.silence_days <= %(max_silence)s
      -- an order after the last purchase (placed, returned) is not silence
      and not {checked_out('l.customer_id', 'l.last_at', '%(hi)s', inclusive=False,
                           has_ropo=has_ropo)}
    """
    return sql, {"multiple": s.reengage_multiple, "min_silence": s.reengage_min_silence_days,
                 "max_silence": s.reengage_max_silence_days}


@dataclass(frozen=True)
class Detector:
    name: str
    build: Callable[[TriggerSettings, bool], tuple[str, dict]]
    #: SQL counting the raw rows the trigger feeds on in (start, end] (trigger health:
    #: a broken tracker shows as no input at all)
    source_sql: str
    needs_norms: bool = False
    #: products of several moments on one subject add up (new arrivals in a category)
    merge_products: bool = False
    #: bind parameters of source_sql besides start and end
    source_params: dict = field(default_factory=dict)


_EVENTS = ("select count(*) from raw.events where event_type = '{}' "
           "and occurred_at > %(start)s and occurred_at <= %(end)s")
_CHANGES = ("select count(*) from raw.product_changes "
            "where changed_at > %(start)s and changed_at <= %(end)s")
_ORDERS = "select count(*) from raw.orders where ordered_at > %(start)s and ordered_at <= %(end)s"

DETECTORS: dict[str, Detector] = {d.name: d for d in (
    Detector("order_cancelled_oos", order_cancelled_oos, _ORDERS),
    Detector("abandoned_cart", abandoned_cart, _EVENTS.format("cart")),
    Detector("back_in_stock", back_in_stock, _CHANGES),
    Detector("price_drop", price_drop, _CHANGES),
    Detector("wishlist_reminder", wishlist_reminder, _EVENTS.format("wishlist")),
    Detector("browse_abandonment", browse_abandonment, _EVENTS.format("view")),
    Detector("search_abandonment", search_abandonment, _EVENTS.format("search")),
    Detector("category_replenished", category_replenished, _CHANGES, merge_products=True),
    Detector("welcome_series", welcome_series,
             "select count(*) from raw.channel_subscriptions "
             "where subscribed_at > %(start)s and subscribed_at <= %(end)s"),
    Detector("second_purchase_nudge", second_purchase_nudge, _ORDERS, needs_norms=True),
    Detector("review_request", review_request, _ORDERS),
    Detector("reengagement", reengagement, _ORDERS, needs_norms=True),
)}
