"""WebSocket routes: clients in the field connect at `/` with no path; `/ws/` too."""

from __future__ import annotations

from django.urls import re_path

from calls.consumers import SignalingConsumer

websocket_urlpatterns = [
    re_path(r"^(ws/?)?$", SignalingConsumer.as_asgi()),
]
