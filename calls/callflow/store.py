"""Call persistence: every change of a call's status goes through `transition`.

Plain synchronous ORM code; the async side calls it through `database_sync_to_async`.
Each function returns plain `CallRecord`s so that callers never touch the ORM.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from calls.callflow.states import END_STATUS, LIVE_STATUSES, CallStatus, EndReason, check_transition
from calls.models import Call, CallEvent, SignalingUser
from calls.observability import metrics
from calls.wire import protocol
from calls.wire.errors import SignalingError

logger = logging.getLogger(__name__)

# Calls deleted per transaction by the retention job: short locks on a big table.
HISTORY_DELETE_BATCH = 1000


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What the async side needs to know about a call after a change."""

    call_id: str
    caller_username: str
    caller_id: str
    callee_username: str
    status: str
    end_reason: str | None
    caller_channel: str
    callee_channel: str
    # Its callee's devices were woken by push (no socket was open).
    pushed: bool = False
    ring_deadline: datetime | None = None

    @classmethod
    def of(cls, call: Call) -> CallRecord:
        return cls(
            call_id=str(call.id),
            caller_username=call.caller.username,
            caller_id=call.caller.user_id,
            callee_username=call.callee.username,
            status=call.status,
            end_reason=call.end_reason,
            caller_channel=call.caller_channel,
            callee_channel=call.callee_channel,
            pushed=call.pushed,
            ring_deadline=call.ring_deadline,
        )


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: a session (its channel, user and device), or the server (all empty)."""

    session: str = ""
    username: str = ""
    device: str = ""


SERVER = Actor()


def _record_event(call: Call, old: str, reason: str | None, actor: Actor) -> None:
    CallEvent.objects.create(
        call=call,
        old_status=old,
        new_status=call.status,
        reason=reason,
        session=actor.session,
        username=actor.username,
        device=actor.device,
    )


def _transition(call: Call, new: CallStatus, reason: EndReason | None, actor: Actor) -> None:
    """Apply one allowed transition to a row locked by the caller, and record it."""
    old = call.status
    check_transition(old, new, reason)
    now = timezone.now()
    call.status = new
    call.end_reason = reason
    if new == CallStatus.ANSWERED:
        call.answered_at = now
        call.callee_channel = actor.session
        call.callee_device = actor.device
    elif new not in LIVE_STATUSES:
        call.ended_at = now
    call.save(update_fields=["status", "end_reason", "answered_at", "ended_at", "callee_channel", "callee_device"])
    _record_event(call, old, reason, actor)
    transaction.on_commit(lambda: metrics.call_transition(new, reason))
    logger.info(
        "call transition",
        extra={
            "call": str(call.id),
            "old_status": old,
            "new_status": new,
            "reason": reason,
            "session": actor.session,
            "device": actor.device,
        },
    )


def _locked_live_call(call_id: str) -> Call | None:
    return (
        Call.objects.select_for_update()
        .select_related("caller", "callee")
        .filter(pk=call_id, status__in=LIVE_STATUSES)
        .first()
    )


def touch_users(users: dict[str, str]) -> dict[str, list[CallRecord]]:
    """Record that these users (username -> user_id) registered now, in one statement.

    Return the calls ringing for each of them (a device that registers rings for
    those too): one more query for the whole batch, not one per registration.
    """
    now = timezone.now()
    # One INSERT ... ON CONFLICT statement instead of a locked read and a write per user.
    # Rows in username order: two processes writing overlapping batches lock them in
    # the same order, so they cannot deadlock.
    SignalingUser.objects.bulk_create(
        [
            SignalingUser(username=username, user_id=users[username], first_seen=now, last_seen=now)
            for username in sorted(users)
        ],
        update_conflicts=True,
        unique_fields=["username"],
        update_fields=["user_id", "last_seen"],
    )
    ringing: dict[str, list[CallRecord]] = {username: [] for username in users}
    calls = (
        Call.objects.filter(status=CallStatus.RINGING, callee__username__in=list(users))
        .select_related("caller", "callee")
        .order_by("created_at")
    )
    for call in calls:
        ringing[call.callee.username].append(CallRecord.of(call))
    return ringing


def start_call(caller: Actor, callee_username: str, ring_timeout: float, pushed: bool = False) -> CallRecord:
    """Create a call: ringing, or busy when either party already has a live call.

    Both users' rows are locked in a fixed order, so two calls racing towards the
    same user are serialised and the second one sees the first.
    """
    now = timezone.now()
    caller_username = caller.username
    with transaction.atomic():
        users = {
            u.username: u
            for u in SignalingUser.objects.select_for_update()
            .filter(username__in=[caller_username, callee_username])
            .order_by("pk")
        }
        caller_row, callee = users[caller_username], users.get(callee_username)
        if callee is None:  # listed, but its registration has not reached the database yet
            raise SignalingError(protocol.USER_OFFLINE_CODE, f"{callee_username} is not online")
        multi = settings.SIGNALING_MULTI_CALL_USERS
        if caller_username not in multi and Call.objects.live().involving(caller_row).exists():
            raise SignalingError(protocol.ALREADY_IN_CALL, "You are already in a call; end it first")
        busy = callee_username not in multi and Call.objects.live().involving(callee).exists()
        call = Call.objects.create(
            caller=caller_row,
            callee=callee,
            status=CallStatus.BUSY if busy else CallStatus.RINGING,
            end_reason=EndReason.BUSY if busy else None,
            ended_at=now if busy else None,
            ring_deadline=None if busy else now + timedelta(seconds=ring_timeout),
            caller_channel=caller.session,
            caller_device=caller.device,
            pushed=pushed and not busy,
        )
        _record_event(call, "", call.end_reason, caller)
        status, reason = call.status, call.end_reason
        transaction.on_commit(lambda: metrics.call_transition(status, reason))
    logger.info(
        "call started",
        extra={
            "call": str(call.id),
            "caller": caller_username,
            "callee": callee_username,
            "status": call.status,
            "session": caller.session,
            "device": caller.device,
        },
    )
    return CallRecord.of(call)


def accept_call(call_id: str, callee: Actor) -> CallRecord:
    """Answer a ringing call from one of the callee's sessions; the first one wins."""
    with transaction.atomic():
        call = _locked_live_call(call_id)
        if call is None or call.callee.username != callee.username or call.status != CallStatus.RINGING:
            raise SignalingError(protocol.NOT_RINGING, "That call is not ringing for you")
        _transition(call, CallStatus.ANSWERED, None, callee)
        return CallRecord.of(call)


