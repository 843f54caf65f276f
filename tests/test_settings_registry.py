"""Every RETENTION_* variable the product reads is a field of `retention.config.Settings`,
read through `settings()`; the README's Settings table lists every field with its
description; a bad value fails naming the variable; a changed variable is read fresh."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from retention.config import Settings, SettingError, settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = (ROOT / "plugins", ROOT / "dags")
CONFIG = ROOT / "plugins" / "retention" / "config.py"
#: variables read straight from the environment on purpose (none)
ALLOWED: set[str] = set()
VARIABLES = [Settings.variable(field) for field in Settings.model_fields]


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


def settings_fields_used(path: Path) -> list[tuple[int, str]]:
    """(line, attribute) of each `settings().<attribute>` in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.lineno, node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == "settings"]


def _product_files() -> list[Path]:
    return [path for folder in SOURCE_DIRS for path in sorted(folder.rglob("*.py"))
            if path != CONFIG]


def test_scanners_see_reads_not_writes(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('import os\nX_ENV = "RETENTION_X"\n'
                      'a = os.environ.get("RETENTION_A", "1")\nb = os.getenv("RETENTION_B")\n'
                      'c = os.environ["RETENTION_C"]\nd = os.environ.get(X_ENV)\n'
                      'os.environ["RETENTION_W"] = "1"\nos.environ.pop("RETENTION_P", None)\n'
                      'del os.environ["RETENTION_D"]\n'
                      'e = settings().home\nf = other().home\n')
    assert [name for _, name in environment_reads(sample)] == [
        "RETENTION_A", "RETENTION_B", "RETENTION_C", "RETENTION_X"]
    assert [attr for _, attr in settings_fields_used(sample)] == ["home"]


def test_product_reads_settings_through_the_object():
    offenders, unknown, used = [], [], 0
    for path in _product_files():
        where = path.relative_to(ROOT)
        offenders += [f"{where}:{line}: {name}"
                      for line, name in environment_reads(path) if name not in ALLOWED]
        fields = settings_fields_used(path)
        used += len(fields)
        unknown += [f"{where}:{line}: settings().{attr}" for line, attr in fields
                    if attr not in Settings.model_fields]
    assert not offenders, ("read RETENTION_* through retention.config.settings() (a field of "
                           "Settings), not os.environ:\n" + "\n".join(offenders))
    assert not unknown, "not a field of Settings:\n" + "\n".join(unknown)
    assert used >= 20  # the scan found the call sites (DAGs, dispatch, results, ...)


def _readme_settings() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    table = text.split("| variable | meaning | default |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `(RETENTION_[A-Z0-9_]+)` \| (.*?) \|", table, flags=re.MULTILINE)


def test_every_setting_is_in_the_readme_table():
    listed = _readme_settings()
    names = [name for name, _ in listed]
    missing = [name for name in VARIABLES if name not in names]
    assert not missing, f"not in the README's Settings table: {missing}"
    # same order as the fields of Settings, then the tests-only row
    assert names == [*VARIABLES, "RETENTION_TEST_DATABASE_URL"]
    meanings = dict(listed)
    for field, info in Settings.model_fields.items():
        assert meanings[Settings.variable(field)] == info.description, field


def test_cli_lists_every_setting_with_description_and_default(capsys):
    from retention.cli import main

    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    blocks = out.strip().split("\nRETENTION_")
    assert len(blocks) == len(Settings.model_fields)
    for block, (field, info) in zip(blocks, Settings.model_fields.items()):
        name, text, default = block.split("\n")
        assert Settings.variable(field).endswith(name)
        assert text.strip() == info.description
        assert default.strip() == f"default: {Settings.shown(info.default)}"
    assert "default: 60\n" in out and "default: true\n" in out


@pytest.mark.parametrize("variable, value, reader, named", [
    ("RETENTION_CLAIM_LEASE_SECONDS", "abc", "retention.campaigns.dispatch:lease_seconds",
     "RETENTION_CLAIM_LEASE_SECONDS='abc': Input should be a valid number"),
    ("RETENTION_DISPATCH_THREADS", "0", "retention.campaigns.dispatch:dispatch_threads",
     "RETENTION_DISPATCH_THREADS='0': Input should be greater than or equal to 1"),
    ("RETENTION_WAIT_SCALE", "-1", "retention.config:settings", "RETENTION_WAIT_SCALE='-1'"),
    ("RETENTION_TRIGGERS_SEND", "maybe", "retention.config:settings",
     "RETENTION_TRIGGERS_SEND='maybe': Input should be a valid boolean"),
    ("RETENTION_ATTRIBUTION_WINDOWS", "{email: 48", "retention.results.uplift:attribution_windows",
     "RETENTION_ATTRIBUTION_WINDOWS='{email: 48': Value error, expected a JSON object"),
    ("RETENTION_ATTRIBUTION_WINDOWS", '{"email": "two days"}',
     "retention.results.uplift:attribution_windows",
     "RETENTION_ATTRIBUTION_WINDOWS (at email)='two days'"),
    ("RETENTION_SENDGRID_WEBHOOK_TOLERANCE_SECONDS", "inf",
     "retention.results.webhook:signature_tolerance",
     "RETENTION_SENDGRID_WEBHOOK_TOLERANCE_SECONDS='inf': Input should be a finite number"),
])
def test_a_bad_value_fails_naming_the_variable(monkeypatch, variable, value, reader, named):
    import importlib

    module, function = reader.split(":")
    read = getattr(importlib.import_module(module), function)
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingError) as failure:
        read()
    assert str(failure.value).startswith(f"invalid setting: {named}")
    monkeypatch.delenv(variable)
    read()  # unset again: the default holds


def test_secrets_stay_out_of_reprs_and_errors(monkeypatch):
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "promo-secret-value")
    monkeypatch.setenv("RETENTION_DATABASE_URL", "postgresql://u:db-password@h/d")
    monkeypatch.setenv("RETENTION_CLAIM_LEASE_SECONDS", "abc")
    with pytest.raises(SettingError) as failure:
        settings()
    monkeypatch.delenv("RETENTION_CLAIM_LEASE_SECONDS")
    current = settings()
    assert current.promo_secret == "promo-secret-value"
    for text in (repr(current), str(current), str(failure.value)):
        assert "promo-secret-value" not in text and "db-password" not in text


def test_a_changed_variable_is_read_fresh(monkeypatch):
    from retention.campaigns.spec import parse_duration
    from retention.config import paths

    monkeypatch.setenv("RETENTION_WAIT_SCALE", "0.5")
    assert parse_duration("2h").total_seconds() == 3600
    monkeypatch.setenv("RETENTION_WAIT_SCALE", "0.25")
    assert parse_duration("2h").total_seconds() == 1800
    monkeypatch.setenv("RETENTION_WAIT_SCALE", "")  # empty counts as unset
    assert parse_duration("2h").total_seconds() == 7200

    monkeypatch.setenv("RETENTION_HOME", "/srv/a")
    assert paths().landing == Path("/srv/a/landing")
    monkeypatch.setenv("RETENTION_LANDING_DIR", "/srv/drops")
    assert paths().landing == Path("/srv/drops") and paths().home == Path("/srv/a")
    monkeypatch.delenv("RETENTION_LANDING_DIR")
    monkeypatch.setenv("RETENTION_HOME", "/srv/b")
    assert paths().landing == Path("/srv/b/landing")
