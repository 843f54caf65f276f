"""A generated shop that behaves like a real one: the raw layer of CONTRACT.md section 1.

`generate_shop` writes one CSV per raw table, customers in chunks so memory stays flat
and a million customers take minutes. Everything is drawn from numpy generators seeded
by (seed, purpose, chunk), so the same arguments give byte-identical files.

What is in it (docs/generator.md says more):

- customers who differ: a per-customer order rate (Gamma) and a chance to drop out after
  each order (Beta), BG/NBD style, so a few are loyal and most buy once;
- a three-level category tree with main products and their accessories; people stay in
  their categories and move to related ones (smartphone -> case, -> earbuds);
- sessions with views, searches, wishlists, carts (mostly abandoned), removals, app opens
  and purchase events at the exact time of the order they placed; anonymous sessions;
- a catalogue whose prices and stock change over time (product_changes), with orders
  cancelled for `out_of_stock` when they hit a stock-out;
- till receipts with a loyalty card, a phone in the till's format, or nothing; receipts
  for products the customer viewed online in the 30 days before (ROPO); family phones
  shared by two customers;
- channel subscriptions with realistic reach and unsubscribes;
- the shop's own events: a `bonus_credited` event (a custom type of include/events.yaml,
  with its `amount` and `reason` properties) a day or two after a share of the delivered
  orders, drawn from generators of their own so every other row stays as it is;
- on request (`plant_preferences`), a planted ground truth in `_truth.csv`: each
  customer's favourite hour of the week and channel, which their browse sessions follow,
  and the order after which they dropped out (TRUTH_COLUMNS), also from generators of its
  own: every file but events.csv stays as without it.
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO
from zoneinfo import ZoneInfo

import numpy as np

from retention_dev import catalog_data as cd
from retention.ingest.contract import EVENT_TYPES, TABLE_BY_NAME, TABLES

DEFAULT_END = datetime(2026, 10, 31, tzinfo=timezone.utc)
DAY = 86_400

EV = {name: code for code, name in enumerate(EVENT_TYPES)}
_SLICE = 100_000  # event rows turned into text at once
_STORE_TZ = "Europe/Kyiv"

#: the ground truth of a shop generated with plant_preferences (`_truth.csv`): the
#: favourite hour of the week is local to the customer's `timezone` (customers.csv),
#: Monday 00:00-00:59 = 0; the favourite channel is one of the channels the customer is
#: subscribed to at `end` (empty: none); `activity` (0.1-1) and `proxy_reader` (reads mail
#: through a privacy proxy that opens every e-mail) are for simulating their engagement
#: (retention_dev.planted_truth); `churned_at` is the time of the order after which the
#: customer dropped out (empty: still buying at `end`, or never bought), `orders` their
#: orders of any status.
TRUTH_FILE = "_truth.csv"
TRUTH_COLUMNS = ("customer_id", "timezone", "favourite_hour_of_week", "favourite_channel",
                 "activity", "proxy_reader", "orders", "churned_at")
#: favourite hours of the day of most customers (the rest: any hour of the week), as in
#: retention_dev.preference_sim
_FAVOURITE_HOURS = np.array([8, 9, 12, 13, 18, 19, 20, 21])

#: relative activity by local hour, online and at the till
_ONLINE_HOURS = np.array(
    [1.2, 0.7, 0.4, 0.3, 0.3, 0.5, 1.0, 2.0, 3.2, 4.2, 4.8, 5.0,
     5.2, 5.0, 4.9, 4.9, 5.0, 5.3, 5.8, 6.5, 7.2, 7.0, 5.5, 3.0]
)
_STORE_HOURS = np.array(
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 2.0, 3.0, 3.5,
     4.0, 4.0, 3.8, 3.8, 4.2, 5.0, 5.5, 5.0, 3.5, 1.5, 0, 0]
)



# numpy evaluates exp and power of float64 arrays with SIMD code chosen by the CPU it runs
# on (AVX-512 machines get their own), which may differ from the C library in the last bit;
# one such bit flips a price's rounding or a sampled choice and the whole generated shop
# differs between machines. The generator computes them with the C library, value by
# value, so a seed gives the same shop on every machine.
def _exp(x: np.ndarray) -> np.ndarray:
    return np.fromiter(map(math.exp, np.asarray(x, dtype=float).ravel()), dtype=float,
                       count=np.size(x)).reshape(np.shape(x))


def _pow(x: np.ndarray, y: float) -> np.ndarray:
    return np.fromiter((math.pow(v, y) for v in np.asarray(x, dtype=float).ravel()),
                       dtype=float, count=np.size(x)).reshape(np.shape(x))

@dataclass(frozen=True)
class ShopKnobs:
    """Everything about the generated shop a user may want to change (keyword arguments
    of `generate_shop`). Shares are of all customers unless said otherwise."""

    # -- output and size
    currency: str = "UAH"
    """ISO-4217 code on every order and receipt (the shop has one currency)."""
    compress: bool = False
    """Write `<table>.csv.gz` instead of `<table>.csv` (deterministic gzip header)."""
    compress_level: int = 6
    """gzip level when compress is set (1 = fastest)."""
    chunk_size: int = 20_000
    """Customers generated and written per step: bounds memory (changing it changes the data)."""
    history_days: int = 730
    """Customers sign up over this many days before `end`."""
    signup_growth: float = 2.0
    """Daily sign-ups at `end` relative to the start of the history (a growing shop)."""
    n_products: int = 6_000
    """Products in the catalogue (spread over 427 leaf categories)."""

    # -- who buys, how often, and what
    buyer_share: float = 0.62
    """Share of customers who ever place an order; the rest only browse or subscribe."""
    quick_first_order_share: float = 0.45
    """Share of buyers who register at their first checkout (order minutes after sign-up)."""
    first_order_delay_days: float = 25.0
    """Mean days from sign-up to first order for the other buyers (exponential)."""
    purchase_gap_days: float = 62.0
    """Mean over customers of the expected days between two orders."""
    purchase_rate_shape: float = 0.8
    """Gamma shape of the per-customer order rate: smaller = more unequal (few loyal)."""
    dropout_a: float = 0.4
    """Beta a of the per-customer chance to stop buying after each order."""
    dropout_b: float = 1.2
    """Beta b of the same; the mean chance is a / (a + b)."""
    multi_item_share: float = 0.30
    """Share of orders with more than one line."""
    category_loyalty: float = 0.8
    """Chance that a purchase or a session stays in the customer's own categories."""
    same_order_accessory_share: float = 0.55
    """Chance that an extra line of an order is an accessory of its first line."""
    cancel_share: float = 0.05
    """Orders cancelled for other reasons than a stock-out."""
    return_share: float = 0.04
    """Delivered orders that come back (status returned)."""

    # -- catalogue over time
    price_change_days: float = 100.0
    """Mean days between two price changes of a product (discount, back, increase)."""
    stock_out_gap_days: float = 240.0
    """Mean days a product stays in stock between two stock-outs."""
    stock_out_days: float = 12.0
    """Mean length of a stock-out."""
    repick_when_out_of_stock: float = 0.8
    """Chance a buyer who meets a stock-out picks another product of the same leaf."""

    # -- sessions and events
    browse_sessions_per_customer: float = 0.8
    """Sessions without an order, per customer (everyone, buyers or not)."""
    browse_sessions_per_order: float = 1.3
    """Further sessions without an order, per order the customer places."""
    views_per_session: float = 1.7
    """Mean product views in a session without an order."""
    order_extra_views: float = 0.6
    """Mean views of alternatives in the session that ends with an order."""
    cart_rate: float = 0.7
    """Share of sessions without an order that put something in the cart (abandoned)."""
    cart_before_purchase_rate: float = 0.6
    """Share of order lines carted before the purchase (the rest: one-click buy)."""
    remove_from_cart_rate: float = 0.2
    """Share of carts with a remove_from_cart."""
    wishlist_rate: float = 0.08
    """Share of sessions with a wishlist event."""
    search_rate: float = 0.3
    """Share of sessions that start with a search."""
    app_open_rate: float = 0.7
    """Share of an app user's sessions that start with app_open."""
    recovered_cart_share: float = 0.12
    """Share of orders preceded (1 h to a few days) by an abandoned cart of the same product."""
    anonymous_sessions_per_customer: float = 0.8
    """Sessions of visitors who are not logged in, per customer."""
    bonus_share: float = 0.35
    """Share of delivered orders that credit loyalty bonus: a `bonus_credited` event 1-3
    days after the order, `amount` 2-5% of its total, `reason` `order`."""

    # -- stores
    offline_share: float = 0.22
    """Share of customers who also buy in stores (Ukrainian cities with a store)."""
    receipts_per_offline_customer: float = 2.5
    """Mean receipts of such a customer over the whole history."""
    walk_in_receipts_per_customer: float = 0.3
    """Receipts of shoppers the shop does not know, per customer."""
    loyalty_card_share: float = 0.30
    """Share of customers with a loyalty card (70% of store shoppers have one)."""
    card_presented_rate: float = 0.85
    """Chance a card holder shows the card at the till."""
    phone_at_till_rate: float = 0.45
    """Chance a store shopper without a shown card gives a phone number."""
    ropo_share: float = 0.3
    """Share of a store shopper's receipts whose product they viewed online 1 h-30 days before."""
    shared_phone_share: float = 0.01
    """Share of customers whose phone is shared with a family member (another customer)."""

    # -- identity and channels
    email_share: float = 0.92
    """Customers with an e-mail address."""
    phone_share: float = 0.85
    """Customers with a phone number."""
    local_phone_format_share: float = 0.2
    """Phones written in a local format (`067 123 45 67`) instead of E.164."""
    app_user_share: float = 0.45
    """Customers with the mobile app (more likely the more they buy)."""
    email_reach: float = 0.70
    """Customers with an e-mail subscription row."""
    mobile_push_reach: float = 0.35
    """Customers with a mobile push device token (app users only)."""
    web_push_reach: float = 0.15
    """Customers with a web push subscription."""
    telegram_reach: float = 0.08
    """Customers with a Telegram chat."""
    sms_reach: float = 0.05
    """Customers subscribed to SMS."""
    viber_reach: float = 0.04
    """Customers subscribed to Viber."""
    second_device_share: float = 0.1
    """Push subscribers with a second device token."""
    unsubscribe_share: float = 0.12
    """Subscriptions that end with an unsubscribe (web push more, Telegram less)."""

    # -- planted ground truth (off: the shop above, byte for byte)
    plant_preferences: bool = False
    """Plant each customer's favourite hour of the week and channel and write the ground
    truth to `_truth.csv` (see `TRUTH_COLUMNS`; the loader skips files named `_*`): the
    customer's browse sessions start in their favourite hour with chance hour_loyalty.
    Drawn from generators of their own, so every file but events.csv stays as without."""
    hour_loyalty: float = 0.7
    """With plant_preferences: chance a browse session starts in the favourite hour."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{f.name} must not be negative, got {value}")
            if isinstance(value, float) and (f.name.endswith(("share", "rate", "reach"))
                                             or f.name in ("category_loyalty", "hour_loyalty")):
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{f.name} must be between 0 and 1, got {value}")
        if self.chunk_size < 1 or self.history_days < 30 or self.n_products < 2_000:
            raise ValueError("need chunk_size >= 1, history_days >= 30, n_products >= 2000")
        for name in ("purchase_gap_days", "purchase_rate_shape", "dropout_a", "dropout_b",
                     "first_order_delay_days", "price_change_days", "stock_out_gap_days",
                     "stock_out_days"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not re.fullmatch(r"[A-Z]{3}", self.currency):
            raise ValueError(f"currency must be an ISO-4217 code, got {self.currency!r}")
        for name, base in (("email_reach", "email_share"), ("sms_reach", "phone_share"),
                           ("viber_reach", "phone_share"),
                           ("mobile_push_reach", "app_user_share")):
            if getattr(self, name) > getattr(self, base):
                raise ValueError(f"{name} cannot exceed {base}")


# --------------------------------------------------------------------------- helpers


def _csr(groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Members of each group: (members sorted by group, start, count)."""
    order = np.argsort(groups, kind="stable")
    count = np.bincount(groups, minlength=n_groups)
    start = np.concatenate(([0], np.cumsum(count)[:-1]))
    return order, start, count


