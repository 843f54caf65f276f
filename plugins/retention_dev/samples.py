"""Sample data for development and tests: customers simulated from BG/NBD + Gamma-Gamma,
the CDNOW transaction log the BG/NBD and Gamma-Gamma papers were fitted on, and
subscribed customers inserted straight into a database (dispatch tests and benchmarks).

The CDNOW files (`tests/data/cdnow/`, source and licence in its README) are the 1/10
sample of the 1997 Q1 cohort and the summary published with the `lifetimes` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CDNOW_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "cdnow"


@dataclass(frozen=True)
class Simulated:
    """Customers drawn from BG/NBD + Gamma-Gamma, in model time units.

    frequency, recency, T, monetary_value per customer (continuous time), and, when asked
    for, the transaction log (customer, time since the customer's first purchase, value),
    first purchases included. `dropped_at`: the planted churn date, the time of the
    purchase after which the customer dropped out (NaN for one still alive at T).
    """

    frequency: np.ndarray
    recency: np.ndarray
    T: np.ndarray
    monetary_value: np.ndarray
    transactions: pd.DataFrame | None
    dropped_at: np.ndarray | None = None


def simulate(
    n: int,
    bgnbd_params: dict[str, float],
    gamma_gamma_params: dict[str, float] | None = None,
    T: Any = 52.0,
    seed: int = 0,
    transactions: bool = False,
) -> Simulated:
    """Draw `n` customers; T is a scalar or an array of ages (one per customer)."""
    rng = np.random.default_rng(seed)
    r, alpha, a, b = (bgnbd_params[k] for k in ("r", "alpha", "a", "b"))
    ages = np.broadcast_to(np.asarray(T, dtype=float), (n,)).copy()
    rate = np.maximum(rng.gamma(r, 1.0 / alpha, n), 1e-300)
    dropout = rng.beta(a, b, n)
    x = np.zeros(n, dtype=np.int64)
    tx = np.zeros(n)
    clock = np.zeros(n)
    dropped_at = np.full(n, np.nan)
    active = np.arange(n)
    ids: list[np.ndarray] = [np.arange(n)] if transactions else []
    times: list[np.ndarray] = [np.zeros(n)] if transactions else []
    while active.size:
        nxt = clock[active] + rng.exponential(1.0 / rate[active])
        inside = nxt <= ages[active]
        active, nxt = active[inside], nxt[inside]
        x[active] += 1
        tx[active] = nxt
        clock[active] = nxt
        if transactions:
            ids.append(active)
            times.append(nxt)
        stays = rng.random(active.size) >= dropout[active]
        dropped_at[active[~stays]] = clock[active[~stays]]
        active = active[stays]

    monetary = np.zeros(n)
    log = None
    if gamma_gamma_params is not None:
        p, q, v = (gamma_gamma_params[k] for k in ("p", "q", "gamma"))
        scale = 1.0 / rng.gamma(q, 1.0 / v, n)  # per-customer 1/nu
        if transactions:
            cust = np.concatenate(ids)
            when = np.concatenate(times)
            value = rng.gamma(p, scale[cust])
            log = pd.DataFrame({"customer": cust, "time": when, "value": value})
            repeat = when > 0
            sums = np.bincount(cust[repeat], weights=value[repeat], minlength=n)
            monetary = np.where(x > 0, sums / np.maximum(x, 1), 0.0)
        else:
            # the mean of x Gamma(p, nu) draws is Gamma(p x, x nu)
            repeat = x > 0
            monetary[repeat] = rng.gamma(p * x[repeat], scale[repeat] / x[repeat])
    elif transactions:
        log = pd.DataFrame({"customer": np.concatenate(ids), "time": np.concatenate(times)})
    return Simulated(x, tx, ages, monetary, log, dropped_at)


def insert_subscribed_customers(conn: Any, n: int, *, digits: int = 6,
                                token_prefix: str = "token-",
                                subscribed_at: str = "2025-01-01Z",
                                created_at: str | None = None) -> None:
    """n customers in Kyiv (`c` and `digits` digits: c000001, ...), each with an e-mail
    address and a push token (`token_prefix` and the customer's digits) subscribed at
    `subscribed_at`; set-wise, so millions take seconds. The caller commits."""
    conn.execute("""insert into raw.customers (customer_id, timezone, created_at)
                    select 'c' || lpad(i::text, %(digits)s, '0'), 'Europe/Kyiv',
                           %(created_at)s::timestamptz
                    from generate_series(1, %(n)s) i""",
                 {"n": n, "digits": digits, "created_at": created_at})
    conn.execute("""insert into raw.channel_subscriptions (customer_id, channel, address,
                                                           subscribed_at)
                    select 'c' || lpad(i::text, %(digits)s, '0'), ch,
                           case ch when 'email' then 'c' || lpad(i::text, %(digits)s, '0')
                                                     || '@example.com'
                                   else %(token)s || lpad(i::text, %(digits)s, '0') end,
                           %(subscribed_at)s::timestamptz
                    from generate_series(1, %(n)s) i,
                         unnest(array['email', 'mobile_push']) ch""",
                 {"n": n, "digits": digits, "token": token_prefix,
                  "subscribed_at": subscribed_at})


def load_cdnow_transactions(path: str | Path | None = None) -> pd.DataFrame:
    """The CDNOW transaction log as customer_id, date, cds, dollars (+ master_id).

    `CDNOW_sample.txt` (the 1/10 sample of the 1997 Q1 cohort, 2,357 customers, the data
    of the BG/NBD paper) has five whitespace-separated columns: the customer's id in the
    master file, the sample id (1..2357, the ID of the published summaries), the date
    yyyymmdd, the number of CDs and the dollar value. `CDNOW_master.txt` has four (id,
    date, CDs, dollars) after a header line. customer_id is the sample id where there is
    one. Without `path`, the sample file shipped in tests/data/cdnow.
    """
    path = Path(path) if path is not None else CDNOW_DIR / "CDNOW_sample.txt"
    with open(path) as fh:
        first = fh.readline().split()
    header = 0 if first and not first[0].isdigit() else None
    raw = pd.read_csv(path, sep=r"\s+", header=header, dtype=str)
    if raw.shape[1] == 5:
        raw.columns = ["master_id", "customer_id", "date", "cds", "dollars"]
    elif raw.shape[1] == 4:
        raw.columns = ["customer_id", "date", "cds", "dollars"]
    else:
        raise ValueError(f"{path}: expected 4 or 5 columns, found {raw.shape[1]}")
    out = pd.DataFrame({"customer_id": raw["customer_id"].astype("int64")})
    if "master_id" in raw:
        out["master_id"] = raw["master_id"].astype("int64")
    out["date"] = pd.to_datetime(raw["date"], format="%Y%m%d")
    out["cds"] = raw["cds"].astype("int64")
    out["dollars"] = raw["dollars"].astype(float)
    return out
