"""The per-process side of the server: presence, ring timers and the reaper.

One `Runtime` exists per event loop (one per daphne process). It starts on the
first connection and runs four background jobs: a listener for presence
changes made by other processes, lease renewal for this process's sessions, a
watch on the presence store that restores this process's state after Redis
lost it (a restart), and a reaper that expires the leases of dead processes and
ends overdue and orphaned calls. Lease renewal and the store watch are
`LeaseKeeper` (calls/leases.py), which `Runtime` inherits. Call-event delivery
over the channel layer is here too, so the consumer and the reaper notify
parties the same way.

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
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from calls import lifecycle
from calls.groups import PRESENCE_GROUP, user_group
from calls.leases import STORE_WATCH_INTERVAL, LeaseKeeper
from calls.lifecycle import CallRecord
from calls.limits import CallLimits, ConnectionLimits
from calls.presence import MemoryPresenceStore, PresenceHub, PresenceStore, SessionInfo, StoreUnavailable
from calls.states import CallStatus, EndReason

if TYPE_CHECKING:
    from calls.consumers import SignalingConsumer

logger = logging.getLogger(__name__)

# Seconds between attempts to deliver a call's end while the channel layer is down.
DELIVERY_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
RING_DEADLINE_MARGIN = timedelta(milliseconds=50)
# Seconds a session has to answer a liveness probe (a WebSocket ping), and the margin
# for the answer to come back over the channel layer from another process.
PROBE_TIMEOUT = 2.0
PROBE_REPLY_MARGIN = 1.5
# Seconds between runs of the history retention job (SIGNALING_HISTORY_DAYS).
RETENTION_INTERVAL = 3600.0


class UserRows:
    """Write the user rows of registrations, many in one statement when they come at once.

    Each registration waits for its row (a caller on another process must find
    it). Registrations that arrive while a write is under way share the next
    one: a sign-in storm costs a statement per batch, not per user, while a lone
    registration is written at once.
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple[str, list[asyncio.Future]]] = {}
        self._writer: asyncio.Task | None = None

    async def touch(self, username: str, user_id: str) -> None:
        loop = asyncio.get_running_loop()
        written = loop.create_future()
        _, waiting = self._pending.get(username, ("", []))
        self._pending[username] = (user_id, [*waiting, written])
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write())
        await written

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                await database_sync_to_async(lifecycle.touch_users)({name: uid for name, (uid, _) in batch.items()})
            except Exception as exc:  # noqa: BLE001 - handed to every registration in the batch
                outcome: BaseException | None = exc
            else:
                outcome = None
            for _, waiting in batch.values():
                for written in waiting:
                    if written.done():
                        continue
                    if outcome is None:
                        written.set_result(None)
                    else:
                        written.set_exception(outcome)


def make_store() -> PresenceStore:
    if settings.REDIS_URL:
        from calls.presence_redis import RedisPresenceStore

        return RedisPresenceStore(settings.REDIS_URL)
    return MemoryPresenceStore()


