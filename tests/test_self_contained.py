"""The repository stands alone: a clone with nothing beside it runs and passes its tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_refers_to_files_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    pattern = re.compile(r"\.\./shared|parent\s*/\s*[\"']shared[\"']")
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yml", ".yaml", ".sh", ".toml", ".cfg", ".txt",
                               ".sql", ""} or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1)
                      if pattern.search(line) and name != "tests/test_self_contained.py"]
    assert offenders == []


def test_the_sample_data_and_the_contract_ship_with_the_repository(sample_data):
    sample = sample_data / "rees46_sample_2019-10-01.csv"
    lines = sample.read_text().splitlines()
    assert lines[0].split(",") == ["event_time", "event_type", "product_id", "category_id",
                                   "category_code", "brand", "price", "user_id", "user_session"]
    assert len(lines) == 5000  # the header and the first 4,999 events
    contract = (ROOT / "docs" / "CONTRACT.md").read_text()
    assert "## 5. Output: what was sent and what it earned" in contract
