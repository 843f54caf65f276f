"""Retention-marketing pipeline: the logic behind the DAGs, importable without Airflow."""

__version__ = "0.1.0"
