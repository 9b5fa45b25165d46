"""Call history in the database: the rows the history writer writes, and what reads them.

Plain synchronous ORM code; the async side calls it through `database_sync_to_async`.
Live calls are not decided here: the call board (board.py) owns them, and
every transition it makes reaches `write_history` in a batch (history.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.db import connection, models, transaction
from django.db.models import Q
from django.utils import timezone

from calls.callflow.board import CallRecord, Transition
from calls.callflow.states import END_STATUS, LIVE_STATUSES, CallStatus, EndReason
from calls.models import Call, CallEvent, SignalingUser

logger = logging.getLogger(__name__)

# Calls deleted per transaction by the retention job: short locks on a big table.
HISTORY_DELETE_BATCH = 1000


# Status order: a row is only ever moved forward (writers of two processes may commit out of order).
_RANK = {CallStatus.RINGING: 0, CallStatus.ANSWERED: 1}
_CALL_FIELDS = [
    "status",
    "end_reason",
    "answered_at",
    "ended_at",
    "ring_deadline",
    "caller_channel",
    "callee_channel",
    "caller_device",
    "callee_device",
    "pushed",
]


def _rank(status: str) -> int:
    return _RANK.get(status, 2)


def touch_users(users: dict[str, str]) -> None:
    """Record that these users (username -> user_id) registered now, in one statement."""
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


def _user_rows(transitions: list[Transition]) -> dict[str, int]:
    """The user rows of every party, by username; a party never registered here gets one."""
    known_ids: dict[str, str] = {}
    for transition in transitions:
        record = transition.record
        known_ids.setdefault(record.callee_username, "")
        known_ids[record.caller_username] = record.caller_id or known_ids.get(record.caller_username, "")
    rows = dict(SignalingUser.objects.filter(username__in=list(known_ids)).values_list("username", "pk"))
    missing = sorted(set(known_ids) - set(rows))
    if missing:
        now = timezone.now()
        SignalingUser.objects.bulk_create(
            [SignalingUser(username=name, user_id=known_ids[name], first_seen=now, last_seen=now) for name in missing],
            ignore_conflicts=True,
        )
        rows.update(SignalingUser.objects.filter(username__in=missing).values_list("username", "pk"))
    return rows


_CALL_COLUMNS = ["id", "caller", "callee", "created_at", *_CALL_FIELDS]
_EVENT_COLUMNS = ["call", "old_status", "new_status", "reason", "session", "username", "device", "at"]


def _call_values(record: CallRecord, users: dict[str, int]) -> tuple:
    return (
        record.call_id,
        users[record.caller_username],
        users[record.callee_username],
        record.created_at,
        record.status,
        record.end_reason,
        record.answered_at,
        record.ended_at,
        record.ring_deadline,
        record.caller_channel,
        record.callee_channel,
        record.caller_device,
        record.callee_device,
        record.pushed,
    )


def _event_values(transition: Transition) -> tuple:
    record, actor = transition.record, transition.actor
    return (
        record.call_id,
        transition.old_status,
        record.status,
        record.end_reason,
        actor.session,
        actor.username,
        actor.device,
        transition.at,
    )


# Columns whose Python values the database drivers take as they are.
_PLAIN = {"CharField", "TextField", "BooleanField", "BigAutoField", "AutoField", "IntegerField", "BigIntegerField"}


def _preparer(field: models.Field) -> Callable[[Any], Any] | None:
    """How a value of `field` becomes a query parameter (None: as it is)."""
    kind = (field.target_field if field.is_relation else field).get_internal_type()
    if kind in _PLAIN:
        return None
    if kind == "DateTimeField":
        return connection.ops.adapt_datetimefield_value
    return lambda value: field.get_db_prep_save(value, connection)


def _insert(model: type[models.Model], columns: list[str], rows: list[tuple], *, skip_existing: bool = False) -> None:
    """INSERT rows with one `executemany`; with `skip_existing`, rows whose primary key exists are left out.

    The ORM's `bulk_create` builds a model and compiles each field of each row:
    most of a history batch's cost, on the thread the event loop shares the GIL with.
    Values are prepared as the model's fields would prepare them.
    """
    if not rows:
        return
    meta = model._meta
    fields = [meta.get_field(name) for name in columns]
    quote = connection.ops.quote_name
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(field.column) for field in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))})"
    )
    if skip_existing:
        sql += f" ON CONFLICT ({quote(meta.pk.column)}) DO NOTHING"
    prepare = [_preparer(field) for field in fields]
    prepared = [
        tuple(value if to_db is None else to_db(value) for to_db, value in zip(prepare, row, strict=True))
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, prepared)


# A row moved forward to a later status (`_move_forward`): what the record decides, and
# what the row keeps when it knew it first. A call written back after a Redis restart
# (board.py `restore`) knows only what its sessions knew: not when it started or was
# answered, nor on which devices. Sessions that resumed moved to new channels: the
# record knows where they are now.
_FORWARD = """
UPDATE {table} SET
    status = %s, end_reason = %s, ended_at = %s,
    answered_at = COALESCE(answered_at, %s),
    ring_deadline = COALESCE(ring_deadline, %s),
    caller_device = CASE WHEN caller_device = '' THEN %s ELSE caller_device END,
    callee_device = CASE WHEN callee_device = '' THEN %s ELSE callee_device END,
    caller_channel = CASE WHEN %s = '' THEN caller_channel ELSE %s END,
    callee_channel = CASE WHEN %s = '' THEN callee_channel ELSE %s END,
    pushed = pushed OR %s
