"""The figures of the calls dashboard: each one aggregate query, read from one index.

Plain synchronous ORM code, as calls/callflow/store.py; the admin's dashboard runs it
in a thread. Every query reads `calls_call` through a range of `created_at` on the
index (created_at, status, end_reason, answered_at) and touches no other column, so
the database answers from the index alone (an index-only scan on PostgreSQL, a
covering index on SQLite): a million rows take a fraction of a second. Counts
therefore count `status`, never the primary key, which is not in the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from django.db.models import Count, F, FloatField, Func, Max, Min, Q, QuerySet, Value, Window
from django.db.models.functions import CumeDist

from calls.callflow.states import LIVE_STATUSES, CallStatus
from calls.models import Call, SignalingUser

# A call that was answered is answered or completed, whatever ended it: counted from
# `status` alone (which is in the index), not from `answered_at`.
ANSWERED = Q(status__in=[CallStatus.ANSWERED, CallStatus.COMPLETED])


class Seconds(Func):
    """The seconds from one time column to another, as a float: sortable, and cheap on both databases.

    Django's `F(end) - F(start)` calls a Python function for every row on SQLite: sorting
    a million calls by it takes 2.4 s, against 0.3 s with SQLite's own julianday().
    A julianday is a double: to about 50 microseconds, finer than anything shown.
    """

    output_field = FloatField()

    def __init__(self, end: str, start: str) -> None:
        super().__init__(F(end), F(start))

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        template = "((julianday(%(expressions)s)) * 86400.0)"
        return self.as_sql(compiler, connection, template=template, arg_joiner=") - julianday(", **extra)

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        template = "CAST(EXTRACT(EPOCH FROM (%(expressions)s)) AS double precision)"
        return self.as_sql(compiler, connection, template=template, arg_joiner=" - ", **extra)


def time_to_answer() -> Seconds:
    """Seconds from a call's start to its answer (None if it was not answered)."""
    return Seconds("answered_at", "created_at")


def talk_time() -> Seconds:
    """Seconds from a call's answer to its end (None while in progress or if never answered)."""
    return Seconds("ended_at", "answered_at")


@dataclass(frozen=True, slots=True)
class Bucket:
    """The calls started in [start, end), and how many of them were answered."""

    start: datetime
    end: datetime
    calls: int
    answered: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """How many calls of a window are in one status, with one end reason (None: still live)."""

    status: str
    end_reason: str | None
    calls: int


@dataclass(frozen=True, slots=True)
class AnswerTimes:
    """Time to answer over the answered calls of a window; None when none was answered."""

    answered: int
    median: timedelta | None
    p90: timedelta | None


def hour_bounds(now: datetime, hours: int = 24) -> list[datetime]:
    """The starts of the last `hours` whole hours (the current one last) and the end of the current one."""
    current = now.replace(minute=0, second=0, microsecond=0)
    return [current - timedelta(hours=hours - 1 - i) for i in range(hours + 1)]


def day_bounds(now: datetime, days: int = 30) -> list[datetime]:
    """The midnights starting the last `days` days (today last) and the one ending today, in `now`'s time zone."""
    # Built from dates, not by adding 24 h: a day with a clock change is 23 or 25 hours long.
    today = now.date()
    return [datetime.combine(today + timedelta(days=i - days + 1), time.min, now.tzinfo) for i in range(days + 1)]


def _started(since: datetime, until: datetime) -> QuerySet:
    # Bounded on both sides: with an open range SQLite's planner, lacking statistics,
    # may read the whole (status, ring_deadline) index instead.
    return Call.objects.filter(created_at__gte=since, created_at__lt=until).order_by()


