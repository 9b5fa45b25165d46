"""Session resume: signed one-time tokens, and a session that outlives its socket.

`ResumableSession` is the part of `SignalingConsumer` (calls/consumers.py) that
keeps a session alive across sockets and processes. Its lifecycle:

1. Hold. A session that asked for resume and loses its socket without a clean
   close is held, not ended (`hold`): its consumer stays alive for the resume
   grace, keeps its presence lease, tells its peers the user is reconnecting,
   and queues what arrives on its channel (bounded; the overflow is counted).
2. Hand over. A new socket registers with the resume token (`request_resume`)
   and, unless the session was parked (3), sends `session.resume` to the old
   channel by name, so the two sockets may be on different processes. The
   holder checks the one-time nonce and replies `session.handover` with the
   calls and the queued events, or `session.refused`. A socket still open when
   the client comes back (the drop not yet noticed) hands over the same way
   (`session_resume`).
3. Park. On a graceful shutdown (`server_drain`) with a shared store, a
   resumable session, held or live, is parked there with its calls for the
   resume grace (`park`), for a socket on another process to claim; without
   one, or without resume, the session ends.
4. Take over. The new socket takes over a handed-over or parked session
   (`take_over`): it joins presence before the old lease goes, moves the
   calls to its channel in the database and brings them up to date with it
   (`reconcile`): what happened to a call while no socket could be told is
   sent to the client, then the queued events are replayed in order.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from django.conf import settings
from django.core import signing

from calls import lifecycle, metrics, protocol
from calls.groups import user_group
from calls.lifecycle import CallRecord
from calls.presence import SessionInfo
from calls.protocol import CLOSE_SERVICE_RESTART, ProtocolError
from calls.session import LiveCall
from calls.states import CallStatus, EndReason

if TYPE_CHECKING:
    from calls.consumers import SignalingConsumer

logger = logging.getLogger(__name__)

SALT = "calls.resume"
MAX_AGE_S = 24 * 3600
# Closes that mean the client left on purpose: its session ends at once, resume or not.
CLEAN_CLOSE_CODES = (1000, 1001)
# Seconds to wait for the holder of a dropped session to answer a resume.
RESUME_REPLY_TIMEOUT = 2.0
RESUME_ATTEMPTS = 4


def make_token(channel: str, username: str, user_id: str) -> tuple[str, str]:
    """Return a signed resume token for this session, and its one-time nonce."""
    nonce = secrets.token_urlsafe(16)
    return signing.dumps({"c": channel, "u": username, "i": user_id, "n": nonce}, salt=SALT), nonce


def read_token(token: str, username: str, user_id: str) -> tuple[str, str] | None:
    """Return (old channel, nonce) if the token is genuine and names this user."""
    try:
        claims = signing.loads(token, salt=SALT, max_age=MAX_AGE_S)
    except signing.BadSignature:
        return None
    if not isinstance(claims, dict) or claims.get("u") != username or claims.get("i") != user_id:
        return None
    channel, nonce = claims.get("c"), claims.get("n")
    if not isinstance(channel, str) or not isinstance(nonce, str):
        return None
    return channel, nonce


def handover_event(consumer: SignalingConsumer, queued: list[dict[str, Any]], dropped: int) -> dict[str, Any]:
    """Build the layer event that gives a held session to its new socket."""
    return {
        "type": "session.handover",
        "old_channel": consumer.channel_name,
        "username": consumer.session.username,
        "user_id": consumer.session.user_id,
        "device_id": consumer.device_id,
        "calls": [asdict(call) for call in consumer.calls.values()],
        "queued": queued,
        "dropped": dropped,
        "delta": consumer.delta_presence,
    }


class ResumableSession:
    """Hold, hand over, park and take over a session; mixed into `SignalingConsumer`.

    Uses the consumer's state (`session`, `calls`, `runtime`, `resume_token`,
    `resume_nonce`, `pending_resume`, `held_dropped`, ...) and its output and
    teardown methods (`send_json`, `send_error`, `tell_peer`, `end_session`).
    The `session_*` and `server_drain` methods are channel-layer handlers.
    """

    # While the socket is gone and the session is held for a resume: what arrives for it.
    held: deque[dict[str, Any]] | None = None
    # Closed with 1012 for a shutdown, waiting for the client's close.
    draining = False

    # --- Hold: the socket dropped --------------------------------------

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        """Hold a resumable session whose socket dropped; any other close ends it as usual."""
        code = message.get("code", 1006)
        if getattr(self, "session", None) is not None and self.resume_token is not None:
            if code not in CLEAN_CLOSE_CODES:
                await self.hold(code)
                return  # this consumer lives on, holding the session, until resumed or expired
        await super().websocket_disconnect(message)  # AsyncWebsocketConsumer's, next in the consumer's MRO

    async def hold(self, code: int) -> None:
        """The socket dropped: keep the session for a resume instead of ending it."""
        self.register_deadline.cancel()
        metrics.connection_closed()
        self.counted = False
        self.release_limits()
        self.runtime.hub.unlisten(self.channel_name)
        self.held = deque()
        self.held_bytes = 0
        for call in self.calls.values():
            await self.tell_peer(
                call, {"type": "call.peer_reconnecting", "call_id": call.call_id, "username": self.session.username}
            )
        loop = asyncio.get_running_loop()
        self.held_until = loop.time() + settings.SIGNALING_RESUME_GRACE
        self.held_timer = loop.call_later(
            settings.SIGNALING_RESUME_GRACE, self.post, {"type": "session.expire", "code": code}
        )
        logger.info(
            "session dropped; held for resume",
            extra={"session": self.channel_name, "user": self.session.username, "code": code},
        )

    async def hold_event(self, event: dict[str, Any]) -> None:
        """Queue what arrives for a held session; hand it over or end it when the time comes."""
        kind = event["type"]
        if kind == "session.resume":
            if event.get("nonce") != self.resume_nonce:
                await self.channel_layer.send(event["reply_to"], {"type": "session.refused"})
                return
            self.held_timer.cancel()
            await self.channel_layer.send(event["reply_to"], handover_event(self, list(self.held), self.held_dropped))
            self.runtime.sessions.pop(self.channel_name, None)
            metrics.session_closed()
            logger.info("session handed over", extra={"session": self.channel_name, "to": event["reply_to"]})
            raise StopConsumer()
        if kind == "session.expire":
            logger.info("resume grace ran out", extra={"session": self.channel_name})
            self.held = None
            await self.end_session(event["code"])
            raise StopConsumer()
        if kind == "server.drain":
            self.held_timer.cancel()
            if event["carry"]:
                grace = self.held_until - asyncio.get_running_loop().time()
                await self.park(list(self.held), self.held_dropped, max(grace, 1.0))
            else:
                await self.end_session(CLOSE_SERVICE_RESTART)
            raise StopConsumer()
        if kind == "session.probe":  # a register for this name: no socket here to defend it
            await self.runtime.answer_probe(event["reply_to"], event["token"], False)
            return
        if kind.startswith("websocket.") or kind == "session.probe_result":
            return
        size = len(protocol.encode(event))
        if (
            len(self.held) >= settings.SIGNALING_RESUME_QUEUE_LIMIT
            or self.held_bytes + size > settings.SIGNALING_RESUME_QUEUE_BYTES
        ):
            self.held_dropped += 1
        else:
            self.held.append(event)
            self.held_bytes += size

    # --- Hand-over: a new socket asks for the session ------------------

    async def request_resume(self, message: protocol.Register, username: str, user_id: str) -> None:
        """Ask the holder of a dropped session to hand it over to this socket."""
        found = read_token(message.resume_token, username, user_id)
        if found is None or self.pending_resume is not None:
            raise ProtocolError(protocol.RESUME_FAILED, "That resume token is not valid for you")
        self.pending_resume = asyncio.get_running_loop().create_task(self._ask_holder(*found))

    async def _ask_holder(self, old_channel: str, nonce: str) -> None:
        """Find the session: parked in the store by a process that shut down, or held by a consumer somewhere.

        The holder is asked more than once: a request that lands while the dropped
        consumer is still winding down can be taken by its last, cancelled receive
        and lost; and its process may park the session meanwhile (a shutdown).
        """
        request = {"type": "session.resume", "nonce": nonce, "reply_to": self.channel_name}
        for _ in range(RESUME_ATTEMPTS):
            parked = await self.runtime.store.claim_parked(old_channel, nonce)
            if parked is not None:
                # A `session.handover` event: taken over in order, by `session_handover`.
                self.post(parked)
                return
            await self.channel_layer.send(old_channel, request)
            await asyncio.sleep(RESUME_REPLY_TIMEOUT / RESUME_ATTEMPTS)
        self.pending_resume = None
        await self.send_error(protocol.RESUME_FAILED, "The session cannot be resumed; register afresh")

    async def session_resume(self, event: dict[str, Any]) -> None:
        """The client is back on a new socket before this one noticed the drop: hand over now."""
        if self.session is None or event.get("nonce") != self.resume_nonce:
            await self.channel_layer.send(event["reply_to"], {"type": "session.refused"})
            return
        self.runtime.hub.unlisten(self.channel_name)
        await self.channel_layer.send(event["reply_to"], handover_event(self, [], 0))
        self.runtime.sessions.pop(self.channel_name, None)
        metrics.session_closed()  # here; the taking socket counts it again where it lives
        logger.info("session handed over", extra={"session": self.channel_name, "to": event["reply_to"]})
        self.session = None
        await self.close()

    async def session_refused(self, event: dict[str, Any]) -> None:
        if self.pending_resume is None:
            return
        self.pending_resume.cancel()
        self.pending_resume = None
        await self.send_error(protocol.RESUME_FAILED, "The session cannot be resumed; register afresh")

    async def session_handover(self, event: dict[str, Any]) -> None:
        if self.pending_resume is None or self.session is not None:
            return
        self.pending_resume.cancel()
        self.pending_resume = None
        await self.take_over(event)

    async def take_over(self, event: dict[str, Any]) -> None:
        """Take over a held or parked session: its presence, its calls and what was queued for it."""
        old_channel = event["old_channel"]
        session = SessionInfo(self.channel_name, event["username"], event["user_id"])
        # Join before the old lease goes, so the user never blinks offline; the old
        # session is this one, so it does not count against the name or the cap.
        await self.runtime.store.join(
            session, settings.SIGNALING_MAX_SESSIONS_PER_USER, self.runtime.lease_seconds, displace=[old_channel]
        )
        self.session = session
        self.device_id = event.get("device_id") or self.device_id
        metrics.session_registered()
        self.register_deadline.cancel()
        self.admitted_registered()
        self.runtime.sessions[self.channel_name] = self
        await self.channel_layer.group_add(user_group(session.username), self.channel_name)
        known = [LiveCall(**call) for call in event["calls"]]
        records = await database_sync_to_async(lifecycle.move_session)(
            old_channel, self.channel_name, [call.call_id for call in known]
        )
        await self.runtime.store.leave(old_channel)
        await self.channel_layer.group_discard(user_group(session.username), old_channel)
        self.calls, missed = reconcile(known, records, old_channel, self.channel_name)
        self.resume_token, self.resume_nonce = make_token(self.channel_name, session.username, session.user_id)
        logger.info(
            "session resumed",
            extra={
                "session": self.channel_name,
                "user": session.username,
                "from": old_channel,
                "calls": len(self.calls),
            },
        )
        await self.send_registered(
            resumed=True,
            calls=[
                {
                    "call_id": call.call_id,
                    "peer_username": call.peer_username,
                    "status": "answered" if call.answered else "ringing",
                }
                for call in self.calls.values()
            ],
        )
        self.delta_presence = event["delta"]
        self.runtime.hub.listen(self.channel_name, self.send_text, self.delta_presence)
        for call in self.calls.values():
            await self.tell_peer(
                call,
                {
                    "type": "call.peer_moved",
                    "call_id": call.call_id,
                    "username": session.username,
                    "channel": self.channel_name,
                },
            )
        for notice in missed:  # what happened to its calls while no socket could be told
            await self.send_json(notice)
        for queued in event["queued"]:
            await self.dispatch(queued)
        if event["dropped"]:
            await self.send_error(
                protocol.RESUME_OVERFLOW, f"{event['dropped']} messages sent while you were away were lost"
            )

    # --- Shutdown: park the session for another process ----------------

    async def server_drain(self, event: dict[str, Any]) -> None:
        """The process is shutting down: park or end the session, and send the client elsewhere."""
        if hasattr(self, "register_deadline"):  # the drain can come before the socket's connect
            self.register_deadline.cancel()
        if getattr(self, "pending_resume", None) is not None:
            # A hand-over now would land on a closing socket: leave the session where it is.
            self.pending_resume.cancel()
            self.pending_resume = None
        if getattr(self, "session", None) is not None:
            self.runtime.hub.unlisten(self.channel_name)
            if event["carry"] and self.resume_token is not None:
                for call in self.calls.values():
                    await self.tell_peer(
                        call,
                        {"type": "call.peer_reconnecting", "call_id": call.call_id, "username": self.session.username},
                    )
                await self.park([], 0, settings.SIGNALING_RESUME_GRACE)
            else:
                await self.end_session(CLOSE_SERVICE_RESTART)
            self.session = None
        # The consumer ends when the client answers the close (or daphne gives up on it).
        self.draining = True
        await self.close(code=CLOSE_SERVICE_RESTART)

    async def park(self, queued: list[dict[str, Any]], dropped: int, grace: float) -> None:
        """Leave the session in the shared store for a socket on another process to resume."""
        state = {**handover_event(self, queued, dropped), "nonce": self.resume_nonce}
        await self.runtime.store.park(self.channel_name, state, grace)
        self.runtime.sessions.pop(self.channel_name, None)
        metrics.session_closed()
        logger.info(
            "session parked for another process",
            extra={
                "session": self.channel_name,
                "user": self.session.username,
                "grace_s": round(grace, 1),
                "calls": len(self.calls),
            },
        )


def reconcile(
    known: list[LiveCall], records: dict[str, CallRecord], old_channel: str, new_channel: str
) -> tuple[dict[str, LiveCall], list[dict[str, Any]]]:
    """Bring a taken-over session's calls up to date with the database.

    Events sent to the old channel after its process shut down are lost: a call
    may have been answered, answered on another device, or ended meanwhile.
    Return the calls still live for this session, and the messages its client missed.
    """
    calls: dict[str, LiveCall] = {}
    missed: list[dict[str, Any]] = []
    for call in known:
        record = records.get(call.call_id)
        if record is None or record.status not in (CallStatus.RINGING, CallStatus.ANSWERED):
            reason = record.end_reason if record is not None else EndReason.DISCONNECTED
            if call.is_caller and reason == EndReason.REJECTED:
                missed.append(
                    {
                        "type": protocol.CALL_REJECTED,
                        "rejecter_username": call.peer_username,
                        "call_id": call.call_id,
                        "reason": reason,
                    }
                )
            else:
                missed.append(protocol.call_ended(call.peer_username, call.call_id, reason))
            continue
        # The peer may have moved too (both parties parked by one process): where it
        # is now is on the row, not in what this session last knew.
        if record.status == CallStatus.ANSWERED and call.is_caller:
            if not call.answered:
                missed.append(
                    {"type": protocol.CALL_ACCEPTED, "accepter_username": call.peer_username, "call_id": call.call_id}
                )
            call.answered, call.peer_channel = True, record.callee_channel
        elif record.status == CallStatus.ANSWERED:
            if record.callee_channel not in (old_channel, new_channel):
                missed.append(protocol.call_ended(call.peer_username, call.call_id, "answered_elsewhere"))
                continue
            call.answered, call.peer_channel = True, record.caller_channel
        elif not call.is_caller:
            call.peer_channel = record.caller_channel
        calls[call.call_id] = call
    return calls, missed