WHERE id = %s AND (CASE status WHEN 'ringing' THEN 0 WHEN 'answered' THEN 1 ELSE 2 END) < %s
"""


def _move_forward(records: list[CallRecord]) -> None:
    """Bring rows written earlier (by this process or another) up to these records, never back."""
    fields = Call._meta
    when = connection.ops.adapt_datetimefield_value
    call_id = fields.pk
    params = [
        (
            record.status,
            record.end_reason,
            when(record.ended_at),
            when(record.answered_at),
            when(record.ring_deadline),
            record.caller_device,
            record.callee_device,
            record.caller_channel,
            record.caller_channel,
            record.callee_channel,
            record.callee_channel,
            record.pushed,
            call_id.get_db_prep_save(record.call_id, connection),
            _rank(record.status),
        )
        for record in records
        if _rank(record.status) > 0
    ]
    if params:
        with connection.cursor() as cursor:
            cursor.executemany(_FORWARD.format(table=connection.ops.quote_name(fields.db_table)), params)


def write_history(transitions: list[Transition]) -> None:
    """Write a batch of call transitions: each call's row as it is now, and one event per transition.

    A call's row may be written first by another process (the callee answered
    there, and that process wrote first): rows are inserted when missing, and
    otherwise only moved forward (ringing, answered, ended), never back.
    """
    latest: dict[str, CallRecord] = {}
    for transition in transitions:
        record, known = transition.record, latest.get(transition.record.call_id)
        # The furthest state of each call in the batch: two steps of one call may have
        # been queued in another order than the board made them.
        if known is None or _rank(record.status) >= _rank(known.status):
            latest[record.call_id] = record
    # In call id order: two processes writing batches that share calls lock their rows in
    # the same order, so they cannot deadlock.
    records = [latest[call_id] for call_id in sorted(latest)]
    with transaction.atomic():
        users = _user_rows(transitions)
        _insert(Call, _CALL_COLUMNS, [_call_values(record, users) for record in records], skip_existing=True)
        # Rows just inserted are as their records: only rows written before move.
        _move_forward(records)
        _insert(CallEvent, _EVENT_COLUMNS, [_event_values(transition) for transition in transitions])


def live_rows(before: datetime) -> list[str]:
    """The ids of calls live in the database that started before `before`."""
    return [str(pk) for pk in Call.objects.live().filter(created_at__lt=before).values_list("pk", flat=True)]


def end_orphans(call_ids: list[str]) -> int:
    """End call rows still live in the database though no board holds them (their process was killed).

    They end as a lost party ends them: a ringing call failed, an answered one
    completed, both `disconnected`, at the time of this sweep.
    """
    now = timezone.now()
    ended = 0
    with transaction.atomic():
        for call in Call.objects.select_for_update().filter(pk__in=call_ids, status__in=LIVE_STATUSES):
            old = call.status
            reason = EndReason.DISCONNECTED
            call.status = END_STATUS[(CallStatus(old), reason)]
            call.end_reason, call.ended_at = reason, now
            call.save(update_fields=["status", "end_reason", "ended_at"])
            CallEvent.objects.create(call=call, old_status=old, new_status=call.status, reason=reason, at=now)
            ended += 1
    if ended:
        logger.warning("calls left live by a lost process ended", extra={"calls": ended})
    return ended


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
