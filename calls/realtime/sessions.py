"""Which sockets and sessions live on this process, and the one way to send a session an event.

`SessionRegistry` is the only owner of that state: consumers add and remove
themselves through it, the lease keeper renews what it lists, the drain closes
what it holds. `send` is the one path for an event to one session: straight
into its inbox when it lives here (cheaper than a Redis round trip, and in
order with every other event sent to it from here), else through the channel
layer. `send_to_user` reaches every session of a user through its group.

`Services` is what a session needs from its process (calls/process/runtime.py
provides it): the consumer depends on this shape, never on the runtime itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Protocol

from calls.callflow.live import LiveCall
from calls.callflow.service import CallService
from calls.callflow.users import UserRows
from calls.observability import metrics
from calls.presence.base import PresenceStore, SessionInfo
from calls.presence.hub import PresenceHub
from calls.push.sender import PushSender
from calls.realtime.groups import user_group
from calls.realtime.limits import ConnectionLimits
from calls.wire import events

logger = logging.getLogger(__name__)

# Seconds a session has to answer a liveness probe (a WebSocket ping), and the margin
# for the answer to come back over the channel layer from another process.
PROBE_TIMEOUT = 2.0
PROBE_REPLY_MARGIN = 1.5


class Session(Protocol):
    """A socket's consumer as the registry, the lease keeper and the drain see it."""

    channel_name: str
    # None until it registers (and after it ended or moved).
    session: SessionInfo | None
    # How it follows presence: "full" (v1 lists), "delta" or "watch" (calls/presence/hub.py),
    # and the users it watches.
    presence_mode: str
    watching: tuple[str, ...]

    def enqueue(self, event: dict[str, Any]) -> bool:
        """Queue an event for the consumer; False when its inbox is full."""

    def post(self, event: dict[str, Any]) -> None:
        """Queue an event that must not be lost: behind the others if its inbox is full."""

    async def send_text(self, text: str) -> None:
        """Send a frame to the client."""

    def live_calls(self) -> list[LiveCall]:
        """The session's view of its calls (written back to a call board that lost them)."""

    async def send_error(self, code: str, message: str) -> None:
        """Send an error to the client."""

    async def close(self, code: int | None = None) -> None:
        """Close the socket with `code`."""


class Services(Protocol):
    """What a session needs from the process it lives in."""

    sessions: SessionRegistry
    store: PresenceStore
    calls: CallService
    push: PushSender
    users: UserRows
    limits: ConnectionLimits
    lease_seconds: float

    async def start(self) -> None:
        """Start the process's background jobs (once)."""

    async def presence_changed(self) -> None:
        """Broadcast the online list soon, here and on the other processes."""

    def track(self, task: asyncio.Task) -> None:
        """Keep a background task until it ends, and log its failure."""


# Seconds between two warnings of relayed signals lost (during a Redis outage, every signal is).
RELAY_FAILURE_LOG_INTERVAL = 10.0
_relay_failures = {"count": 0, "logged_at": float("-inf")}


def _log_relay_failure(sent: asyncio.Future[None]) -> None:
    if sent.cancelled() or sent.exception() is None:
        return
    _relay_failures["count"] += 1
    now = time.monotonic()
    if now - _relay_failures["logged_at"] >= RELAY_FAILURE_LOG_INTERVAL:
        logger.warning(
            "relayed signals not sent", extra={"count": _relay_failures["count"], "error": repr(sent.exception())}
        )
        _relay_failures.update(count=0, logged_at=now)


