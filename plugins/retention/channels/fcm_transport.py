"""A lean HTTP transport for firebase-admin's FCM calls: urllib3 without requests on top.

firebase-admin sends each push as one HTTP request through
`_http_client.JsonHttpClient.request`, which calls `session.request(method, url,
headers=..., json=..., timeout=...)` on a `google.auth.transport.requests.AuthorizedSession`
and then `raise_for_status()`. About two thirds of a push's client CPU (0.8-0.95 ms on
this project's 2-core machine) went to requests itself: `Session.prepare_request`
(header, cookie and setting merges, URL parsing), hooks, adapters, the cookie jar and the
Response wrapper. `LeanFcmSession` stands in for that session with the same contract and
less work per request:

* one `urllib3.HTTPConnectionPool` (or HTTPS, verifying against certifi's bundle or
  REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE) for the one FCM host, `maxsize` keep-alive
  connections, blocking when all are busy, no urllib3 retries (the channel retries);
* the OAuth2 bearer token of the app's credential, refreshed under a lock when it is not
  valid, and once more after a 401 (what AuthorizedSession does);
* the body encoded with `json.dumps` exactly as requests would (`allow_nan=False`,
  UTF-8);
* the answer returned as a real `requests.Response` (status, headers, body, url, reason),
  and errors raised as the requests exceptions firebase-admin already maps:
  `ReadTimeout`/`ConnectTimeout` (-> DeadlineExceededError), `ConnectionError`
  (-> UnavailableError), `HTTPError` from `raise_for_status` (-> the FCM error of the
  status and body).

So message building, error mapping and `send_each`'s batching stay the SDK's; only the
bytes move differently. It is used when no proxy applies to the FCM host and no .netrc
entry names it (FirebaseChannel falls back to the SDK's own session otherwise).
"""

from __future__ import annotations

import json as _json
import os
import threading
from typing import Any
from urllib.parse import urlsplit

import google.auth.transport.requests
import requests
import urllib3
from requests.structures import CaseInsensitiveDict

_REFRESH_STATUS = 401


def lean_transport_applies(url: str) -> bool:
    """True unless the environment routes `url` through a proxy or .netrc has
    credentials for its host: then requests' handling is kept."""
    return not requests.utils.get_environ_proxies(url) and \
        requests.utils.get_netrc_auth(url) is None


class LeanFcmSession:
    """What firebase-admin's JsonHttpClient needs of a session, on one urllib3 pool."""

    def __init__(self, base_url: str, credential: Any, *, maxsize: int = 500) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"FCM base URL must be http(s)://host[:port], not {base_url!r}")
        self._origin = f"{parts.scheme}://{parts.netloc}"
        kwargs: dict[str, Any] = {"maxsize": maxsize, "block": True, "retries": False}
        if parts.scheme == "https":
            import certifi

            kwargs["ca_certs"] = (os.environ.get("REQUESTS_CA_BUNDLE")
                                  or os.environ.get("CURL_CA_BUNDLE") or certifi.where())
            kwargs["cert_reqs"] = "CERT_REQUIRED"
            pool_cls = urllib3.HTTPSConnectionPool
        else:
            pool_cls = urllib3.HTTPConnectionPool
        self._pool = pool_cls(parts.hostname, parts.port, **kwargs)
        self._credential = credential
        self._lock = threading.Lock()
        self.headers: dict[str, str] = {}  # JsonHttpClient may update() it

    # ------------------------------------------------------------------ auth
    def _token(self, force: bool = False, stale: str | None = None) -> str:
        credential = self._credential
        if force or not credential.valid:
            with self._lock:
                # another thread may have refreshed it meanwhile
                if not credential.valid or (force and credential.token == stale):
                    credential.refresh(google.auth.transport.requests.Request())
        return credential.token

    # ------------------------------------------------------------------ requests API
    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                json: Any = None, data: bytes | str | None = None,
                timeout: float | tuple[float, float] | None = None, **_: Any) -> requests.Response:
        if not url.startswith(self._origin + "/"):
            raise ValueError(f"LeanFcmSession serves {self._origin}, not {url}")
        path = url[len(self._origin):]
        if json is not None:
            body: bytes | None = _json.dumps(json, allow_nan=False).encode("utf-8")
            content_type: str | None = "application/json"
        else:
            body = data.encode("utf-8") if isinstance(data, str) else data
            content_type = None
        out = {**self.headers, **(headers or {})}
        if content_type:
            out.setdefault("Content-Type", content_type)
        if isinstance(timeout, tuple):
            limit = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        else:
            limit = urllib3.Timeout(connect=timeout, read=timeout)
        token = self._token()
        for attempt in (1, 2):
            out["Authorization"] = f"Bearer {token}"
            try:
                raw = self._pool.urlopen(method.upper(), path, body=body, headers=out,
                                         timeout=limit, retries=False, redirect=False,
                                         preload_content=True, assert_same_host=False)
            except urllib3.exceptions.NewConnectionError as exc:  # a ConnectTimeoutError too
                raise requests.exceptions.ConnectionError(exc) from exc
            except urllib3.exceptions.ConnectTimeoutError as exc:
                raise requests.exceptions.ConnectTimeout(exc) from exc
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise requests.exceptions.ReadTimeout(exc) from exc
            except urllib3.exceptions.SSLError as exc:
                raise requests.exceptions.SSLError(exc) from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise requests.exceptions.ConnectionError(exc) from exc
            if raw.status == _REFRESH_STATUS and attempt == 1:
                token = self._token(force=True, stale=token)
                continue
            break
        return _response(raw, url)

    def close(self) -> None:
        self._pool.close()

    # AuthorizedSession/requests.Session methods firebase-admin may touch
    def mount(self, *_: Any) -> None:
        pass


def _response(raw: urllib3.BaseHTTPResponse, url: str) -> requests.Response:
    resp = requests.Response()
    resp.status_code = raw.status
    resp.headers = CaseInsensitiveDict(raw.headers)
    resp._content = raw.data  # noqa: SLF001 - the documented way to fill a Response
    resp.encoding = "utf-8"
    resp.reason = raw.reason or ""
    resp.url = url
    return resp