def end_call(call_id: str, reason: EndReason, actor: Actor = SERVER, *, party: bool = False) -> CallRecord | None:
    """End a live call for `reason`; None when it had already ended.

    With `party`, the actor must be the caller or the callee (a hang-up or a
    rejection); otherwise the server ends it (a drop, a timeout).
    """
    by_username = actor.username if party else None
    with transaction.atomic():
        call = _locked_live_call(call_id)
        if call is None:
            return None
        if by_username is not None and by_username not in (call.caller.username, call.callee.username):
            return None
        if reason == EndReason.REJECTED and call.status != CallStatus.RINGING:
            raise SignalingError(protocol.NOT_RINGING, "That call is not ringing for you")
        # A hang-up before the answer is the caller cancelling (or the callee refusing).
        if call.status == CallStatus.RINGING and reason == EndReason.HANGUP:
            by_caller = by_username == call.caller.username
            reason = EndReason.CANCELLED if by_caller else EndReason.REJECTED
        new_status = END_STATUS.get((CallStatus(call.status), reason))
        if new_status is None:  # e.g. a ring timeout firing after the answer
            return None
        _transition(call, new_status, reason, actor)
        return CallRecord.of(call)


def expire_overdue_calls(now: datetime | None = None) -> list[CallRecord]:
    """End every ringing call whose ring deadline has passed, with reason timeout."""
    now = now or timezone.now()
    overdue = Call.objects.filter(status=CallStatus.RINGING, ring_deadline__lte=now).values_list("pk", flat=True)
    ended = [end_call(str(pk), EndReason.TIMEOUT) for pk in list(overdue)]
    return [record for record in ended if record is not None]


def end_calls_of_vanished(live_channels: Iterable[str], online_usernames: Iterable[str]) -> list[CallRecord]:
    """End live calls whose caller session, answering session or ringing callee is gone.

    A pushed call rings a callee who is offline on purpose: it waits for a woken device.
    """
    live = set(live_channels)
    online = set(online_usernames)
    doomed = []
    for call in Call.objects.live().select_related("callee"):
        gone = call.caller_channel not in live or (
            call.callee_channel not in live
            if call.status == CallStatus.ANSWERED
            else call.callee.username not in online and not call.pushed
        )
        if gone:
            doomed.append(str(call.pk))
    ended = [end_call(pk, EndReason.DISCONNECTED) for pk in doomed]
    return [record for record in ended if record is not None]


