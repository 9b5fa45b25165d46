"""The per-process side of the server: the parts wired together, and their background jobs.

One `Runtime` exists per event loop (one per daphne process). It builds the
parts (presence store and hub, session registry, call service, user rows,
connection limits), hands them to each consumer as its `Services`
(calls/realtime/sessions.py), and starts on the first connection six jobs: a
listener on this process's own channel (presence changes made by other
processes, probe answers), lease renewal and a watch on the presence store
(`LeaseKeeper`, calls/process/leases.py), the reaper and its sweep of call rows
left live (calls/process/reaper.py), and history retention.

Timing, from SIGNALING_PRESENCE_TTL (T): a lease lasts 2T/3 and is renewed
every T/4; the reaper sweeps at least every T/3. A process that dies stops
renewing, so its sessions' leases run out within 2T/3 and the next sweep of any
other process (within T/3) removes them: they leave the list within T.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from datetime import timedelta

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from calls.callflow import store as call_store
from calls.callflow.board import CallBoard
from calls.callflow.board_memory import MemoryCallBoard
from calls.callflow.history import HistoryWriter
from calls.callflow.service import CallService
from calls.callflow.users import UserRows
from calls.presence.base import PresenceStore
from calls.presence.hub import PresenceHub
from calls.presence.memory import MemoryPresenceStore
from calls.process.leases import STORE_WATCH_INTERVAL, LeaseKeeper
from calls.process.reaper import Reaper
from calls.push.sender import PushSender, providers_from_settings
from calls.realtime.groups import PRESENCE_GROUP
from calls.realtime.limits import ConnectionLimits
from calls.realtime.sessions import SessionRegistry
from calls.wire import events

logger = logging.getLogger(__name__)

# Seconds between runs of the history retention job (SIGNALING_HISTORY_DAYS).
RETENTION_INTERVAL = 3600.0


def make_store() -> PresenceStore:
    if settings.REDIS_URL:
        from calls.presence.redis import RedisPresenceStore

        return RedisPresenceStore(settings.REDIS_URL)
    return MemoryPresenceStore()


def make_board() -> CallBoard:
    """The call board: in Redis when the processes share one, else in this process's memory."""
    # An ended call stays readable for a session that resumes after it ended.
    keep_ended = settings.SIGNALING_RESUME_GRACE + 30
    if settings.REDIS_URL:
        from calls.callflow.board_redis import RedisCallBoard

        # A live call's key outlives its sessions' leases; renewals extend it (LeaseKeeper).
        ttl = settings.SIGNALING_PRESENCE_TTL
        live_ttl = max(3 * ttl, settings.SIGNALING_RING_TIMEOUT + ttl)
        return RedisCallBoard(settings.REDIS_URL, live_ttl=live_ttl, keep_ended=keep_ended)
    return MemoryCallBoard(keep_ended=keep_ended)


