"""The WebSocket consumer: one socket, one session; parse a frame, hand it to a collaborator, send the result.

Its collaborators each own one part of a session: `CallTable` its calls,
`Resumption` its life beyond the socket. What it needs from the process comes
as `Services` (calls/realtime/sessions.py), handed in by calls/process/routing.py.
Layer event types are always set by the server, never taken from a client.

It is a channels consumer (`AsyncWebsocketConsumer`) with its own loop in
`__call__`: channels' loop (`await_many_dispatch`) waits on the socket and the
layer with `asyncio.wait` and starts a task per message; two long-lived reader
tasks feeding one inbox do the same job for far less (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from calls.callflow.board import Actor
from calls.callflow.live import LiveCall
from calls.observability import metrics
from calls.presence.base import SessionInfo
from calls.presence.hub import FULL
from calls.realtime import push_subscriptions
from calls.realtime.call_table import CallTable
from calls.realtime.following import change_watch, presence_mode
from calls.realtime.groups import user_group
from calls.realtime.ice import ice_servers_for
from calls.realtime.identity import join_presence
from calls.realtime.resume import CLEAN_CLOSE_CODES, Resumption
from calls.realtime.security import TokenInvalid, new_bucket, scope_client_address, token_identity
from calls.realtime.sessions import PROBE_TIMEOUT, Services
from calls.wire import events, protocol, push
from calls.wire.errors import SignalingError
from calls.wire.presence import Watch

logger = logging.getLogger(__name__)

# The ASGI scope extension through which a consumer reaches its socket, added by
# calls/server/daphne.py: {"probe": (timeout) -> Future[bool], "abort": () -> None}.
# Absent under other servers and in-process tests.
SOCKET_EXTENSION = "signaling.socket"
CLOSE_UNAUTHORIZED = 4401
CLOSE_POLICY = 1008
CLOSE_DROPPED = 1006
# Refused frames in a row (after rate limiting) before a flooding client is cut off.
FLOOD_STRIKES = 20
# Events read ahead from the socket and the channel layer, waiting for dispatch.
INBOX_LIMIT = 256


class SignalingConsumer(AsyncWebsocketConsumer):
    """One client socket speaking the v1 protocol and its additions."""

    def __init__(self, services: Callable[[], Services]) -> None:
        super().__init__()
        self.services_of_loop = services
        self.session: SessionInfo | None = None
        self.device_id = ""
        self.presence_mode = FULL
        self.watching: tuple[str, ...] = ()
        self.draining = False
        self.table = CallTable(self)
        self.resumption = Resumption(self)

    async def __call__(self, scope, receive, send) -> None:
        """Run the consumer: one inbox, fed by the socket and by the channel layer, read in order."""
        self.scope = scope
        self.base_send = send
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        self.inbox: asyncio.Queue = asyncio.Queue(INBOX_LIMIT)
        self.services = self.services_of_loop()
        sessions = self.services.sessions
        sessions.socket_opened(self, asyncio.current_task())
        loop = asyncio.get_running_loop()
        readers = [
            loop.create_task(self._read(receive)),
            loop.create_task(self._read(functools.partial(self.channel_layer.receive, self.channel_name))),
        ]
        try:
            while True:
                message = await self.inbox.get()
                if isinstance(message, BaseException):
                    raise message
                await self.dispatch(message)
        except StopConsumer:
            pass
        finally:
            sessions.socket_closed(self)
            if sessions.get(self.channel_name) is self:
                # Ended without its disconnect (an error in a handler, or cancelled by
                # daphne): its session must not stay listed, renewed, and unreachable.
                sessions.remove(self.channel_name)
                self.services.track(loop.create_task(self.end_session(1011)))
            for reader in readers:
                reader.cancel()
            for reader in readers:
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _read(self, source) -> None:
        try:
            while True:
                await self.inbox.put(await source())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the dispatch loop, which raises it
            await self.inbox.put(exc)

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections before every handler, a thread
        # hop per message; only the call service uses the database, through
        # database_sync_to_async, which does that housekeeping.
        if self.resumption.held is not None:
            await self.resumption.hold_event(message)
            return
        kind = message["type"]
        if self.draining and kind != "websocket.disconnect":
            return  # closed for a shutdown: only the client's close is still awaited
        name = kind.replace(".", "_")
        owner = self.table if kind.startswith("call.") else self
        handler = getattr(owner, name, None)
        if handler is None:
            raise ValueError(f"No handler for message type {kind}")
        await handler(message)

    # --- The socket ----------------------------------------------------

    async def connect(self) -> None:
        await self.services.start()
        self.registered_at = timezone.now()
        self.bucket = new_bucket()
        self.strikes = 0
        self.address = scope_client_address(self.scope)
        refusal = self.services.limits.admit(self.address)
        # Counted by the limits until it registers (pending) and until it closes (admitted).
        self.admitted = self.pending = refusal is None
        await self.accept()
        metrics.connection_opened()
        self.counted = True
        self.register_deadline = asyncio.get_running_loop().call_later(
            settings.SIGNALING_REGISTER_TIMEOUT, self._register_timeout
        )
        if refusal is not None:
            logger.info("connection refused: limit", extra={"session": self.channel_name, "address": self.address})
            await self.send_error(protocol.TOO_MANY_CONNECTIONS, refusal)
            self.draining = True  # nothing but the client's close is handled from now on
            await self.close(code=CLOSE_POLICY)
        elif self.services.sessions.draining:  # accepted just before the listening socket closed
            self.draining = True
            await self.close(code=protocol.CLOSE_SERVICE_RESTART)

    def _register_timeout(self) -> None:
        if self.session is None:
            logger.info("session closed: no register in time", extra={"session": self.channel_name})
            asyncio.get_running_loop().create_task(self.close(code=CLOSE_POLICY))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if not self.bucket.take():
            self.strikes += 1
            if self.strikes >= FLOOD_STRIKES:
                logger.warning("session cut off for flooding", extra={"session": self.channel_name})
                await self.close(code=CLOSE_POLICY)
                return
            await self.send_error(protocol.RATE_LIMITED, "Too many messages; slow down")
            return
        self.strikes = 0
        if text_data is None:
            await self.send_error(protocol.INVALID_MESSAGE, "Binary frames are not supported; send JSON text")
            return
        # "surrogatepass": a lone surrogate is refused by the parser, naming its field.
        limit = settings.SIGNALING_MAX_MESSAGE_BYTES
        if len(text_data) > limit or len(text_data.encode("utf-8", "surrogatepass")) > limit:
            await self.send_error(protocol.MESSAGE_TOO_LARGE, f"Messages are limited to {limit} bytes")
            return
        try:
            try:
                message = protocol.parse_message(text_data)
            except SignalingError:
                metrics.message_received(metrics.INVALID)
                raise
            metrics.message_received(metrics.message_type(message))
            if self.session is None and not isinstance(message, protocol.Register | protocol.Ping):
                raise SignalingError(protocol.NOT_REGISTERED, "Register first")
            await self.handle(message)
        except SignalingError as exc:
            await self.send_error(exc.code, exc.message)
        except Exception:
            logger.exception("message not handled", extra={"session": self.channel_name})
            await self.send_error(protocol.INTERNAL_ERROR, "The server could not handle that message")

    async def handle(self, message: protocol.Message) -> None:
        table = self.table
        match message:
            case protocol.Signal():
                await table.relay(message)
            case protocol.Register():
                await self.register(message)
            case protocol.CallRequest():
                await table.request(message)
            case protocol.CallAnswer(type=protocol.CALL_ACCEPTED):
                await table.accept(message)
            case protocol.CallAnswer():
                await table.reject(message)
            case protocol.CallEnd():
                await table.hang_up(message)
            case protocol.HistoryRequest():
                await table.send_history(message)
            case protocol.Ping():
                await self.send_json(protocol.pong())
            case push.PushSubscribe():
                await push_subscriptions.subscribe(self, message)
            case push.PushUnsubscribe():
                await push_subscriptions.unsubscribe(self, message)
            case Watch():
                await change_watch(self, message)

    # --- Registration ---------------------------------------------------

    async def register(self, message: protocol.Register) -> None:
        username, user_id = message.username, message.user_id
        if settings.SIGNALING_AUTH == "token":
            try:
                identity = token_identity(message.token)
            except TokenInvalid as exc:
                await self.send_error(protocol.UNAUTHORIZED, str(exc))
                await self.close(code=CLOSE_UNAUTHORIZED)
                return
            # The account's stable id, the same on every device: not the client's word.
            username, user_id = identity.username, identity.user_id
        if self.session is not None:
            if self.session.username != username:
                raise SignalingError(protocol.ALREADY_REGISTERED, "This socket is already registered")
            await self.send_registered()
            return
        self.device_id = message.device_id or ""
        mode = presence_mode(message)
        if message.resume_token is not None:
            self.resumption.request(message.resume_token, username, user_id)
            return
        session = SessionInfo(self.channel_name, username, user_id)
        came_online = await join_presence(self.services, session)
        self.became(session, mode, message.watch or ())
        await self.channel_layer.group_add(user_group(username), self.channel_name)
        await self.services.users.touch(username, user_id)
        ringing = await self.services.calls.ringing_for(username)
        logger.info(
            "session registered", extra={"session": self.channel_name, "user": username, "device": self.device_id}
        )
        if message.resume:
            self.resumption.issue_token()
        await self.send_registered()
        self.services.sessions.listen(self)
        await self.table.ring_waiting(ringing)
        if came_online:
            await self.services.presence_changed()

    def became(self, session: SessionInfo, presence_mode: str, watching: tuple[str, ...]) -> None:
        """This socket now holds `session` (registered, or taken over): list it here."""
        self.session = session
        self.registered_at = timezone.now()
        self.presence_mode, self.watching = presence_mode, watching
        self.register_deadline.cancel()
        if self.pending:
            self.pending = False
            self.services.limits.registered(self.address)
        self.services.sessions.add(self)

    async def send_registered(self, **extra: Any) -> None:
        reply = {
            "type": protocol.REGISTERED,
            "username": self.session.username,
            "user_id": self.session.user_id,
            "ice_servers": ice_servers_for(self.session.username),
        }
        if self.device_id:
            reply["device_id"] = self.device_id
        if self.services.push.vapid_public_key:
            reply["vapid_public_key"] = self.services.push.vapid_public_key
        if self.resumption.token is not None:
            reply["resume_token"] = self.resumption.token
        await self.send_json({**reply, **extra})

    def actor(self) -> Actor:
        """This session as the actor of a call change."""
        return Actor(self.channel_name, self.session.username if self.session else "", self.device_id)

    def live_calls(self) -> list[LiveCall]:
        return list(self.table.calls.values())

    # --- Events for this consumer from this process ---------------------

    def enqueue(self, event: dict[str, Any]) -> bool:
        """Queue an event from this process for this consumer; False when its inbox is full."""
        try:
            self.inbox.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True

    def post(self, event: dict[str, Any]) -> None:
        """Queue an event for this consumer that must not be lost: behind the others if its inbox is full."""
        if not self.enqueue(event):
            self.services.track(asyncio.get_running_loop().create_task(self.inbox.put(event)))

    # --- Channel-layer events: sessions (call.* go to the call table) ---

    async def session_resume(self, event: dict[str, Any]) -> None:
        if await self.resumption.hand_over_live(event):
            self.session = None
            await self.close()

    async def session_refused(self, event: dict[str, Any]) -> None:
        await self.resumption.refused()

    async def session_handover(self, event: dict[str, Any]) -> None:
        await self.resumption.handed_over(event)

    async def session_probe(self, event: dict[str, Any]) -> None:
        """A register for this name asks whether this session's client still answers: ping it."""
        socket = self.scope.get("extensions", {}).get(SOCKET_EXTENSION)
        if self.session is None or socket is None:
            # No session to defend; or a server that cannot ping (tests in-process): alive.
            await self.services.sessions.answer_probe(event["reply_to"], event["token"], self.session is not None)
            return

        async def ping() -> None:
            self.post(events.session_probe_result(event, await socket["probe"](PROBE_TIMEOUT)))

        self.services.track(asyncio.get_running_loop().create_task(ping()))

    async def session_probe_result(self, event: dict[str, Any]) -> None:
        alive = event["alive"] and self.session is not None
        if self.session is not None and not event["alive"]:
            logger.info("session did not answer a ping; dropped", extra={"session": self.channel_name})
            self.scope["extensions"][SOCKET_EXTENSION]["abort"]()
            await self.end_as_drop(CLOSE_DROPPED)
        await self.services.sessions.answer_probe(event["reply_to"], event["token"], alive)

    async def server_drain(self, event: dict[str, Any]) -> None:
        """The process is shutting down: park or end the session, and send the client elsewhere."""
        if hasattr(self, "register_deadline"):  # the drain can come before the socket's connect
            self.register_deadline.cancel()
        # A hand-over now would land on a closing socket: leave the session where it is.
        self.resumption.cancel_pending()
        if self.session is not None:
            self.services.sessions.socket_lost(self.channel_name)
            await self.resumption.park_or_end(event["carry"])
            self.session = None
        # The consumer ends when the client answers the close (or daphne gives up on it).
        self.draining = True
        await self.close(code=protocol.CLOSE_SERVICE_RESTART)

    # --- Output and teardown --------------------------------------------

    async def send_json(self, content: dict[str, Any]) -> None:
        await self.send(text_data=protocol.encode(content))

    async def send_text(self, text: str) -> None:
        await self.send(text_data=text)

    async def send_error(self, code: str, message: str) -> None:
        metrics.error_sent(code)
        await self.send_json(protocol.error(code, message))

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        """Hold a resumable session whose socket dropped; any other close ends it."""
        code = message.get("code", CLOSE_DROPPED)
        if self.session is not None and self.resumption.enabled and code not in CLEAN_CLOSE_CODES:
            await self.resumption.hold(code)
            return  # this consumer lives on, holding the session, until resumed or expired
        await super().websocket_disconnect(message)

    async def disconnect(self, code: int) -> None:
        self.socket_gone()
        self.resumption.cancel_pending()
        if self.session is not None:
            await self.end_session(code)

    def socket_gone(self) -> None:
        """The socket closed: stop the register deadline and the socket's counts (once)."""
        if hasattr(self, "register_deadline"):
            self.register_deadline.cancel()
        if getattr(self, "admitted", False):
            self.admitted = False
            self.services.limits.closed(self.address, self.pending)
            self.pending = False
        if getattr(self, "counted", False):
            self.counted = False
            metrics.connection_closed()

    async def end_as_drop(self, code: int) -> None:
        """End this session as a dropped socket ends: held for a resume if it asked for one."""
        if self.resumption.enabled:
            await self.resumption.hold(code)
            return
        await self.end_session(code)
        self.session = None

    async def end_session(self, code: int) -> None:
        """End this session for good: presence, group, and the calls it held."""
        services, username = self.services, self.session.username
        services.sessions.remove(self.channel_name)
        await self.channel_layer.group_discard(user_group(username), self.channel_name)
        _, went_offline = await services.store.leave(self.channel_name)
        await services.calls.end_calls_of(self.actor(), went_offline)
        if went_offline:
            await services.presence_changed()
        logger.info("session ended", extra={"session": self.channel_name, "user": username, "code": code})
