"""E-mail through SendGrid's v3 Mail Send, with the `sendgrid` SDK.

One request carries up to 1,000 personalizations, one per message: its own `to`, its
own `custom_args` (`message_id` and the dispatcher's data, which SendGrid's event webhook
echoes back), its own `List-Unsubscribe` and `List-Unsubscribe-Post` headers (one-click
unsubscribe, RFC 8058) and, when subjects differ, its own `subject`.

Different bodies in one request: every message is rendered in full by the dispatcher,
so bodies differ (promo code, unsubscribe link, picks). The request carries one shared
body per content type, `<common prefix>[%rt_text%]<common suffix>` (likewise
`[%rt_html%]`), and each personalization a `substitutions` value with its own middle part.
Rendered from one template, the messages share most of their markup, so the parts that
travel per recipient are small. SendGrid limits substitutions to 10,000 bytes per
personalization: a message whose own part is larger (or whose text contains a tag) goes
in a request of its own with its full body. Grouping by identical content instead would
give one request per message, since every body carries a personal link.

SendGrid refuses a whole request that names an address twice or carries one invalid
address. Addresses are therefore spread so each appears once per request, syntax is
checked before sending (failed: `invalid address`), and when a 400 points at particular
personalizations (`personalizations.N...`), those messages fail with SendGrid's message
and the rest are sent again without them.

SendGrid answers one `X-Message-Id` per request; it is every message's
provider_message_id (the event webhook's `sg_message_id` starts with it, and carries our
`custom_args.message_id`). In sandbox mode SendGrid validates and answers 200 without an
id: the messages count as sent with provider_message_id None.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import urllib.error
from collections.abc import Sequence
from typing import Any

import python_http_client.exceptions as sg_errors
from sendgrid import SendGridAPIClient

from retention.channels.base import ChannelStats, OutboundMessage, SendResult, gave_up
from retention.channels.retry import (OutcomeUnknown, PermanentError, RetriesExhausted,
                                      RetryPolicy, TransientError, retry_after_seconds)

TEXT_TAG = "[%rt_text%]"
HTML_TAG = "[%rt_html%]"
MAX_PERSONALIZATIONS = 1000
SUBSTITUTION_LIMIT_BYTES = 10_000
EMAIL_RE = re.compile(r"^[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")
_PERSONALIZATION_FIELD = re.compile(r"personalizations\.(\d+)(\.|$)")


def _common_suffix(values: list[str]) -> str:
    return os.path.commonprefix([v[::-1] for v in values])[::-1]


def _factor(values: list[str], tag: str) -> tuple[str, list[str] | None]:
    """The shared body with `tag` where the values differ, and each value's own part
    (None when all values are equal: the body is sent as is)."""
    first = values[0]
    if all(v == first for v in values):
        return first, None
    prefix = os.path.commonprefix(values)
    suffix = _common_suffix([v[len(prefix):] for v in values])  # never overlaps the prefix
    middles = [v[len(prefix):len(v) - len(suffix)] for v in values]
    return prefix + tag + suffix, middles


class SendGridChannel:
    """`send_batch` of up to `max_batch` e-mails (any number works: it splits them)."""

    name = "email"
    max_batch = MAX_PERSONALIZATIONS

    def __init__(self, api_key: str, from_email: str, *, base_url: str = "https://api.sendgrid.com",
                 from_name: str | None = None, reply_to: str | None = None, sandbox: bool = False,
                 categories: Sequence[str] = (), retry: RetryPolicy | None = None,
                 timeout: float = 30.0, substitution_limit: int = SUBSTITUTION_LIMIT_BYTES,
                 max_personalizations: int = MAX_PERSONALIZATIONS,
                 activity_lag_seconds: float = 600.0) -> None:
        self._sdk = SendGridAPIClient(api_key=api_key, host=base_url.rstrip("/"))
        self.sender: dict[str, str] = {"email": from_email, **({"name": from_name} if from_name else {})}
        self.reply_to = reply_to
        self.sandbox = sandbox
        self.categories = list(categories)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.substitution_limit = substitution_limit
        self.max_personalizations = max_personalizations
        #: how long after a request its messages are sure to show in the activity API
        self.activity_lag_seconds = float(activity_lag_seconds)
        self.stats = ChannelStats()

    #: messages may carry `OutboundMessage.attachments`
    supports_attachments = True

    # planning ---------------------------------------------------------------
    def plan_requests(self, messages: Sequence[OutboundMessage]) -> list[list[OutboundMessage]]:
        """Split into requests: at most `max_personalizations` each, an address once per
        request, HTML and text-only mail apart, messages with other attachments apart (a
        request's attachments are the same for all its personalizations), and oversize
        personal parts on their own."""
        groups: list[list[OutboundMessage]] = []
        kinds = dict.fromkeys((m.body_html is not None, m.attachments) for m in messages)
        for kind in kinds:
            chunks: list[tuple[set[str], list[OutboundMessage]]] = []
            for m in messages:
                if (m.body_html is not None, m.attachments) != kind:
                    continue
                key = m.address.lower()
                for seen, chunk in chunks:
                    if key not in seen and len(chunk) < self.max_personalizations:
                        break
                else:
                    seen, chunk = set(), []
                    chunks.append((seen, chunk))
                seen.add(key)
                chunk.append(m)
            for _, chunk in chunks:
                groups.extend(self._fit_substitutions(chunk))
        return groups

    def _fit_substitutions(self, chunk: list[OutboundMessage]) -> list[list[OutboundMessage]]:
        alone = [m for m in chunk if any(tag in (part or "") for tag in (TEXT_TAG, HTML_TAG)
                                         for part in (m.body_text, m.body_html, m.subject))]
        rest = [m for m in chunk if m not in alone] if alone else chunk
        while len(rest) > 1:
            sizes = self._substitution_sizes(rest)
            over = {i for i, size in enumerate(sizes) if size > self.substitution_limit}
            if not over:
                break
            alone += [m for i, m in enumerate(rest) if i in over]
            rest = [m for i, m in enumerate(rest) if i not in over]
        return ([rest] if rest else []) + [[m] for m in alone]

    def _substitution_sizes(self, group: list[OutboundMessage]) -> list[int]:
        sizes = [0] * len(group)
        for tag, values in ((TEXT_TAG, [m.body_text for m in group]),
                            (HTML_TAG, [m.body_html for m in group])):
            if values[0] is None:
                continue
            _, middles = _factor(values, tag)
            if middles is not None:
                for i, middle in enumerate(middles):
                    sizes[i] += len(tag.encode()) + len(middle.encode())
        return sizes

    def build_request(self, group: Sequence[OutboundMessage]) -> dict[str, Any]:
        """The Mail Send body for one request (every message of `group` one personalization)."""
        group = list(group)
        body: dict[str, Any] = {"from": dict(self.sender)}
        subjects = {m.subject for m in group}
        same_subject = len(subjects) == 1
        if same_subject:
            body["subject"] = group[0].subject
        text, text_parts = _factor([m.body_text for m in group], TEXT_TAG)
        content = [{"type": "text/plain", "value": text}] if text else []  # SendGrid: no empty block
        html_parts = None
        if group[0].body_html is not None:
            html, html_parts = _factor([m.body_html for m in group], HTML_TAG)
            content.append({"type": "text/html", "value": html})
        personalizations = []
        for i, m in enumerate(group):
            p: dict[str, Any] = {"to": [{"email": m.address}]}
            if not same_subject:
                p["subject"] = m.subject
            subs = {}
            if text_parts is not None:
                subs[TEXT_TAG] = text_parts[i]
            if html_parts is not None:
                subs[HTML_TAG] = html_parts[i]
            if subs:
                p["substitutions"] = subs
            if m.unsubscribe_url:
                p["headers"] = {"List-Unsubscribe": f"<{m.unsubscribe_url}>",
                                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
            p["custom_args"] = {**{k: str(v) for k, v in m.data.items()}, "message_id": m.message_id}
            personalizations.append(p)
        body["personalizations"] = personalizations
        body["content"] = content
        if self.reply_to:
            body["reply_to"] = {"email": self.reply_to}
        if self.categories:
            body["categories"] = self.categories
        if group[0].attachments:
            body["attachments"] = [
                {"content": base64.b64encode(a.content).decode("ascii"), "type": a.mime_type,
                 "filename": a.filename,
                 **({"disposition": "inline", "content_id": a.content_id} if a.content_id
                    else {"disposition": "attachment"})}
                for a in group[0].attachments]
        body["mail_settings"] = {"sandbox_mode": {"enable": self.sandbox}}
        return body

    # reconciliation ---------------------------------------------------------
    def lookup_accepted(self, claim_token: str) -> dict[str, str]:
        """Addresses SendGrid accepted from requests whose custom_args.claim is
        `claim_token`, with the request's X-Message-Id: the dispatcher asks this after a
        worker died between the provider's answer and the ledger write. Uses the E-mail
        Activity API (an add-on on real accounts); raises if it cannot tell. The keys are
        lower-cased addresses. A send shows there only after a delay, so the dispatcher
        asks no sooner than `activity_lag_seconds` after the request went out."""
        query = f"unique_args['claim']=\"{claim_token}\""

        def get():
            try:
                return self._sdk.client.messages.get(
                    query_params={"query": query, "limit": self.max_personalizations * 4},
                    timeout=self.timeout)
            except sg_errors.HTTPError as exc:
                status = int(exc.status_code)
                if status == 429 or status >= 500:
                    raise TransientError(str(status), retry_after_seconds(exc.headers)) from None
                raise PermanentError(f"{status}: activity lookup refused", status) from None
            except (TimeoutError, socket.timeout, urllib.error.URLError,
                    http.client.HTTPException, ConnectionError) as exc:
                raise TransientError("connection error") from exc

        response = self.retry.call(get)
        found = json.loads(response.body or b"{}").get("messages", [])
        # SendGrid reports addresses lower-cased; the ledger keeps them as the shop gave them
        return {str(m["to_email"]).lower(): str(m["msg_id"]).split(".", 1)[0] for m in found}

    # sending ----------------------------------------------------------------
    def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        results: dict[str, SendResult] = {}
        sendable = []
        for m in messages:
            if not EMAIL_RE.match(m.address or ""):
                results[m.message_id] = SendResult.failed(m.message_id, "invalid address")
            elif not m.subject:
                results[m.message_id] = SendResult.failed(m.message_id, "no subject")
            else:
                sendable.append(m)
        for group in self.plan_requests(sendable):
            results.update(self._send_group(group))
        return [results[m.message_id] for m in messages]

    def _send_group(self, group: list[OutboundMessage]) -> dict[str, SendResult]:
        out: dict[str, SendResult] = {}
        pending = group
        while pending:
            body = self.build_request(pending)
            try:
                response = self.retry.call(lambda: self._post(body),
                                           on_retry=lambda _: self.stats.count(retries=1))
            except (RetriesExhausted, OutcomeUnknown) as exc:
                out.update({m.message_id: gave_up(m.message_id, exc) for m in pending})
                break
            except PermanentError as exc:
                bad = self._refused_personalizations(exc, len(pending))
                if not bad or len(bad) == len(pending):
                    out.update({m.message_id: SendResult.failed(m.message_id, exc.reason)
                                for m in pending})
                    break
                for i, reason in bad.items():
                    out[pending[i].message_id] = SendResult.failed(pending[i].message_id, reason)
                pending = [m for i, m in enumerate(pending) if i not in bad]
                continue
            provider_id = response.headers.get("X-Message-Id") if response.headers else None
            out.update({m.message_id: SendResult.sent(m.message_id, provider_id) for m in pending})
            break
        return out

    @staticmethod
    def _refused_personalizations(exc: PermanentError, count: int) -> dict[int, str]:
        """{index: reason} when every error of a 400 names a personalization."""
        if exc.status != 400 or not exc.details:
            return {}
        bad: dict[int, str] = {}
        for error in exc.details:
            m = _PERSONALIZATION_FIELD.match(str(error.get("field") or ""))
            if not m or int(m.group(1)) >= count:
                return {}
            i = int(m.group(1))
            bad.setdefault(i, f"400: {error.get('message')} ({error.get('field')})")
        return bad

    def _post(self, body: dict[str, Any]):
        self.stats.count(requests=1)
        try:
            return self._sdk.client.mail.send.post(request_body=body, timeout=self.timeout)
        except sg_errors.HTTPError as exc:
            status = int(exc.status_code)
            if status == 429 or status >= 500:
                raise TransientError(str(status), retry_after_seconds(exc.headers)) from None
            errors = _errors(exc.body)
            text = "; ".join(f"{e.get('message')}" + (f" ({e['field']})" if e.get("field") else "")
                             for e in errors) or str(exc.reason)
            raise PermanentError(f"{status}: {text}"[:1000], status, errors) from None
        except urllib.error.URLError as exc:
            # urllib wraps what fails while connecting and writing the request: the
            # provider has no whole request, so sending again is safe
            timed_out = isinstance(exc.reason, (TimeoutError, socket.timeout))
            raise TransientError("connect timeout" if timed_out else "connection error") from exc
        except (TimeoutError, socket.timeout) as exc:
            # the request went out and no answer came in time: SendGrid may have taken it
            raise OutcomeUnknown("timeout") from exc
        except (http.client.HTTPException, ConnectionError) as exc:
            raise OutcomeUnknown("connection lost before the answer") from exc


def _errors(body: bytes | str | None) -> list[dict]:
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        return []
    errors = parsed.get("errors") if isinstance(parsed, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
