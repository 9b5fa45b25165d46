"""Coalesced broadcasts of who is online to this process's sessions.

Changes anywhere mark the hub dirty, and at most once per window it reads the
list once, encodes it once, and sends it to every local session (full list for
v1 clients, deltas for clients that asked for them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from calls.observability import metrics
from calls.presence.base import PresenceStore
from calls.wire import protocol

# After a broadcast, the next one waits at least this many times as long as the
# After a broadcast, the next one waits at least this many times as long as the
# broadcast took to build and hand to the sockets. The sockets' writes come after
# and cost about as much again, so while changes keep coming broadcasting takes
# about half of the process's time at most, however many sessions listen.
BROADCAST_BACKOFF = 3.0

logger = logging.getLogger(__name__)


SendText = Callable[[str], Awaitable[None]]


@dataclass(slots=True)
class _Listener:
    send: SendText
    delta: bool
    needs_snapshot: bool = True


@dataclass
class PresenceHub:
    """Coalesce presence changes and send the list to this process's sessions."""

    store: PresenceStore
    window: float
    _listeners: dict[str, _Listener] = field(default_factory=dict)
    _snapshot: dict[str, str] = field(default_factory=dict)
    _flush_task: asyncio.Task | None = None
    _dirty: bool = False

    def listen(self, channel: str, send: SendText, delta: bool) -> None:
        """Send presence to this session from the next broadcast on (a full list first)."""
        self._listeners[channel] = _Listener(send, delta)
        self.changed()

    def unlisten(self, channel: str) -> None:
        self._listeners.pop(channel, None)

    def changed(self) -> None:
        """Note that the list may have changed; a broadcast follows within the window."""
        self._dirty = True
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_soon())

    async def flush_now(self) -> None:
        """Broadcast at once if anything changed (tests and shutdown)."""
        if self._dirty:
            await self._broadcast()

    async def _flush_soon(self) -> None:
        while self._dirty:
            await asyncio.sleep(self.window)
            started = time.monotonic()
            try:
                await self._broadcast()
            except Exception:
                logger.exception("presence broadcast failed; retrying next window")
                self._dirty = True
                await asyncio.sleep(1)
                continue
            # A broadcast to many sessions is costly: a sign-in storm must not turn
            # into back-to-back lists.
            await asyncio.sleep(BROADCAST_BACKOFF * (time.monotonic() - started))

    async def _broadcast(self) -> None:
        self._dirty = False
        users = await self.store.online_users()
        metrics.online_users(len(users))
        current = {user["username"]: user["user_id"] for user in users}
        full_text = protocol.encode(protocol.online_users(users))
        deltas = [
            protocol.encode(protocol.user_offline(name, uid))
            for name, uid in self._snapshot.items()
            if current.get(name) != uid
        ] + [
            protocol.encode(protocol.user_online(name, uid))
            for name, uid in current.items()
            if self._snapshot.get(name) != uid
        ]
        self._snapshot = current
        for channel, listener in list(self._listeners.items()):
            try:
                if not listener.delta or listener.needs_snapshot:
                    listener.needs_snapshot = False
                    await listener.send(full_text)
                else:
                    for text in deltas:
                        await listener.send(text)
            except Exception as exc:  # noqa: BLE001 - one socket's failure is not the others'
                # A socket that went away mid-broadcast: its disconnect is on its way.
                logger.info("presence not sent to one session", extra={"session": channel, "error": repr(exc)})
