"""asyncio helpers for the FCM client's event loop thread (channels/fcm_transport.py)."""

from __future__ import annotations

import asyncio


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with Airflow's uvicorn
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
