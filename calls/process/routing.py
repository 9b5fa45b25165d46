"""WebSocket routes: clients in the field connect at `/` with no path; `/ws/` too.

Here because this is where the parts are wired: each consumer is handed its
event loop's runtime as its `Services`.
"""

from __future__ import annotations

from django.urls import re_path

from calls.process.runtime import Runtime
from calls.realtime.consumer import SignalingConsumer

websocket_urlpatterns = [
    re_path(r"^(ws/?)?$", SignalingConsumer.as_asgi(services=Runtime.current)),
]
