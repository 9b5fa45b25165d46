"""The call service: what sessions ask of calls, and telling both parties what happened.

Sessions call it to start, answer, refuse and end calls; the reaper calls it to
end calls whose parties vanished. Every change goes through the store
(calls/callflow/store.py, on the database thread); the parties are then told
through a `Courier`, which the session registry (calls/realtime/sessions.py)
implements: the call flow never depends on how sessions are reached.
Ring timers live here too: one per call this process started, cancelled when
the call is answered or ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, Protocol

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from calls.callflow import store as call_store
from calls.callflow.limits import CallLimits
from calls.callflow.states import CallStatus, EndReason
from calls.callflow.store import Actor, CallRecord
from calls.wire import events

logger = logging.getLogger(__name__)

# Seconds between attempts to deliver a call's end while the channel layer is down.
DELIVERY_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
# A ring timer may fire a hair early against the deadline written with the call.
RING_DEADLINE_MARGIN = timedelta(milliseconds=50)


class Courier(Protocol):
    """How the call service reaches sessions, wherever they live."""

    async def send(self, channel: str, event: dict[str, Any]) -> None:
        """Send an event to one session."""

    async def send_to_user(self, username: str, event: dict[str, Any]) -> None:
        """Send an event to every session of a user."""


class Pusher(Protocol):
    """How the call service wakes a callee with no socket open (calls/push/sender.py)."""

    async def has_subscriptions(self, username: str) -> bool:
        """Whether a push can wake one of the user's devices."""

    def ring(self, record: CallRecord) -> None:
        """Push `incoming_call` to the callee's devices (in the background)."""

    def ring_ended(self, record: CallRecord, reason: str) -> None:
        """Push `call_ended` to the callee's devices: the pushed call stopped ringing."""


class CallService:
    """Start, answer, refuse and end calls, and tell the parties; one per process."""

    def __init__(self, courier: Courier, pusher: Pusher, track: Callable[[asyncio.Task], None]) -> None:
        self.courier = courier
        self.pusher = pusher
        self.track = track
        self.limits = CallLimits()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # --- What sessions ask ------------------------------------------------

    async def start(self, caller: Actor, caller_id: str, callee_username: str, *, push: bool = False) -> CallRecord:
        """Create a call and ring every session of the callee; a busy callee comes back as an ended record.

        With `push`, the callee has no socket open: its devices are woken by push too.
        """
        record: CallRecord = await database_sync_to_async(call_store.start_call)(
            caller, callee_username, settings.SIGNALING_RING_TIMEOUT, push
        )
        if record.end_reason == EndReason.BUSY:
            return record
        if record.pushed:
            self.pusher.ring(record)
        self._schedule_ring_timeout(record.call_id)
        incoming = events.call_incoming(record.call_id, caller.username, caller_id, caller.session)
        await self.courier.send_to_user(callee_username, incoming)
        return record

    async def accept(self, call_id: str, callee: Actor) -> CallRecord:
        """Answer a ringing call from one session; tell the caller, and the callee's other sessions."""
        record: CallRecord = await database_sync_to_async(call_store.accept_call)(call_id, callee)
        self.cancel_ring_timeout(call_id)
        if record.pushed:  # the callee's other devices stop ringing
            self.pusher.ring_ended(record, "answered_elsewhere")
        await self.courier.send(record.caller_channel, events.call_accepted(call_id, callee.username, callee.session))
        await self.courier.send_to_user(callee.username, events.call_answered_elsewhere(call_id, callee.session))
        return record

    async def end(self, call_id: str, reason: EndReason, actor: Actor) -> None:
        """A party hangs up or refuses: end the call and tell both parties."""
        record = await database_sync_to_async(call_store.end_call)(call_id, reason, actor, party=True)
        if record is not None:
            await self.notify_ended(record)

    async def end_calls_of(self, actor: Actor, went_offline: bool) -> None:
        """A session ended: end its calls (and the calls ringing for its user, if now offline)."""
        for record in await database_sync_to_async(call_store.end_calls_of_session)(actor, went_offline):
            await self.notify_ended(record)

    async def move_session(self, old: str, new: str, call_ids: Iterable[str]) -> dict[str, CallRecord]:
        """Point a resumed session's live calls at its new channel; return their state now."""
        return await database_sync_to_async(call_store.move_session)(old, new, list(call_ids))

    async def history(self, username: str, limit: int, session: str | None, since: datetime | None) -> list[dict]:
        return await database_sync_to_async(call_store.call_history)(username, limit, session, since)

    # --- What the reaper asks ---------------------------------------------

    async def end_calls_of_lost_sessions(self, sessions: list[Actor], online: set[str]) -> None:
        """Sessions whose process died: end their calls, and calls ringing for users now offline."""
        for record in await database_sync_to_async(call_store.end_calls_of_lost_sessions)(sessions, online):
            await self.notify_ended(record)

    async def end_overdue(self, now: datetime | None = None) -> None:
        """End every call that rang past its deadline."""
        for record in await database_sync_to_async(call_store.expire_overdue_calls)(now):
            await self.notify_ended(record)

    async def end_vanished(self, live_channels: set[str], online: list[str]) -> None:
        """End live calls whose caller, answering session or ringing callee is gone."""
        for record in await database_sync_to_async(call_store.end_calls_of_vanished)(live_channels, online):
            await self.notify_ended(record)

    # --- Ring timers --------------------------------------------------------

    def _schedule_ring_timeout(self, call_id: str) -> None:
        loop = asyncio.get_running_loop()
        self._timers[call_id] = loop.call_later(
            settings.SIGNALING_RING_TIMEOUT, lambda: self.track(loop.create_task(self._ring_timeout(call_id)))
        )

    def cancel_ring_timeout(self, call_id: str) -> None:
        timer = self._timers.pop(call_id, None)
        if timer is not None:
            timer.cancel()

    async def _ring_timeout(self, call_id: str) -> None:
        self._timers.pop(call_id, None)
        # Only a call still ringing times out: when the callee answered on another
        # process, this process's timer was not cancelled.
        await self.end_overdue(timezone.now() + RING_DEADLINE_MARGIN)

    def stop(self) -> None:
        """Cancel every ring timer (the deadlines stay on the call rows for the reaper)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # --- Telling the parties ----------------------------------------------

    async def notify_ended(self, record: CallRecord) -> None:
        """Tell both parties' sessions that a call ended.

        A session that already dropped the call (the one that ended it) ignores
        the event, so both sides can always be told.
        """
        self.cancel_ring_timeout(record.call_id)
        if record.pushed and record.status != CallStatus.COMPLETED:  # it ended while ringing
            self.pusher.ring_ended(record, record.end_reason)
        if record.status == CallStatus.REJECTED:
            caller_event = events.call_rejected(record.call_id, record.callee_username, record.end_reason)
        else:
            caller_event = events.call_ended(record.call_id, record.end_reason)
        await self._send_or_retry(lambda: self.courier.send(record.caller_channel, caller_event), record.call_id)
        callee_event = events.call_ended(record.call_id, record.end_reason)
        if record.callee_channel:
            await self._send_or_retry(lambda: self.courier.send(record.callee_channel, callee_event), record.call_id)
        else:
            callee = record.callee_username
            await self._send_or_retry(lambda: self.courier.send_to_user(callee, callee_event), record.call_id)

    async def _send_or_retry(self, send: Callable[[], Awaitable[None]], call_id: str) -> None:
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
