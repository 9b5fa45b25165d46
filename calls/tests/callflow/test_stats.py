"""Covers calls.callflow.stats: the dashboard's figures, each from one query, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.db.models import Count, QuerySet
from django.test.utils import CaptureQueriesContext

from calls.callflow import stats
from calls.models import Call, SignalingUser

NOW = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)


def user(name: str) -> SignalingUser:
    return SignalingUser.objects.get_or_create(username=name, defaults={"user_id": f"id-{name}", "last_seen": NOW})[0]


def call(
    status: str,
    reason: str | None,
    started: datetime,
    answered_after: float | None = None,
    ended_after: float | None = None,
    caller: str = "alice",
    callee: str = "bob",
    **fields: str,
) -> Call:
    """A call row as the store leaves it, started at `started` (seconds after it for the rest)."""
    row = Call.objects.create(caller=user(caller), callee=user(callee), status=status, end_reason=reason, **fields)
    # created_at is auto_now_add: only an update can set it.
    Call.objects.filter(pk=row.pk).update(
        created_at=started,
        answered_at=None if answered_after is None else started + timedelta(seconds=answered_after),
        ended_at=None if ended_after is None else started + timedelta(seconds=ended_after),
    )
    row.refresh_from_db()
    return row


def test_hour_bounds_are_the_last_24_whole_hours_and_the_end_of_the_current_one():
    bounds = stats.hour_bounds(NOW)
    assert len(bounds) == 25
    assert bounds[0] == datetime(2026, 3, 9, 13, tzinfo=UTC)
    assert bounds[-2] == datetime(2026, 3, 10, 12, tzinfo=UTC)
    assert bounds[-1] == datetime(2026, 3, 10, 13, tzinfo=UTC)


def test_day_bounds_are_midnights_even_across_a_clock_change():
    paris = ZoneInfo("Europe/Paris")
    bounds = stats.day_bounds(datetime(2026, 3, 30, 9, 0, tzinfo=paris), days=3)
    assert bounds == [datetime(2026, 3, day, tzinfo=paris) for day in (28, 29, 30, 31)]
    # The day clocks went forward is 23 hours long.
    assert bounds[2].astimezone(UTC) - bounds[1].astimezone(UTC) == timedelta(hours=23)


def test_calls_by_bucket_counts_calls_and_answered_calls_per_hour_in_one_query(db):
    call("completed", "hangup", NOW - timedelta(minutes=10), 3, 60)
    call("missed", "timeout", NOW - timedelta(minutes=20), None, 45)
    call("busy", "busy", NOW - timedelta(hours=2, minutes=5), None, 0)
    call("answered", None, NOW - timedelta(hours=2, minutes=1), 2)
    call("completed", "hangup", NOW - timedelta(hours=30), 1, 5)  # before the window
    with CaptureQueriesContext(connection) as queries:
        buckets = stats.calls_by_bucket(stats.hour_bounds(NOW))
    assert len(queries) == 1
    assert len(buckets) == 24
    by_hour = {bucket.start.hour: (bucket.calls, bucket.answered) for bucket in buckets if bucket.calls}
    assert by_hour == {12: (2, 1), 10: (2, 1)}
    assert buckets[-1].start == datetime(2026, 3, 10, 12, tzinfo=UTC)


def test_calls_by_bucket_counts_a_call_on_a_bound_in_the_later_bucket(db):
    call("completed", "hangup", datetime(2026, 3, 10, 11, tzinfo=UTC), 1, 2)
    buckets = stats.calls_by_bucket(stats.hour_bounds(NOW))
    assert [(b.start.hour, b.calls) for b in buckets if b.calls] == [(11, 1)]


def test_calls_by_bucket_fills_thirty_days_with_zeros_where_nothing_happened(db):
    call("rejected", "rejected", NOW - timedelta(days=3), None, 4)
    call("completed", "hangup", NOW - timedelta(days=29, hours=-1), 2, 30)
    call("completed", "hangup", NOW - timedelta(days=31), 2, 30)
    buckets = stats.calls_by_bucket(stats.day_bounds(NOW))
    assert len(buckets) == 30
    assert [(b.start.day, b.calls, b.answered) for b in buckets if b.calls] == [(9, 1, 1), (7, 1, 0)]
    assert sum(b.calls for b in buckets) == 2


def test_outcomes_count_each_status_and_end_reason_of_the_window(db):
    since, until = NOW - timedelta(hours=24), NOW
    for _ in range(3):
        call("busy", "busy", NOW - timedelta(hours=1), None, 0)
    call("completed", "hangup", NOW - timedelta(hours=1), 1, 9)
    call("completed", "disconnected", NOW - timedelta(hours=1), 1, 9)
    call("ringing", None, NOW - timedelta(seconds=5))
    call("missed", "timeout", NOW - timedelta(hours=25), None, 45)  # before the window
    with CaptureQueriesContext(connection) as queries:
        found = stats.outcomes(since, until)
    assert len(queries) == 1
    assert found == [
        stats.Outcome("busy", "busy", 3),
        stats.Outcome("completed", "disconnected", 1),
        stats.Outcome("completed", "hangup", 1),
        stats.Outcome("ringing", None, 1),
    ]


def test_answer_times_are_the_nearest_rank_median_and_90th_percentile(db):
    for seconds in (7, 1, 10, 3, 2, 9, 5, 4, 8, 6):
        call("completed", "hangup", NOW - timedelta(hours=1), seconds, seconds + 30)
    call("missed", "timeout", NOW - timedelta(hours=1), None, 45)
    call("completed", "hangup", NOW - timedelta(days=2), 40, 50)  # before the window
    with CaptureQueriesContext(connection) as queries:
        times = stats.answer_times(NOW - timedelta(hours=24), NOW)
    assert len(queries) == 1
    assert times == stats.AnswerTimes(10, timedelta(seconds=5), timedelta(seconds=9))


def test_answer_times_with_ties_take_the_smallest_time_reaching_each_share(db):
    for seconds in (2, 2, 2, 8):
        call("completed", "hangup", NOW - timedelta(hours=1), seconds, 60)
    times = stats.answer_times(NOW - timedelta(hours=24), NOW)
    assert (times.median, times.p90) == (timedelta(seconds=2), timedelta(seconds=8))


def test_answer_times_keep_milliseconds(db):
    call("answered", None, NOW - timedelta(minutes=1), 1.25)
    times = stats.answer_times(NOW - timedelta(hours=24), NOW)
    assert times == stats.AnswerTimes(1, timedelta(seconds=1.25), timedelta(seconds=1.25))


def test_answer_times_are_none_when_nothing_was_answered(db):
    call("rejected", "rejected", NOW - timedelta(hours=1), None, 3)
    assert stats.answer_times(NOW - timedelta(hours=24), NOW) == stats.AnswerTimes(0, None, None)


def test_live_calls_are_the_ringing_and_answered_ones_newest_first(db):
    older = call("answered", None, NOW - timedelta(minutes=5), 2)
    newer = call("ringing", None, NOW - timedelta(seconds=3))
    call("completed", "hangup", NOW - timedelta(minutes=9), 1, 20)
    assert [c.pk for c in stats.live_calls()] == [newer.pk, older.pk]
    assert stats.live_call_count() == {"ringing": 1, "answered": 1}


def test_devices_of_a_user_merge_both_sides_of_their_calls(db):
    call("completed", "hangup", NOW - timedelta(days=2), 1, 5, caller_device="phone")
    call("completed", "hangup", NOW - timedelta(days=1), 1, 5, caller="bob", callee="alice", callee_device="phone")
    call("missed", "timeout", NOW - timedelta(hours=1), None, 45, caller_device="laptop")
    call("completed", "hangup", NOW, 1, 5, caller="bob", callee="alice", caller_device="bob-phone")
    assert stats.devices_of(user("alice")) == [
        stats.Device("laptop", 1, NOW - timedelta(hours=1)),
        stats.Device("phone", 2, NOW - timedelta(days=1)),
    ]


def plan_of(queryset: QuerySet) -> str:
    """The database's plan for a query; on PostgreSQL with sequential scans off (a test table is tiny)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET enable_seqscan = off")
        try:
            return queryset.explain()
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET enable_seqscan")
    return queryset.explain()


@pytest.mark.parametrize(
    "figure",
    [
        lambda since, until: stats._started(since, until).values("status", "end_reason").annotate(n=Count("status")),
        lambda since, until: stats._started(since, until).filter(answered_at__isnull=False).values("answered_at"),
    ],
    ids=["outcomes", "answer-times"],
)
def test_the_figures_are_read_from_the_figures_index_alone(db, figure):
    call("completed", "hangup", NOW - timedelta(hours=1), 1, 5)
    plan = plan_of(figure(NOW - timedelta(hours=24), NOW))
    if connection.vendor == "postgresql":
        assert "Index Only Scan using call_started_figures_idx" in plan
    else:
        assert "USING COVERING INDEX call_started_figures_idx" in plan
