"""Airflow glue for the retention pipeline: Assets and hooks. The logic lives in `retention`."""