class SessionRegistry:
    """The sockets and sessions of this process, and delivery to any session."""

    def __init__(self, layer: Any, hub: PresenceHub) -> None:
        self.layer = layer
        # The layer's way to queue a message without waiting for it (calls/realtime/redis_layer.py), if it has one.
        self._send_soon = getattr(layer, "send_soon", None)
        self.hub = hub
        # Where liveness probes are answered: this process's own channel (set at start).
        self.reply_channel = ""
        # Set when the process shuts down: new sockets are closed at once.
        self.draining = False
        self._sessions: dict[str, Session] = {}
        self._sockets: dict[Session, asyncio.Task] = {}
        self._probes: dict[str, asyncio.Future] = {}

    # --- Sockets: every live consumer, registered or not ----------------

    def socket_opened(self, consumer: Session, task: asyncio.Task) -> None:
        self._sockets[consumer] = task

    def socket_closed(self, consumer: Session) -> None:
        self._sockets.pop(consumer, None)

    def sockets(self) -> dict[Session, asyncio.Task]:
        """Every live consumer of this process and the task running it."""
        return dict(self._sockets)

    # --- Sessions: registered, listed, renewed ---------------------------

    def add(self, consumer: Session) -> None:
        """A session registered (or was taken over) here: list it, renew it, reach it."""
        self._sessions[consumer.channel_name] = consumer
        metrics.session_registered()

    def listen(self, consumer: Session) -> None:
        """Send the session presence from the next broadcast on (after its `registered`)."""
        self.hub.listen(consumer.channel_name, consumer.send_text, consumer.presence_mode, consumer.watching)

    def socket_lost(self, channel: str) -> None:
        """The session's socket is gone but the session is held (for a resume): no more presence."""
        self.hub.unlisten(channel)

    def remove(self, channel: str) -> None:
        """The session ended here (or moved to another socket)."""
        self.hub.unlisten(channel)
        if self._sessions.pop(channel, None) is not None:
            metrics.session_closed()

    def get(self, channel: str) -> Session | None:
        return self._sessions.get(channel)

    def channels(self) -> list[str]:
        return list(self._sessions)

    def consumers(self) -> list[Session]:
        return list(self._sessions.values())

    def __contains__(self, channel: str) -> bool:
        return channel in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    # --- Delivery ---------------------------------------------------------

    async def send(self, channel: str, event: dict[str, Any]) -> None:
        """Send an event to one session: into its inbox when it lives here, else through the layer."""
        if not channel:
            return
        local = self._sessions.get(channel)
        if local is None or not local.enqueue(event):
            await self.layer.send(channel, event)

    async def relay(self, channel: str, event: dict[str, Any]) -> None:
        """Send a relayed signal to one session without waiting for Redis to take it.

        A layer that can queue (calls/realtime/redis_layer.py `send_soon`) keeps
        the order of everything sent from here; a failure is logged, as the
        signal is lost like a packet (the call's end, sent with `send`, is retried).
        """
        local = self._sessions.get(channel)
        if local is not None and local.enqueue(event):
            return
        if self._send_soon is None:
            await self.layer.send(channel, event)
            return
        self._send_soon(channel, event).add_done_callback(_log_relay_failure)

    async def send_to_user(self, username: str, event: dict[str, Any]) -> None:
        """Send an event to every session of a user, on every process."""
        await self.layer.group_send(user_group(username), event)

    # --- Liveness probes --------------------------------------------------

    async def probe(self, channels: list[str]) -> list[str]:
        """Ask sessions, wherever they live, whether their client still answers; return the gone ones.

        Each holder pings its socket (the consumer's `session_probe`); one that
        does not answer within PROBE_TIMEOUT ends as a dropped socket does and
        answers "gone". A session whose process does not answer at all (dead,
        its lease not yet run out) counts as gone too.
        """
        loop = asyncio.get_running_loop()
        asked: dict[str, tuple[str, asyncio.Future]] = {}
        for channel in channels:
            token = uuid.uuid4().hex
            self._probes[token] = answered = loop.create_future()
            asked[channel] = (token, answered)
            try:
                await self.send(channel, events.session_probe(token, self.reply_channel))
            except Exception as exc:  # noqa: BLE001 - the layer's errors depend on its backend
                logger.warning("session probe not sent", extra={"session": channel, "error": repr(exc)})
        try:
            if asked:
                await asyncio.wait(
                    [answered for _, answered in asked.values()], timeout=PROBE_TIMEOUT + PROBE_REPLY_MARGIN
                )
        finally:
            for token, _ in asked.values():
                self._probes.pop(token, None)
        return [channel for channel, (_, alive) in asked.items() if not (alive.done() and alive.result())]

    async def answer_probe(self, reply_to: str, token: str, alive: bool) -> None:
        """Answer a liveness probe from `reply_to` (a process channel)."""
        if reply_to == self.reply_channel:
            self.probe_answered(token, alive)
        else:
            await self.layer.send(reply_to, events.session_probe_reply(token, alive))

    def probe_answered(self, token: str, alive: bool) -> None:
        waiting = self._probes.get(token)
        if waiting is not None and not waiting.done():
            waiting.set_result(alive)
