"""Message templates: Jinja2 in a sandbox, HTML autoescaped, per channel.

Layout under include/templates/<channel>/:

| channel | files |
|---|---|
| email | `<t>.subject.j2`, `<t>.html.j2` (autoescaped), `<t>.txt.j2` |
| mobile_push, web_push | `<t>.title.j2`, `<t>.body.j2` |
| telegram | `<t>.html.j2` (autoescaped; Telegram's HTML subset) |
| sms, viber | `<t>.txt.j2` |

Variables: `greeting`, `customer_id`, `preferred_category` and its `preferred_category_label`,
`products` (recommended: name, price, url), `promo` (code, discount_percent, expires_on),
`unsubscribe_url`, `campaign`, `variant`. Promo codes and unsubscribe links are HMACs of
the message, keyed by RETENTION_PROMO_SECRET, so a re-run renders the same code.
"""

from __future__ import annotations

import base64
import hmac
import time
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlencode

from jinja2 import FileSystemLoader, StrictUndefined, Template, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

from retention.config import PROJECT_ROOT, settings

TEMPLATES_DIR = PROJECT_ROOT / "include" / "templates"


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    body_text: str
    body_html: str | None


@lru_cache(maxsize=4)
def environment(root: str = str(TEMPLATES_DIR)) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        loader=FileSystemLoader(root),
        autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False,
                                     default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )


def promo_secret() -> bytes:
    secret = settings().promo_secret
    if not secret:
        raise TemplateError("RETENTION_PROMO_SECRET is not set: it keys promo codes and "
                            "unsubscribe links (set it in the environment)")
    return secret.encode()


@dataclass(frozen=True)
class LinkKeys:
    """The settings a message's promo code and unsubscribe link need, read once for a
    batch of messages (`link_keys()`) instead of once per message."""
    secret: bytes
    unsubscribe_base: str


def link_keys() -> LinkKeys:
    """RETENTION_PROMO_SECRET and RETENTION_UNSUBSCRIBE_URL as the environment holds them."""
    return LinkKeys(promo_secret(), settings().unsubscribe_url)


def _mac(*parts: str, secret: bytes | None = None) -> bytes:
    return hmac.digest(secret or promo_secret(), "|".join(parts).encode(), "sha256")


def promo_code(campaign_id: str, run_id: str, customer_id: str, prefix: str = "", *,
               secret: bytes | None = None) -> str:
    # the first 8 base32 characters are the first 5 bytes' (40 bits): no need to encode all 32
    code = base64.b32encode(_mac("promo", campaign_id, run_id, customer_id,
                                 secret=secret)[:5]).decode()
    return f"{prefix}{code}"


def unsubscribe_url(message_id: str, base: str | None = None, *,
                    secret: bytes | None = None) -> str:
    base = base or settings().unsubscribe_url
    token = base64.urlsafe_b64encode(_mac("unsubscribe", message_id, secret=secret)).decode()[:22]
    return f"{base}?{urlencode({'m': message_id, 't': token})}"


def verify_unsubscribe_token(message_id: str, token: str) -> bool:
    expected = base64.urlsafe_b64encode(_mac("unsubscribe", message_id)).decode()[:22]
    return hmac.compare_digest(expected, token)


def category_label(category_path: str | None) -> str | None:
    if not category_path:
        return None
    return category_path.split(".")[-1].replace("_", " ")


FILES = {
    "email": ("subject", "html", "txt"),
    "mobile_push": ("title", "body"),
    "web_push": ("title", "body"),
    "telegram": ("html",),
    "sms": ("txt",),
    "viber": ("txt",),
}


def template_files(channel: str, template: str) -> list[Path]:
    return [TEMPLATES_DIR / channel / f"{template}.{part}.j2" for part in FILES[channel]]


#: templates looked up in the last second: the loader checks a template file's mtime on
#: every `get_template` (a stat per message part); a wave renders thousands a second
_RECHECK_SECONDS = 1.0
_recent: dict[tuple[int, str], tuple[Template, float]] = {}


def _template(env: SandboxedEnvironment, name: str) -> Template:
    now = time.monotonic()
    key = (id(env), name)
    hit = _recent.get(key)
    if hit is not None and now - hit[1] < _RECHECK_SECONDS:
        return hit[0]
    found = env.get_template(name)
    _recent[key] = (found, now)
    return found


def render(channel: str, template: str, context: dict) -> Rendered:
    env = environment()

    def part(name: str) -> str:
        try:
            return _template(env, f"{channel}/{template}.{name}.j2").render(**context).strip()
        except Exception as exc:  # jinja2 raises several types; name the file
            raise TemplateError(f"{TEMPLATES_DIR / channel / f'{template}.{name}.j2'}: {exc}") from exc

    if channel == "email":
        return Rendered(part("subject"), part("txt"), part("html"))
    if channel in ("mobile_push", "web_push"):
        return Rendered(part("title"), part("body"), None)
    if channel == "telegram":
        html = part("html")
        return Rendered(None, html, html)
    return Rendered(None, part("txt"), None)


def context_for(*, campaign_id: str, campaign_name: str, run_id: str, message_id: str,
                customer_id: str, variant: str, preferred_category: str | None,
                products: list[dict], discount_percent: float, expires_on: date,
                code_prefix: str = "", keys: LinkKeys | None = None) -> dict:
    """A message's template context; `keys` (from `link_keys()`, once per batch) saves
    reading the settings for each message."""
    secret = keys.secret if keys is not None else None
    return {
        "greeting": "Hello!",
        "customer_id": customer_id,
        "preferred_category": preferred_category,
        "preferred_category_label": category_label(preferred_category),
        "products": products,
        "promo": {"code": promo_code(campaign_id, run_id, customer_id, code_prefix,
                                     secret=secret),
                  "discount_percent": int(discount_percent) if float(discount_percent).is_integer()
                  else discount_percent,
                  "expires_on": expires_on.isoformat()},
        "unsubscribe_url": unsubscribe_url(
            message_id, keys.unsubscribe_base if keys is not None else None, secret=secret),
        "campaign": campaign_name,
        "variant": variant,
    }
