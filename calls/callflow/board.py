"""The call board: the one owner of every live call's state.

A live call (ringing or answered) lives here, not in the database: its status,
its parties, the session that answered it and its ring deadline. Every change
of a call's status is one transition of the board, decided atomically:
`MemoryCallBoard` (board_memory.py) on one process, `RedisCallBoard`
(board_redis.py) across processes, one Lua script per transition, so that of
two devices answering at once exactly one wins, and a busy, a cancel and a
timeout racing each other have one outcome. Each transition returns a
`Transition`, which the call service hands to the history writer
(calls/callflow/history.py): the database keeps the history, written behind.

Sessions keep a view of their calls (calls/realtime/call_table.py), changed
only by the events the call service sends after a transition; the ring timers
of calls/callflow/service.py are early wake-ups for a deadline kept here.

The rules both boards apply live in `decide_end` and `decide_accept` (and the
tables of calls/callflow/states.py they read); the Redis scripts are built from
the same tables.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from calls.callflow.states import END_STATUS, CallStatus, EndReason
from calls.wire import protocol
from calls.wire.errors import SignalingError
from calls.wire.text import username_key


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: a session (its channel, user and device), or the server (all empty)."""

    session: str = ""
    username: str = ""
    device: str = ""


SERVER = Actor()


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call as the board holds it (and as it ended, for a while after)."""

    call_id: str
    caller_username: str
    caller_id: str
    callee_username: str
    status: str
    end_reason: str | None
    caller_channel: str
    # The session that answered; empty while ringing (every session of the callee rings).
    callee_channel: str
    # Its callee's devices were woken by push (no socket was open).
    pushed: bool = False
    ring_deadline: datetime | None = None
    caller_device: str = ""
    callee_device: str = ""
    created_at: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None

    @property
    def live(self) -> bool:
        return self.status in (CallStatus.RINGING, CallStatus.ANSWERED)


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a call's status: the call after it, its status before ("" when created), who acted, when."""

    record: CallRecord
    old_status: str
    actor: Actor
    at: datetime


def new_call(
    caller: Actor, caller_id: str, callee_username: str, now: datetime, ring_seconds: float, pushed: bool = False
) -> CallRecord:
    """A call about to start: a fresh id, ringing until `ring_seconds` from `now`."""
    return CallRecord(
        call_id=str(uuid.uuid4()),
        caller_username=caller.username,
        caller_id=caller_id,
        callee_username=callee_username,
        status=CallStatus.RINGING,
        end_reason=None,
        caller_channel=caller.session,
        callee_channel="",
        pushed=pushed,
        ring_deadline=now + timedelta(seconds=ring_seconds),
        caller_device=caller.device,
        created_at=now,
    )


def busy(record: CallRecord) -> CallRecord:
    """A call refused at its start because its callee has a live call: ended, never rung, never pushed."""
    return replace(
        record,
        status=CallStatus.BUSY,
        end_reason=EndReason.BUSY,
        ring_deadline=None,
        ended_at=record.created_at,
        pushed=False,
    )


def not_ringing() -> SignalingError:
    return SignalingError(protocol.NOT_RINGING, "That call is not ringing for you")


def decide_accept(record: CallRecord, callee: Actor, now: datetime) -> CallRecord:
    """The call answered by `callee`'s session; raise NOT_RINGING unless it rings for that user."""
    if record.status != CallStatus.RINGING or username_key(record.callee_username) != username_key(callee.username):
        raise not_ringing()
    return replace(
        record,
        status=CallStatus.ANSWERED,
        callee_channel=callee.session,
        callee_device=callee.device,
        answered_at=now,
    )


def decide_end(record: CallRecord, reason: EndReason, actor: Actor, party: bool, now: datetime) -> CallRecord | None:
    """The call ended for `reason`, or None when that changes nothing.

    With `party`, the actor must be the caller or the callee (a hang-up or a
    rejection); otherwise the server ends it (a drop, a timeout). A hang-up
    before the answer is the caller cancelling, or the callee refusing.
    """
    if not record.live:
        return None
    by_caller = False
    if party:
        key = username_key(actor.username)
        by_caller = key == username_key(record.caller_username)
        if not by_caller and key != username_key(record.callee_username):
            return None
    if reason == EndReason.REJECTED and record.status != CallStatus.RINGING:
        raise not_ringing()
    if record.status == CallStatus.RINGING and reason == EndReason.HANGUP:
        reason = EndReason.CANCELLED if by_caller else EndReason.REJECTED
    new_status = END_STATUS.get((CallStatus(record.status), reason))
    if new_status is None:  # e.g. a ring timeout firing after the answer
        return None
    # Times are read before the atomic step: an answer decided a moment later on another
    # process must not end up after the end.
    ended_at = max(now, record.answered_at) if record.answered_at else now
    return replace(record, status=new_status, end_reason=reason, ended_at=ended_at)


class CallBoard(Protocol):
    """Where live calls live; every method is one atomic step."""

    async def start(self, record: CallRecord, caller_multi: bool, callee_multi: bool) -> CallRecord:
        """Add a ringing call; return it, or it ended busy when the callee has a live call.

        Raise ALREADY_IN_CALL when the caller has one. `*_multi`: that party may
        have several calls at once (SIGNALING_MULTI_CALL_USERS).
        """

    async def accept(self, call_id: str, callee: Actor, now: datetime) -> CallRecord:
        """Answer a ringing call from one session of its callee; the first one wins (NOT_RINGING for the others)."""

    async def end(self, call_id: str, reason: EndReason, actor: Actor, party: bool, now: datetime) -> CallRecord | None:
        """End a live call (see `decide_end`); None when it was not live or the end changes nothing."""

    async def get(self, call_ids: list[str]) -> dict[str, CallRecord]:
        """These calls as they are, live or ended lately (a while after their end); unknown ones are left out."""

    async def calls_of_session(self, session: str) -> list[str]:
        """The live calls this session made or answered."""

    async def ringing_for(self, username: str) -> list[CallRecord]:
        """The calls ringing for this user, oldest first (a device that registers rings for them too)."""

    async def move_session(self, old: str, new: str) -> None:
        """A resumed session's calls now reach it on its new channel."""

    async def overdue(self, now: datetime) -> list[str]:
        """The ringing calls whose deadline has passed."""

    async def live(self) -> list[CallRecord]:
        """Every live call."""

    async def renew(self, channels: list[str], ttl: float) -> None:
        """These sessions are alive: their calls stay for at least `ttl` seconds more (a shared board's expiry)."""

    async def restore(self, records: list[CallRecord]) -> int:
        """Write back calls the board lost (a Redis restart) from the sessions' views; return how many were missing."""

    async def clear(self) -> None:
        """Forget every call (tests)."""

    async def close(self) -> None:
        """Release connections."""