def calls_of_session(session: str) -> list[str]:
    """Return the ids of live calls this session made or answered."""
    return [
        str(pk)
        for pk in Call.objects.live()
        .filter(Q(caller_channel=session) | Q(callee_channel=session))
        .values_list("pk", flat=True)
    ]


def move_session(old: str, new: str, call_ids: Iterable[str]) -> dict[str, CallRecord]:
    """Point the live calls of a resumed session at its new channel.

    Return the current state of the calls the session knew of (`call_ids`),
    which may have been answered or ended while it was away.
    """
    with transaction.atomic():
        Call.objects.live().filter(caller_channel=old).update(caller_channel=new)
        Call.objects.live().filter(callee_channel=old).update(callee_channel=new)
        calls = Call.objects.filter(pk__in=list(call_ids)).select_related("caller", "callee")
        return {str(call.id): CallRecord.of(call) for call in calls}


def end_calls_of_session(actor: Actor, went_offline: bool) -> list[CallRecord]:
    """End the calls a closed session held, and the calls ringing for its user if now offline."""
    call_ids = calls_of_session(actor.session)
    if went_offline:
        call_ids += ringing_calls_to(actor.username)
    ended = [end_call(call_id, EndReason.DISCONNECTED, actor) for call_id in dict.fromkeys(call_ids)]
    return [record for record in ended if record is not None]


def end_calls_of_lost_sessions(sessions: Iterable[Actor], online: set[str]) -> list[CallRecord]:
    """End the calls of sessions whose lease expired, and calls ringing for their users now offline."""
    ended = []
    for session in sessions:
        ended += end_calls_of_session(session, went_offline=session.username not in online)
    return ended


def ringing_calls_to(username: str) -> list[str]:
    """Return the ids of calls ringing for `username` that need a session of it (not pushed ones)."""
    ringing = Call.objects.filter(status=CallStatus.RINGING, callee__username=username, pushed=False)
    return [str(pk) for pk in ringing.values_list("pk", flat=True)]


def call_history(username: str, limit: int, session: str | None = None, since: datetime | None = None) -> list[dict]:
    """Return the user's calls, newest first, as wire dictionaries.

    With `session`, only the calls that session took part in: those it made,
    answered or acted on, and those to its user since `since` (when it
    registered). Open mode asks this way, since nothing proves that one who
    registers a name now is the one who used it before.
    """
    if session is None:
        mine = Q(caller__username=username) | Q(callee__username=username)
    else:
        acted = CallEvent.objects.filter(session=session).values("call_id")
        mine = Q(caller_channel=session) | Q(callee_channel=session) | Q(pk__in=acted)
        if since is not None:
            mine |= Q(callee__username=username, created_at__gte=since)
    calls = Call.objects.filter(mine).select_related("caller", "callee").order_by("-created_at")[:limit]
    return [_history_item(call) for call in calls]


def delete_history_before(cutoff: datetime) -> int:
    """Delete ended calls (and their events) started before `cutoff`; return how many calls."""
    deleted = 0
    while True:
        batch = list(
            Call.objects.filter(created_at__lt=cutoff)
            .exclude(status__in=LIVE_STATUSES)
            .values_list("pk", flat=True)[:HISTORY_DELETE_BATCH]
        )
        if not batch:
            return deleted
        with transaction.atomic():
            CallEvent.objects.filter(call_id__in=batch).delete()
            Call.objects.filter(pk__in=batch).delete()
        deleted += len(batch)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _history_item(call: Call) -> dict:
    duration = call.duration
    return {
        "call_id": str(call.id),
        "caller_username": call.caller.username,
        "callee_username": call.callee.username,
        "status": call.status,
        "end_reason": call.end_reason,
        "started_at": _iso(call.created_at),
        "answered_at": _iso(call.answered_at),
        "ended_at": _iso(call.ended_at),
        "duration_s": round(duration.total_seconds(), 3) if duration is not None else None,
        "caller_device_id": call.caller_device or None,
        "callee_device_id": call.callee_device or None,
    }
