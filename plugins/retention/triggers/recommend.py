"""What a chain's message shows: its products, and what to recommend with them.

`chain_context` is the dispatcher's `extra_context` hook for chain messages: per message
it adds `products` (the cart's contents, the dropped-price product, the new arrivals,
the replacement for an out-of-stock order line, ...), `recommended` ("customers who
bought X then viewed or bought Y", the dbt model `marts.product_recommendations`, else
best sellers of the product's category), `chain` (trigger, step, search query, old and
new price, order id) and the links a step asks for (review, feedback).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import psycopg

from retention.campaigns.render import category_label

SHOP_URL = "https://shop.example"


def shop_url() -> str:
    return os.environ.get("RETENTION_SHOP_URL", SHOP_URL).rstrip("/")


def _card(row) -> dict:
    product_id, name, price, category, in_stock = row
    return {"id": product_id, "name": name or f"Product {product_id}",
            "price": f"{price:.2f}" if price is not None else "",
            "url": f"{shop_url()}/p/{product_id}", "category": category,
            "in_stock": in_stock is not False}


def product_cards(conn: psycopg.Connection, product_ids: Sequence[str]) -> dict[str, dict]:
    if not product_ids:
        return {}
    rows = conn.execute("select product_id, name, price, category_path, in_stock "
                        "from raw.products where product_id = any(%s)",
                        (list(product_ids),)).fetchall()
    return {r[0]: _card(r) for r in rows}


def _has(conn: psycopg.Connection, relation: str) -> bool:
    return conn.execute("select to_regclass(%s) is not null", (relation,)).fetchone()[0]


def also_bought(conn: psycopg.Connection, product_ids: Sequence[str], n: int = 3,
                exclude: Iterable[str] = ()) -> list[dict]:
    """Products that customers who bought one of these then viewed or bought (in stock),
    best first; best sellers of their categories where the model has too few."""
    exclude = set(exclude) | set(product_ids)
    picked: list[str] = []
    if product_ids and _has(conn, "marts.product_recommendations"):
        rows = conn.execute("""
            select r.recommended_product_id
            from marts.product_recommendations r
            join raw.products p on p.product_id = r.recommended_product_id
            where r.product_id = any(%s) and coalesce(p.in_stock, true)
            group by r.recommended_product_id
            order by min(r.rank), max(r.score) desc, r.recommended_product_id
            limit %s""", (list(product_ids), n + len(exclude))).fetchall()
        picked = [r[0] for r in rows if r[0] not in exclude][:n]
    if len(picked) < n:
        categories = [r[0] for r in conn.execute(
            "select distinct category_path from raw.products where product_id = any(%s) "
            "and category_path is not null", (list(product_ids),)).fetchall()]
        picked += [p for p in best_sellers(conn, categories, n + len(exclude) + len(picked))
                   if p not in exclude and p not in picked][: n - len(picked)]
    cards = product_cards(conn, picked)
    return [cards[p] for p in picked if p in cards]


def best_sellers(conn: psycopg.Connection, categories: Sequence[str], n: int) -> list[str]:
    """In-stock products of the categories by units sold (all time), then by id."""
    if not categories:
        return []
    rows = conn.execute("""
        select p.product_id
        from raw.products p
        left join raw.order_items oi on oi.product_id = p.product_id
        where p.category_path = any(%s) and coalesce(p.in_stock, true)
        group by p.product_id
        order by coalesce(sum(oi.quantity), 0) desc, p.product_id
        limit %s""", (list(categories), n)).fetchall()
    return [r[0] for r in rows]


def replacements(conn: psycopg.Connection, product_ids: Sequence[str], n: int = 3) -> list[dict]:
    """For an order cancelled for a stock-out: each product again if it is back in stock,
    else the in-stock product of its category with the closest price."""
    out: list[str] = []
    for product_id in product_ids:
        row = conn.execute("""
            select coalesce(p.in_stock, true), p.category_path, p.price
            from raw.products p where p.product_id = %s""", (product_id,)).fetchone()
        if row is None:
            continue
        in_stock, category, price = row
        if in_stock:
            out.append(product_id)
            continue
        similar = conn.execute("""
            select product_id from raw.products
            where category_path = %s and coalesce(in_stock, true) and product_id <> %s
            order by abs(coalesce(price, 0) - coalesce(%s, 0)), product_id limit 1""",
                               (category, product_id, price)).fetchone()
        if similar:
            out.append(similar[0])
    out = list(dict.fromkeys(out))[:n]
    cards = product_cards(conn, out)
    return [cards[p] for p in out if p in cards]


def search_results(conn: psycopg.Connection, query: str, n: int = 3) -> list[dict]:
    """In-stock products whose name, brand or category holds every word of the query
    (else any word), best sellers first."""
    words = [w for w in query.lower().split() if w][:6]
    if not words:
        return []
    patterns = ["%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                for w in words]
    for quantifier in ("all", "any"):
        rows = conn.execute(f"""
            select p.product_id
            from raw.products p
            left join raw.order_items oi on oi.product_id = p.product_id
            where coalesce(p.in_stock, true)
              and lower(concat_ws(' ', p.name, p.brand, replace(p.category_path, '.', ' ')))
                  like {quantifier}(%s)
            group by p.product_id
            order by coalesce(sum(oi.quantity), 0) desc, p.product_id
            limit %s""", (patterns, n)).fetchall()
        if rows:
            cards = product_cards(conn, [r[0] for r in rows])
            return [cards[r[0]] for r in rows if r[0] in cards]
    return []


def purchased_products(conn: psycopg.Connection, customer_id: str, limit: int = 5) -> list[str]:
    rows = conn.execute("""
        select oi.product_id from raw.orders o join raw.order_items oi on oi.order_id = o.order_id
        where o.customer_id = %s and o.status in ('paid', 'delivered')
        group by oi.product_id order by max(o.ordered_at) desc, oi.product_id limit %s""",
                        (customer_id, limit)).fetchall()
    return [r[0] for r in rows]


def top_affinity_category(conn: psycopg.Connection, customer_id: str) -> str | None:
    if not _has(conn, "marts.customer_category_affinity"):
        return None
    row = conn.execute("""select category_path from marts.customer_category_affinity
                          where customer_id = %s order by affinity_rank limit 1""",
                       (customer_id,)).fetchone()
    return row[0] if row else None


def _category_of(conn: psycopg.Connection, product_ids: Sequence[str]) -> str | None:
    if not product_ids:
        return None
    row = conn.execute("select category_path from raw.products where product_id = any(%s) "
                       "and category_path is not null order by category_path limit 1",
                       (list(product_ids),)).fetchone()
    return row[0] if row else None


def chain_context(conn: psycopg.Connection, rows: Sequence[tuple]) -> dict[str, dict]:
    """The dispatcher's extra_context hook: template variables per claimed message."""
    ids = [r[0] for r in rows]
    info = conn.execute("""
        select m.message_id, m.step, m.customer_id, ci.trigger, ci.subject, ci.context
        from ops.messages m join ops.chain_instances ci on ci.chain_id = m.run_id
        where m.message_id = any(%s)""", (ids,)).fetchall()
    base = shop_url()
    out: dict[str, dict] = {}
    for message_id, step, customer_id, trigger, subject, context in info:
        context = context or {}
        product_ids = [p for p in context.get("products", []) if p]
        extra: dict = {}
        if trigger == "order_cancelled_oos":
            products = replacements(conn, product_ids)
        elif trigger == "search_abandonment":
            products = search_results(conn, context.get("query", ""))
        elif trigger in ("second_purchase_nudge", "reengagement", "welcome_series"):
            # the customer's strongest category (marts.customer_category_affinity, else
            # the category of what they bought), what they have not bought yet there;
            # then what buyers of their products went on to buy
            bought = product_ids or purchased_products(conn, customer_id)
            category = top_affinity_category(conn, customer_id) or _category_of(conn, bought)
            picks = [p for p in best_sellers(conn, [category] if category else [], 3 + len(bought))
                     if p not in bought][:3]
            cards = product_cards(conn, picks)
            products = [cards[p] for p in picks if p in cards]
            if len(products) < 3:
                products += also_bought(conn, bought, 3, exclude=picks)[: 3 - len(products)]
            product_ids = bought
        else:
            cards = product_cards(conn, product_ids[:3])
            products = [cards[p] for p in product_ids[:3] if p in cards]
        if products:
            extra["products"] = products
        extra["recommended"] = also_bought(conn, product_ids, 3) if product_ids else []
        category = context.get("category") or (subject[len("category:"):]
                                               if subject.startswith("category:") else None)
        extra["chain"] = {
            "trigger": trigger, "step": step, "subject": subject,
            "query": context.get("query"),
            "category": category, "category_label": category_label(category),
            "old_price": _money(context.get("old_price")),
            "new_price": _money(context.get("new_price")),
            "order_id": context.get("order_id"),
            "silence_days": context.get("silence_days"),
        }
        extra["step"] = step
        extra["shop_url"] = base
        extra["review_url"] = f"{base}/review/{context.get('order_id', '')}?m={message_id}"
        extra["feedback_url"] = f"{base}/feedback?m={message_id}"
        extra["cart_url"] = f"{base}/cart?m={message_id}"
        out[message_id] = extra
    return out


def _money(value) -> str | None:
    if value is None:
        return None
    return f"{float(value):.2f}"
