"""dbt's parse is reused from one build to the next: as of another moment (the as_of
reaches the models through the environment, not a var) and after a build of another
database from the same checkout (the parse state is kept per database). A full parse of
the project costs seconds on every build otherwise."""

from __future__ import annotations

from datetime import datetime, timezone

from report_shop import copy_dbt_project
from retention.warehouse.build import run_dbt


def _parse(url: str, as_of: datetime) -> list[str]:
    """`dbt parse` for the warehouse `url` as of `as_of`; the names of dbt's events that
    say it could not reuse its earlier parse."""
    events: list[str] = []

    def on_event(event) -> None:
        if event.info.name == "UnableToPartialParse":
            events.append(event.data.reason)

    result = run_dbt(["parse"], url, as_of=as_of, callbacks=[on_event])
    assert result.success, result.exception
    return events


def test_a_build_as_of_another_moment_or_after_another_database_reuses_the_parse(
        tmp_path, monkeypatch):
    project = copy_dbt_project(tmp_path / "dbt_project")
    monkeypatch.setenv("RETENTION_DBT_PROJECT_DIR", str(project))
    # parsing connects to no database: these need not exist
    shop, other = (f"postgresql://postgres@127.0.0.1:5432/parse_{n}" for n in ("shop", "other"))
    first, second = (datetime(2026, 10, d, tzinfo=timezone.utc) for d in (30, 31))

    assert _parse(shop, first)  # nothing to reuse yet
    assert _parse(shop, second) == []  # the next day
    assert _parse(other, second)  # another database: its first parse
    assert _parse(shop, first) == []  # back to the first database: its own parse state
    assert len(list((project / "target" / "partial_parse").glob("*.msgpack"))) == 2
