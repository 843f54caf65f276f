"""One file per revision; the first is the baseline."""