def calls_by_bucket(bounds: list[datetime]) -> list[Bucket]:
    """Calls and answered calls started between each pair of consecutive bounds.

    One statement: a UNION ALL of one counting SELECT per bucket, each an index range.
    Grouping by an expression of `created_at` (TruncHour, TruncDay) would be one
    SELECT, but costs a function call per row (a Python one on SQLite: 4 s for a
    million rows, against 0.1 s for the ranges).
    """
    parts = [
        _started(start, end)
        .annotate(bucket=Value(index))
        .values("bucket")
        .annotate(calls=Count("status"), answered=Count("status", filter=ANSWERED))
        for index, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False))
    ]
    rows = {row["bucket"]: row for row in parts[0].union(*parts[1:], all=True)} if parts else {}
    return [
        Bucket(start, end, rows.get(index, {}).get("calls", 0), rows.get(index, {}).get("answered", 0))
        for index, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False))
    ]


def outcomes(since: datetime, until: datetime) -> list[Outcome]:
    """How the calls started in [since, until) ended (or that they are still live), most frequent first."""
    rows = _started(since, until).values("status", "end_reason").annotate(calls=Count("status"))
    found = [Outcome(row["status"], row["end_reason"], row["calls"]) for row in rows]
    return sorted(found, key=lambda outcome: (-outcome.calls, outcome.status, outcome.end_reason or ""))


def answer_times(since: datetime, until: datetime) -> AnswerTimes:
    """The median and 90th percentile time to answer of the calls started in [since, until).

    One query on both databases: SQLite has no percentile_cont or percentile_disc, but
    both have window functions. CUME_DIST() over the answered calls ordered by time to
    answer is the share of calls answered as fast or faster; the p-th percentile is the
    smallest time whose share reaches p (the nearest-rank percentile, PostgreSQL's
    percentile_disc). The outer query takes both minimums and the count at once.
    """
    ranked = (
        _started(since, until)
        .filter(answered_at__isnull=False)
        .annotate(time_to_answer=time_to_answer())
        .annotate(share=Window(CumeDist(), order_by=F("time_to_answer").asc()))
    )
    figures = ranked.aggregate(
        answered=Count("status"),
        median=Min("time_to_answer", filter=Q(share__gte=0.5)),
        p90=Min("time_to_answer", filter=Q(share__gte=0.9)),
    )
    return AnswerTimes(figures["answered"], _to_delta(figures["median"]), _to_delta(figures["p90"]))


def _to_delta(seconds: float | None) -> timedelta | None:
    # To the millisecond: the float is exact to about 50 microseconds.
    return None if seconds is None else timedelta(seconds=round(seconds, 3))


def live_calls(limit: int = 50) -> list[Call]:
    """The calls ringing or in progress, newest first (by the status index), with their parties."""
    return list(
        Call.objects.filter(status__in=LIVE_STATUSES).select_related("caller", "callee").order_by("-created_at")[:limit]
    )


def live_call_count() -> dict[str, int]:
    """How many calls are ringing and in progress now."""
    counts = dict(
        Call.objects.filter(status__in=LIVE_STATUSES).order_by().values_list("status").annotate(n=Count("status"))
    )
    return {status: counts.get(status, 0) for status in LIVE_STATUSES}


@dataclass(frozen=True, slots=True)
class Device:
    """A device_id a user called from or answered on: how many such calls, and the last one's start."""

    device: str
    calls: int
    last_call: datetime


def devices_of(user: SignalingUser) -> list[Device]:
    """The devices of a user's calls, by name: two grouped queries on the foreign keys' indexes."""
    seen: dict[str, Device] = {}
    for side, column in (("caller", "caller_device"), ("callee", "callee_device")):
        used = Call.objects.filter(**{side: user}).exclude(**{column: ""}).order_by().values(column)
        for row in used.annotate(calls=Count("status"), last=Max("created_at")):
            known = seen.get(row[column])
            calls, last = (known.calls, known.last_call) if known else (0, row["last"])
            seen[row[column]] = Device(row[column], calls + row["calls"], max(last, row["last"]))
    return sorted(seen.values(), key=lambda device: device.device)
