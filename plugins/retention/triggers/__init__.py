"""Trigger chains, lifecycle flows and the re-engagement sequence (no Airflow import).

`run_triggers(interval_start, interval_end)` is one 15-minute run; `run_reengagement(as_of)`
one daily run. See runner.py for the order of a run, detect.py for each trigger's rule,
chains.py for chain semantics and state.py for the tables.
"""

from retention.triggers.runner import format_report, run_reengagement, run_triggers

__all__ = ["format_report", "run_reengagement", "run_triggers"]
