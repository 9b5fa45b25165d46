"""The WebSocket consumer: parse a frame, apply it through a service, send the result.

Each socket is one session. A session knows the calls it is party to
(`self.calls`, see calls/session.py), kept current by channel-layer events, so
relaying offers, answers and candidates is a memory lookup and never touches
the database. Layer event types are always set here, never taken from a client.

What keeps a session alive beyond its socket (holding it for a resume, handing
it over to a new socket, parking it on a graceful shutdown, taking it over) is
`ResumableSession` in calls/resume.py, which this consumer inherits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from calls import lifecycle, metrics, protocol
from calls.backpressure import SOCKET_EXTENSION
from calls.groups import user_group
from calls.ice import ice_servers_for
from calls.lifecycle import Actor, CallRecord, CallRefused
from calls.presence import JoinRefused, SessionInfo
from calls.protocol import CLOSE_SERVICE_RESTART, ProtocolError
from calls.resume import ResumableSession, make_token
from calls.runtime import PROBE_TIMEOUT, Runtime
from calls.security import TokenInvalid, new_bucket, scope_client_address, token_identity
from calls.session import LiveCall
from calls.states import EndReason

logger = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED = 4401
CLOSE_POLICY = 1008
# Refused frames in a row (after rate limiting) before a flooding client is cut off.
FLOOD_STRIKES = 20
# Events read ahead from the socket and the channel layer, waiting for dispatch.
INBOX_LIMIT = 256


class SignalingConsumer(ResumableSession, AsyncWebsocketConsumer):
    """One client socket speaking the v1 protocol and its additions."""

    async def connect(self) -> None:
        await self.runtime.start()
        self.session: SessionInfo | None = None
        self.device_id = ""
        self.registered_at = timezone.now()
        self.delta_presence = False
        self.resume_token: str | None = None
        self.resume_nonce: str | None = None
        self.pending_resume: asyncio.Task | None = None
        self.held_dropped = 0
        self.calls: dict[str, LiveCall] = {}
        self.bucket = new_bucket()
        self.strikes = 0
        self.address = scope_client_address(self.scope)
        refusal = self.runtime.limits.admit(self.address)
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
        elif self.runtime.draining:  # accepted just before the listening socket closed
            self.draining = True
            await self.close(code=CLOSE_SERVICE_RESTART)

    async def __call__(self, scope, receive, send) -> None:
        """Run the consumer: one inbox, fed by the socket and by the channel layer, read in order.

        channels' loop (`await_many_dispatch`) waits on both sources with
        `asyncio.wait` and starts a new task for every message; two long-lived
        reader tasks do the same job for far less (docs/benchmarks.md).
        """
        self.scope = scope
        self.base_send = send
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        self.inbox: asyncio.Queue = asyncio.Queue(INBOX_LIMIT)
        self.runtime = Runtime.current()
        self.runtime.consumers[self] = asyncio.current_task()
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
            self.runtime.consumers.pop(self, None)
            if self.runtime.sessions.get(self.channel_name) is self:
                # Ended without its disconnect (an error in a handler, or cancelled by
                # daphne): its session must not stay listed, renewed, and unreachable.
                self.runtime.sessions.pop(self.channel_name, None)
                self.runtime.hub.unlisten(self.channel_name)
                cleanup = loop.create_task(self.end_session(1011))
                self.runtime.track(cleanup)
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
        # Channels closes stale database connections before every handler, a
        # thread hop per message; only lifecycle handlers use the database, and
        # they do it through database_sync_to_async, which does that housekeeping.
        if self.held is not None:
            await self.hold_event(message)
            return
        if self.draining and message["type"] != "websocket.disconnect":
            return  # closed for a shutdown: only the client's close is still awaited
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    def _register_timeout(self) -> None:
        if self.session is None:
            logger.info("session closed: no register in time", extra={"session": self.channel_name})
            asyncio.get_running_loop().create_task(self.close(code=CLOSE_POLICY))

    # --- Inbound frames ------------------------------------------------

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
        if len(text_data) > settings.SIGNALING_MAX_MESSAGE_BYTES or (
            len(text_data.encode("utf-8", "surrogatepass")) > settings.SIGNALING_MAX_MESSAGE_BYTES
        ):
            await self.send_error(
                protocol.MESSAGE_TOO_LARGE, f"Messages are limited to {settings.SIGNALING_MAX_MESSAGE_BYTES} bytes"
            )
            return
        try:
            try:
                message = protocol.parse_message(text_data)
            except ProtocolError:
                metrics.message_received(metrics.INVALID)
                raise
            metrics.message_received(metrics.message_type(message))
            if self.session is None and not isinstance(message, protocol.Register):
                if not isinstance(message, protocol.Ping):
                    raise ProtocolError(protocol.NOT_REGISTERED, "Register first")
            await self.handle(message)
        except ProtocolError as exc:
            await self.send_error(exc.code, exc.message)
        except CallRefused as exc:
            await self.send_error(exc.code, exc.message)
        except Exception:
            logger.exception("message not handled", extra={"session": self.channel_name})
            await self.send_error(protocol.INTERNAL_ERROR, "The server could not handle that message")

    async def handle(self, message: protocol.Message) -> None:
        match message:
            case protocol.Signal():
                await self.relay_signal(message)
            case protocol.Register():
                await self.register(message)
            case protocol.CallRequest():
                await self.request_call(message)
            case protocol.CallAnswer(type=protocol.CALL_ACCEPTED):
                await self.accept_call(message)
            case protocol.CallAnswer():
                await self.reject_call(message)
            case protocol.CallEnd():
                await self.end_call(message)
            case protocol.HistoryRequest():
                await self.send_history(message)
            case protocol.Ping():
                await self.send_json({"type": protocol.PONG, "server_time": protocol.utc_timestamp()})

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
                raise ProtocolError(protocol.ALREADY_REGISTERED, "This socket is already registered")
            await self.send_registered()
            return
        self.device_id = message.device_id or ""
        if message.resume_token is not None:
            await self.request_resume(message, username, user_id)
            return
        session = SessionInfo(self.channel_name, username, user_id)
        came_online = await self.join_presence(session)
        self.session = session
        self.registered_at = timezone.now()
        metrics.session_registered()
        self.register_deadline.cancel()
        self.admitted_registered()
        self.runtime.sessions[self.channel_name] = self
        await self.channel_layer.group_add(user_group(username), self.channel_name)
        # Before the reply: once a client is registered, a call to it on any process finds its row.
        await self.runtime.users.touch(username, user_id)
        logger.info(
            "session registered", extra={"session": self.channel_name, "user": username, "device": self.device_id}
        )
        if message.resume:
            self.resume_token, self.resume_nonce = make_token(self.channel_name, username, user_id)
        await self.send_registered()
        self.delta_presence = message.presence == "delta"
        self.runtime.hub.listen(self.channel_name, self.send_text, self.delta_presence)
        if came_online:
            await self.runtime.presence_changed()

    async def join_presence(self, session: SessionInfo) -> bool:
        """List the session; return whether its user came online. Raise ProtocolError when refused.

        In open mode nothing proves who owns a name, so a name has one live
        session: a second register is refused, whatever user_id it carries. The
        exception keeps v1 phones working across a network switch, where the old
        socket lingers until the ping timeout: when the newcomer carries the
        holder's user_id, the holder is probed, and one that does not answer
        is ended as a drop and gives way.
        """
        store, lease = self.runtime.store, self.runtime.lease_seconds
        if settings.SIGNALING_AUTH == "token":
            try:
                return await store.join(session, settings.SIGNALING_MAX_SESSIONS_PER_USER, lease)
            except JoinRefused as exc:
                raise ProtocolError(exc.code, exc.message) from None
        try:
            return await store.join(session, 1, lease)
        except JoinRefused as exc:
            holders = exc.holders
        if not holders or any(holder.user_id != session.user_id for holder in holders):
            raise ProtocolError(protocol.USERNAME_TAKEN, "That username is online on another connection")
        gone = await self.runtime.probe_sessions([holder.channel for holder in holders])
        if len(gone) < len(holders):
            raise ProtocolError(protocol.USERNAME_TAKEN, "That username is online on another connection")
        logger.info("register replaces a silent session", extra={"session": self.channel_name, "replaced": len(gone)})
        try:
            return await store.join(session, 1, lease, displace=gone)
        except JoinRefused:
            raise ProtocolError(protocol.USERNAME_TAKEN, "That username is online on another connection") from None

    def admitted_registered(self) -> None:
        """This socket registered: it no longer counts against its address's unregistered sockets."""
        if self.pending:
            self.pending = False
            self.runtime.limits.registered(self.address)

    def release_limits(self) -> None:
        """The socket closed: it no longer counts against the connection limits (once)."""
        if getattr(self, "admitted", False):
            self.admitted = False
            self.runtime.limits.closed(self.address, self.pending)
            self.pending = False

    def actor(self) -> Actor:
        """This session as the actor of a call change."""
        return Actor(self.channel_name, self.session.username if self.session else "", self.device_id)

    async def send_registered(self, **extra: Any) -> None:
        reply = {
            "type": protocol.REGISTERED,
            "username": self.session.username,
            "user_id": self.session.user_id,
            "ice_servers": ice_servers_for(self.session.username),
        }
        if self.device_id:
            reply["device_id"] = self.device_id
        if self.resume_token is not None:
            reply["resume_token"] = self.resume_token
        await self.send_json({**reply, **extra})

    async def request_call(self, message: protocol.CallRequest) -> None:
        me, target = self.session.username, message.target_username
        if protocol.username_key(target) == protocol.username_key(me):
            raise ProtocolError(protocol.INVALID_MESSAGE, "You cannot call yourself")
        refusal = self.runtime.call_limits.check(me, target)
        if refusal is not None:
            raise ProtocolError(protocol.CALL_RATE_LIMITED, refusal)
        sessions = await self.runtime.store.sessions_of(target)
        if not sessions:
            raise ProtocolError(protocol.USER_OFFLINE_CODE, f"{target} is not online")
        target = sessions[0].username  # as its owner writes it
        record: CallRecord = await database_sync_to_async(lifecycle.start_call)(
            self.actor(), target, settings.SIGNALING_RING_TIMEOUT
        )
        if record.end_reason == EndReason.BUSY:
            await self.send_json(
                {
                    "type": protocol.CALL_REJECTED,
                    "rejecter_username": target,
                    "call_id": record.call_id,
                    "reason": EndReason.BUSY,
                }
            )
            return
        self.calls[record.call_id] = LiveCall(record.call_id, target, is_caller=True)
        self.runtime.schedule_ring_timeout(record.call_id)
        await self.channel_layer.group_send(
            user_group(target),
            {
                "type": "call.incoming",
                "call_id": record.call_id,
                "caller_username": me,
                "caller_id": self.session.user_id,
                "caller_channel": self.channel_name,
            },
        )
        await self.send_json({"type": protocol.CALL_RINGING, "call_id": record.call_id, "target_username": target})

    def find_call(self, call_id: str | None, peer: str | None, *, ringing_for_me: bool = False) -> LiveCall | None:
        """Find one of this session's calls by id, or by the other party's username."""
        if call_id is not None:
            call = self.calls.get(call_id)
            if call is not None and peer is not None and call.peer_username != peer:
                return None
        else:
            call = next((c for c in reversed(self.calls.values()) if c.peer_username == peer), None)
        if call is not None and ringing_for_me and (call.is_caller or call.answered):
            return None
        return call

    async def accept_call(self, message: protocol.CallAnswer) -> None:
        call = self.find_call(message.call_id, message.caller_username, ringing_for_me=True)
        if call is None:
            raise ProtocolError(protocol.NOT_RINGING, "That call is not ringing for you")
        record = await database_sync_to_async(lifecycle.accept_call)(call.call_id, self.actor())
        self.runtime.cancel_ring_timeout(call.call_id)
        call.answered = True
        call.peer_channel = record.caller_channel
        await self.runtime.send_to_session(
            record.caller_channel,
            {
                "type": "call.accepted",
                "call_id": call.call_id,
                "accepter_username": self.session.username,
                "accepter_channel": self.channel_name,
            },
        )
        await self.channel_layer.group_send(
            user_group(self.session.username),
            {"type": "call.answered_elsewhere", "call_id": call.call_id, "answered_channel": self.channel_name},
        )

    async def reject_call(self, message: protocol.CallAnswer) -> None:
        call = self.find_call(message.call_id, message.caller_username, ringing_for_me=True)
        if call is None:
            raise ProtocolError(protocol.NOT_RINGING, "That call is not ringing for you")
        record = await database_sync_to_async(lifecycle.end_call)(
            call.call_id, EndReason.REJECTED, self.actor(), party=True
        )
        self.calls.pop(call.call_id, None)
        if record is not None:
            await self.runtime.notify_call_ended(record)

    async def end_call(self, message: protocol.CallEnd) -> None:
        call = self.find_call(message.call_id, message.target_username)
        if call is None:
            raise ProtocolError(protocol.NOT_IN_CALL, "You are not in a call with that user")
        self.calls.pop(call.call_id, None)
        record = await database_sync_to_async(lifecycle.end_call)(
            call.call_id, EndReason.HANGUP, self.actor(), party=True
        )
        if record is not None:
            await self.runtime.notify_call_ended(record)

    async def relay_signal(self, message: protocol.Signal) -> None:
        call = self.find_call(message.call_id, message.target_username)
        if call is None:
            raise ProtocolError(protocol.NOT_IN_CALL, f"You are not in a call with {message.target_username}")
        text = protocol.encode(protocol.signal(message.type, self.session.username, message.data, call.call_id))
        event = {"type": "call.signal", "call_id": call.call_id, "text": text, "sent_at": time.time()}
        # The hot path: a peer on this process gets the signal straight into its inbox,
        # without the layer (a Redis round trip), like every point-to-point event to it
        # (Runtime.send_to_session), so they keep their order. Before the answer,
        # signals go to every session of the callee as a group send, through the layer.
        if call.answered:
            await self.runtime.send_to_session(call.peer_channel, event)
        else:
            await self.tell_peer(call, event)

    def deliver(self, event: dict[str, Any]) -> bool:
        """Queue an event from this process for this consumer; False when its inbox is full."""
        try:
            self.inbox.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True

    def post(self, event: dict[str, Any]) -> None:
        """Queue an event for this consumer that must not be lost: behind the others if its inbox is full."""
        if not self.deliver(event):
            self.runtime.track(asyncio.get_running_loop().create_task(self.inbox.put(event)))

    async def tell_peer(self, call: LiveCall, event: dict[str, Any]) -> None:
        """Send a layer event to the other party of a call: its session, or all its sessions."""
        if call.peer_channel:
            await self.runtime.send_to_session(call.peer_channel, event)
        else:
            await self.channel_layer.group_send(user_group(call.peer_username), event)

    async def send_history(self, message: protocol.HistoryRequest) -> None:
        if settings.SIGNALING_AUTH == "token":
            scope: dict[str, Any] = {}
        else:  # nothing proves this is who used the name before: only this session's calls
            scope = {"session": self.channel_name, "since": self.registered_at}
        calls = await database_sync_to_async(lifecycle.call_history)(self.session.username, message.limit, **scope)
        await self.send_json({"type": protocol.CALL_HISTORY, "calls": calls})

    # --- Channel-layer events (types set by this server only) -----------

    async def call_incoming(self, event: dict[str, Any]) -> None:
        if self.session is None:
            return
        call_id = event["call_id"]
        self.calls[call_id] = LiveCall(
            call_id, event["caller_username"], is_caller=False, peer_channel=event["caller_channel"]
        )
        await self.send_json(
            {
                "type": protocol.INCOMING_CALL,
                "caller_username": event["caller_username"],
                "caller_id": event["caller_id"],
                "call_id": call_id,
            }
        )

    async def call_accepted(self, event: dict[str, Any]) -> None:
        call = self.calls.get(event["call_id"])
        if call is None:
            return
        self.runtime.cancel_ring_timeout(call.call_id)
        self.runtime.call_limits.answered(self.session.username, call.peer_username)
        call.answered = True
        call.peer_channel = event["accepter_channel"]
        await self.send_json(
            {"type": protocol.CALL_ACCEPTED, "accepter_username": event["accepter_username"], "call_id": call.call_id}
        )

    async def call_answered_elsewhere(self, event: dict[str, Any]) -> None:
        if event["answered_channel"] == self.channel_name:
            return
        call = self.calls.pop(event["call_id"], None)
        if call is not None:
            await self.send_json(protocol.call_ended(call.peer_username, call.call_id, "answered_elsewhere"))

    async def call_rejected(self, event: dict[str, Any]) -> None:
        call = self.calls.pop(event["call_id"], None)
        if call is not None:
            await self.send_json(
                {
                    "type": protocol.CALL_REJECTED,
                    "rejecter_username": event["rejecter_username"],
                    "call_id": call.call_id,
                    "reason": event["reason"],
                }
            )

    async def call_ended(self, event: dict[str, Any]) -> None:
        call = self.calls.pop(event["call_id"], None)
        if call is not None:
            await self.send_json(protocol.call_ended(call.peer_username, call.call_id, event["reason"]))

    async def call_peer_reconnecting(self, event: dict[str, Any]) -> None:
        if event["call_id"] in self.calls:
            await self.send_json(
                {"type": protocol.PEER_RECONNECTING, "username": event["username"], "call_id": event["call_id"]}
            )

    async def call_peer_moved(self, event: dict[str, Any]) -> None:
        call = self.calls.get(event["call_id"])
        if call is None:
            return
        if call.peer_channel:
            call.peer_channel = event["channel"]
        await self.send_json(
            {"type": protocol.PEER_RECONNECTED, "username": event["username"], "call_id": call.call_id}
        )

    async def call_signal(self, event: dict[str, Any]) -> None:
        if event["call_id"] in self.calls:
            metrics.observe_relay(time.time() - event["sent_at"])
            await self.send(text_data=event["text"])

    async def session_probe(self, event: dict[str, Any]) -> None:
        """A register for this name asks whether this session's client still answers: ping it."""
        socket = self.scope.get("extensions", {}).get(SOCKET_EXTENSION)
        if self.session is None or socket is None:
            # No session to defend; or a server that cannot ping (tests in-process): alive.
            await self.runtime.answer_probe(event["reply_to"], event["token"], self.session is not None)
            return

        async def ping() -> None:
            alive = await socket["probe"](PROBE_TIMEOUT)
            self.post({**event, "type": "session.probe_result", "alive": alive})

        self.runtime.track(asyncio.get_running_loop().create_task(ping()))

    async def session_probe_result(self, event: dict[str, Any]) -> None:
        if self.session is not None and not event["alive"]:
            logger.info("session did not answer a ping; dropped", extra={"session": self.channel_name})
            self.scope["extensions"][SOCKET_EXTENSION]["abort"]()
            await self.end_as_drop(1006)
        await self.runtime.answer_probe(event["reply_to"], event["token"], event["alive"] and self.session is not None)

    async def end_as_drop(self, code: int) -> None:
        """End this session as a dropped socket ends: held for a resume if it asked for one."""
        if self.resume_token is not None:
            await self.hold(code)
            return
        self.runtime.hub.unlisten(self.channel_name)
        await self.end_session(code)
        self.session = None

    # --- Output and teardown --------------------------------------------

    async def send_json(self, content: dict[str, Any]) -> None:
        await self.send(text_data=protocol.encode(content))

    async def send_text(self, text: str) -> None:
        await self.send(text_data=text)

    async def send_error(self, code: str, message: str) -> None:
        metrics.error_sent(code)
        await self.send_json(protocol.error(code, message))

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "register_deadline"):
            self.register_deadline.cancel()
        self.release_limits()
        if getattr(self, "counted", False):
            metrics.connection_closed()
        if getattr(self, "pending_resume", None) is not None:
            self.pending_resume.cancel()
            self.pending_resume = None
        if getattr(self, "session", None) is None:
            return
        self.runtime.hub.unlisten(self.channel_name)
        await self.end_session(code)

    async def end_session(self, code: int) -> None:
        """End this session for good: presence, group, and the calls it held."""
        metrics.session_closed()
        username = self.session.username
        self.runtime.sessions.pop(self.channel_name, None)
        await self.channel_layer.group_discard(user_group(username), self.channel_name)
        _, went_offline = await self.runtime.store.leave(self.channel_name)
        ended = await database_sync_to_async(_end_calls_after_disconnect)(self.actor(), went_offline)
        for record in ended:
            await self.runtime.notify_call_ended(record)
        if went_offline:
            await self.runtime.presence_changed()
        logger.info("session ended", extra={"session": self.channel_name, "user": username, "code": code})


def _end_calls_after_disconnect(actor: Actor, went_offline: bool) -> list[CallRecord]:
    """End the calls a closed session held, and calls ringing for a user now offline."""
    call_ids = lifecycle.calls_of_session(actor.session)
    if went_offline:
        call_ids += lifecycle.ringing_calls_to(actor.username)
    ended = [lifecycle.end_call(call_id, EndReason.DISCONNECTED, actor) for call_id in call_ids]
    return [record for record in ended if record is not None]
