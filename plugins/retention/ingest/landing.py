"""The landing folder the ingest DAG loads from.

Layout under RETENTION_LANDING_DIR: `incoming/<drop>/` holds one drop (contract CSV or
CSV.gz files) and becomes ready when the exporter writes the empty marker `_SUCCESS` last;
after a successful load the drop moves to `loaded/<drop>/`. A re-run after a crash between
load and move loads the drop again, which changes nothing (loads upsert).
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from retention.config import paths
from retention.ingest.load import load_folder

READY_MARKER = "_SUCCESS"


def landing_dir() -> Path:
    return paths().landing


def ready_drops(root: Path | None = None) -> list[Path]:
    incoming = (root or landing_dir()) / "incoming"
    if not incoming.is_dir():
        return []
    return sorted(p for p in incoming.iterdir() if p.is_dir() and (p / READY_MARKER).exists())


def load_drop(drop: str | Path, *, loaded_at: datetime, url: str | None = None) -> dict:
    drop = Path(drop)
    report = load_folder(drop, url, loaded_at=loaded_at)
    loaded = drop.parent.parent / "loaded" / drop.name
    loaded.parent.mkdir(parents=True, exist_ok=True)
    if loaded.exists():
        shutil.rmtree(loaded)
    shutil.move(str(drop), str(loaded))
    summary = report.as_dict()
    summary["moved_to"] = str(loaded)
    return summary
