"""What a chain's message shows: its products, and what to recommend with them.

`chain_context` is the dispatcher's `extra_context` hook for chain messages: per message
it adds `products` (the cart's contents, the dropped-price product, the new arrivals,
the replacement for an out-of-stock order line, ...), `recommended` ("customers who
bought X then viewed or bought Y", the dbt model `marts.product_recommendations`, else
best sellers of the product's category), `chain` (trigger, step, search query, old and
new price, order id) and the links a step asks for (review, feedback, cart).

Everything is read for a whole claimed batch at once (a handful of queries per batch,
not per message). Best sellers are by units sold in the 90 days before the batch's
planned time, in stock, so a re-run renders the same products.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import psycopg

from retention.campaigns.render import category_label
from retention.config import settings

SHOP_URL = "https://shop.example"
N = 3  # products a message shows
POPULAR_DAYS = 90


def shop_url() -> str:
    return settings().shop_url.rstrip("/")


def _has(conn: psycopg.Connection, relation: str) -> bool:
    return conn.execute("select to_regclass(%s) is not null", (relation,)).fetchone()[0]


def _money(value) -> str | None:
    return None if value is None else f"{float(value):.2f}"


class _Catalog:
    """Product facts for one batch: cards, best sellers, co-purchase recommendations."""

    def __init__(self, conn: psycopg.Connection, as_of: datetime) -> None:
        self.conn, self.as_of = conn, as_of
        self.cards: dict[str, dict] = {}
        self.best: dict[str, list[str]] = {}
        self.recs: dict[str, list[str]] = {}

    def load_cards(self, product_ids: Iterable[str]) -> None:
        wanted = [p for p in set(product_ids) if p and p not in self.cards]
        if not wanted:
            return
        base = shop_url()
        for pid, name, price, category, in_stock in self.conn.execute(
                "select product_id, name, price, category_path, in_stock from raw.products "
                "where product_id = any(%s)", (wanted,)).fetchall():
            self.cards[pid] = {"id": pid, "name": name or f"Product {pid}",
                               "price": f"{price:.2f}" if price is not None else "",
                               "url": f"{base}/p/{pid}", "category": category,
                               "in_stock": in_stock is not False}

    def load_best_sellers(self, categories: Iterable[str], per_category: int = 10) -> None:
        wanted = [c for c in set(categories) if c and c not in self.best]
        if not wanted:
            return
        for c in wanted:
            self.best[c] = []
        rows = self.conn.execute("""
            with sold as (
              select oi.product_id, sum(oi.quantity) as units
              from raw.orders o join raw.order_items oi on oi.order_id = o.order_id
              where o.status in ('paid', 'delivered')
                and o.ordered_at > %(as_of)s - %(days)s and o.ordered_at <= %(as_of)s
              group by oi.product_id
            ), ranked as (
              select p.category_path, p.product_id,
                     row_number() over (partition by p.category_path
                                        order by coalesce(s.units, 0) desc, p.product_id) as rank
              from raw.products p left join sold s on s.product_id = p.product_id
              where p.category_path = any(%(categories)s) and coalesce(p.in_stock, true)
            )
            select category_path, product_id from ranked where rank <= %(n)s
            order by category_path, rank""", {"as_of": self.as_of, "days": timedelta(days=POPULAR_DAYS),
                                              "categories": wanted, "n": per_category}).fetchall()
        for category, pid in rows:
            self.best[category].append(pid)

    def load_recommendations(self, product_ids: Iterable[str], per_product: int = 10) -> None:
        wanted = [p for p in set(product_ids) if p and p not in self.recs]
        if not wanted:
            return
        for p in wanted:
            self.recs[p] = []
        if not _has(self.conn, "marts.product_recommendations"):
            return
        for pid, rec in self.conn.execute("""
                select r.product_id, r.recommended_product_id
                from marts.product_recommendations r
                join raw.products p on p.product_id = r.recommended_product_id
                where r.product_id = any(%s) and r.rank <= %s and coalesce(p.in_stock, true)
                order by r.product_id, r.rank""", (wanted, per_product)).fetchall():
            self.recs[pid].append(rec)

    def category_of(self, product_ids: Sequence[str]) -> str | None:
        self.load_cards(product_ids)
        categories = sorted(c for c in (self.cards.get(p, {}).get("category") for p in product_ids)
                            if c)
        return categories[0] if categories else None

    def also_bought(self, product_ids: Sequence[str], n: int = N,
                    exclude: Iterable[str] = ()) -> list[str]:
        """What buyers of these products went on to view or buy (best rank first, the
        first product's first), then best sellers of their categories."""
        skip = set(exclude) | set(product_ids)
        self.load_recommendations(product_ids)
        ranked = sorted(((rank, i, rec) for i, p in enumerate(product_ids)
                         for rank, rec in enumerate(self.recs.get(p, []))))
        out: list[str] = []
        for _, _, rec in ranked:
            if rec not in skip and rec not in out:
                out.append(rec)
        if len(out) < n:
            self.load_cards(product_ids)
            categories = sorted({self.cards[p]["category"] for p in product_ids
                                 if p in self.cards and self.cards[p]["category"]})
            self.load_best_sellers(categories)
            for c in categories:
                out += [p for p in self.best.get(c, []) if p not in skip and p not in out]
        return out[:n]

    def show(self, product_ids: Sequence[str]) -> list[dict]:
        self.load_cards(product_ids)
        return [self.cards[p] for p in product_ids if p in self.cards]


def _bought_by(conn: psycopg.Connection, customers: Sequence[str], as_of: datetime,
               limit: int = 5) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    if not customers:
        return out
    for customer, pid in conn.execute("""
            select customer_id, product_id from (
              select o.customer_id, oi.product_id,
                     row_number() over (partition by o.customer_id
                                        order by max(o.ordered_at) desc, oi.product_id) as rank
              from raw.orders o join raw.order_items oi on oi.order_id = o.order_id
              where o.customer_id = any(%s) and o.status in ('paid', 'delivered')
                and o.ordered_at <= %s
              group by o.customer_id, oi.product_id) r
            where rank <= %s order by customer_id, rank""",
                                      (list(customers), as_of, limit)).fetchall():
        out[customer].append(pid)
    return out


def _top_affinity(conn: psycopg.Connection, customers: Sequence[str]) -> dict[str, str]:
    if not customers or not _has(conn, "marts.customer_category_affinity"):
        return {}
    return dict(conn.execute("""
        select distinct on (customer_id) customer_id, category_path
        from marts.customer_category_affinity where customer_id = any(%s)
        order by customer_id, affinity_rank""", (list(customers),)).fetchall())


def _search(conn: psycopg.Connection, query: str, n: int = N) -> list[str]:
    """In-stock products whose name, brand or category holds every word of the query
    (else any word), by id."""
    words = [w for w in query.lower().split() if w][:6]
    if not words:
        return []
    patterns = ["%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                for w in words]
    for quantifier in ("all", "any"):
        rows = conn.execute(f"""
            select product_id from raw.products
            where coalesce(in_stock, true)
              and lower(concat_ws(' ', name, brand, replace(category_path, '.', ' ')))
                  like {quantifier}(%s)
            order by product_id limit %s""", (patterns, n)).fetchall()
        if rows:
            return [r[0] for r in rows]
    return []


def _replacements(conn: psycopg.Connection, product_ids: Sequence[str], n: int = N) -> list[str]:
    """Each product again if it is back in stock, else the in-stock product of its
    category with the closest price."""
    out: list[str] = []
    for pid, pick in conn.execute("""
            select p.product_id,
                   case when coalesce(p.in_stock, true) then p.product_id else (
                     select s.product_id from raw.products s
                     where s.category_path = p.category_path and coalesce(s.in_stock, true)
                       and s.product_id <> p.product_id
                     order by abs(coalesce(s.price, 0) - coalesce(p.price, 0)), s.product_id
                     limit 1) end
            from unnest(%s::text[]) with ordinality as u(product_id, ord)
            join raw.products p on p.product_id = u.product_id
            order by u.ord""", (list(product_ids),)).fetchall():
        if pick and pick not in out:
            out.append(pick)
    return out[:n]


def chain_context(conn: psycopg.Connection, rows: Sequence[tuple]) -> dict[str, dict]:
    """The dispatcher's extra_context hook: template variables per claimed message."""
    ids = [r[0] for r in rows]
    info = conn.execute("""
        select m.message_id, m.step, m.customer_id, m.planned_at, ci.trigger, ci.subject,
               ci.context
        from ops.messages m join ops.chain_instances ci on ci.chain_id = m.run_id
        where m.message_id = any(%s)""", (ids,)).fetchall()
    if not info:
        return {}
    conn.execute("set jit = off")  # small lookups with pessimistic estimates
    catalog = _Catalog(conn, max(r[3] for r in info))
    personal = {"second_purchase_nudge", "reengagement", "welcome_series"}
    needs_history = sorted({r[2] for r in info if r[4] in personal
                            and not (r[6] or {}).get("products")})
    bought_by = _bought_by(conn, needs_history, catalog.as_of)
    affinity = _top_affinity(conn, sorted({r[2] for r in info if r[4] in personal}))
    # everything the batch will look up, in a few queries
    all_products = {p for r in info for p in (r[6] or {}).get("products", []) if p}
    all_products |= {p for ps in bought_by.values() for p in ps}
    catalog.load_cards(all_products)
    catalog.load_recommendations(all_products)
    catalog.load_cards({q for recs in catalog.recs.values() for q in recs})
    catalog.load_best_sellers(set(affinity.values())
                              | {c["category"] for c in catalog.cards.values() if c["category"]})
    catalog.load_cards({q for best in catalog.best.values() for q in best})
    base = shop_url()
    out: dict[str, dict] = {}
    for message_id, step, customer_id, _planned, trigger, subject, context in info:
        context = context or {}
        product_ids = [p for p in context.get("products", []) if p]
        if trigger == "order_cancelled_oos":
            products = catalog.show(_replacements(conn, product_ids))
        elif trigger == "search_abandonment":
            products = catalog.show(_search(conn, context.get("query", "")))
        elif trigger in personal:
            # the customer's strongest category (marts.customer_category_affinity, else
            # that of what they bought): what they have not bought there yet; then what
            # buyers of their products went on to buy
            product_ids = product_ids or bought_by.get(customer_id, [])
            category = affinity.get(customer_id) or catalog.category_of(product_ids)
            catalog.load_best_sellers([category] if category else [])
            picks = [p for p in catalog.best.get(category, []) if p not in product_ids][:N]
            picks += catalog.also_bought(product_ids, N - len(picks), exclude=picks) \
                if len(picks) < N else []
            products = catalog.show(picks)
        else:
            products = catalog.show(product_ids[:N])
        extra: dict = {"products": products} if products else {}
        extra["recommended"] = catalog.show(catalog.also_bought(product_ids)) if product_ids else []
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
            # the entry event's own properties (a custom event type's, events.yaml)
            "properties": context.get("properties") or {},
        }
        extra.update(step=step, shop_url=base,
                     review_url=f"{base}/review/{context.get('order_id', '')}?m={message_id}",
                     feedback_url=f"{base}/feedback?m={message_id}",
                     cart_url=f"{base}/cart?m={message_id}")
        out[message_id] = extra
    return out
