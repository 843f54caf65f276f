"""Warehouse: the dbt build, predicted customer value."""
