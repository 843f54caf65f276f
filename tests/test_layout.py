"""The product and the development package stay apart (no database: `-m unit`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = [ROOT / "plugins" / "retention", ROOT / "plugins" / "retention_airflow", ROOT / "dags"]

pytestmark = pytest.mark.unit


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_product_never_imports_the_development_package():
    offenders = sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for folder in PRODUCT for path in folder.rglob("*.py")
        for name in _imported_modules(path)
        if name == "retention_dev" or name.startswith("retention_dev."))
    assert offenders == []


def test_the_check_sees_an_import_of_the_development_package(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from retention_dev.stack import local_provider_stack\n")
    assert "retention_dev.stack" in _imported_modules(probe)


def test_airflow_never_loads_the_development_package():
    ignored = (ROOT / "plugins" / ".airflowignore").read_text().split()
    assert "retention_dev/" in ignored
