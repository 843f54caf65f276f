"""Secrets stay secret: a connection's secret never reaches an error message or the log,
and the demo's promo secret file is readable by its owner only.

A service account that is neither JSON nor the path of an existing file is refused with
an error naming the connection and what was expected; the value itself is not echoed,
not even in a chained exception's traceback.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import traceback
import urllib.parse

import pytest

from retention.connections import ConnectionError_, build_channel, channels_from_env
from retention_dev.servers import fake_service_account

pytestmark = pytest.mark.unit

SECRET = "sk-live-9f3a7c1e-Do-Not-Log-Me"


def _raised(call) -> ConnectionError_:
    with pytest.raises(ConnectionError_) as err:
        call()
    return err.value


def _assert_secret_absent(exc: BaseException, caplog, secret: str = SECRET) -> None:
    """Neither the message, nor the full traceback, nor what a logger records holds it."""
    text = "".join(traceback.format_exception(exc))
    assert secret not in str(exc)
    assert secret not in text
    log = logging.getLogger("retention.test_connections_secrets")
    with caplog.at_level(logging.DEBUG):
        try:
            raise exc
        except ConnectionError_:
            log.exception("building the channel failed")
    assert caplog.records
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert secret not in (record.exc_text or caplog.text)
    assert secret not in caplog.text


@pytest.mark.parametrize("conn", [
    {"password": SECRET},
    {"password": f"  {SECRET}  "},
    {"extra": {"service_account": SECRET}},
    {"extra": json.dumps({"service_account": SECRET})},
], ids=["password", "padded-password", "extra", "extra-as-json-text"])
def test_service_account_neither_json_nor_a_file_is_refused_without_echoing_it(conn, caplog):
    exc = _raised(lambda: build_channel("mobile_push", conn))
    assert "retention_fcm" in str(exc)
    assert "JSON" in str(exc) and "path" in str(exc)
    _assert_secret_absent(exc, caplog)


def test_service_account_broken_json_names_the_connection_not_the_value(caplog):
    secret = '{"type": "service_account", "private_key": "' + SECRET + '"'  # no closing brace
    exc = _raised(lambda: build_channel("mobile_push", {"password": secret}))
    assert "retention_fcm" in str(exc) and "not valid JSON" in str(exc)
    _assert_secret_absent(exc, caplog)


def test_service_account_json_of_the_wrong_shape_is_refused(caplog):
    exc = _raised(lambda: build_channel("mobile_push", {"password": json.dumps([SECRET])}))
    assert "retention_fcm" in str(exc) and "JSON object" in str(exc)
    _assert_secret_absent(exc, caplog)


def test_uri_connection_from_env_with_a_plain_password(monkeypatch, caplog):
    """The `AIRFLOW_CONN_*` URI form, as the CLI reads it: the password is the secret."""
    uri = f"http://:{urllib.parse.quote(SECRET, safe='')}@fcm.example.com"
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_FCM", uri)
    exc = _raised(lambda: channels_from_env(["mobile_push"]))
    assert "retention_fcm" in str(exc)
    _assert_secret_absent(exc, caplog)


def test_extra_that_is_not_json_names_the_connection(caplog):
    extra = f'{{"service_account": "{SECRET}"'
    exc = _raised(lambda: build_channel("telegram", {"password": "token", "extra": extra}))
    assert "retention_telegram" in str(exc) and "extra" in str(exc)
    _assert_secret_absent(exc, caplog)


def test_service_account_as_inline_json_or_an_existing_file(tmp_path):
    info, _ = fake_service_account("http://127.0.0.1:9/token", project_id="shop-push")
    for conn in ({"password": json.dumps(info)}, {"extra": {"service_account": info}},
                 {"extra": {"service_account": json.dumps(info)}}):
        channel = build_channel("mobile_push", conn)
        channel.close()
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(info))
    channel = build_channel("mobile_push", {"password": str(path)})
    channel.close()
    channel = build_channel("mobile_push", {"extra": {"service_account": f" {path}\n"}})
    channel.close()


def test_service_account_file_that_is_not_json(tmp_path, caplog):
    path = tmp_path / "service-account.json"
    path.write_text(SECRET)
    exc = _raised(lambda: build_channel("mobile_push", {"password": str(path)}))
    assert "retention_fcm" in str(exc) and "not valid JSON" in str(exc)
    _assert_secret_absent(exc, caplog)


# --------------------------------------------------------------------------- demo secret


@pytest.fixture()
def no_promo_secret(monkeypatch):
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "")  # restored after the test
    monkeypatch.delenv("RETENTION_PROMO_SECRET")
    old_umask = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old_umask)


def test_demo_promo_secret_is_created_owner_only(tmp_path, monkeypatch, no_promo_secret):
    """Created with mode 0600, not created world-readable and tightened afterwards: with
    chmod disabled the file still has no bits for group or others."""
    from retention_dev.demo import _ensure_promo_secret

    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    monkeypatch.setattr(type(tmp_path), "chmod", lambda *a, **k: None)
    _ensure_promo_secret(tmp_path)
    keep = tmp_path / "demo_promo_secret"
    assert stat.S_IMODE(keep.stat().st_mode) == 0o600
    secret = os.environ["RETENTION_PROMO_SECRET"]
    assert len(secret) >= 32 and keep.read_text().strip() == secret


def test_demo_promo_secret_is_kept_and_tightened(tmp_path, no_promo_secret):
    from retention_dev.demo import _ensure_promo_secret

    keep = tmp_path / "demo_promo_secret"
    keep.write_text("kept-secret-from-an-earlier-run\n")
    keep.chmod(0o644)
    _ensure_promo_secret(tmp_path)
    assert os.environ["RETENTION_PROMO_SECRET"] == "kept-secret-from-an-earlier-run"
    assert stat.S_IMODE(keep.stat().st_mode) == 0o600


def test_demo_promo_secret_from_the_environment_writes_no_file(tmp_path, monkeypatch):
    from retention_dev.demo import _ensure_promo_secret

    monkeypatch.setenv("RETENTION_PROMO_SECRET", "from-the-environment")
    _ensure_promo_secret(tmp_path)
    assert not (tmp_path / "demo_promo_secret").exists()
    assert os.environ["RETENTION_PROMO_SECRET"] == "from-the-environment"
