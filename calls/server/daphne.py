"""Every patch of daphne, autobahn (its WebSocket engine) and Twisted, in one place.

The application speaks ASGI; these hooks add what ASGI cannot say. Each is
written for the versions in `TESTED_VERSIONS` (pinned in requirements.lock),
and `install()` refuses to start with any other, naming them: a release that
renamed an attribute would otherwise break a patch silently.

1. A cap on what daphne buffers for a client that stops reading. daphne hands
   every outbound frame to Twisted, which buffers without limit when the
   client's socket is full. Before a frame is written, if more than
   SIGNALING_SEND_BUFFER_BYTES are already waiting for that client, the
   connection is dropped (the application then gets its usual disconnect).
   Reads Twisted's `transport.dataBuffer`, `offset` and `_tempDataLen`.
2. Close codes autobahn refuses from an application (1008 policy violation,
   1012 service restart) are sent as close frames (`sendCloseFrame`).
3. A connection is failed with a close frame (1009 for a frame over the size
   limit, 1007 for text that is not UTF-8) instead of autobahn's default of
   dropping TCP (`failByDrop`), so clients learn why.
4. A send to a socket that is closing is dropped instead of raising
   autobahn's `Disconnected` into the sending task (which may be a broadcast to
   every socket); the application's disconnect is already on its way.
5. The application's handle on its socket (`SOCKET_EXTENSION` in the ASGI
   scope): a liveness probe (a WebSocket ping it can await, `sendPing`/`onPong`)
   and a way to cut a dead socket (`abortConnection`). Added by wrapping
   `Server.create_application`.
6. Text frames are encoded and framed once for all recipients: a presence
   frame sent to thousands of sockets is one str object, made into one
   autobahn `PreparedMessage` (`last_prepared`, shared by every connection on
   purpose) whose bytes every transport holds by reference. Framing per socket
   gave each its own copy until written: after a sign-in storm, 12 KB or more
   per connection (docs/benchmarks.md, Presence).
7. autobahn pretty-prints some forty settings for a debug log line on every
   new connection whether or not debug logging is on (`pformat` in its module
   and `Timings.__str__`): deferred until a line is written, 2-3% of the CPU of
   a sign-in storm (docs/benchmarks.md).
8. Graceful shutdown: on SIGTERM daphne cancels every application and drops
   every connection at once. `Server.kill_all_applications` first stops
   listening (ports remembered by wrapping `Server.listen_success`) and drains
   the runtime (calls/process/drain.py): every socket closed with 1012,
   resumable sessions parked for another process.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pprint import pformat
from typing import Any

from django.conf import settings

from calls.realtime.consumer import SOCKET_EXTENSION
from calls.realtime.versions import require_tested

logger = logging.getLogger(__name__)

# The versions these patches were written and tested for (requirements.lock pins them).
TESTED_VERSIONS = {"daphne": "4.2.3", "autobahn": "26.11.1", "twisted": "26.10.0"}


def check_versions(installed: dict[str, str | None] | None = None) -> None:
    """Refuse to start with versions of daphne, autobahn or Twisted the patches were not tested with."""
    require_tested(
        TESTED_VERSIONS, installed, "calls/server/daphne.py patches", "check each patch against the new version"
    )


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
    """Apply every patch (idempotent); under another ASGI server, nothing."""
    try:
        import autobahn.websocket.protocol as autobahn_protocol
        from daphne.server import Server
        from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
        from twisted.internet import defer
    except ImportError:  # another ASGI server: it must bound its own buffers and drain on its own
        return
    if getattr(WebSocketFactory.protocol, "bounded", False):
        return
    check_versions()
    _install_protocol(autobahn_protocol, Server, WebSocketFactory, WebSocketProtocol)
    _install_drain(Server, defer)


def _install_protocol(autobahn_protocol: Any, Server: Any, WebSocketFactory: Any, WebSocketProtocol: Any) -> None:  # noqa: N803
    autobahn_protocol.pformat = _LazyFormat
    # The one place that returns pformat's result as a str.
    autobahn_protocol.Timings.__str__ = lambda timings: pformat(timings._timings)

    class BoundedWebSocketProtocol(WebSocketProtocol):
        bounded = True
        # The last text frame prepared, shared by every connection: a presence list sent
        # to thousands of sessions is one str object, encoded and framed once.
        last_prepared: tuple[str, Any] = ("", None)

        def serverSend(self, content: Any, binary: bool = False) -> None:
            if binary or self.state == self.STATE_CONNECTING:
                super().serverSend(content, binary)
                return
            text, prepared = BoundedWebSocketProtocol.last_prepared
            if text is not content:
                # A server's frames are not masked: a prepared message is the same for every socket.
                prepared = self.factory.prepareMessage(content.encode("utf8"), False)
                BoundedWebSocketProtocol.last_prepared = (content, prepared)
            self.sendPreparedMessage(prepared)

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


def _install_drain(Server: Any, defer: Any) -> None:  # noqa: N803
    from calls.process.drain import drain_runtime

    kill_all_applications = Server.kill_all_applications
    listen_success = Server.listen_success

    def remember_port(server: Any, port: Any) -> None:
        server.__dict__.setdefault("ports", []).append(port)
        listen_success(server, port)

    def drain_then_kill(server: Any) -> Any:
        async def drain() -> None:
            for port in server.__dict__.get("ports", []):
                port.stopListening()
            logger.info("SIGTERM: stopped listening; draining", extra={"ports": len(server.__dict__.get("ports", []))})
            try:
                await drain_runtime()
            except Exception:
                logger.exception("drain failed; closing what is left")

        drained = defer.Deferred.fromFuture(asyncio.ensure_future(drain()))
        drained.addBoth(lambda _: kill_all_applications(server))
        return drained

    Server.listen_success = remember_port
    Server.kill_all_applications = drain_then_kill
