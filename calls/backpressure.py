"""A cap on what daphne buffers for a client that stops reading.

daphne hands every outbound frame to Twisted, which buffers without limit when
the client's socket is full; an ASGI application cannot see that buffer. This
module gives daphne's WebSocket protocol a limit: before a frame is written,
if more than SIGNALING_SEND_BUFFER_BYTES are already waiting for that client,
the connection is dropped (the application then gets its usual disconnect).
Writes never block, so a stuck client delays nobody else.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)


def buffered_bytes(transport: Any) -> int:
    """Return how many bytes Twisted holds for this transport, not yet written."""
    pending = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    return pending + getattr(transport, "_tempDataLen", 0)


def install() -> None:
    """Make daphne's WebSocket factory build protocols that enforce the cap (idempotent)."""
    try:
        from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
    except ImportError:  # another ASGI server: it must bound its own buffers
        return
    if getattr(WebSocketFactory.protocol, "bounded", False):
        return

    class BoundedWebSocketProtocol(WebSocketProtocol):
        bounded = True

        def handle_reply(self, message: dict[str, Any]) -> None:
            if message.get("type") == "websocket.send" and self.transport is not None:
                pending = buffered_bytes(self.transport)
                if pending > settings.SIGNALING_SEND_BUFFER_BYTES:
                    logger.warning(
                        "dropping client %s: %d bytes unread (limit %d)",
                        self.client_addr,
                        pending,
                        settings.SIGNALING_SEND_BUFFER_BYTES,
                    )
                    self.transport.abortConnection()
                    return
            super().handle_reply(message)

    WebSocketFactory.protocol = BoundedWebSocketProtocol
