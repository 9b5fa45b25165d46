"""The per-process side of the server: presence, ring timers and the reaper.

One `Runtime` exists per event loop (one per daphne process). It starts on the
first connection and runs three background jobs: a listener for presence
changes made by other processes, lease renewal for this process's sessions,
and a reaper that ends overdue and orphaned calls. Call-event delivery over
the channel layer is here too, so the consumer and the reaper notify parties
the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from calls import lifecycle
from calls.lifecycle import CallRecord
from calls.presence import MemoryPresenceStore, PresenceHub, PresenceStore
from calls.states import CallStatus

if TYPE_CHECKING:
    from calls.consumers import SignalingConsumer

logger = logging.getLogger(__name__)

PRESENCE_GROUP = "presence"


def user_group(username: str) -> str:
    """Return the channel-layer group of a user's sessions (safe for any username)."""
    return "user." + hashlib.sha256(username.encode()).hexdigest()[:40]


def make_store() -> PresenceStore:
    if settings.REDIS_URL:
        from calls.presence_redis import RedisPresenceStore

        return RedisPresenceStore(settings.REDIS_URL)
    return MemoryPresenceStore()


class Runtime:
    """Process-wide state and background jobs, bound to one event loop."""

    _instances: dict[asyncio.AbstractEventLoop, Runtime] = {}

    def __init__(self) -> None:
        self.process_id = uuid.uuid4().hex[:12]
        self.layer = get_channel_layer()
        self.store = make_store()
        self.hub = PresenceHub(self.store, settings.SIGNALING_PRESENCE_WINDOW_MS / 1000)
        self.sessions: dict[str, SignalingConsumer] = {}
        self._tasks: list[asyncio.Task] = []
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._started = False
        self._process_channel = ""

    @classmethod
    def current(cls) -> Runtime:
        """Return this event loop's runtime, creating it on first use."""
        loop = asyncio.get_running_loop()
        runtime = cls._instances.get(loop)
        if runtime is None:
            for old in [other for other in cls._instances if other.is_closed()]:
                del cls._instances[old]
            runtime = cls._instances[loop] = cls()
        return runtime

    async def start(self) -> None:
        """Start the background jobs once."""
        if self._started:
            return
        self._started = True
        self._process_channel = await self.layer.new_channel(prefix=f"process.{self.process_id}.")
        await self.layer.group_add(PRESENCE_GROUP, self._process_channel)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen_for_presence()),
            loop.create_task(self._renew_leases()),
            loop.create_task(self._reap()),
        ]
        logger.info("runtime %s started (pid %s)", self.process_id, os.getpid())

    async def stop(self) -> None:
        """Cancel the background jobs (tests and shutdown)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for timer in self._timers.values():
            timer.cancel()
        self._tasks, self._timers, self._started = [], {}, False

    # --- Presence ------------------------------------------------------

    async def presence_changed(self) -> None:
        """Broadcast soon here, and tell the other processes to do the same."""
        self.hub.changed()
        await self.layer.group_send(PRESENCE_GROUP, {"type": "presence.changed", "origin": self.process_id})

    async def _listen_for_presence(self) -> None:
        while True:
            try:
                event = await self.layer.receive(self._process_channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("runtime %s: presence listener failed; retrying", self.process_id)
                await asyncio.sleep(1)
                continue
            if event.get("type") == "presence.changed" and event.get("origin") != self.process_id:
                self.hub.changed()

    async def _renew_leases(self) -> None:
        ttl = settings.SIGNALING_PRESENCE_TTL
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                await self.store.renew(list(self.sessions), ttl)
            except Exception:
                logger.exception("runtime %s: lease renewal failed", self.process_id)

    # --- Calls ---------------------------------------------------------

    def schedule_ring_timeout(self, call_id: str) -> None:
        """Expire the call when its ring timeout passes, unless it changed first."""
        loop = asyncio.get_running_loop()
        self._timers[call_id] = loop.call_later(
            settings.SIGNALING_RING_TIMEOUT, lambda: loop.create_task(self._ring_timeout(call_id))
        )

    def cancel_ring_timeout(self, call_id: str) -> None:
        timer = self._timers.pop(call_id, None)
        if timer is not None:
            timer.cancel()

    async def _ring_timeout(self, call_id: str) -> None:
        self._timers.pop(call_id, None)
        record = await database_sync_to_async(lifecycle.end_call)(call_id, lifecycle.EndReason.TIMEOUT, "")
        if record is not None:
            await self.notify_call_ended(record)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(settings.SIGNALING_REAPER_INTERVAL)
            try:
                await self.reap_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("runtime %s: reaper failed", self.process_id)

    async def reap_once(self) -> None:
        """Expire dead leases, then end overdue calls and calls whose party vanished."""
        expired = await self.store.expire()
        if expired:
            logger.info("runtime %s: %d session lease(s) expired", self.process_id, len(expired))
            await self.presence_changed()
        ended = await database_sync_to_async(lifecycle.expire_overdue_calls)()
        live = await self.store.live_channels()
        online = [user["username"] for user in await self.store.online_users()]
        ended += await database_sync_to_async(lifecycle.end_calls_of_vanished)(live, online)
        for record in ended:
            await self.notify_call_ended(record)

    async def notify_call_ended(self, record: CallRecord) -> None:
        """Tell both parties' sessions that a call ended.

        A session that already dropped the call (the one that ended it) ignores
        the event, so both sides can always be told.
        """
        self.cancel_ring_timeout(record.call_id)
        if record.status == CallStatus.REJECTED:
            await self.send_to_session(
                record.caller_channel,
                {
                    "type": "call.rejected",
                    "call_id": record.call_id,
                    "rejecter_username": record.callee_username,
                    "reason": record.end_reason,
                },
            )
        else:
            await self.send_to_session(
                record.caller_channel, {"type": "call.ended", "call_id": record.call_id, "reason": record.end_reason}
            )
        callee_event = {"type": "call.ended", "call_id": record.call_id, "reason": record.end_reason}
        if record.callee_channel:
            await self.send_to_session(record.callee_channel, callee_event)
        else:
            await self.layer.group_send(user_group(record.callee_username), callee_event)

    async def send_to_session(self, channel: str, event: dict[str, Any]) -> None:
        """Send a layer event to one session's channel (through the layer, to keep order)."""
        if channel:
            await self.layer.send(channel, event)
