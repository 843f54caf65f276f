"""Campaigns, trigger chains and sequences: spec, audiences, ledger, planning, dispatch."""