def _pick(rng, csr, g: np.ndarray, skew: float = 1.0) -> np.ndarray:
    """One member of group g[i] for each i; skew > 1 favours the first members."""
    members, start, count = csr
    u = rng.random(len(g))
    if skew != 1.0:
        u = u**skew
    return members[start[g] + (u * count[g]).astype(np.int64)]


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ragged groups of the given sizes: owner of each element and its position."""
    counts = counts.astype(np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    pos = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, pos


def _choice(rng, options: Sequence[tuple[str, float]], n: int) -> np.ndarray:
    p = np.array([w for _, w in options], dtype=float)
    return rng.choice(len(options), n, p=p / p.sum())


def _charm_cents(uah: np.ndarray) -> np.ndarray:
    """Shop prices: 49.99, 1299.00, 12999.00."""
    uah = np.maximum(uah, 5.0)
    small = np.round(uah) * 100 - 1
    mid = (np.round(uah / 10) * 10 - 1) * 100
    big = (np.round(uah / 100) * 100 - 1) * 100
    return np.where(uah < 200, small, np.where(uah < 2000, mid, big)).astype(np.int64)


def _money(cents: Iterable[int]) -> list[str]:
    return [f"{c // 100}.{c % 100:02d}" for c in cents]


def _hour_sampler(weights: np.ndarray):
    cdf = np.cumsum(weights) / weights.sum()

    def sample(rng, n: int) -> np.ndarray:
        hours = np.searchsorted(cdf, rng.random(n), side="right")
        return hours * 3600 + rng.integers(0, 3600, n)

    return sample


_online_sod = _hour_sampler(_ONLINE_HOURS)
_store_sod = _hour_sampler(_STORE_HOURS)


def _check_plain(values: Iterable[str], what: str) -> None:
    for v in values:
        if any(ch in v for ch in ',"\n\r'):
            raise ValueError(f"{what} value {v!r} would need CSV quoting")


# --------------------------------------------------------------------------- time


class _Clock:
    """Seconds since the epoch (UTC) as int64, and their ISO-8601 text via lookup tables."""

    def __init__(self, end: datetime, history_days: int, growth: float) -> None:
        self.end = int(end.timestamp())
        self.start = self.end - history_days * DAY
        self.day0 = self.start - self.start % DAY  # UTC midnight, day index 0
        self.n_days = -(-(self.end - self.day0) // DAY)
        self.base = self.day0 - 3 * 365 * DAY  # the catalogue is older than the customers
        n_table = (self.end - self.base) // DAY + 3
        base_date = datetime.fromtimestamp(self.base, timezone.utc).date()
        dates = [base_date + timedelta(days=d) for d in range(n_table)]
        self._day_text = np.array([d.isoformat() + "T" for d in dates], dtype=object)
        self._tod = [f"{h:02d}:{m:02d}:{s:02d}" for h in range(24) for m in range(60)
                     for s in range(60)]
        self._tod_text: dict[int, np.ndarray] = {}
        store_tz = ZoneInfo(_STORE_TZ)
        self.store_offset = np.array(
            [int(datetime(d.year, d.month, d.day, 12, tzinfo=timezone.utc)
                 .astimezone(store_tz).utcoffset().total_seconds()) for d in dates],
            dtype=np.int64,
        )
        # sign-up days: a growing shop, Black Friday and December peaks, busier weekends
        d = np.arange(self.n_days)
        day_dates = [datetime.fromtimestamp(self.day0 + i * DAY, timezone.utc).date()
                     for i in range(self.n_days)]
        season = np.array([
            1.8 if (x.month == 11 and x.day >= 20) else 1.3 if (x.month == 12 and x.day < 24)
            else 0.8 if (x.month == 1 and x.day < 8) else 0.9 if x.month in (7, 8) else 1.0
            for x in day_dates])
        weekend = np.array([1.1 if x.weekday() >= 5 else 1.0 for x in day_dates])
        w = _exp(math.log(max(growth, 1e-6)) * d / max(self.n_days - 1, 1)) * season * weekend
        w[(self.day0 + d * DAY) < self.start - DAY] = 0.0
        self._day_cdf = np.cumsum(w) / w.sum()

    def tod_text(self, offset: int) -> np.ndarray:
        if offset not in self._tod_text:
            if offset == 0:
                suffix = "Z"
            else:
                sign = "+" if offset > 0 else "-"
                suffix = f"{sign}{abs(offset) // 3600:02d}:{abs(offset) % 3600 // 60:02d}"
            self._tod_text[offset] = np.array([t + suffix for t in self._tod], dtype=object)
        return self._tod_text[offset]

    def text(self, t: np.ndarray, offset: np.ndarray | None = None) -> list[str]:
        """ISO-8601 text of t (UTC `Z`, or local with the given offsets); t < 0 -> ''."""
        t = np.asarray(t, dtype=np.int64)
        null = t < 0
        out = np.empty(len(t), dtype=object)
        if offset is None:
            offset = np.zeros(len(t), dtype=np.int64)
        local = np.where(null, self.base, t + offset) - self.base
        day, sod = np.divmod(local, DAY)
        for off in np.unique(offset):
            m = offset == off
            out[m] = self._day_text[day[m]] + self.tod_text(int(off))[sod[m]]
        out[null] = ""
        return out.tolist()

    def store_offset_at(self, t: np.ndarray) -> np.ndarray:
        return self.store_offset[(t - self.base) // DAY]

    def sample_days(self, rng, n: int) -> np.ndarray:
        return np.searchsorted(self._day_cdf, rng.random(n), side="right")

    def at(self, day: np.ndarray, sod: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """UTC seconds of local second-of-day `sod` on day index `day`."""
        return self.day0 + day.astype(np.int64) * DAY + sod - offset

    def day_of(self, t: np.ndarray) -> np.ndarray:
        return (t - self.day0) // DAY


# --------------------------------------------------------------------------- catalogue


class _Catalog:
    """Category tree, products, their price and stock history, stores, search words."""

    def __init__(self, rng, knobs: ShopKnobs, clock: _Clock) -> None:
        self._tree()
        self._products(rng, knobs, clock)
        self._history(rng, knobs, clock)
        self._queries()
        self._stores()

    # the tree ------------------------------------------------------------------
    def _tree(self) -> None:
        mids, tops, prim_price, acc_price = [], [], [], []
        leaf_path, leaf_name, leaf_mid, leaf_primary, leaf_price = [], [], [], [], []
        for line in cd.CATEGORY_TREE.strip().splitlines():
            head, leaves = line.split(":")
            path, prices = head.split()
            p, a = (float(x) for x in prices.split("/"))
            m = len(mids)
            mids.append(path)
            tops.append(path.split(".")[0])
            prim_price.append(p)
            acc_price.append(a)
            for raw in leaves.split(","):
                name = raw.strip()
                primary = name.endswith("*")
                name = name.rstrip("*")
                leaf_path.append(f"{path}.{name}")
                leaf_name.append(name)
                leaf_mid.append(m)
                leaf_primary.append(primary)
                leaf_price.append(p if primary else a)
        self.top_names = list(cd.TOP_WEIGHTS)
        self.mid_path = mids
        self.mid_top = np.array([self.top_names.index(t) for t in tops])
        rank = np.zeros(len(mids))
        for t in range(len(self.top_names)):
            idx = np.nonzero(self.mid_top == t)[0]
            rank[idx] = np.arange(len(idx))
        top_w = np.array([cd.TOP_WEIGHTS[t] for t in tops], dtype=float)
        zipf = 1.0 / _pow(rank + 1.0, 0.7)
        per_top = np.bincount(self.mid_top, weights=zipf)
        self.mid_weight = top_w * zipf / per_top[self.mid_top]
        self.mid_weight /= self.mid_weight.sum()
        rate = np.array([cd.TOP_RATE[t] for t in self.top_names])
        rate_by_mid = rate[self.mid_top]
        self.mid_rate = rate_by_mid / float(self.mid_weight @ rate_by_mid)
        self.leaf_path = leaf_path
        self.leaf_name = leaf_name
        self.leaf_mid = np.array(leaf_mid)
        self.leaf_primary = np.array(leaf_primary)
        self.leaf_price = np.array(leaf_price)
        n_mid = len(mids)
        self.mid_leaves = _csr(self.leaf_mid, n_mid)
        prim = np.nonzero(self.leaf_primary)[0]
        acc = np.nonzero(~self.leaf_primary)[0]
        self.mid_primaries = (prim[_csr(self.leaf_mid[prim], n_mid)[0]],
                              *_csr(self.leaf_mid[prim], n_mid)[1:])
        self.mid_accessories = (acc[_csr(self.leaf_mid[acc], n_mid)[0]],
                                *_csr(self.leaf_mid[acc], n_mid)[1:])
        if (self.mid_primaries[2] == 0).any() or (self.mid_accessories[2] == 0).any():
            raise ValueError("every mid-category needs a main product and an accessory")
        related: dict[int, list[int]] = {}
        for line in cd.RELATED.strip().splitlines():
            left, right = line.split(":")
            related[mids.index(left.strip())] = [mids.index(r.strip()) for r in right.split(",")]
        owner, members = [], []
        for m in range(n_mid):
            rel = related.get(m) or [x for x in range(n_mid)
                                     if self.mid_top[x] == self.mid_top[m] and x != m]
            owner += [m] * len(rel)
            members += rel
        members_a = np.array(members)
        order, start, count = _csr(np.array(owner), n_mid)
        self.mid_related = (members_a[order], start, count)

    # products --------------------------------------------------------------------
    def _products(self, rng, knobs: ShopKnobs, clock: _Clock) -> None:
        n_leaf = len(self.leaf_path)
        leaf_w = self.mid_weight[self.leaf_mid] / self.mid_leaves[2][self.leaf_mid]
        extra = knobs.n_products - 4 * n_leaf
        if extra < 0:
            raise ValueError(f"n_products must be at least {4 * n_leaf}")
        share = np.sqrt(leaf_w) / np.sqrt(leaf_w).sum()
        per_leaf = 4 + np.floor(share * extra).astype(np.int64)
        per_leaf[np.argsort(-share, kind="stable")[: knobs.n_products - per_leaf.sum()]] += 1
        self.prod_leaf = np.repeat(np.arange(n_leaf), per_leaf)
        n = len(self.prod_leaf)
        self.n_products = n
        self.leaf_products = _csr(self.prod_leaf, n_leaf)
        self.leaf_first_product = self.leaf_products[1]
        leaf_factor = _exp(rng.normal(0, 0.35, n_leaf))
        base = self.leaf_price[self.prod_leaf] * leaf_factor[self.prod_leaf] * _exp(
            rng.normal(0, 0.5, n))
        self.base_cents = _charm_cents(base)
        # launch: most products are older than the history, a quarter arrive during it
        old = rng.random(n) < 0.75
        old[self.leaf_first_product] = True
        before = clock.start - rng.integers(30 * DAY, 3 * 365 * DAY - 30 * DAY, n)
        during = clock.start + rng.integers(0, clock.end - clock.start - 14 * DAY, n)
        self.launch = np.where(old, before, during).astype(np.int64)
        brands = {t: cd.BRANDS[t].split() for t in self.top_names}
        top_of_leaf = self.mid_top[self.leaf_mid]
        brand_pick = rng.random(n)
        letters = "ASXGKMNPRTVZ"
        model_letter = rng.integers(0, len(letters), n)
        model_number = rng.integers(1, 100, n) * 10
        suffixes = ("", "", "", " Pro", " Max", " Lite", " Plus", " Mini")
        model_suffix = rng.integers(0, len(suffixes), n)
        self.prod_brand, self.prod_name = [], []
        for i in range(n):
            leaf = self.prod_leaf[i]
            name = self.leaf_name[leaf]
            pool = brands[self.top_names[top_of_leaf[leaf]]]
            leaf_pool = cd.LEAF_BRANDS[name].split() if name in cd.LEAF_BRANDS else pool
            brand = leaf_pool[int(brand_pick[i] ** 1.5 * len(leaf_pool))]
            title = cd.LEAF_TITLE.get(name, name.replace("_", " ").capitalize())
            model = f"{letters[model_letter[i]]}{model_number[i]}{suffixes[model_suffix[i]]}"
            self.prod_brand.append(brand)
            self.prod_name.append(f"{brand} {title} {model}")
        self.prod_id = [f"p{i + 1:05d}" for i in range(n)]
        self.prod_id_text = np.array(self.prod_id + [""], dtype=object)
        self.prod_category = np.array([self.leaf_path[x] for x in self.prod_leaf] + [""],
                                      dtype=object)
        _check_plain(self.prod_name, "product name")

    def _history(self, rng, knobs: ShopKnobs, clock: _Clock) -> None:
        n = self.n_products
        prod, t_all, price_all, stock_all = [np.arange(n)], [self.launch], [self.base_cents], [
            np.ones(n, dtype=np.int8)]
        # price changes: a discount, back to the regular price, or a new regular price
        regular = self.base_cents.copy()
        t = self.launch.astype(np.float64)
        alive = np.arange(n)
        while alive.size:
            t[alive] += rng.exponential(knobs.price_change_days * DAY, alive.size)
            alive = alive[t[alive] < clock.end]
            u = rng.random(alive.size)
            raise_ = u >= 0.85
            regular[alive[raise_]] = _charm_cents(
                regular[alive[raise_]] / 100 * rng.uniform(1.03, 1.15, raise_.sum()))
            discount = _charm_cents(regular[alive] / 100 * (1 - rng.uniform(0.1, 0.35, alive.size)))
            price = np.where(u < 0.45, discount, regular[alive])
            prod.append(alive)
            t_all.append(t[alive].astype(np.int64))
            price_all.append(price)
            stock_all.append(np.full(alive.size, -1, dtype=np.int8))
        # stock-outs, and a few products that never come back
        t = self.launch.astype(np.float64)
        alive = np.arange(n)
        while alive.size:
            t[alive] += rng.exponential(knobs.stock_out_gap_days * DAY, alive.size)
            alive = alive[t[alive] < clock.end]
            prod.append(alive)
            t_all.append(t[alive].astype(np.int64))
            price_all.append(np.full(alive.size, -1, dtype=np.int64))
            stock_all.append(np.zeros(alive.size, dtype=np.int8))
            alive = alive[rng.random(alive.size) > 0.01]
            t[alive] += rng.exponential(knobs.stock_out_days * DAY, alive.size) + 3600
            alive = alive[t[alive] < clock.end]
            prod.append(alive)
            t_all.append(t[alive].astype(np.int64))
            price_all.append(np.full(alive.size, -1, dtype=np.int64))
            stock_all.append(np.ones(alive.size, dtype=np.int8))
        p = np.concatenate(prod)
        tt = np.concatenate(t_all)
        pr = np.concatenate(price_all)
        st = np.concatenate(stock_all)
        order = np.lexsort((tt, p))
        p, tt, pr, st = p[order], tt[order], pr[order], st[order]
        # at most one row per product and second
        while True:
            dup = np.nonzero((p[1:] == p[:-1]) & (tt[1:] <= tt[:-1]))[0] + 1
            if not dup.size:
                break
            tt[dup] = tt[dup - 1] + 1
        inside = tt < clock.end
        p, tt, pr, st = p[inside], tt[inside], pr[inside], st[inside]
        # each row carries the full state after the change
        idx = np.where(pr >= 0, np.arange(len(p)), 0)
        pr = pr[np.maximum.accumulate(idx)]
        idx = np.where(st >= 0, np.arange(len(p)), 0)
        st = st[np.maximum.accumulate(idx)]
        first = np.r_[True, p[1:] != p[:-1]]
        changed = first | (pr != np.r_[-1, pr[:-1]]) | (st != np.r_[-1, st[:-1]])
        p, tt, pr, st = p[changed], tt[changed], pr[changed], st[changed]
        self.ch_prod, self.ch_t, self.ch_price, self.ch_stock = p, tt, pr, st.astype(bool)
        self.ch_key = p.astype(np.int64) * (1 << 32) + (tt - clock.base)
        self.prod_first_row = np.searchsorted(p, np.arange(n))
        self.prod_last_row = np.r_[self.prod_first_row[1:], len(p)] - 1
        self.ch_price_text = np.array(_money(pr.tolist()) + [""], dtype=object)
        self._base = clock.base

    def state_row(self, prod: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Row of product_changes in force for product prod at time t."""
        key = prod.astype(np.int64) * (1 << 32) + (t - self._base)
        row = np.searchsorted(self.ch_key, key, side="right") - 1
        bad = (row < 0) | (self.ch_prod[np.maximum(row, 0)] != prod)
        return np.where(bad, self.prod_first_row[prod], row)

    def pick_product(self, rng, leaf: np.ndarray, t: np.ndarray) -> np.ndarray:
        """A product of the leaf, popular ones first, launched by time t."""
        prod = _pick(rng, self.leaf_products, leaf, skew=2.0)
        return np.where(self.launch[prod] <= t, prod, self.leaf_first_product[leaf])

    # search words and stores ---------------------------------------------------
    def _queries(self) -> None:
        owner, text = [], []
        for leaf, name in enumerate(self.leaf_name):
            title = cd.LEAF_TITLE.get(name, name.replace("_", " ")).lower()
            top = self.top_names[self.mid_top[self.leaf_mid[leaf]]]
            words = [title, f"{cd.BRANDS[top].split()[0].lower()} {title}",
                     f"{cd.BRANDS[top].split()[1].lower()} {title}"]
            words += cd.LEAF_QUERIES.get(name, "").split("|") if name in cd.LEAF_QUERIES else []
            owner += [leaf] * len(words)
            text += words
        _check_plain(text, "search query")
        self.query_text = np.array(text + [""], dtype=object)
        self.leaf_queries = _csr(np.array(owner), len(self.leaf_name))

    def _stores(self) -> None:
        city_of = {c[0]: i for i, c in enumerate(cd.LOCATIONS)}
        loc, fmt = [], []
        for city, count in cd.STORES_PER_CITY.items():
            for k in range(count):
                loc.append(city_of[city])
                fmt.append((len(loc) * 7 + k) % 3)  # each till system writes phones its way
        self.store_loc = np.array(loc)
        self.store_phone_format = np.array(fmt)
        self.store_id = np.array([f"st{i + 1:03d}" for i in range(len(loc))], dtype=object)
        self.loc_stores = _csr(self.store_loc, len(cd.LOCATIONS))
        w = np.array([cd.LOCATIONS[i][3] for i in loc])
        self.store_weight = w / w.sum()


