"""A cap on what daphne buffers for a client that stops reading.

daphne hands every outbound frame to Twisted, which buffers without limit when
the client's socket is full; an ASGI application cannot see that buffer. This
module gives daphne's WebSocket protocol a limit: before a frame is written,
if more than SIGNALING_SEND_BUFFER_BYTES are already waiting for that client,
the connection is dropped (the application then gets its usual disconnect).
Writes never block, so a stuck client delays nobody else.

It also lets the application close with the registered codes autobahn refuses
(1008 policy violation, 1012 service restart); fails a connection with a close
frame (1009 for a frame over the size limit, 1007 for text that is not UTF-8)
instead of autobahn's default of dropping TCP, so clients learn why; drops a
send to a socket that closed a moment ago instead of raising into the
application (whose disconnect is already on its way); gives the application a
liveness probe (a WebSocket ping it can await, `SOCKET_EXTENSION` in the scope)
and a way to cut a dead socket; and stops autobahn (daphne's WebSocket engine) from pretty-printing some
forty settings for a debug log line on every new connection whether or not
debug logging is on: 2-3% of the CPU of a sign-in storm (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pprint import pformat
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

# The ASGI scope extension through which a consumer reaches its socket under daphne:
# {"probe": (timeout) -> Future[bool], "abort": () -> None}. Absent elsewhere.
SOCKET_EXTENSION = "signaling.socket"


def buffered_bytes(transport: Any) -> int:
    """Return how many bytes Twisted holds for this transport, not yet written."""
    pending = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    return pending + getattr(transport, "_tempDataLen", 0)


class _LazyFormat:
    """pformat deferred until a log line is actually written."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return pformat(self.value)

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


def install() -> None:
    """Make daphne's WebSocket factory build protocols that enforce the cap (idempotent)."""
    try:
        import autobahn.websocket.protocol as autobahn_protocol
    except ImportError:
        pass
    else:
        autobahn_protocol.pformat = _LazyFormat
        # The one place that returns pformat's result as a str.
        autobahn_protocol.Timings.__str__ = lambda timings: pformat(timings._timings)
    try:
        from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
    except ImportError:  # another ASGI server: it must bound its own buffers
        return
    if getattr(WebSocketFactory.protocol, "bounded", False):
        return
    from daphne.server import Server

    class BoundedWebSocketProtocol(WebSocketProtocol):
        bounded = True
        # The last text frame encoded, shared by every connection: a presence list sent
        # to thousands of sessions is one str object, encoded to UTF-8 once.
        last_encoded: tuple[str, bytes] = ("", b"")

        def serverSend(self, content: Any, binary: bool = False) -> None:
            if binary or self.state == self.STATE_CONNECTING:
                super().serverSend(content, binary)
                return
            text, encoded = BoundedWebSocketProtocol.last_encoded
            if text is not content:
                encoded = content.encode("utf8")
                BoundedWebSocketProtocol.last_encoded = (content, encoded)
            self.sendMessage(encoded, False)

        def serverClose(self, code: int | None = None) -> None:
            # autobahn's sendClose only takes 1000 and 3000-4999, and daphne then drops
            # the connection without a close frame; 1008 (policy) and 1012 (service
            # restart: reconnect elsewhere) are registered codes clients act on.
            if code is not None and 1001 <= code <= 1014 and code not in (1004, 1005, 1006):
                self.sendCloseFrame(code=code, isReply=False)
                return
            super().serverClose(code)

        def _connectionMade(self) -> None:
            super()._connectionMade()
            # autobahn copies its options from the factory here. Failing by drop
            # ends an oversized frame as 1006 (abnormal) with no close frame; a
            # close frame tells the client it was 1009 (message too big).
            self.failByDrop = False

        def probe(self, timeout: float) -> asyncio.Future:
            """Ping the client; the future becomes True on its pong, False after `timeout`."""
            loop = asyncio.get_running_loop()
            answered = loop.create_future()
            if self.state != self.STATE_OPEN:
                answered.set_result(False)
                return answered
            payload = secrets.token_bytes(8)
            pings = self.__dict__.setdefault("pings", {})
            pings[payload] = answered

            def expire() -> None:
                pings.pop(payload, None)
                if not answered.done():
                    answered.set_result(False)

            loop.call_later(timeout, expire)
            self.sendPing(payload)
            return answered

        def onPong(self, payload: bytes) -> None:
            answered = self.__dict__.get("pings", {}).pop(payload, None)
            if answered is not None and not answered.done():
                answered.set_result(True)

        def abort(self) -> None:
            """Cut the connection now, without a close handshake (a client that stopped answering)."""
            if self.transport is not None:
                self.transport.abortConnection()

        def handle_reply(self, message: dict[str, Any]) -> None:
            if message.get("type") == "websocket.send" and self.state in (self.STATE_CLOSING, self.STATE_CLOSED):
                # Closed (or closing) a moment ago: autobahn would raise into the sending
                # task, which may be a broadcast to every socket. The application gets
                # its websocket.disconnect anyway.
                return
            if message.get("type") == "websocket.send" and self.transport is not None:
                pending = buffered_bytes(self.transport)
                if pending > settings.SIGNALING_SEND_BUFFER_BYTES:
                    logger.warning(
                        "dropping client: send buffer full",
                        extra={
                            "client": ":".join(map(str, self.client_addr or ())),
                            "unread_bytes": pending,
                            "limit_bytes": settings.SIGNALING_SEND_BUFFER_BYTES,
                        },
                    )
                    self.transport.abortConnection()
                    return
            super().handle_reply(message)

    WebSocketFactory.protocol = BoundedWebSocketProtocol
    create_application = Server.create_application

    def create_application_with_socket(server: Any, protocol: Any, scope: dict) -> Any:
        if isinstance(protocol, BoundedWebSocketProtocol):
            extensions = {
                **scope.get("extensions", {}),
                SOCKET_EXTENSION: {"probe": protocol.probe, "abort": protocol.abort},
            }
            scope = {**scope, "extensions": extensions}
        return create_application(server, protocol, scope)

    Server.create_application = create_application_with_socket
