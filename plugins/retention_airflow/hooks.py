"""One Airflow hook per channel provider: the secret comes from an Airflow connection
(any secrets backend), `get_conn()` returns our channel client built on the vendor SDK.

Connection ids and fields are those of `retention.connections` (`retention_sendgrid`,
`retention_fcm`, `retention_telegram`, `retention_sms`, `retention_viber`).
"""

from __future__ import annotations

from collections.abc import Iterable

from airflow.sdk.bases.hook import BaseHook

from retention.channels.base import Channel
from retention.connections import CONNECTION_FOR, build_channel


class ChannelHook(BaseHook):
    """Builds the channel client for `channel` from its connection."""

    conn_name_attr = "retention_conn_id"
    hook_name = "Retention channel"

    def __init__(self, channel: str, conn_id: str | None = None) -> None:
        super().__init__()
        self.channel = channel
        self.conn_id = conn_id or CONNECTION_FOR[channel]

    def get_conn(self) -> Channel:
        conn = self.get_connection(self.conn_id)
        return build_channel(self.channel, {
            "conn_type": conn.conn_type, "host": conn.host, "port": conn.port,
            "schema": conn.schema, "login": conn.login, "password": conn.password,
            "extra": conn.extra_dejson,
        })


class SendGridHook(ChannelHook):
    def __init__(self, conn_id: str = "retention_sendgrid") -> None:
        super().__init__("email", conn_id)


class FirebaseHook(ChannelHook):
    def __init__(self, kind: str = "mobile_push", conn_id: str = "retention_fcm") -> None:
        super().__init__(kind, conn_id)


class TelegramHook(ChannelHook):
    def __init__(self, conn_id: str = "retention_telegram") -> None:
        super().__init__("telegram", conn_id)


class HttpGatewayHook(ChannelHook):
    def __init__(self, channel: str = "sms", conn_id: str | None = None) -> None:
        super().__init__(channel, conn_id)


def channels_for(names: Iterable[str]) -> dict[str, Channel]:
    """Channel clients for the given channel names, from their Airflow connections."""
    return {name: ChannelHook(name).get_conn() for name in names}


def trigger_channels():
    """The trigger and re-engagement runs' channels: each client built from its Airflow
    connection when a message for it is due; None (plan, do not send) when
    RETENTION_TRIGGERS_SEND is false."""
    from retention.config import settings
    from retention.triggers.runner import LazyChannels

    if not settings().triggers_send:
        return None
    return LazyChannels(lambda name: ChannelHook(name).get_conn())