class Runtime:
    """Process-wide parts and background jobs, bound to one event loop; the `Services` of its consumers."""

    _instances: dict[asyncio.AbstractEventLoop, Runtime] = {}

    def __init__(self) -> None:
        self.process_id = uuid.uuid4().hex[:12]
        self.layer = get_channel_layer()
        self.store = make_store()
        self.hub = PresenceHub(self.store, settings.SIGNALING_PRESENCE_WINDOW_MS / 1000)
        self.sessions = SessionRegistry(self.layer, self.hub)
        self.push = PushSender(providers_from_settings(), self.track)
        self.board = make_board()
        self.history = HistoryWriter(settings.SIGNALING_HISTORY_DELAY_MS / 1000)
        self.calls = CallService(self.board, self.history, self.sessions, self.push, self.track)
        self.users = UserRows()
        self.limits = ConnectionLimits()
        ttl = settings.SIGNALING_PRESENCE_TTL
        # How long a session's presence lease lasts: renewals come every ttl/4, so
        # a renewal may be late by 5ttl/12 before a live session lapses.
        self.lease_seconds = ttl * 2 / 3
        self._renew_interval = ttl / 4
        self._sweep_interval = min(settings.SIGNALING_REAPER_INTERVAL, ttl / 3)
        self._watch_interval = min(STORE_WATCH_INTERVAL, ttl / 4)
        self.leases = LeaseKeeper(
            self.store,
            self.layer,
            self.sessions,
            self.calls,
            self.lease_seconds,
            self.presence_changed,
            self.process_id,
        )
        self.reaper = Reaper(self.store, self.sessions, self.calls, self.leases, self.presence_changed, self.process_id)
        self.process_channel = ""
        self._tasks: list[asyncio.Task] = []
        self._start_lock = asyncio.Lock()
        self._started = False
        self._announce_task: asyncio.Task | None = None
        self._announce_pending = False
        # Tasks started in the background (deliveries retried, probes, clean-ups).
        self._background: set[asyncio.Task] = set()

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

    @classmethod
    def of_loop(cls, loop: asyncio.AbstractEventLoop) -> Runtime | None:
        """Return the runtime of `loop`, if it has one."""
        return cls._instances.get(loop)

    async def start(self) -> None:
        """Start the background jobs once; a failed start (Redis down) is tried again next time."""
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            # The default prefix matters for the core layer: its process-local channels
            # share one Redis list per prefix, popped by one receiver at a time, so a
            # channel with a prefix of its own would starve every consumer in turn.
            channel = await self.layer.new_channel()
            await self.layer.group_add(PRESENCE_GROUP, channel)
            self.process_channel = self.sessions.reply_channel = channel
            await self.leases.start()
            loop, every = asyncio.get_running_loop(), self.leases.every
            self._tasks = [
                loop.create_task(self._listen()),
                loop.create_task(every(self._renew_interval, self.leases.renew, "lease renewal failed")),
                loop.create_task(
                    every(self._watch_interval, self._check_store, "restoring state after a Redis restart failed")
                ),
                loop.create_task(every(self._sweep_interval, self.reaper.reap_once, "reaper failed")),
                loop.create_task(every(self._sweep_interval, self.reaper.end_orphans, "orphan sweep failed")),
                loop.create_task(every(RETENTION_INTERVAL, self.trim_history, "history retention failed")),
            ]
            self._started = True
        logger.info("runtime started", extra={"runtime": self.process_id, "pid": os.getpid()})

    async def _check_store(self) -> None:
        await self.leases.check_store(self.process_channel)

    async def stop(self) -> None:
        """Cancel the background jobs (tests and shutdown)."""
        tasks = [*self._tasks, *self._background, *([self._announce_task] if self._announce_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.calls.stop()
        # The history queued so far is written before the process goes (a graceful shutdown).
        await self.history.stop()
        with contextlib.suppress(Exception):
            await self.board.close()
        with contextlib.suppress(Exception):
            await self.store.close()
        with contextlib.suppress(Exception):
            await self.push.close()
        self._tasks, self._started, self._announce_task = [], False, None

    def track(self, task: asyncio.Task) -> None:
        """Keep a background task referenced until it ends, and log its failure."""
        self._background.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception(), extra={"runtime": self.process_id})

    # --- Presence ------------------------------------------------------

    async def presence_changed(self) -> None:
        """Broadcast soon here, and tell the other processes to do the same.

        The other processes are told at once, then at most once per presence
        window however many changes follow: a sign-in storm costs each process
        one message per window, not one per sign-in.
        """
        self.hub.changed()
        self._announce_pending = True
        if self._announce_task is None or self._announce_task.done():
            self._announce_task = asyncio.get_running_loop().create_task(self._announce())

    async def announced(self, timeout: float) -> None:
        """Wait (at most `timeout`) until the other processes have been told of the last change."""
        if self._announce_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._announce_task, timeout=timeout)

    async def _announce(self) -> None:
        failing = False
        while self._announce_pending:
            self._announce_pending = False
            try:
                await self.layer.group_send(PRESENCE_GROUP, events.presence_changed(self.process_id))
                failing = False
            except Exception as exc:  # noqa: BLE001 - the layer's errors depend on its backend
                if not failing:
                    logger.warning(
                        "presence change not announced; retrying",
                        extra={"runtime": self.process_id, "error": repr(exc)},
                    )
                failing = True
                # Until it gets through, the other processes' lists miss this change.
                self._announce_pending = True
                await asyncio.sleep(STORE_WATCH_INTERVAL / 2)
            await asyncio.sleep(self.hub.window)

    async def _listen(self) -> None:
        """Read this process's own channel: other processes' presence changes, probe answers."""
        failing = False
        while True:
            try:
                event = await self.layer.receive(self.process_channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the layer's errors depend on its backend
                if not failing:
                    logger.warning(
                        "presence listener failed; retrying", extra={"runtime": self.process_id, "error": repr(exc)}
                    )
                failing = True
                await asyncio.sleep(1)
                continue
            failing = False
            kind = event.get("type")
            if kind == events.PRESENCE_CHANGED and event.get("origin") != self.process_id:
                self.hub.changed()
            elif kind == events.SESSION_PROBE_REPLY:
                self.sessions.probe_answered(event.get("token", ""), bool(event.get("alive")))
            elif kind == events.RUNTIME_PROBE:
                self.leases.layer_probe_arrived(event.get("token", ""))

    # --- History --------------------------------------------------------

    async def trim_history(self) -> None:
        """Delete call history older than SIGNALING_HISTORY_DAYS (0 keeps it all)."""
        days = settings.SIGNALING_HISTORY_DAYS
        if not days:
            return
        deleted = await database_sync_to_async(call_store.delete_history_before)(timezone.now() - timedelta(days=days))
        if deleted:
            logger.info("old call history deleted", extra={"runtime": self.process_id, "calls": deleted, "days": days})
