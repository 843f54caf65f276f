"""Ingest: the data contract, the loader, the REES46 import, landing folders and data quality."""
