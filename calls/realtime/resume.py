"""Session resume: signed one-time tokens, and a session that outlives its socket.

`Resumption` is the collaborator a consumer (calls/realtime/consumer.py) keeps
for a session registered with `resume: true`. It holds everything about the
session outliving its socket, and reaches its consumer only through the small
`ResumableSocket` interface. The lifecycle:

1. Hold. A session that asked for resume and loses its socket without a clean
   close is held, not ended (`hold`): its consumer stays alive for the resume
   grace, keeps its presence lease, tells its peers the user is reconnecting,
   and queues what arrives on its channel (bounded in messages and bytes; the
   overflow is counted).
2. Hand over. A new socket registers with the resume token (`request`) and,
   unless the session was parked (3), sends `session.resume` to the old channel
   by name, so the two sockets may be on different processes. The holder checks
   the one-time nonce and replies `session.handover` with the calls and the
   queued events, or `session.refused`. A socket still open when the client
   comes back (the drop not yet noticed) hands over the same way
   (`hand_over_live`).
3. Park. On a graceful shutdown with a shared store, a resumable session, held
   or live, is parked there with its calls for the resume grace (`park`), for a
   socket on another process to claim; without one, the session ends.
4. Take over. The new socket takes over a handed-over or parked session
   (`take_over`): it joins presence before the old lease goes, moves the calls
   to its channel in the database and brings them up to date with it
   (`reconcile`): what happened to a call while no socket could be told is
   sent to the client, then the queued events are replayed in order.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from dataclasses import asdict
from typing import Any, Protocol

from channels.exceptions import StopConsumer
from django.conf import settings
from django.core import signing

from calls.callflow.board import CallRecord
from calls.callflow.live import LiveCall
from calls.callflow.states import CallStatus, EndReason
from calls.presence.base import SessionInfo
from calls.realtime.call_table import CallTable
from calls.realtime.groups import user_group
from calls.realtime.sessions import Services
from calls.wire import events, protocol
from calls.wire.errors import SignalingError

logger = logging.getLogger(__name__)

# Tokens signed before the module moved must still verify: the salt keeps its first name.
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


class ResumableSocket(Protocol):
    """What `Resumption` needs of the consumer it serves."""

    channel_name: str
    channel_layer: Any
    services: Services
    session: SessionInfo | None
    device_id: str
    presence_mode: str
    watching: tuple[str, ...]
    table: CallTable

    async def send_json(self, content: dict[str, Any]) -> None: ...
    async def send_error(self, code: str, message: str) -> None: ...
    async def send_registered(self, **extra: Any) -> None: ...
    async def dispatch(self, message: dict[str, Any]) -> None: ...
    async def end_session(self, code: int) -> None: ...
    def post(self, event: dict[str, Any]) -> None: ...
    def socket_gone(self) -> None: ...
    def became(self, session: SessionInfo, presence_mode: str, watching: tuple[str, ...]) -> None: ...


class Resumption:
    """A resumable session's life beyond its socket: token, hold, hand-over, park, take-over."""

    def __init__(self, socket: ResumableSocket) -> None:
        self.socket = socket
        self.token: str | None = None
        self.nonce: str | None = None
        # While the socket is gone and the session is held: what arrives for it.
        self.held: deque[dict[str, Any]] | None = None
        self.held_bytes = 0
        self.dropped = 0
        self.held_until = 0.0
        self.held_timer: asyncio.TimerHandle | None = None
        # A resume this socket asked for and is waiting on.
        self.pending: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def issue_token(self) -> None:
        """Give the registered session a fresh one-time token (sent in `registered`)."""
        session = self.socket.session
        self.token, self.nonce = make_token(self.socket.channel_name, session.username, session.user_id)

    def cancel_pending(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None

    def handover_event(self, queued: list[dict[str, Any]], dropped: int) -> dict[str, Any]:
        socket = self.socket
        return events.session_handover(
            old_channel=socket.channel_name,
            username=socket.session.username,
            user_id=socket.session.user_id,
            device_id=socket.device_id,
            calls=[asdict(call) for call in socket.table.calls.values()],
            queued=queued,
            dropped=dropped,
            presence=socket.presence_mode,
            watch=list(socket.services.sessions.hub.watched(socket.channel_name) or socket.watching),
        )

    # --- Hold: the socket dropped --------------------------------------

    async def hold(self, code: int) -> None:
        """The socket dropped: keep the session for a resume instead of ending it."""
        socket = self.socket
        socket.socket_gone()
        socket.services.sessions.socket_lost(socket.channel_name)
        # Calls to its user now wake its devices by push, as if it had no session.
        await socket.services.store.set_held(socket.channel_name, True)
        self.held = deque()
        self.held_bytes = 0
        await socket.table.send_to_peers(
            lambda call: events.call_peer_reconnecting(call.call_id, socket.session.username)
        )
        loop = asyncio.get_running_loop()
        self.held_until = loop.time() + settings.SIGNALING_RESUME_GRACE
        self.held_timer = loop.call_later(settings.SIGNALING_RESUME_GRACE, socket.post, events.session_expire(code))
        logger.info(
            "session dropped; held for resume",
            extra={"session": socket.channel_name, "user": socket.session.username, "code": code},
        )

    async def hold_event(self, event: dict[str, Any]) -> None:
        """Queue what arrives for a held session; hand it over or end it when the time comes."""
        socket, kind = self.socket, event["type"]
        if kind == events.SESSION_RESUME:
            if event.get("nonce") != self.nonce:
                await socket.channel_layer.send(event["reply_to"], events.session_refused())
                return
            self.held_timer.cancel()
            await socket.channel_layer.send(event["reply_to"], self.handover_event(list(self.held), self.dropped))
            socket.services.sessions.remove(socket.channel_name)
            logger.info("session handed over", extra={"session": socket.channel_name, "to": event["reply_to"]})
            raise StopConsumer()
        if kind == events.SESSION_EXPIRE:
            logger.info("resume grace ran out", extra={"session": socket.channel_name})
            self.held = None
            await socket.end_session(event["code"])
            raise StopConsumer()
        if kind == events.SERVER_DRAIN:
            self.held_timer.cancel()
            if event["carry"]:
                grace = self.held_until - asyncio.get_running_loop().time()
                await self.park(list(self.held), self.dropped, max(grace, 1.0))
            else:
                await socket.end_session(protocol.CLOSE_SERVICE_RESTART)
            raise StopConsumer()
        if kind == events.SESSION_PROBE:  # a register for this name: no socket here to defend it
            await socket.services.sessions.answer_probe(event["reply_to"], event["token"], False)
            return
        if kind.startswith("websocket.") or kind == events.SESSION_PROBE_RESULT:
            return
        size = len(protocol.encode(event))
        if (
            len(self.held) >= settings.SIGNALING_RESUME_QUEUE_LIMIT
            or self.held_bytes + size > settings.SIGNALING_RESUME_QUEUE_BYTES
        ):
            self.dropped += 1
        else:
            self.held.append(event)
            self.held_bytes += size

    # --- Hand-over: a new socket asks for the session ------------------

    def request(self, resume_token: str, username: str, user_id: str) -> None:
        """Ask the holder of a dropped session to hand it over to this socket."""
        found = read_token(resume_token, username, user_id)
        if found is None or self.pending is not None:
            raise SignalingError(protocol.RESUME_FAILED, "That resume token is not valid for you")
        self.pending = asyncio.get_running_loop().create_task(self._ask_holder(*found))

    async def _ask_holder(self, old_channel: str, nonce: str) -> None:
        """Find the session: parked in the store by a process that shut down, or held by a consumer somewhere.

        The holder is asked more than once: a request that lands while the dropped
        consumer is still winding down can be taken by its last, cancelled receive
        and lost; and its process may park the session meanwhile (a shutdown).
        """
        socket = self.socket
        request = events.session_resume(nonce, socket.channel_name)
        for _ in range(RESUME_ATTEMPTS):
            parked = await socket.services.store.claim_parked(old_channel, nonce)
            if parked is not None:
                # A `session.handover` event: taken over in order, by the consumer's `session_handover`.
                socket.post(parked)
                return
            await socket.channel_layer.send(old_channel, request)
            await asyncio.sleep(RESUME_REPLY_TIMEOUT / RESUME_ATTEMPTS)
        self.pending = None
        await socket.send_error(protocol.RESUME_FAILED, "The session cannot be resumed; register afresh")

    async def hand_over_live(self, event: dict[str, Any]) -> bool:
        """The client is back on a new socket before this one noticed the drop: hand over now.

        Return whether the session was handed over (the socket then closes).
        """
        socket = self.socket
        if socket.session is None or event.get("nonce") != self.nonce:
            await socket.channel_layer.send(event["reply_to"], events.session_refused())
            return False
        await socket.channel_layer.send(event["reply_to"], self.handover_event([], 0))
        socket.services.sessions.remove(socket.channel_name)
        logger.info("session handed over", extra={"session": socket.channel_name, "to": event["reply_to"]})
        return True

    async def refused(self) -> None:
        if self.pending is None:
            return
        self.cancel_pending()
        await self.socket.send_error(protocol.RESUME_FAILED, "The session cannot be resumed; register afresh")

    async def handed_over(self, event: dict[str, Any]) -> None:
        if self.pending is None or self.socket.session is not None:
            return
        self.cancel_pending()
        await self.take_over(event)

    async def take_over(self, event: dict[str, Any]) -> None:
        """Take over a held or parked session: its presence, its calls and what was queued for it."""
        socket, services = self.socket, self.socket.services
        old_channel = event["old_channel"]
        session = SessionInfo(socket.channel_name, event["username"], event["user_id"])
        # Join before the old lease goes, so the user never blinks offline; the old
        # session is this one, so it does not count against the name or the cap.
        await services.store.join(
            session, settings.SIGNALING_MAX_SESSIONS_PER_USER, services.lease_seconds, displace=[old_channel]
        )
        socket.device_id = event.get("device_id") or socket.device_id
        known = [LiveCall(**call) for call in event["calls"]]
        # A session parked by an older process says only whether it took deltas.
        mode = event.get("presence") or ("delta" if event.get("delta") else "full")
        socket.became(session, mode, tuple(event.get("watch", ())))
        await socket.channel_layer.group_add(user_group(session.username), socket.channel_name)
        records = await services.calls.move_session(old_channel, socket.channel_name, [c.call_id for c in known])
        await services.store.leave(old_channel)
        await socket.channel_layer.group_discard(user_group(session.username), old_channel)
        socket.table.calls, missed = reconcile(known, records, old_channel, socket.channel_name)
        self.issue_token()
        logger.info(
            "session resumed",
            extra={
                "session": socket.channel_name,
                "user": session.username,
                "from": old_channel,
                "calls": len(socket.table.calls),
            },
        )
        await socket.send_registered(
            resumed=True,
            calls=[
                {
                    "call_id": call.call_id,
                    "peer_username": call.peer_username,
                    "status": "answered" if call.answered else "ringing",
                }
                for call in socket.table.calls.values()
            ],
        )
        services.sessions.listen(socket)
        await socket.table.send_to_peers(
            lambda call: events.call_peer_moved(call.call_id, session.username, socket.channel_name)
        )
        for notice in missed:  # what happened to its calls while no socket could be told
            await socket.send_json(notice)
        for queued in event["queued"]:
            await socket.dispatch(queued)
        if event["dropped"]:
            await socket.send_error(
                protocol.RESUME_OVERFLOW, f"{event['dropped']} messages sent while you were away were lost"
            )

    # --- Shutdown: park the session for another process ----------------

    async def park_or_end(self, carry: bool) -> None:
        """The process shuts down under a live session: park it if another process can carry it, else end it."""
        socket = self.socket
        if carry and self.enabled:
            username = socket.session.username
            await socket.table.send_to_peers(lambda call: events.call_peer_reconnecting(call.call_id, username))
            await self.park([], 0, settings.SIGNALING_RESUME_GRACE)
        else:
            await socket.end_session(protocol.CLOSE_SERVICE_RESTART)

    async def park(self, queued: list[dict[str, Any]], dropped: int, grace: float) -> None:
        """Leave the session in the shared store for a socket on another process to resume."""
        socket = self.socket
        state = {**self.handover_event(queued, dropped), "nonce": self.nonce}
        await socket.services.store.park(socket.channel_name, state, grace)
        socket.services.sessions.remove(socket.channel_name)
        logger.info(
            "session parked for another process",
            extra={
                "session": socket.channel_name,
                "user": socket.session.username,
                "grace_s": round(grace, 1),
                "calls": len(socket.table.calls),
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
                missed.append(protocol.call_rejected(call.peer_username, call.call_id, reason))
            else:
                missed.append(protocol.call_ended(call.peer_username, call.call_id, reason))
            continue
        # The peer may have moved too (both parties parked by one process): where it
        # is now is on the row, not in what this session last knew.
        if record.status == CallStatus.ANSWERED and call.is_caller:
            if not call.answered:
                missed.append(protocol.call_accepted(call.peer_username, call.call_id))
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
