"""The input formats the loader accepts, by name: the contract's CSV files and REES46's
event export. `retention load --format` and the ingest DAG go through `load_path`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from retention.ingest.load import LoadError, LoadReport, load_folder
from retention.ingest.rees46 import load_rees46


def _rees46(path: Path, url: str | None, *, loaded_at: datetime,
            currency: str | None, recheck: bool = False) -> LoadReport:
    return load_rees46(path, url, loaded_at=loaded_at)


#: format name -> loader(path, url, loaded_at=..., currency=..., recheck=...)
LOADERS: dict[str, Callable[..., LoadReport]] = {"contract": load_folder, "rees46": _rees46}


def load_path(path: str | Path, url: str | None = None, *, fmt: str = "contract",
              loaded_at: datetime | None = None, currency: str | None = None,
              recheck: bool = False) -> LoadReport:
    """Load `path` in format `fmt`; `loaded_at` defaults to now (the CLI's load time).
    `recheck`: read and check files unchanged since their last load too (contract format;
    see retention.ingest.load)."""
    loader = LOADERS.get(fmt)
    if loader is None:
        raise LoadError(f"unknown format {fmt!r} (expected one of {', '.join(LOADERS)})")
    return loader(Path(path).resolve(), url, loaded_at=loaded_at or datetime.now(timezone.utc),
                  currency=currency, recheck=recheck)
