"""Channel clients: one per provider, credentials passed in, no Airflow import.

`base` holds the interface the dispatcher uses; each provider module uses the vendor's
SDK (or plain HTTP where the vendor has none) and maps every non-2xx answer to a failed
result or a retry.
"""

from retention.channels.base import Channel, ChannelStats, OutboundMessage, SendResult
from retention.channels.retry import RetryPolicy, TokenBucket

__all__ = ["Channel", "ChannelStats", "OutboundMessage", "SendResult", "RetryPolicy",
           "TokenBucket", "SendGridChannel", "FirebaseChannel", "TelegramChannel",
           "HttpGatewayChannel", "HttpGatewayConfig"]


def __getattr__(name: str):
    # the SDKs load only when a channel that needs them is asked for
    modules = {"SendGridChannel": "sendgrid", "FirebaseChannel": "firebase",
               "TelegramChannel": "telegram", "HttpGatewayChannel": "http_gateway",
               "HttpGatewayConfig": "http_gateway"}
    if name in modules:
        import importlib
        return getattr(importlib.import_module(f"retention.channels.{modules[name]}"), name)
    raise AttributeError(name)
