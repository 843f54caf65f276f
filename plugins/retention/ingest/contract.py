"""The raw layer of docs/CONTRACT.md section 1, as data.

One description serves the loader (types, keys, checks), the data-quality suites, the
generator and the tests, so a column is named in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ORDER_STATUSES = ("placed", "paid", "delivered", "cancelled", "returned")
PURCHASE_STATUSES = ("paid", "delivered")
CHANNELS = ("email", "mobile_push", "web_push", "telegram", "sms", "viber")
EVENT_TYPES = ("view", "cart", "remove_from_cart", "wishlist", "search", "purchase", "app_open")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # text, timestamptz, numeric, integer, boolean, date, jsonb
    required: bool = False  # must be present in the file header
    not_null: bool = False  # a row without a value is quarantined
    enum: tuple[str, ...] | None = None
    non_negative: bool = False
    pii: bool = False


@dataclass(frozen=True)
class ForeignKey:
    column: str
    table: str
    ref_column: str
    reason: str


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    foreign_keys: tuple[ForeignKey, ...] = ()
    currency_column: str | None = None
    optional: bool = True
    description: str = ""
    checks: tuple[str, ...] = field(default=())
    #: optional columns the contract gained as extensions (CONTRACT.md marks them): the
    #: loader reads, checks and writes them like the others, a file may leave them out,
    #: and they come after `columns` in the raw table. `columns` and `column_names` are
    #: the original layout (what the generator writes); `all_columns` is the whole table.
    extensions: tuple[Column, ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def all_columns(self) -> tuple[Column, ...]:
        return self.columns + self.extensions

    @property
    def all_column_names(self) -> list[str]:
        return [c.name for c in self.all_columns]

    def column(self, name: str) -> Column:
        return next(c for c in self.all_columns if c.name == name)


def _c(name: str, type_: str = "text", **kw) -> Column:
    return Column(name, type_, **kw)


def _key(name: str, type_: str = "text") -> Column:
    return Column(name, type_, required=True, not_null=True)


def _line_items(name: str, parent: str, parent_key: str, missing: str,
                description: str) -> Table:
    """The lines of a purchase in `parent` (an order, a till receipt): the product, how
    many and at what unit price; `missing` is the quarantine reason of a line whose
    purchase does not exist."""
    return Table(
        name,
        (
            _key(parent_key),
            _key("line_no", "integer"),
            Column("product_id", "text", required=True, not_null=True),
            Column("quantity", "integer", required=True, not_null=True, non_negative=True),
            Column("unit_price", "numeric", required=True, not_null=True, non_negative=True),
        ),
        key=(parent_key, "line_no"),
        foreign_keys=(ForeignKey(parent_key, parent, parent_key, missing),),
        description=description,
    )


TABLES: tuple[Table, ...] = (
    Table(
        "customers",
        (
            _key("customer_id"),
            _c("email", pii=True),
            _c("phone", pii=True),
            _c("loyalty_card_id", pii=True),
            _c("created_at", "timestamptz"),
            _c("timezone"),
            _c("city"),
            _c("country"),
        ),
        key=("customer_id",),
        optional=False,
        description="one row per customer",
        extensions=(_c("birth_date", "date", pii=True),),
    ),
    Table(
        "channel_subscriptions",
        (
            _key("customer_id"),
            Column("channel", "text", required=True, not_null=True, enum=CHANNELS),
            _key("address"),
            _c("subscribed_at", "timestamptz"),
            _c("unsubscribed_at", "timestamptz"),
        ),
        key=("customer_id", "channel", "address"),
        foreign_keys=(ForeignKey("customer_id", "customers", "customer_id", "unknown customer"),),
        description="one row per customer, channel and address",
    ),
    Table(
        "products",
        (
            _key("product_id"),
            _c("name"),
            _c("category_path"),
            _c("brand"),
            _c("price", "numeric", non_negative=True),
            _c("in_stock", "boolean"),
            _c("updated_at", "timestamptz"),
        ),
        key=("product_id",),
        description="one row per product, current state",
    ),
    Table(
        "product_changes",
        (
            _key("product_id"),
            _key("changed_at", "timestamptz"),
            _c("price", "numeric", non_negative=True),
            _c("in_stock", "boolean"),
        ),
        key=("product_id", "changed_at"),
        description="one row per product and change time",
    ),
    Table(
        "orders",
        (
            _key("order_id"),
            Column("customer_id", "text", required=True, not_null=True),
            Column("ordered_at", "timestamptz", required=True, not_null=True),
            Column("status", "text", required=True, not_null=True, enum=ORDER_STATUSES),
            Column("total_amount", "numeric", required=True, not_null=True, non_negative=True),
            _c("currency"),
            _c("payment_method"),
            _c("cancel_reason"),
        ),
        key=("order_id",),
        foreign_keys=(ForeignKey("customer_id", "customers", "customer_id", "unknown customer"),),
        currency_column="currency",
        optional=False,
        description="one row per online order",
    ),
    _line_items("order_items", "orders", "order_id", "order does not exist",
                "one row per order line"),
    Table(
        "offline_receipts",
        (
            _key("receipt_id"),
            _c("store_id"),
            Column("purchased_at", "timestamptz", required=True, not_null=True),
            _c("loyalty_card_id", pii=True),
            _c("phone", pii=True),
            Column("total_amount", "numeric", required=True, not_null=True, non_negative=True),
            _c("currency"),
        ),
        key=("receipt_id",),
        currency_column="currency",
        description="one row per till receipt",
    ),
    _line_items("offline_receipt_items", "offline_receipts", "receipt_id",
                "receipt does not exist", "one row per receipt line"),
    Table(
        "events",
        (
            _key("event_id"),
            Column("occurred_at", "timestamptz", required=True, not_null=True),
            Column("event_type", "text", required=True, not_null=True, enum=EVENT_TYPES),
            _c("customer_id"),
            _c("session_id"),
            _c("product_id"),
            _c("category_path"),
            _c("price", "numeric", non_negative=True),
            _c("search_query"),
        ),
        key=("event_id",),
        description="one row per clickstream event",
        # a JSON object; which event types may carry which properties is the shop's
        # declaration (retention.ingest.events, include/events.yaml)
        extensions=(_c("properties", "jsonb"),),
    ),
)

#: load order: a table comes after the tables its foreign keys point to
TABLE_BY_NAME = {t.name: t for t in TABLES}
LOAD_ORDER = [t.name for t in TABLES]
REQUIRED_TABLES = [t.name for t in TABLES if not t.optional]

#: SQL type of each contract type; the raw tables are created by the migrations
#: (retention.db.schema), and tests/test_migrations.py checks the two agree
SQL_TYPES = {
    "text": "text",
    "timestamptz": "timestamptz",
    "numeric": "numeric(18,2)",
    "integer": "integer",
    "boolean": "boolean",
    "date": "date",
    "jsonb": "jsonb",
}