# --------------------------------------------------------------------------- output


class _Writer:
    """One open file per raw table; rows appended chunk by chunk."""

    def __init__(self, out_dir: Path, knobs: ShopKnobs) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, IO[bytes]] = {}
        self.rows = {t.name: 0 for t in TABLES}
        self._raw: list[IO[bytes]] = []
        for table in TABLES:
            suffix = ".csv.gz" if knobs.compress else ".csv"
            path = out_dir / f"{table.name}{suffix}"
            raw = open(path, "wb")
            self._raw.append(raw)
            if knobs.compress:
                fh: IO[bytes] = gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                              compresslevel=knobs.compress_level, mtime=0)
            else:
                fh = raw
            fh.write((",".join(_written_columns(table.name)) + "\n").encode())
            self.files[table.name] = fh
        self.truth: IO[bytes] | None = None
        if knobs.plant_preferences:
            self.truth = open(out_dir / TRUTH_FILE, "wb")
            self.truth.write((",".join(TRUTH_COLUMNS) + "\n").encode())

    def write(self, table: str, columns: dict[str, Sequence[str]]) -> None:
        names = _written_columns(table)
        if set(columns) != set(names):
            raise KeyError(f"{table}: columns {sorted(columns)} differ from the contract")
        cols = [columns[c] for c in names]
        n = len(cols[0])
        if any(len(c) != n for c in cols):
            raise ValueError(f"{table}: columns of different lengths")
        if n == 0:
            return
        text = "\n".join(map(",".join, zip(*cols))) + "\n"
        self.files[table].write(text.encode("utf-8"))
        self.rows[table] += n

    def write_truth(self, columns: dict[str, Sequence[str]]) -> None:
        assert self.truth is not None and tuple(columns) == TRUTH_COLUMNS
        if len(columns["customer_id"]):
            self.truth.write(("\n".join(map(",".join, zip(*columns.values()))) + "\n").encode())

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
        if self.truth is not None:
            self.truth.close()
        for raw in self._raw:
            raw.close()


