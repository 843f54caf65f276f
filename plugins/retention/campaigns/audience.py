"""Audience rules compiled to parameterised SQL.

Every value from a campaign file becomes a bind parameter; only the fixed fragments below
are SQL text. All rules are evaluated as of the run's `as_of`: data after it is ignored, so
a re-run selects the same people (and the first selection is frozen anyway, see engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retention.ingest.contract import EVENT_TYPES

PURCHASE_STATUSES_SQL = "('paid', 'delivered')"
#: rules on the customer's latest predicted-value snapshot at or before as_of
#: (marts.customer_predicted_value, retention.warehouse.predict): the churn risk bands, a
#: top share by predicted value, and a min/max range of a measure
PREDICTED_RULES = ("churn_risk", "predicted_value_top", "probability_alive",
                   "churn_probability", "expected_purchases_30d", "expected_purchases_90d",
                   "predicted_value_12m")


def _like_prefix(category: str) -> str:
    escaped = category.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + ".%"


@dataclass
class _Compiler:
    params: dict = field(default_factory=dict)
    needs: set = field(default_factory=set)

    def bind(self, value) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f"%({name})s"

    def window(self, days: float | None, column: str, hours: float | None = None) -> str:
        parts = [f"{column} <= %(as_of)s"]
        if days is not None:
            parts.append(f"{column} > %(as_of)s - make_interval(secs => {self.bind(days * 86400.0)})")
        if hours is not None:
            parts.append(f"{column} > %(as_of)s - make_interval(secs => {self.bind(hours * 3600.0)})")
        return " and ".join(parts)

    def category(self, column: str, category: str) -> str:
        return f"({column} = {self.bind(category)} or {column} like {self.bind(_like_prefix(category))})"

    def purchased_in(self, category: str | None, days: float | None) -> str:
        cat_online = f" and {self.category('pr.category_path', category)}" if category else ""
        online = f"""exists (
            select 1 from raw.orders o
            {'join raw.order_items oi on oi.order_id = o.order_id join raw.products pr on pr.product_id = oi.product_id' if category else ''}
            where o.customer_id = c.customer_id and o.status in {PURCHASE_STATUSES_SQL}
              and {self.window(days, 'o.ordered_at')}{cat_online})"""
        cat_offline = f" and {self.category('pr.category_path', category)}" if category else ""
        self.needs.add("marts.ropo_purchases")
        offline = f"""exists (
            select 1 from marts.ropo_purchases rp
            {'join raw.offline_receipt_items ri on ri.receipt_id = rp.receipt_id join raw.products pr on pr.product_id = ri.product_id' if category else ''}
            where rp.customer_id = c.customer_id and {self.window(days, 'rp.purchased_at')}{cat_offline})"""
        return f"({online} or {offline})"

    def rule(self, rule: dict) -> str:
        (kind, arg), = rule.items()
        if kind == "bought_category":
            return self.purchased_in(arg["category"], arg.get("within_days"))
        if kind == "purchased":
            return self.purchased_in(None, arg.get("within_days"))
        if kind == "viewed_category":
            viewed = f"""exists (
                select 1 from raw.events e left join raw.products pr on pr.product_id = e.product_id
                where e.customer_id = c.customer_id and e.event_type = 'view'
                  and {self.window(arg.get('within_days'), 'e.occurred_at')}
                  and ({self.category('e.category_path', arg['category'])}
                       or {self.category('pr.category_path', arg['category'])}))"""
            if arg.get("without_purchase"):
                viewed += f" and not {self.purchased_in(arg['category'], arg.get('within_days'))}"
            return f"({viewed})"
        if kind == "affinity":
            self.needs.add("marts.customer_category_affinity")
            return f"""exists (
                select 1 from marts.customer_category_affinity a
                where a.customer_id = c.customer_id
                  and {self.category('a.category_path', arg['category'])}
                  and a.affinity_rank <= {self.bind(int(arg.get('max_rank', 3)))})"""
        if kind == "visited":
            # a visit is the customer's own clickstream (the contract's event types); a
            # shop's declared events such as bonus_credited may come from its back office
            return f"""exists (select 1 from raw.events e where e.customer_id = c.customer_id
                                and e.event_type = any({self.bind(list(EVENT_TYPES))})
                                and {self.window(arg['within_days'], 'e.occurred_at')})"""
        if kind == "ordered":
            return f"""exists (select 1 from raw.orders o where o.customer_id = c.customer_id
                                and {self.window(arg.get('within_days'), 'o.ordered_at', arg.get('within_hours'))})"""
        if kind in ("lifecycle_stage", "rfm_segment", "ltv", "purchases", "days_since_last_purchase"):
            self.needs.add("marts.customer_lifetime")
        if kind in ("lifecycle_stage", "rfm_segment"):
            return f"cl.{kind} = any({self.bind(list(arg))})"
        if kind in ("ltv", "purchases", "days_since_last_purchase"):
            parts = []
            if arg.get("min") is not None:
                parts.append(f"cl.{kind} >= {self.bind(arg['min'])}")
            if arg.get("max") is not None:
                parts.append(f"cl.{kind} <= {self.bind(arg['max'])}")
            return "(" + (" and ".join(parts) or "true") + ")"
        if kind in PREDICTED_RULES:
            self.needs.add("marts.customer_predicted_value")
        if kind == "churn_risk":
            return f"coalesce(pv.churn_risk = any({self.bind(list(arg))}), false)"
        if kind == "predicted_value_top":
            # the top share of the snapshot's customers by predicted value
            return f"coalesce(pv.predicted_value_rank > 1 - {self.bind(float(arg))}, false)"
        if kind in PREDICTED_RULES:
            parts = []
            if arg.get("min") is not None:
                parts.append(f"pv.{kind} >= {self.bind(arg['min'])}")
            if arg.get("max") is not None:
                parts.append(f"pv.{kind} <= {self.bind(arg['max'])}")
            # no snapshot, or no value in it (a customer who never bought): not selected,
            # and so kept by an exclude rule
            return ("coalesce(pv.customer_id is not null and "
                    + (" and ".join(parts) or "true") + ", false)")
        if kind == "has_channel":
            return f"""exists (select 1 from raw.channel_subscriptions s
                                where s.customer_id = c.customer_id and s.channel = {self.bind(arg)}
                                  and coalesce(s.subscribed_at <= %(as_of)s, true)
                                  and (s.unsubscribed_at is null or s.unsubscribed_at > %(as_of)s))"""
        if kind == "customer_ids":
            return f"c.customer_id = any({self.bind(list(arg))})"
        if kind == "all_customers":
            return "true"
        raise ValueError(f"unknown audience rule {kind!r}")


def compile_audience(audience: dict) -> tuple[str, dict, set[str]]:
    """SQL selecting customer_id for an audience definition, its bind parameters (the
    caller adds `as_of`), and the published tables it reads (built by `retention build`)."""
    comp = _Compiler()
    conditions = ["coalesce(c.created_at <= %(as_of)s, true)"]
    if audience.get("include_any"):
        conditions.append("(" + " or ".join(comp.rule(r) for r in audience["include_any"]) + ")")
    for r in audience.get("include_all", []):
        conditions.append(comp.rule(r))
    for r in audience.get("exclude_any", []):
        conditions.append(f"not {comp.rule(r)}")
    join = ("left join marts.customer_lifetime cl on cl.customer_id = c.customer_id "
            if "marts.customer_lifetime" in comp.needs else "")
    if "marts.customer_predicted_value" in comp.needs:
        join += ("left join marts.customer_predicted_value pv on pv.customer_id = c.customer_id "
                 "and pv.as_of = (select max(h.as_of) from marts.customer_predicted_value h "
                 "where h.as_of <= %(as_of)s) ")
    sql = f"select c.customer_id from raw.customers c {join}where " + "\n and ".join(conditions)
    return sql, comp.params, comp.needs