class Runtime(LeaseKeeper):
    """Process-wide state and background jobs, bound to one event loop."""

    _instances: dict[asyncio.AbstractEventLoop, Runtime] = {}

    def __init__(self) -> None:
        self.process_id = uuid.uuid4().hex[:12]
        self.layer = get_channel_layer()
        self.store = make_store()
        self.hub = PresenceHub(self.store, settings.SIGNALING_PRESENCE_WINDOW_MS / 1000)
        self.sessions: dict[str, SignalingConsumer] = {}
        self.users = UserRows()
        self.limits = ConnectionLimits()
        self.call_limits = CallLimits()
        # Liveness probes of sessions this process is waiting on, by token.
        self._session_probes: dict[str, asyncio.Future] = {}
        # Every live consumer of this loop (registered or not) and the task running it.
        self.consumers: dict[SignalingConsumer, asyncio.Task] = {}
        self.draining = False
        ttl = settings.SIGNALING_PRESENCE_TTL
        # How long a session's presence lease lasts: renewals come every ttl/4, so
        # a renewal may be late by 5ttl/12 before a live session lapses.
        self.lease_seconds = ttl * 2 / 3
        self._renew_interval = ttl / 4
        self._sweep_interval = min(settings.SIGNALING_REAPER_INTERVAL, ttl / 3)
        self._watch_interval = min(STORE_WATCH_INTERVAL, ttl / 4)
        self._tasks: list[asyncio.Task] = []
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._start_lock = asyncio.Lock()
        self._started = False
        self._process_channel = ""
        self._epoch: str | None = None
        self._store_down = False
        # After the store lost its data, other processes need a lease period to
        # write their sessions back; until then a missing session is not a dead one.
        self._vanished_hold_until = 0.0
        self._announce_task: asyncio.Task | None = None
        self._announce_pending = False
        self._probes: dict[str, asyncio.Future] = {}
        # Tasks started in the background (deliveries retried, drains, clean-ups).
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
            self._process_channel = channel
            try:
                self._epoch = await self.store.epoch()
            except StoreUnavailable:
                self._epoch = None
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._listen_for_presence()),
                loop.create_task(self._every(self._renew_interval, self._renew_leases, "lease renewal failed")),
                loop.create_task(
                    self._every(self._watch_interval, self._check_store, "restoring state after a Redis restart failed")
                ),
                loop.create_task(self._every(self._sweep_interval, self.reap_once, "reaper failed")),
                loop.create_task(self._every(RETENTION_INTERVAL, self.trim_history, "history retention failed")),
            ]
            self._started = True
        logger.info("runtime started", extra={"runtime": self.process_id, "pid": os.getpid()})

    async def stop(self) -> None:
        """Cancel the background jobs (tests and shutdown)."""
        tasks = [*self._tasks, *self._background, *([self._announce_task] if self._announce_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for timer in self._timers.values():
            timer.cancel()
        with contextlib.suppress(Exception):
            await self.store.close()
        self._tasks, self._timers, self._started, self._announce_task = [], {}, False, None

    async def drain(self, timeout: float) -> None:
        """Shut down gracefully: every socket is closed with 1012 (reconnect elsewhere).

        With a shared store, a session that can resume is parked for the resume
        grace, calls and all, for a socket on another process to take over;
        other sessions end as if their socket dropped.
        """
        self.draining = True
        carry = self.store.shared and settings.SIGNALING_RESUME_GRACE > 0
        consumers = dict(self.consumers)
        logger.info(
            "runtime draining",
            extra={"runtime": self.process_id, "connections": len(consumers), "carry_calls": carry},
        )
        for consumer in consumers:
            consumer.post({"type": "server.drain", "carry": carry})
        if consumers:
            # Whatever is still running after the timeout, daphne cancels next.
            _, late = await asyncio.wait(consumers.values(), timeout=timeout)
            if late:
                logger.warning(
                    "connections did not close in time", extra={"runtime": self.process_id, "count": len(late)}
                )
        # Other processes must hear of the users who went offline.
        if self._announce_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._announce_task, timeout=max(1.0, 4 * self.hub.window))
        await self.stop()
        logger.info("runtime drained", extra={"runtime": self.process_id})

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

    async def _announce(self) -> None:
        failing = False
        while self._announce_pending:
            self._announce_pending = False
            try:
                await self.layer.group_send(PRESENCE_GROUP, {"type": "presence.changed", "origin": self.process_id})
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

    async def _listen_for_presence(self) -> None:
        failing = False
        while True:
            try:
                event = await self.layer.receive(self._process_channel)
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
            if event.get("type") == "presence.changed" and event.get("origin") != self.process_id:
                self.hub.changed()
            elif event.get("type") == "session.probe_reply":
                self._probe_answered(event.get("token", ""), bool(event.get("alive")))
            elif event.get("type") == "runtime.probe":
                arrived = self._probes.get(event.get("token", ""))
                if arrived is not None and not arrived.done():
                    arrived.set_result(None)

    # --- Liveness of sessions -----------------------------------------

    async def probe_sessions(self, channels: list[str]) -> list[str]:
        """Ask sessions, wherever they live, whether their client still answers; return the gone ones.

        Each holder pings its socket (`SignalingConsumer.session_probe`); one that
        does not answer within PROBE_TIMEOUT ends as a dropped socket does and
        answers "gone". A session whose process does not answer at all (dead,
        its lease not yet run out) counts as gone too.
        """
        loop = asyncio.get_running_loop()
        asked: dict[str, asyncio.Future] = {}
        for channel in channels:
            token = uuid.uuid4().hex
            asked[channel] = self._session_probes[token] = loop.create_future()
            event = {"type": "session.probe", "token": token, "reply_to": self._process_channel}
            try:
                await self.send_to_session(channel, event)
            except Exception as exc:  # noqa: BLE001 - the layer's errors depend on its backend
                logger.warning("session probe not sent", extra={"session": channel, "error": repr(exc)})
        try:
            if asked:
                await asyncio.wait(asked.values(), timeout=PROBE_TIMEOUT + PROBE_REPLY_MARGIN)
        finally:
            for token in [t for t, future in self._session_probes.items() if future in asked.values()]:
                del self._session_probes[token]
        return [channel for channel, alive in asked.items() if not (alive.done() and alive.result())]

    async def answer_probe(self, reply_to: str, token: str, alive: bool) -> None:
        """Answer a liveness probe from `reply_to` (a process channel)."""
        if reply_to == self._process_channel:
            self._probe_answered(token, alive)
        else:
            await self.layer.send(reply_to, {"type": "session.probe_reply", "token": token, "alive": alive})

    def _probe_answered(self, token: str, alive: bool) -> None:
        waiting = self._session_probes.get(token)
        if waiting is not None and not waiting.done():
            waiting.set_result(alive)

    # --- History --------------------------------------------------------

    async def trim_history(self) -> None:
        """Delete call history older than SIGNALING_HISTORY_DAYS (0 keeps it all)."""
        days = settings.SIGNALING_HISTORY_DAYS
        if not days:
            return
        deleted = await database_sync_to_async(lifecycle.delete_history_before)(timezone.now() - timedelta(days=days))
        if deleted:
            logger.info("old call history deleted", extra={"runtime": self.process_id, "calls": deleted, "days": days})

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
        # Only a call still ringing times out: when the callee answered on another
        # process, this process's timer was not cancelled. The margin covers a timer
        # that fires a hair early against the deadline written with the call.
        now = timezone.now() + RING_DEADLINE_MARGIN
        for record in await database_sync_to_async(lifecycle.expire_overdue_calls)(now):
            await self.notify_call_ended(record)

    async def reap_once(self) -> None:
        """Expire dead leases and end their calls, then end overdue calls and calls whose party vanished."""
        ended = []
        expired = await self.store.expire()
        if expired:
            logger.info("session leases expired", extra={"runtime": self.process_id, "count": len(expired)})
            online = {user["username"] for user in await self.store.online_users()}
            ended += await database_sync_to_async(_end_calls_of_lost_sessions)(expired, online)
            await self.presence_changed()
        ended += await database_sync_to_async(lifecycle.expire_overdue_calls)()
        if asyncio.get_running_loop().time() >= self._vanished_hold_until and await self._store_unchanged():
            # This process's own sessions are alive whatever the store says.
            live = await self.store.live_channels() | set(self.sessions)
            online = [user["username"] for user in await self.store.online_users()]
            # A store that restarted between the two checks holds a partial picture.
            if await self._store_unchanged():
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
            caller_event = {
                "type": "call.rejected",
                "call_id": record.call_id,
                "rejecter_username": record.callee_username,
                "reason": record.end_reason,
            }
        else:
            caller_event = {"type": "call.ended", "call_id": record.call_id, "reason": record.end_reason}
        await self._deliver(lambda: self.send_to_session(record.caller_channel, caller_event), record.call_id)
        callee_event = {"type": "call.ended", "call_id": record.call_id, "reason": record.end_reason}
        if record.callee_channel:
            await self._deliver(lambda: self.send_to_session(record.callee_channel, callee_event), record.call_id)
        else:
            group = user_group(record.callee_username)
            await self._deliver(lambda: self.layer.group_send(group, callee_event), record.call_id)

    async def _deliver(self, send: Callable[[], Awaitable[None]], call_id: str) -> None:
        """Send a call's end; while the layer is down (Redis restarting) keep trying in the background.

        The call has already ended in the database: a party that is never told
        would sit in a dead call.
        """
        try:
            await send()
        except Exception as exc:  # noqa: BLE001 - the layer's errors depend on its backend
            logger.warning("call end not delivered; retrying", extra={"call": call_id, "error": repr(exc)})
            self.track(asyncio.get_running_loop().create_task(self._retry_delivery(send, call_id)))

    async def _retry_delivery(self, send: Callable[[], Awaitable[None]], call_id: str) -> None:
        for delay in DELIVERY_RETRY_DELAYS:
            await asyncio.sleep(delay)
            try:
                await send()
                return
            except Exception:  # noqa: BLE001, S112 - tried again after the next delay
                continue
        logger.error(
            "gave up delivering a call end", extra={"call": call_id, "attempts": len(DELIVERY_RETRY_DELAYS) + 1}
        )

    async def send_to_session(self, channel: str, event: dict[str, Any]) -> None:
        """Send an event to one session: into its inbox when it is on this process, else through the layer.

        Every point-to-point event from this process to a local session takes the
        same path, so they arrive in the order sent. Group sends (to every device
        of a user) always go through the layer.
        """
        if not channel:
            return
        local = self.sessions.get(channel)
        if local is None or not local.deliver(event):
            await self.layer.send(channel, event)

    def track(self, task: asyncio.Task) -> None:
        """Keep a background task referenced until it ends, and log its failure."""
        self._background.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception(), extra={"runtime": self.process_id})


def _end_calls_of_lost_sessions(sessions: list[SessionInfo], online: set[str]) -> list[CallRecord]:
    """End the calls of sessions whose lease expired, and calls ringing for users now offline."""
    ended = []
    for session in sessions:
        call_ids = lifecycle.calls_of_session(session.channel)
        if session.username not in online:
            call_ids += lifecycle.ringing_calls_to(session.username)
        for call_id in dict.fromkeys(call_ids):
            actor = lifecycle.Actor(session.channel, session.username)
            record = lifecycle.end_call(call_id, EndReason.DISCONNECTED, actor)
            if record is not None:
                ended.append(record)
    return ended