#: contract extensions the generator writes (raw.events.properties: the custom events')
WRITTEN_EXTENSIONS = {"events": ("properties",)}


def _written_columns(table: str) -> list[str]:
    return TABLE_BY_NAME[table].column_names + list(WRITTEN_EXTENSIONS.get(table, ()))


def _csv_quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _ints(values: np.ndarray) -> list[str]:
    return list(map(str, values.tolist()))


class _Events:
    """Clickstream rows of one chunk, collected per kind and sorted by time at the end."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.n_sessions = 0

    def new_sessions(self, n: int) -> np.ndarray:
        ids = np.arange(self.n_sessions, self.n_sessions + n)
        self.n_sessions += n
        return ids

    def add(self, t, etype, cust, session, prod=None, query=None) -> None:
        n = len(t)
        if n == 0:
            return
        minus = np.full(n, -1, dtype=np.int64)
        self.parts.append((
            np.asarray(t, dtype=np.int64),
            np.broadcast_to(np.asarray(etype, dtype=np.int8), (n,)),
            np.asarray(cust, dtype=np.int64),
            np.asarray(session, dtype=np.int64),
            minus if prod is None else np.asarray(prod, dtype=np.int64),
            minus if query is None else np.asarray(query, dtype=np.int64),
        ))

    def columns(self) -> tuple[np.ndarray, ...]:
        if not self.parts:
            return tuple(np.zeros(0, dtype=np.int64) for _ in range(6))
        return tuple(np.concatenate([p[i] for p in self.parts]) for i in range(6))


# --------------------------------------------------------------------------- the shop


class _Shop:
    def __init__(self, seed: int, end: datetime, knobs: ShopKnobs) -> None:
        self.seed = seed
        self.k = knobs
        self.clock = _Clock(end, knobs.history_days, knobs.signup_growth)
        self.cat = _Catalog(self._rng(0, 0), knobs, self.clock)
        locs = cd.LOCATIONS
        w = np.array([x[3] for x in locs])
        self.loc_weight = w / w.sum()
        self.loc_city = np.array([x[0] for x in locs], dtype=object)
        self.loc_country = np.array([x[1] for x in locs], dtype=object)
        self.loc_tz = np.array([x[2] for x in locs], dtype=object)
        ref = datetime(end.year, 1, 15, tzinfo=timezone.utc)
        self.loc_offset = np.array(
            [int(ref.astimezone(ZoneInfo(x[2])).utcoffset().total_seconds()) for x in locs])
        self.loc_ua = self.loc_country == "UA"
        self.loc_has_store = self.cat.loc_stores[2] > 0
        self.store_city_share = float(self.loc_weight[self.loc_has_store].sum())
        self.counters = {"order": 0, "receipt": 0, "event": 0, "session": 0, "bonus": 0}
        self._zone_offsets: tuple[int, np.ndarray] | None = None

    def _rng(self, purpose: int, chunk: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(purpose, chunk)))

    # ---------------------------------------------------------------- catalogue files
    def write_catalog(self, out: _Writer) -> None:
        cat, clock = self.cat, self.clock
        last = cat.prod_last_row
        out.write("products", {
            "product_id": cat.prod_id,
            "name": cat.prod_name,
            "category_path": cat.prod_category[:-1].tolist(),
            "brand": cat.prod_brand,
            "price": cat.ch_price_text[last].tolist(),
            "in_stock": np.where(cat.ch_stock[last], "true", "false").tolist(),
            "updated_at": clock.text(cat.ch_t[last]),
        })
        out.write("product_changes", {
            "product_id": cat.prod_id_text[cat.ch_prod].tolist(),
            "changed_at": clock.text(cat.ch_t),
            "price": cat.ch_price_text[:-1].tolist(),
            "in_stock": np.where(cat.ch_stock, "true", "false").tolist(),
        })

    # ---------------------------------------------------------------- one chunk
    def write_chunk(self, out: _Writer, chunk: int, first: int, n: int) -> None:
        rng = self._rng(1, chunk)
        c = self._customers(rng, first, n)
        planted = self._plant(self._rng(3, chunk), c) if self.k.plant_preferences else None
        events = _Events()
        orders = self._orders(rng, c, events)
        self._browse(rng, c, orders, events, planted)
        self._anonymous(rng, n, events)
        receipts = self._offline(rng, c, events)
        subs = self._subscriptions(rng, c)
        self._emit_customers(out, c)
        self._emit_subscriptions(out, c, subs)
        self._emit_orders(out, c, orders)
        self._emit_receipts(out, c, receipts)
        self._emit_events(out, c, events)
        self._emit_bonuses(out, c, self._bonuses(self._rng(2, chunk), orders))
        if planted is not None:
            self._emit_truth(out, c, orders, subs, planted)

    # customers ---------------------------------------------------------------------
    def _customers(self, rng, first: int, n: int) -> dict:
        k, clock, cat = self.k, self.clock, self.cat
        gi = np.arange(first, first + n, dtype=np.int64)
        loc = rng.choice(len(self.loc_weight), n, p=self.loc_weight)
        created_day = clock.sample_days(rng, n)
        home = rng.choice(len(cat.mid_weight), n, p=cat.mid_weight)
        second = np.where(rng.random(n) < 0.5, _pick(rng, cat.mid_related, home),
                          rng.choice(len(cat.mid_weight), n, p=cat.mid_weight))
        rate = rng.gamma(k.purchase_rate_shape, 1.0 / (k.purchase_gap_days * k.purchase_rate_shape),
                         n) * cat.mid_rate[home]
        dropout = rng.beta(k.dropout_a, k.dropout_b, n)
        buyer = rng.random(n) < k.buyer_share
        has_email = rng.random(n) < k.email_share
        has_phone = rng.random(n) < k.phone_share
        engagement = (np.argsort(np.argsort(rate, kind="stable"), kind="stable") + 0.5) / n  # rank in [0, 1)
        app_user = rng.random(n) < k.app_user_share * (0.5 + engagement)
        # families: customer i+1 shares the phone (and the home) of customer i
        head = (rng.random(n) < k.shared_phone_share / 2) & self.loc_ua[loc]
        head[1:] &= ~head[:-1]
        head[-1] = False
        heads = np.nonzero(head)[0]
        partners = heads + 1
        loc[partners] = loc[heads]
        has_phone[heads] = True
        has_phone[partners] = True
        offline = (self.loc_ua[loc] & self.loc_has_store[loc]
                   & (rng.random(n) < min(1.0, k.offline_share / self.store_city_share)))
        family_shops = (rng.random(len(heads)) < 0.6) & self.loc_has_store[loc[heads]]
        offline[heads[family_shops]] = True
        offline[partners[family_shops]] = True
        card_online = max(0.0, (k.loyalty_card_share - 0.7 * k.offline_share)
                          / max(1e-9, 1 - k.offline_share))
        has_card = rng.random(n) < np.where(offline, 0.7, card_online)
        offset = self.loc_offset[loc]
        created = clock.at(created_day, _online_sod(rng, n), offset)
        created = np.clip(created, clock.start, clock.end - 3600)
        phone_e164, phone_text = self._phones(rng, gi, loc, heads, partners)
        return {
            "n": n, "gi": gi, "loc": loc, "created": created, "home": home, "second": second,
            "rate": rate, "dropout": dropout, "buyer": buyer, "has_email": has_email,
            "has_phone": has_phone, "app_user": app_user, "offline": offline,
            "has_card": has_card, "offset": offset, "phone_e164": phone_e164,
            "phone_text": phone_text, "heads": heads, "email_text": _emails(gi, rng),
            "id_text": np.array([f"c{i + 1:07d}" for i in gi.tolist()] + [""], dtype=object),
        }

    def _phones(self, rng, gi, loc, heads, partners):
        n = len(gi)
        country = self.loc_country[loc]
        e164 = np.empty(n, dtype=object)
        text = np.empty(n, dtype=object)
        style = np.where(rng.random(n) < self.k.local_phone_format_share,
                         rng.integers(1, 5, n), 0)
        nums = np.zeros(n, dtype=np.int64)
        mult = 982_451_653
        offset = (self.seed * 7_919 + 12_345) % 1_000_003
        for cc in np.unique(country):
            m = country == cc
            code, prefixes, digits = cd.PHONE_PLANS[cc]
            space = len(prefixes) * 10**digits
            # a bijection on customer numbers: nobody shares a phone by accident
            # (while there are fewer customers than the smallest plan, 20 million)
            nums[m] = (gi[m] * mult + offset) % space
        nums[partners] = nums[heads]
        for i, (cc, num, st) in enumerate(zip(country.tolist(), nums.tolist(), style.tolist())):
            code, prefixes, digits = cd.PHONE_PLANS[cc]
            national = prefixes[num // 10**digits] + f"{num % 10**digits:0{digits}d}"
            e164[i] = "+" + code + national
            if st == 0:
                text[i] = e164[i]
            elif cc == "UA":
                text[i] = _ua_local(national, st)
            else:
                text[i] = f"+{code} {national[:3]} {national[3:6]} {national[6:]}"
        return e164, text

    # orders ------------------------------------------------------------------------
    def _orders(self, rng, c: dict, events: _Events) -> dict:
        k, clock, cat = self.k, self.clock, self.cat
        end = clock.end
        bc = np.nonzero(c["buyer"])[0]
        nb = len(bc)
        quick = rng.random(nb) < k.quick_first_order_share
        later_day = clock.day_of(c["created"][bc]) + np.ceil(
            rng.exponential(k.first_order_delay_days, nb)).astype(np.int64)
        later = clock.at(later_day, _online_sod(rng, nb), c["offset"][bc])
        t = np.where(quick, c["created"][bc] + rng.integers(180, 2400, nb), later)
        t = np.maximum(t, c["created"][bc] + 120)
        cur_c, cur_t = bc[t < end], t[t < end]
        oc, ot, ok = [], [], []
        dropped = np.full(c["n"], -1, dtype=np.int64)  # the order after which they stopped
        nth = 0
        while cur_c.size:
            oc.append(cur_c)
            ot.append(cur_t)
            ok.append(np.full(cur_c.size, nth))
            drop = rng.random(cur_c.size) < c["dropout"][cur_c]
            dropped[cur_c[drop]] = cur_t[drop]
            gap = np.minimum(rng.exponential(1.0, cur_c.size) / c["rate"][cur_c], 1e5)
            day = np.floor((cur_t - clock.day0) / DAY + gap).astype(np.int64)
            nt = clock.at(day, _online_sod(rng, cur_c.size), c["offset"][cur_c])
            nt = np.maximum(nt, cur_t + 1800 + rng.integers(0, 3600, cur_c.size))
            alive = ~drop & (nt < end)
            cur_c, cur_t = cur_c[alive], nt[alive]
            nth += 1
        o_cust = np.concatenate(oc) if oc else np.zeros(0, dtype=np.int64)
        o_t = np.concatenate(ot) if ot else np.zeros(0, dtype=np.int64)
        o_nth = np.concatenate(ok) if ok else np.zeros(0, dtype=np.int64)
        order = np.argsort(o_t, kind="stable")
        o_cust, o_t, o_nth = o_cust[order], o_t[order], o_nth[order]
        n_orders = len(o_cust)

        # lines and what they are
        extra = rng.choice(3, n_orders, p=[0.65, 0.22, 0.13]) + 2
        n_lines = np.where(rng.random(n_orders) < k.multi_item_share, extra, 1)
        l_order, l_no = _expand(n_lines)
        l_cust = o_cust[l_order]
        l_t = o_t[l_order]
        first_line = l_no == 0
        mid, kind = self._category_choice(rng, c, l_cust, first_purchase=(o_nth[l_order] == 0)
                                          & first_line)
        # extra lines: often an accessory of the first line's category (phone + case)
        line0 = np.cumsum(n_lines) - n_lines
        acc = ~first_line & (rng.random(len(l_no)) < k.same_order_accessory_share)
        mid = np.where(acc, mid[line0[l_order]], mid)
        kind = np.where(acc, 2, kind)
        leaf = self._leaf(rng, mid, kind)
        prod = cat.pick_product(rng, leaf, l_t)
        row = cat.state_row(prod, l_t)
        out = ~cat.ch_stock[row]
        retry = out & (rng.random(len(out)) < k.repick_when_out_of_stock)
        if retry.any():
            prod[retry] = cat.pick_product(rng, leaf[retry], l_t[retry])
            row[retry] = cat.state_row(prod[retry], l_t[retry])
        out = ~cat.ch_stock[row]
        unit = cat.ch_price[row]
        qty = np.where((unit < 30_000) & (rng.random(len(unit)) < 0.3),
                       rng.integers(2, 4, len(unit)), 1)
        total = np.bincount(l_order, weights=unit * qty, minlength=n_orders)
        total = total.round().astype(np.int64)
        oos = np.bincount(l_order, weights=out, minlength=n_orders) > 0

        # where each order stands at `end`
        payment = _choice(rng, cd.PAYMENT_METHODS, n_orders)
        cod = payment == 0
        age = (end - o_t) / DAY
        delivered_after = 1.5 + rng.exponential(1.5, n_orders)
        status = np.where(age < delivered_after, np.where(cod, 0, 1), 2)  # placed/paid/delivered
        returned = ((status == 2) & (age > delivered_after + 2)
                    & (rng.random(n_orders) < k.return_share))
        status = np.where(returned, 4, status)
        cancelled = rng.random(n_orders) < k.cancel_share
        reason = _choice(rng, cd.CANCEL_REASONS, n_orders)
        reason = np.where(cod & (reason == 1), 2, np.where(~cod & (reason == 2), 1, reason)) + 1
        reason = np.where(oos, 0, np.where(cancelled, reason, -1))
        status = np.where(oos | cancelled, 3, status)

        # the session that ended with the order
        self._order_sessions(rng, c, events, o_cust, o_t, n_lines, l_order, l_no, prod, leaf)
        return {
            "cust": o_cust, "t": o_t, "total": total, "status": status, "payment": payment,
            "reason": reason, "l_order": l_order, "l_no": l_no, "prod": prod, "qty": qty,
            "unit": unit, "count": np.bincount(o_cust, minlength=c["n"]),
            "last": _group_max(o_cust, o_t, c["n"]), "dropped": dropped,
        }

    def _category_choice(self, rng, c: dict, cust: np.ndarray, first_purchase=None):
        """Mid-category and leaf kind (0 any, 1 main product, 2 accessory) per pick."""
        cat, loyal = self.cat, self.k.category_loyalty
        n = len(cust)
        home, second = c["home"][cust], c["second"][cust]
        related = _pick(rng, cat.mid_related, home)
        popular = rng.choice(len(cat.mid_weight), n, p=cat.mid_weight)
        u = rng.random(n)
        edges = np.array([0.2, 0.6, 0.8, 1.0]) * loyal
        mode = np.searchsorted(edges, u, side="right")  # 0 home main .. 3 related, 4 popular
        if first_purchase is not None:
            first_mode = np.where(u < 0.8 * loyal, 0, np.where(u < loyal, 1, 4))
            mode = np.where(first_purchase, first_mode, mode)
        mid = np.choose(mode, [home, home, second, related, popular])
        kind = np.choose(mode, [1, 2, 0, 0, 0])
        return mid, kind

    def _leaf(self, rng, mid: np.ndarray, kind: np.ndarray) -> np.ndarray:
        cat = self.cat
        leaf = _pick(rng, cat.mid_leaves, mid)
        for code, csr in ((1, cat.mid_primaries), (2, cat.mid_accessories)):
            m = kind == code
            leaf[m] = _pick(rng, csr, mid[m])
        return leaf

    def _session_leaf(self, rng, c: dict, cust: np.ndarray) -> np.ndarray:
        mid, _ = self._category_choice(rng, c, cust)
        return _pick(rng, self.cat.mid_leaves, mid)

    def _order_sessions(self, rng, c, events: _Events, o_cust, o_t, n_lines, l_order, l_no,
                        l_prod, l_leaf) -> None:
        k, cat = self.k, self.cat
        n = len(o_cust)
        if n == 0:
            return
        sess = events.new_sessions(n)
        step = 20 + rng.exponential(40, n)
        leaf0 = l_leaf[np.cumsum(n_lines) - n_lines]
        n_alt = rng.poisson(k.order_extra_views, n)
        total_slots = 2 + n_alt + n_lines + 1

        def at(o, slot):
            jitter = np.where(slot >= total_slots[o], 0.0, rng.uniform(0, 0.2, len(o)))
            return o_t[o] - np.round((total_slots[o] - slot - jitter) * step[o]).astype(np.int64)

        cust = o_cust
        app = c["app_user"][cust] & (rng.random(n) < k.app_open_rate)
        o = np.nonzero(app)[0]
        events.add(at(o, np.zeros(len(o))), EV["app_open"], cust[o], sess[o])
        o = np.nonzero(rng.random(n) < k.search_rate)[0]
        events.add(at(o, np.ones(len(o))), EV["search"], cust[o], sess[o],
                   query=_pick(rng, cat.leaf_queries, leaf0[o]))
        # alternatives looked at, one sometimes carted and taken out again
        a_o, a_pos = _expand(n_alt)
        a_prod = cat.pick_product(rng, leaf0[a_o], o_t[a_o])
        events.add(at(a_o, 2.0 + a_pos), EV["view"], cust[a_o], sess[a_o], a_prod)
        rem = (a_pos == 0) & (rng.random(len(a_o)) < k.remove_from_cart_rate * 1.5)
        r_o = a_o[rem]
        events.add(at(r_o, np.full(len(r_o), 2.5)), EV["cart"], cust[r_o], sess[r_o], a_prod[rem])
        events.add(at(r_o, 2.0 + n_alt[r_o] + n_lines[r_o] - 0.25), EV["remove_from_cart"],
                   cust[r_o], sess[r_o], a_prod[rem])
        # the products bought: viewed, (usually) carted, purchased at the order's time
        slot = 2.0 + n_alt[l_order] + l_no
        events.add(at(l_order, slot), EV["view"], cust[l_order], sess[l_order], l_prod)
        carted = rng.random(len(l_order)) < k.cart_before_purchase_rate
        lo = l_order[carted]
        events.add(at(lo, slot[carted] + 0.5), EV["cart"], cust[lo], sess[lo], l_prod[carted])
        events.add(o_t[l_order], EV["purchase"], cust[l_order], sess[l_order], l_prod)
        # an abandoned cart of the same product some time before (what cart triggers recover)
        first = np.cumsum(n_lines) - n_lines
        o = np.nonzero(rng.random(n) < k.recovered_cart_share)[0]
        before = np.clip(rng.exponential(DAY, len(o)), 3600, 6 * DAY).astype(np.int64)
        t0 = o_t[o] - before
        keep = t0 > c["created"][cust[o]] + 60
        o, t0 = o[keep], t0[keep]
        rs = events.new_sessions(len(o))
        p0 = l_prod[first[o]]
        events.add(t0, EV["view"], cust[o], rs, p0)
        events.add(t0 + rng.integers(20, 300, len(o)), EV["cart"], cust[o], rs, p0)

    # sessions without an order -------------------------------------------------------
    def _browse(self, rng, c: dict, orders: dict, events: _Events,
                planted: dict | None = None) -> None:
        k, clock = self.k, self.clock
        n = c["n"]
        count = rng.poisson(k.browse_sessions_per_customer
                            + k.browse_sessions_per_order * orders["count"])
        active_until = np.where(
            orders["count"] > 0, orders["last"] + rng.exponential(60 * DAY, n),
            c["created"] + rng.exponential(150 * DAY, n))
        active_until = np.minimum(active_until, clock.end).astype(np.int64)
        s_cust, _ = _expand(count)
        created = c["created"][s_cust]
        span = np.maximum(active_until[s_cust] - created, 0)
        t = created + (rng.random(len(s_cust)) * span).astype(np.int64)
        t = clock.at(clock.day_of(t), _online_sod(rng, len(t)), c["offset"][s_cust])
        if planted is not None:
            t = self._at_favourite_hour(planted, c, s_cust, t, active_until[s_cust])
        t = np.maximum(t, created + 60)
        leaf = self._session_leaf(rng, c, s_cust)
        self._sessions(rng, events, s_cust, t, leaf, c["app_user"][s_cust], k.cart_rate,
                       k.views_per_session)

    def _sessions(self, rng, events: _Events, cust, t0, leaf, app_user, cart_rate,
                  views_mean, wishlist=True) -> None:
        """Generic browsing: app_open, search, views, maybe a cart that is left behind."""
        k, cat = self.k, self.cat
        n = len(cust)
        if n == 0:
            return
        sess = events.new_sessions(n)
        step = 15 + rng.exponential(45, n)

        def at(s, slot):
            return t0[s] + np.round((slot + rng.uniform(0, 0.2, len(s))) * step[s]).astype(np.int64)

        s = np.nonzero(app_user & (rng.random(n) < k.app_open_rate))[0]
        events.add(at(s, np.zeros(len(s))), EV["app_open"], cust[s], sess[s])
        s = np.nonzero(rng.random(n) < k.search_rate)[0]
        events.add(at(s, np.ones(len(s))), EV["search"], cust[s], sess[s],
                   query=_pick(rng, cat.leaf_queries, leaf[s]))
        n_views = 1 + rng.poisson(max(views_mean - 1, 0), n)
        v_s, v_pos = _expand(n_views)
        v_prod = cat.pick_product(rng, leaf[v_s], t0[v_s])
        events.add(at(v_s, 2.0 + v_pos), EV["view"], cust[v_s], sess[v_s], v_prod)
        carted = rng.random(n) < cart_rate
        cart1 = carted[v_s] & (v_pos == 0)
        cart2 = carted[v_s] & (v_pos == 1) & (rng.random(len(v_s)) < 0.35)
        cm = cart1 | cart2
        events.add(at(v_s[cm], 2.5 + v_pos[cm]), EV["cart"], cust[v_s[cm]], sess[v_s[cm]],
                   v_prod[cm])
        rm = cart1 & (rng.random(len(v_s)) < k.remove_from_cart_rate)
        events.add(at(v_s[rm], 2.25 + n_views[v_s[rm]]), EV["remove_from_cart"],
                   cust[v_s[rm]], sess[v_s[rm]], v_prod[rm])
        if wishlist:
            wm = (v_pos == n_views[v_s] - 1) & (rng.random(len(v_s)) < k.wishlist_rate)
            events.add(at(v_s[wm], 2.3 + v_pos[wm]), EV["wishlist"], cust[v_s[wm]],
                       sess[v_s[wm]], v_prod[wm])

    def _anonymous(self, rng, n_customers: int, events: _Events) -> None:
        clock, cat = self.clock, self.cat
        n = rng.poisson(self.k.anonymous_sessions_per_customer * n_customers)
        day = clock.sample_days(rng, n)
        t = clock.at(day, _online_sod(rng, n), np.full(n, 7200))
        t = np.maximum(t, clock.start)
        mid = rng.choice(len(cat.mid_weight), n, p=cat.mid_weight)
        leaf = _pick(rng, cat.mid_leaves, mid)
        self._sessions(rng, events, np.full(n, -1), t, leaf, rng.random(n) < 0.15, 0.1, 1.8,
                       wishlist=False)

    # stores ---------------------------------------------------------------------------
    def _offline(self, rng, c: dict, events: _Events) -> dict:
        k, clock, cat = self.k, self.clock, self.cat
        shoppers = np.nonzero(c["offline"])[0]
        span = (clock.end - c["created"][shoppers]) / (clock.end - clock.start)
        count = 1 + rng.poisson(max(k.receipts_per_offline_customer - 1, 0) * span)
        r_cust = shoppers[_expand(count)[0]]
        first_day = clock.day_of(c["created"][r_cust]) + 1
        day = first_day + (rng.random(len(r_cust)) * (clock.n_days - first_day)).astype(np.int64)
        # a shopper's own city, now and then another store
        loc = c["loc"][r_cust]
        store = _pick(rng, cat.loc_stores, loc)
        away = rng.random(len(store)) < 0.1
        store[away] = rng.choice(len(cat.store_id), away.sum(), p=cat.store_weight)
        # who they are at the till
        card = c["has_card"][r_cust] & (rng.random(len(r_cust)) < k.card_presented_rate)
        phone = ~card & c["has_phone"][r_cust] & (rng.random(len(r_cust)) < k.phone_at_till_rate)
        # walk-ins: shoppers the shop does not know
        nw = rng.poisson(k.walk_in_receipts_per_customer * c["n"])
        w_day = clock.sample_days(rng, nw)
        w_store = rng.choice(len(cat.store_id), nw, p=cat.store_weight)
        w_kind = rng.choice(3, nw, p=[0.82, 0.12, 0.06])  # nothing, a phone, an unlinked card
        cust = np.concatenate([r_cust, np.full(nw, -1)])
        day = np.concatenate([day, w_day])
        store = np.concatenate([store, w_store])
        card = np.concatenate([card, np.zeros(nw, bool)])
        phone = np.concatenate([phone, np.zeros(nw, bool)])
        sod = _store_sod(rng, len(day))
        offset = clock.store_offset[clock.day0 // DAY - clock.base // DAY + day]
        t = clock.at(day, sod, offset)
        ok = (t < clock.end) & (t > np.where(cust >= 0, c["created"][cust], clock.start))
        stranger_phone = np.concatenate([np.zeros(len(r_cust), bool), w_kind == 1])
        stranger_card = np.concatenate([np.zeros(len(r_cust), bool), w_kind == 2])
        ropo = (cust >= 0) & (rng.random(len(cust)) < k.ropo_share)
        stranger_num = np.concatenate([np.zeros(len(r_cust), np.int64),
                                       rng.integers(0, 10**7, nw)])
        sel = np.nonzero(ok)[0]
        sel = sel[np.argsort(t[sel], kind="stable")]
        cust, t, store, card, phone = cust[sel], t[sel], store[sel], card[sel], phone[sel]
        stranger_phone, stranger_card, ropo = stranger_phone[sel], stranger_card[sel], ropo[sel]
        stranger_num = stranger_num[sel]
        n = len(sel)
        # items: the shopper's categories, or what sells for walk-ins
        n_lines = rng.choice(5, n, p=[0.45, 0.25, 0.15, 0.1, 0.05]) + 1
        l_r, l_no = _expand(n_lines)
        l_cust = cust[l_r]
        known = l_cust >= 0
        mid = rng.choice(len(cat.mid_weight), len(l_r), p=cat.mid_weight)
        if known.any():
            mid[known] = self._category_choice(rng, c, l_cust[known])[0]
        leaf = _pick(rng, cat.mid_leaves, mid)
        prod = cat.pick_product(rng, leaf, t[l_r])
        unit = cat.ch_price[cat.state_row(prod, t[l_r])]
        qty = np.where((unit < 20_000) & (rng.random(len(unit)) < 0.35),
                       rng.integers(2, 5, len(unit)), 1)
        total = np.bincount(l_r, weights=unit * qty, minlength=n).round().astype(np.int64)
        # ROPO: the product was looked at online first
        first_line = np.cumsum(n_lines) - n_lines
        r = np.nonzero(ropo)[0]
        before = np.clip(rng.exponential(4 * DAY, len(r)), 3600, 29.5 * DAY).astype(np.int64)
        tv = t[r] - before
        keep = tv > c["created"][cust[r]] + 60
        r, tv = r[keep], tv[keep]
        p0 = prod[first_line[r]]
        rc = cust[r]
        rs = events.new_sessions(len(r))
        events.add(tv, EV["view"], rc, rs, p0)
        again = rng.random(len(r)) < 0.4
        events.add(tv[again] + rng.integers(60, 600, again.sum()), EV["view"], rc[again],
                   rs[again], cat.pick_product(rng, leaf[first_line[r[again]]], tv[again]))
        wish = rng.random(len(r)) < 0.15
        events.add(tv[wish] + rng.integers(610, 900, wish.sum()), EV["wishlist"], rc[wish],
                   rs[wish], p0[wish])
        return {
            "cust": cust, "t": t, "store": store, "card": card, "phone": phone,
            "stranger_phone": stranger_phone, "stranger_card": stranger_card,
            "stranger_num": stranger_num, "total": total,
            "l_r": l_r, "l_no": l_no, "prod": prod, "qty": qty, "unit": unit,
        }

    # channels ------------------------------------------------------------------------
    def _subscriptions(self, rng, c: dict) -> dict:
        k, clock = self.k, self.clock
        n = c["n"]
        created = c["created"]
        rows: list[tuple[np.ndarray, int, np.ndarray, np.ndarray, float]] = []

        def later(who, mean_days, soon_share=0.0):
            delay = rng.exponential(mean_days * DAY, len(who))
            soon = rng.random(len(who)) < soon_share
            delay = np.where(soon, rng.integers(0, 600, len(who)), delay)
            # the reach knobs count customers with a row: keep them all before `end`
            room = clock.end - 1 - created[who]
            delay = np.where(delay < room, delay, rng.random(len(who)) * room)
            return created[who] + delay.astype(np.int64)

        email = np.nonzero(c["has_email"] & (rng.random(n) < k.email_reach / k.email_share))[0]
        rows.append((email, 0, later(email, 60, 0.8), np.array(c["email_text"])[email], 1.0))
        push_p = k.mobile_push_reach / max(k.app_user_share, 1e-9)
        push = np.nonzero(c["app_user"] & (rng.random(n) < push_p))[0]
        devices = np.concatenate([push, push[rng.random(len(push)) < k.second_device_share]])
        devices.sort(kind="stable")
        rows.append((devices, 1, later(devices, 30, 0.3), _device_tokens(rng, len(devices)), 1.2))
        web = np.nonzero(rng.random(n) < k.web_push_reach)[0]
        rows.append((web, 2, later(web, 20, 0.2), _web_push_endpoints(rng, len(web)), 1.5))
        tg = np.nonzero(rng.random(n) < k.telegram_reach)[0]
        chat = 100_000_000 + (c["gi"][tg] * 1_000_003 + self.seed % 9_973) % 6_000_000_000
        rows.append((tg, 3, later(tg, 60), chat.astype(str).astype(object), 0.6))
        for code, reach in ((4, k.sms_reach), (5, k.viber_reach)):
            who = np.nonzero(c["has_phone"] & (rng.random(n) < reach / k.phone_share))[0]
            rows.append((who, code, later(who, 45, 0.3), c["phone_e164"][who], 1.0 if code == 4
                         else 0.8))
        cust, chan, sub, addr, unsub = [], [], [], [], []
        for who, code, t, address, churn in rows:
            gone = rng.random(len(who)) < min(1.0, k.unsubscribe_share * churn)
            u = t + 1 + (rng.random(len(who)) * (clock.end - 2 - t)).astype(np.int64)
            u = np.where(gone & (u > t) & (u < clock.end), u, -1)
            keep = t < clock.end
            cust.append(who[keep])
            chan.append(np.full(keep.sum(), code))
            sub.append(t[keep])
            addr.append(np.asarray(address, dtype=object)[keep])
            unsub.append(u[keep])
        cust_a, chan_a = np.concatenate(cust), np.concatenate(chan)
        order = np.lexsort((chan_a, cust_a))
        return {"cust": cust_a[order], "channel": chan_a[order],
                "sub": np.concatenate(sub)[order], "unsub": np.concatenate(unsub)[order],
                "address": np.concatenate(addr)[order]}

    # writing ---------------------------------------------------------------------------
    def _emit_customers(self, out: _Writer, c: dict) -> None:
        n = c["n"]
        out.write("customers", {
            "customer_id": c["id_text"][:-1].tolist(),
            "email": np.where(c["has_email"], np.array(c["email_text"], dtype=object), "").tolist(),
            "phone": np.where(c["has_phone"], c["phone_text"], "").tolist(),
            "loyalty_card_id": np.where(c["has_card"], _cards(c["gi"]), "").tolist(),
            "created_at": self.clock.text(c["created"]),
            "timezone": self.loc_tz[c["loc"]].tolist(),
            "city": self.loc_city[c["loc"]].tolist(),
            "country": self.loc_country[c["loc"]].tolist(),
        })
        assert n == len(c["id_text"]) - 1

    def _emit_subscriptions(self, out: _Writer, c: dict, s: dict) -> None:
        channels = np.array(["email", "mobile_push", "web_push", "telegram", "sms", "viber"],
                            dtype=object)
        out.write("channel_subscriptions", {
            "customer_id": c["id_text"][s["cust"]].tolist(),
            "channel": channels[s["channel"]].tolist(),
            "address": s["address"].tolist(),
            "subscribed_at": self.clock.text(s["sub"]),
            "unsubscribed_at": self.clock.text(s["unsub"]),
        })

    def _emit_orders(self, out: _Writer, c: dict, o: dict) -> None:
        n = len(o["cust"])
        first = self.counters["order"]
        self.counters["order"] += n
        ids = np.array([f"o{i + 1:08d}" for i in range(first, first + n)], dtype=object)
        statuses = np.array(["placed", "paid", "delivered", "cancelled", "returned"], dtype=object)
        reasons = np.array(["out_of_stock", "customer_request", "payment_failed",
                            "not_picked_up", ""], dtype=object)
        payments = np.array([p for p, _ in cd.PAYMENT_METHODS], dtype=object)
        out.write("orders", {
            "order_id": ids.tolist(),
            "customer_id": c["id_text"][o["cust"]].tolist(),
            "ordered_at": self.clock.text(o["t"]),
            "status": statuses[o["status"]].tolist(),
            "total_amount": _money(o["total"].tolist()),
            "currency": [self.k.currency] * n,
            "payment_method": payments[o["payment"]].tolist(),
            "cancel_reason": reasons[o["reason"]].tolist(),
        })
        out.write("order_items", {
            "order_id": ids[o["l_order"]].tolist(),
            "line_no": _ints(o["l_no"] + 1),
            "product_id": self.cat.prod_id_text[o["prod"]].tolist(),
            "quantity": _ints(o["qty"]),
            "unit_price": _money(o["unit"].tolist()),
        })

    def _emit_receipts(self, out: _Writer, c: dict, r: dict) -> None:
        cat = self.cat
        n = len(r["cust"])
        first = self.counters["receipt"]
        self.counters["receipt"] += n
        ids = np.array([f"r{i + 1:08d}" for i in range(first, first + n)], dtype=object)
        cust = r["cust"]
        gi = np.where(cust >= 0, c["gi"][cust], 0)
        card = np.where(r["card"], _cards(gi), "")
        # cards handed out at a till and never linked to an online account
        stranger_cards = np.array([f"29{50_000_000_000 + x * 4_999:011d}"
                                   for x in r["stranger_num"].tolist()], dtype=object)
        card = np.where(r["stranger_card"], stranger_cards, card)
        phone = np.full(n, "", dtype=object)
        fmt = cat.store_phone_format[r["store"]]
        idx = np.nonzero(r["phone"])[0]
        phone[idx] = [_till_phone(p, f) for p, f in
                      zip(c["phone_e164"][cust[idx]].tolist(), fmt[idx].tolist())]
        idx = np.nonzero(r["stranger_phone"])[0]
        strangers = r["stranger_num"][idx]
        phone[idx] = [_till_phone(f"+380{cd.STRANGER_UA_PREFIX}{s:07d}", f)
                      for s, f in zip(strangers.tolist(), fmt[idx].tolist())]
        out.write("offline_receipts", {
            "receipt_id": ids.tolist(),
            "store_id": cat.store_id[r["store"]].tolist(),
            "purchased_at": self.clock.text(r["t"], self.clock.store_offset_at(r["t"])),
            "loyalty_card_id": card.tolist(),
            "phone": phone.tolist(),
            "total_amount": _money(r["total"].tolist()),
            "currency": [self.k.currency] * n,
        })
        out.write("offline_receipt_items", {
            "receipt_id": ids[r["l_r"]].tolist(),
            "line_no": _ints(r["l_no"] + 1),
            "product_id": cat.prod_id_text[r["prod"]].tolist(),
            "quantity": _ints(r["qty"]),
            "unit_price": _money(r["unit"].tolist()),
        })

    def _emit_events(self, out: _Writer, c: dict, events: _Events) -> None:
        cat, clock = self.cat, self.clock
        t, etype, cust, sess, prod, query = events.columns()
        # nothing at or after `end`, nothing of a customer before they signed up
        keep = (t < clock.end) & ((cust < 0) | (t >= c["created"][cust]))
        order = np.nonzero(keep)[0]
        order = order[np.argsort(t[order], kind="stable")]
        t, etype, cust, sess, prod, query = (a[order] for a in (t, etype, cust, sess, prod, query))
        n = len(t)
        # sessions numbered in the order they start
        _, first_seen, inverse = np.unique(sess, return_index=True, return_inverse=True)
        rank = np.empty(len(first_seen), dtype=np.int64)
        rank[np.argsort(first_seen, kind="stable")] = np.arange(len(first_seen))
        s0 = self.counters["session"]
        self.counters["session"] += len(first_seen)
        session_text = [f"s{i + 1:09d}" for i in range(s0, s0 + len(first_seen))]
        e0 = self.counters["event"]
        self.counters["event"] += n
        has_prod = prod >= 0
        price = np.full(n, -1, dtype=np.int64)
        price[has_prod] = cat.state_row(prod[has_prod], t[has_prod])
        types = np.array(EVENT_TYPES, dtype=object)
        session = np.array(session_text, dtype=object)[rank[inverse]]
        for a in range(0, n, _SLICE):  # the text of a slice at a time: memory stays flat
            b = min(a + _SLICE, n)
            out.write("events", {
                "event_id": [f"e{i + 1:09d}" for i in range(e0 + a, e0 + b)],
                "occurred_at": clock.text(t[a:b]),
                "event_type": types[etype[a:b]].tolist(),
                "customer_id": c["id_text"][cust[a:b]].tolist(),
                "session_id": session[a:b].tolist(),
                "product_id": cat.prod_id_text[prod[a:b]].tolist(),
                "category_path": cat.prod_category[prod[a:b]].tolist(),
                "price": cat.ch_price_text[price[a:b]].tolist(),
                "search_query": cat.query_text[query[a:b]].tolist(),
                "properties": [""] * (b - a),
            })

    # the shop's own events -----------------------------------------------------------
    def _bonuses(self, rng, o: dict) -> dict:
        """Loyalty bonus credited 1-3 days after a share of the delivered orders (a
        returned order was delivered first); none at or after `end`."""
        delivered = np.nonzero((o["status"] == 2) | (o["status"] == 4))[0]
        pick = delivered[rng.random(len(delivered)) < self.k.bonus_share]
        t = o["t"][pick] + rng.integers(DAY, 3 * DAY, len(pick))
        # whole hryvnias (or the shop currency's units), at least one
        amount = np.maximum(1, (o["total"][pick] * rng.uniform(0.02, 0.05, len(pick)) / 100)
                            .round().astype(np.int64))
        keep = t < self.clock.end
        order = np.argsort(t[keep], kind="stable")
        return {"cust": o["cust"][pick][keep][order], "t": t[keep][order],
                "amount": amount[keep][order]}

    def _emit_bonuses(self, out: _Writer, c: dict, b: dict) -> None:
        n = len(b["t"])
        first = self.counters["bonus"]
        self.counters["bonus"] += n
        empty = [""] * n
        out.write("events", {
            "event_id": [f"b{i + 1:09d}" for i in range(first, first + n)],
            "occurred_at": self.clock.text(b["t"]),
            "event_type": ["bonus_credited"] * n,
            "customer_id": c["id_text"][b["cust"]].tolist(),
            "session_id": empty, "product_id": empty, "category_path": empty, "price": empty,
            "search_query": empty,
            "properties": [_csv_quote(f'{{"amount": {a}, "reason": "order"}}')
                           for a in b["amount"].tolist()],
        })

    # the planted ground truth (plant_preferences) -----------------------------------------
    def _plant(self, rng, c: dict) -> dict:
        """Each customer's favourite hour of the week (local), activity and proxy reading,
        from the chunk's own generator (`rng`, kept for the sessions and the channel)."""
        n = c["n"]
        usual = rng.random(n) < 0.8
        day = rng.integers(0, 7, n)
        hour = _FAVOURITE_HOURS[rng.integers(0, len(_FAVOURITE_HOURS), n)]
        how = np.where(usual, day * 24 + hour, rng.integers(0, 168, n))
        return {"rng": rng, "how": how, "activity": rng.uniform(0.1, 1.0, n),
                "proxy": rng.random(n) < 1 / 3}

    def _utc_offset(self, loc: np.ndarray, t: np.ndarray) -> np.ndarray:
        """UTC offset (seconds) of each location's zone on the day of t, daylight saving
        included (the offset at noon UTC: wrong only in the hours before a switch)."""
        if self._zone_offsets is None:
            first = self.clock.day0 - 14 * DAY
            n_days = (self.clock.end - first) // DAY + 16
            by_zone: dict[str, np.ndarray] = {}
            table = np.zeros((len(self.loc_tz), n_days), dtype=np.int64)
            for i, tz in enumerate(self.loc_tz.tolist()):
                if tz not in by_zone:
                    zone = ZoneInfo(tz)
                    by_zone[tz] = np.array([int(datetime.fromtimestamp(
                        first + d * DAY + DAY // 2, timezone.utc).astimezone(zone)
                        .utcoffset().total_seconds()) for d in range(n_days)], dtype=np.int64)
                table[i] = by_zone[tz]
            self._zone_offsets = (first, table)
        first, table = self._zone_offsets
        return table[loc, np.clip((t - first) // DAY, 0, table.shape[1] - 1)]

    def _at_favourite_hour(self, planted: dict, c: dict, cust: np.ndarray, t: np.ndarray,
                           until: np.ndarray) -> np.ndarray:
        """Session starts moved, with chance hour_loyalty each, to a minute 0-49 of the
        customer's favourite hour of the week in the same local week (or the week before or
        after, to stay between their sign-up and `until`); the others stay at t."""
        rng, n = planted["rng"], len(t)
        moved = rng.random(n) < self.k.hour_loyalty
        into = rng.integers(0, 50 * 60, n)
        loc = c["loc"][cust]
        local_day = (t + self._utc_offset(loc, t)) // DAY
        monday = (local_day - (local_day + 3) % 7) * DAY  # 1970-01-01 was a Thursday
        low = c["created"][cust] + 60
        high = np.minimum(until, self.clock.end)
        out = t.copy()
        todo = moved.copy()
        for weeks in (0, -1, 1):
            wall = monday + weeks * 7 * DAY + planted["how"][cust] * 3600 + into
            at = wall - self._utc_offset(loc, wall - self._utc_offset(loc, wall))
            ok = todo & (at >= low) & (at < high)
            out[ok] = at[ok]
            todo &= ~ok
        return out

    def _emit_truth(self, out: _Writer, c: dict, o: dict, s: dict, planted: dict) -> None:
        n = c["n"]
        # the favourite channel: one of the customer's channels not unsubscribed at `end`
        # (subscription rows come sorted by customer and channel; a second device is one)
        live = s["unsub"] < 0
        cust, chan = s["cust"][live], s["channel"][live]
        distinct = np.r_[True, (cust[1:] != cust[:-1]) | (chan[1:] != chan[:-1])][:len(cust)]
        cust, chan = cust[distinct], chan[distinct]
        count = np.bincount(cust, minlength=n)
        start = np.cumsum(count) - count
        pick = start + (planted["rng"].random(n) * count).astype(np.int64)
        favourite = np.where(count > 0, np.r_[chan, -1][np.minimum(pick, len(chan))], -1)
        names = np.array(["email", "mobile_push", "web_push", "telegram", "sms", "viber", ""],
                         dtype=object)  # the channel codes of _subscriptions, -1: none
        out.write_truth({
            "customer_id": c["id_text"][:-1].tolist(),
            "timezone": self.loc_tz[c["loc"]].tolist(),
            "favourite_hour_of_week": _ints(planted["how"]),
            "favourite_channel": names[favourite].tolist(),
            "activity": [f"{a:.3f}" for a in planted["activity"].tolist()],
            "proxy_reader": np.where(planted["proxy"], "true", "false").tolist(),
            "orders": _ints(o["count"]),
            "churned_at": self.clock.text(o["dropped"]),
        })


# --------------------------------------------------------------------------- small formats


def _group_max(group: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, -1, dtype=np.int64)
    np.maximum.at(out, group, values)
    return out


def _ua_local(national: str, style: int) -> str:
    op, s = national[:2], national[2:]
    if style == 1:
        return f"0{op} {s[:3]} {s[3:5]} {s[5:]}"
    if style == 2:
        return f"+38 (0{op}) {s[:3]}-{s[3:5]}-{s[5:]}"
    if style == 3:
        return f"0{op}{s}"
    return f"380{op}{s}"


def _till_phone(e164: str, fmt: int) -> str:
    """How a till system writes a phone: +380..., 0XX..., or 380... ."""
    if fmt == 0 or not e164.startswith("+380"):
        return e164
    if fmt == 1:
        return "0" + e164[4:]
    return e164[1:]


def _cards(gi: np.ndarray) -> np.ndarray:
    """Loyalty cards: in-store EAN range 29..., unique per customer (a bijection)."""
    num = (gi * 982_451_653 + 7_777) % 50_000_000_000
    return np.array([f"29{x:011d}" for x in num.tolist()], dtype=object)


_B64 = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", np.uint8)


def _device_tokens(rng, n: int) -> np.ndarray:
    """APNs tokens (64 hex) for iPhones, FCM registration tokens for Android."""
    ios = rng.random(n) < 0.35
    hex_tokens = [b.hex() for b in np.frombuffer(rng.bytes(32 * n), "S32")] if n else []
    fcm = _B64[rng.integers(0, 64, (n, 174))].view("S174").ravel() if n else []
    out = np.empty(n, dtype=object)
    for i in range(n):
        if ios[i]:
            out[i] = hex_tokens[i]
        else:
            raw = fcm[i].decode()
            out[i] = f"{raw[:22]}:APA91b{raw[22:156]}"
    return out


def _web_push_endpoints(rng, n: int) -> np.ndarray:
    codes = [x.decode() for x in _B64[rng.integers(0, 64, (n, 152))].view("S152").ravel()]
    return np.array([f"https://fcm.googleapis.com/fcm/send/{x[:22]}:APA91b{x[22:]}"
                     for x in codes], dtype=object)


def _emails(gi: np.ndarray, rng) -> list[str]:
    first = rng.integers(0, len(cd.FIRST_NAMES), len(gi))
    last = rng.integers(0, len(cd.LAST_NAMES), len(gi))
    dom = rng.integers(0, len(cd.EMAIL_DOMAINS), len(gi))
    style = rng.random(len(gi))
    out = []
    for g, f, l_, d, s in zip(gi.tolist(), first.tolist(), last.tolist(), dom.tolist(),
                              style.tolist()):
        fn, ln, dn = cd.FIRST_NAMES[f], cd.LAST_NAMES[l_], cd.EMAIL_DOMAINS[d]
        if s < 0.45:
            local = f"{fn}.{ln}{g + 1}"
        elif s < 0.8:
            local = f"{fn[0]}{ln}{g + 1}"
        elif s < 0.98:
            local = f"{ln}_{fn}{g + 1}"
        else:  # typed with capitals: the address is the same, the text is not
            local = f"{fn.capitalize()}.{ln.capitalize()}{g + 1}"
        out.append(f"{local}@{dn}")
    return out


# --------------------------------------------------------------------------- entry point


def generate_shop(
    out_dir: Path,
    customers: int,
    seed: int = 42,
    end: datetime = DEFAULT_END,
    **knobs,
) -> dict[str, int]:
    """Write a generated shop's raw tables as CSV files into out_dir.

    `knobs` are the fields of `ShopKnobs`. Returns the rows written per table. The same
    arguments give byte-identical files; no timestamp is at or after `end`.
    """
    if customers < 0:
        raise ValueError("customers must be >= 0")
    if end.tzinfo is None:
        end = end.replace(tzinfo=timezone.utc)
    settings = ShopKnobs(**knobs)
    shop = _Shop(seed, end, settings)
    out = _Writer(Path(out_dir), settings)
    try:
        shop.write_catalog(out)
        for chunk, first in enumerate(range(0, customers, settings.chunk_size)):
            n = min(settings.chunk_size, customers - first)
            shop.write_chunk(out, chunk, first, n)
    finally:
        out.close()
    return dict(out.rows)
