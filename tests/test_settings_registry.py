"""Every RETENTION_* variable the product reads goes through `retention.config.setting`
and is listed in the README's Settings table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from retention.config import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = (ROOT / "plugins", ROOT / "dags")
CONFIG = ROOT / "plugins" / "retention" / "config.py"
#: variables read straight from the environment on purpose (none)
ALLOWED: set[str] = set()


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ"
            and isinstance(node.value, ast.Name) and node.value.id == "os")


def _name(node: ast.AST, constants: dict[str, str]) -> str | None:
    """The variable name `node` spells: a string literal or a module-level constant."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def environment_reads(path: Path) -> list[tuple[int, str]]:
    """(line, name) of each RETENTION_* read from the environment in `path`:
    os.environ.get(...), os.getenv(...), os.environ[...] (not assignments or deletions)
    and `... in os.environ`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "get" and _is_environ(func.value)) \
                    or (isinstance(func, ast.Attribute) and func.attr == "getenv"
                        and isinstance(func.value, ast.Name) and func.value.id == "os"):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                and _is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 \
                and isinstance(node.ops[0], (ast.In, ast.NotIn)) and _is_environ(node.comparators[0]):
            key = node.left
        name = _name(key, constants) if key is not None else None
        if name and name.startswith("RETENTION_"):
            found.append((node.lineno, name))
    return found


def test_scanner_sees_reads_not_writes(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('import os\nX_ENV = "RETENTION_X"\n'
                      'a = os.environ.get("RETENTION_A", "1")\nb = os.getenv("RETENTION_B")\n'
                      'c = os.environ["RETENTION_C"]\nd = os.environ.get(X_ENV)\n'
                      'os.environ["RETENTION_W"] = "1"\nos.environ.pop("RETENTION_P", None)\n'
                      'del os.environ["RETENTION_D"]\n')
    assert [name for _, name in environment_reads(sample)] == [
        "RETENTION_A", "RETENTION_B", "RETENTION_C", "RETENTION_X"]


def test_product_reads_settings_through_the_registry():
    offenders = []
    for folder in SOURCE_DIRS:
        for path in sorted(folder.rglob("*.py")):
            if path == CONFIG:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{line}: {name}"
                          for line, name in environment_reads(path) if name not in ALLOWED]
    assert not offenders, ("read RETENTION_* through retention.config.setting (and register "
                           "it in SETTINGS), not os.environ:\n" + "\n".join(offenders))


def _readme_settings() -> list[str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("| variable | meaning | default |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `(RETENTION_[A-Z0-9_]+)` \|", table, flags=re.MULTILINE)


def test_every_setting_is_in_the_readme_table():
    listed = _readme_settings()
    missing = [name for name in SETTINGS if name not in listed]
    assert not missing, f"not in the README's Settings table: {missing}"
    # same order as SETTINGS, then the tests-only row
    assert listed == [*SETTINGS, "RETENTION_TEST_DATABASE_URL"]
