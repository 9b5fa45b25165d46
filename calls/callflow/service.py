"""The call service: what sessions ask of calls, and telling both parties what happened.

Sessions call it to start, answer, refuse and end calls; the reaper calls it to
end calls whose parties vanished. Every change is one transition of the call
board (calls/callflow/board.py), the one owner of live calls, in memory or in
Redis; the transition then goes to the history writer (history.py), which
writes it to the database behind the call. The parties are told through a
`Courier`, which the session registry (calls/realtime/sessions.py)
implements: the call flow never depends on how sessions are reached.
Ring timers live here too: an early wake-up, on the process that started the
call, for a deadline the board keeps (the reaper ends the calls of a process
that died).
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
from calls.callflow.board import SERVER, Actor, CallBoard, CallRecord, Transition, new_call
from calls.callflow.history import FLUSH_TIMEOUT, HistoryWriter
from calls.callflow.limits import CallLimits
from calls.callflow.live import LiveCall
from calls.callflow.states import CallStatus, EndReason
from calls.observability import metrics
from calls.wire import events

logger = logging.getLogger(__name__)

# Seconds between attempts to deliver a call's end while the channel layer is down.
DELIVERY_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
# A ring timer may fire a hair early against the deadline kept by the board.
RING_DEADLINE_MARGIN = timedelta(milliseconds=50)
# How long a call row may be live in the database and on no board before the reaper ends it:
# longer than the history writer takes to write an end decided elsewhere.
ORPHAN_GRACE = timedelta(seconds=3)


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

    def __init__(
        self,
        board: CallBoard,
        history: HistoryWriter,
        courier: Courier,
        pusher: Pusher,
        track: Callable[[asyncio.Task], None],
    ) -> None:
        self.board = board
        self.history = history
        self.courier = courier
        self.pusher = pusher
        self.track = track
        self.limits = CallLimits()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Call rows live in the database and on no board, with when this process first saw each.
        self._suspects: dict[str, float] = {}

    # --- What sessions ask ------------------------------------------------

    async def start(self, caller: Actor, caller_id: str, callee_username: str, *, push: bool = False) -> CallRecord:
        """Create a call and ring every session of the callee; a busy callee comes back as an ended record.

        With `push`, the callee has no socket open: its devices are woken by push too.
        """
        now = timezone.now()
        multi = settings.SIGNALING_MULTI_CALL_USERS
        ringing = new_call(caller, caller_id, callee_username, now, settings.SIGNALING_RING_TIMEOUT, pushed=push)
        record = await self.board.start(ringing, caller.username in multi, callee_username in multi)
        self._record(record, "", caller, now)
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
        now = timezone.now()
        record = await self.board.accept(call_id, callee, now)
        self._record(record, CallStatus.RINGING, callee, now)
        self.cancel_ring_timeout(call_id)
        if record.pushed:  # the callee's other devices stop ringing
            self.pusher.ring_ended(record, "answered_elsewhere")
        await self.courier.send(record.caller_channel, events.call_accepted(call_id, callee.username, callee.session))
        await self.courier.send_to_user(callee.username, events.call_answered_elsewhere(call_id, callee.session))
        return record

    async def end(self, call_id: str, reason: EndReason, actor: Actor) -> CallRecord | None:
        """A party hangs up or refuses: end the call and tell both parties; None if it was not live."""
        record = await self._end(call_id, reason, actor, party=True)
        if record is not None:
            await self.notify_ended(record, ended_by=actor.session)
        return record

    async def end_calls_of(self, actor: Actor, went_offline: bool) -> None:
        """A session ended: end its calls (and the calls ringing for its user, if now offline)."""
        call_ids = await self.board.calls_of_session(actor.session)
        if went_offline:  # calls that need a session of it (a pushed call waits for a woken device)
            call_ids += [record.call_id for record in await self.board.ringing_for(actor.username) if not record.pushed]
        for call_id in dict.fromkeys(call_ids):
            record = await self._end(call_id, EndReason.DISCONNECTED, actor)
            if record is not None:
                await self.notify_ended(record)

    async def ringing_for(self, username: str) -> list[CallRecord]:
        """The calls ringing for a user (a device that registers rings for them too)."""
        return await self.board.ringing_for(username)

    async def move_session(self, old: str, new: str, call_ids: Iterable[str]) -> dict[str, CallRecord]:
        """Point a resumed session's live calls at its new channel; return their state now (ended ones too)."""
        await self.board.move_session(old, new)
        return await self.board.get(list(call_ids))

    async def restore(self, session: Actor, calls: Iterable[LiveCall]) -> int:
        """Write a session's calls back to a board that lost them (a Redis restart), from the session's view."""
        now = timezone.now()
        deadline = now + timedelta(seconds=settings.SIGNALING_RING_TIMEOUT)
        records = []
        for call in calls:
            mine, theirs = (session.username, session.session), (call.peer_username, call.peer_channel)
            (caller, caller_channel), (callee, callee_channel) = (mine, theirs) if call.is_caller else (theirs, mine)
            records.append(
                CallRecord(
                    call_id=call.call_id,
                    caller_username=caller,
                    caller_id=call.caller_id,
                    callee_username=callee,
                    status=CallStatus.ANSWERED if call.answered else CallStatus.RINGING,
                    end_reason=None,
                    caller_channel=caller_channel,
                    # Before the answer, every session of the callee rings.
                    callee_channel=callee_channel if call.answered else "",
                    pushed=call.pushed,
                    ring_deadline=None if call.answered else deadline,
                    answered_at=now if call.answered else None,
                    created_at=now,
                )
            )
        return await self.board.restore(records)

    async def history_of(self, username: str, limit: int, session: str | None, since: datetime | None) -> list[dict]:
        """A user's call history, newest first; what this process has queued is written first."""
        await self.history.flush(timeout=FLUSH_TIMEOUT)
        return await database_sync_to_async(call_store.call_history)(username, limit, session, since)

    # --- What the reaper asks ---------------------------------------------

    async def end_calls_of_lost_sessions(self, sessions: list[Actor], online: set[str]) -> None:
        """Sessions whose process died: end their calls, and calls ringing for users now offline."""
        for session in sessions:
            await self.end_calls_of(session, went_offline=session.username not in online)

    async def end_overdue(self, now: datetime | None = None) -> None:
        """End every call that rang past its deadline."""
        for call_id in await self.board.overdue(now or timezone.now()):
            record = await self._end(call_id, EndReason.TIMEOUT, SERVER)
            if record is not None:
                await self.notify_ended(record)

    async def end_vanished(self, live_channels: set[str], online: list[str]) -> None:
        """End live calls whose caller, answering session or ringing callee is gone.

        A pushed call rings a callee who is offline on purpose: it waits for a woken device.
        """
        present = set(online)
        for call in await self.board.live():
            gone = call.caller_channel not in live_channels or (
                call.callee_channel not in live_channels
                if call.status == CallStatus.ANSWERED
                else call.callee_username not in present and not call.pushed
            )
            if gone:
                record = await self._end(call.call_id, EndReason.DISCONNECTED, SERVER)
                if record is not None:
                    await self.notify_ended(record)

    async def end_orphan_rows(self) -> None:
        """End call rows live in the database that no board holds any more.

        Their process was killed before its history writer wrote their end (or
        the whole Redis was lost). A row counts only once it has been seen so
        for ORPHAN_GRACE: an end decided on another process may still be on its
        way to the database.
        """
        if not await self.history.flush(timeout=FLUSH_TIMEOUT):
            return  # the database is behind: these rows' ends may be among what is queued
        rows = await database_sync_to_async(call_store.live_rows)(timezone.now() - ORPHAN_GRACE)
        held = await self.board.get(rows)
        orphans = {call_id for call_id in rows if call_id not in held or not held[call_id].live}
        now = asyncio.get_running_loop().time()
        self._suspects = {call_id: self._suspects.get(call_id, now) for call_id in orphans}
        due = [call_id for call_id, since in self._suspects.items() if now - since >= ORPHAN_GRACE.total_seconds()]
        if not due:
            return
        # The board still knows how those it holds ended: write that end, not a made-up one.
        known = [held[call_id] for call_id in due if call_id in held]
        if known:
            ended = [
                Transition(record, _before_end(record), SERVER, record.ended_at or timezone.now()) for record in known
            ]
            await database_sync_to_async(call_store.write_history)(ended)
        lost = [call_id for call_id in due if call_id not in held]
        if lost:
            await database_sync_to_async(call_store.end_orphans)(lost)
        for call_id in due:
            del self._suspects[call_id]

    # --- Transitions --------------------------------------------------------

    async def _end(self, call_id: str, reason: EndReason, actor: Actor, *, party: bool = False) -> CallRecord | None:
        now = timezone.now()
        record = await self.board.end(call_id, reason, actor, party, now)
        if record is not None:
            self._record(record, _before_end(record), actor, now)
        return record

    def _record(self, record: CallRecord, old: str, actor: Actor, at: datetime) -> None:
        """Queue a transition for the history, count it, and log it."""
        self.history.add(Transition(record, old, actor, at))
        metrics.call_transition(record.status, record.end_reason)
        parties = {"caller": record.caller_username, "callee": record.callee_username} if not old else {}
        logger.info(
            "call started" if not old else "call transition",
            extra={
                "call": record.call_id,
                **parties,
                "old_status": old,
                "new_status": record.status,
                "reason": record.end_reason,
                "session": actor.session,
                "device": actor.device,
            },
        )

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
        """Cancel every ring timer (the deadlines stay on the board, for the reaper)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # --- Telling the parties ----------------------------------------------

    async def notify_ended(self, record: CallRecord, ended_by: str = "") -> None:
        """Tell both parties' sessions that a call ended.

        `ended_by`: the session that ended it, which already dropped the call and
        is not told. Any other session that already dropped it ignores the event.
        """
        self.cancel_ring_timeout(record.call_id)
        if record.pushed and record.status != CallStatus.COMPLETED:  # it ended while ringing
            self.pusher.ring_ended(record, record.end_reason)
        if record.status == CallStatus.REJECTED:
            caller_event = events.call_rejected(record.call_id, record.callee_username, record.end_reason)
        else:
            caller_event = events.call_ended(record.call_id, record.end_reason)
        if record.caller_channel != ended_by:
            await self._send_or_retry(lambda: self.courier.send(record.caller_channel, caller_event), record.call_id)
        callee_event = events.call_ended(record.call_id, record.end_reason)
        if record.callee_channel:
            if record.callee_channel != ended_by:
                await self._send_or_retry(
                    lambda: self.courier.send(record.callee_channel, callee_event), record.call_id
                )
        else:  # it rang: every session of the callee, the one that refused it too
            callee = record.callee_username
            await self._send_or_retry(lambda: self.courier.send_to_user(callee, callee_event), record.call_id)

    async def _send_or_retry(self, send: Callable[[], Awaitable[None]], call_id: str) -> None:
        """Send a call's end; while the layer is down (Redis restarting) keep trying in the background.

        The call has already ended on the board: a party that is never told
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


def _before_end(record: CallRecord) -> str:
    """The status an ended call had before its end."""
    return CallStatus.ANSWERED if record.answered_at is not None else CallStatus.RINGING
