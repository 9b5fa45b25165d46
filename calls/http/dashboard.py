"""The admin's calls dashboard: the service's figures drawn, and what is live now.

Two sources, read in two steps. What is live comes from this process's runtime, on
the event loop it is bound to (`read_live_state`, async): who is online from the
presence store (Redis, when configured: every process's sessions), which
sessions this process holds from its registry, and the live calls from the
call board (calls/callflow/board.py). The history comes from the
database (`dashboard_context`, sync, in a thread): calls/callflow/stats.py, one
aggregate query per chart. The admin view (calls/admin.py) runs the first, then
the second, and renders admin/calls/dashboard.html.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from django.urls import reverse
from django.utils import timezone

from calls.callflow import stats
from calls.callflow.board import CallRecord
from calls.callflow.states import LIVE_STATUSES, CallStatus, EndReason
from calls.http import charts
from calls.models import SignalingUser
from calls.presence.base import StoreUnavailable
from calls.process.runtime import Runtime

logger = logging.getLogger(__name__)

# Seconds the page waits for the presence store: a hung Redis must not hang the page.
PRESENCE_TIMEOUT = 2.0
# Online users and live calls listed by name on the page (all are counted).
LISTED = 100

# How a call ended, in the order the page lists them: answered first, then each way
# of not being answered, then still ringing; each with the bar's colour class.
OUTCOMES: list[tuple[str, str | None, str, str]] = [
    (CallStatus.COMPLETED, EndReason.HANGUP, "Completed, hung up", "answered"),
    (CallStatus.COMPLETED, EndReason.DISCONNECTED, "Completed, connection lost", "answered"),
    (CallStatus.ANSWERED, None, "In progress", "answered"),
    (CallStatus.BUSY, EndReason.BUSY, "Busy", "failed"),
    (CallStatus.MISSED, EndReason.TIMEOUT, "Missed (ring timeout)", "failed"),
    (CallStatus.REJECTED, EndReason.REJECTED, "Rejected", "failed"),
    (CallStatus.CANCELLED, EndReason.CANCELLED, "Cancelled by caller", "failed"),
    (CallStatus.FAILED, EndReason.DISCONNECTED, "Failed, a party disconnected", "failed"),
    (CallStatus.RINGING, None, "Ringing now", "ringing"),
]


@dataclass(frozen=True, slots=True)
class LiveState:
    """What is live now: online users and sessions (None: the presence store did not answer)."""

    online: list[dict[str, str]] | None
    # Every live session, on any process (the presence store), and those of this process.
    sessions: frozenset[str]
    local: frozenset[str]
    # Every live call, from the call board (None: it did not answer; the history's live rows are shown).
    calls: tuple[CallRecord, ...] | None = None


async def read_live_state() -> LiveState:
    """Read who is online and which sessions live, from the runtime of the running event loop."""
    runtime = Runtime.current()
    local = frozenset(runtime.sessions.channels())
    calls = None
    try:
        async with asyncio.timeout(PRESENCE_TIMEOUT):
            calls = tuple(await runtime.board.live())
    except Exception as exc:  # noqa: BLE001 - the board's errors depend on where it lives
        logger.warning("dashboard: the call board did not answer", extra={"error": repr(exc)})
    try:
        async with asyncio.timeout(PRESENCE_TIMEOUT):
            online = await runtime.store.online_users()
            sessions = frozenset(await runtime.store.live_channels())
    except (StoreUnavailable, TimeoutError) as exc:
        logger.warning("dashboard: the presence store did not answer", extra={"error": repr(exc)})
        return LiveState(None, frozenset(), local, calls)
    return LiveState(online, sessions, local, calls)


def _seconds(value: timedelta | None) -> str:
    return "–" if value is None else f"{value.total_seconds():.1f} s"


def _calls_url(**filters: Any) -> str:
    url = reverse("admin:calls_call_changelist")
    return f"{url}?{urlencode(filters)}" if filters else url


def _window_filters(since: datetime, until: datetime) -> dict[str, str]:
    return {"created_at__gte": since.isoformat(), "created_at__lt": until.isoformat()}


def _columns(buckets: list[stats.Bucket], label: Callable[[datetime], str], tooltip: str) -> list[charts.Column]:
    return [
        charts.Column(
            label(bucket.start),
            bucket.calls,
            bucket.answered,
            f"{bucket.start.strftime(tooltip)}: {bucket.calls:,} calls, {bucket.answered:,} answered",
        )
        for bucket in buckets
    ]


def _rows(buckets: list[stats.Bucket], label: str) -> list[dict[str, Any]]:
    return [
        {
            "label": f"{bucket.start:{label}}",
            "calls": bucket.calls,
            "answered": bucket.answered,
            "url": _calls_url(**_window_filters(bucket.start, bucket.end)),
        }
        for bucket in buckets
    ]


def _outcome_rows(found: list[stats.Outcome], since: datetime, until: datetime) -> list[dict[str, Any]]:
    counts = {(outcome.status, outcome.end_reason): outcome.calls for outcome in found}
    named = {(status, reason): (label, kind) for status, reason, label, kind in OUTCOMES}
    # A pair the table does not name (a status added later) is still shown, after the others.
    for status, reason in sorted(counts.keys() - named.keys(), key=str):
        named[status, reason] = (f"{status}, {reason or 'live'}", "failed")
    rows = []
    for (status, reason), (label, kind) in named.items():
        filters = {"status__exact": status, **_window_filters(since, until)}
        filters.update({"end_reason__exact": reason} if reason else {"end_reason__isnull": "True"})
        rows.append(
            {"label": label, "calls": counts.get((status, reason), 0), "kind": kind, "url": _calls_url(**filters)}
        )
    return rows


def _session_state(channel: str, live: LiveState) -> str:
    if not channel:
        return "–"
    if channel in live.local:
        return "on this process"
    if live.online is None:
        return "unknown"
    return "on another process" if channel in live.sessions else "gone"


def _live_calls(live: LiveState, now: datetime) -> dict[str, Any]:
    if live.calls is not None:  # the board: the live calls themselves
        calls = sorted(live.calls, key=lambda call: call.created_at or now, reverse=True)
        counts = {status: sum(1 for call in calls if call.status == status) for status in LIVE_STATUSES}
        listed = [
            (call.call_id, call.caller_username, call.callee_username, call.status, call.answered_at or call.created_at)
            + (call.caller_channel, call.callee_channel)
            for call in calls[:LISTED]
        ]
    else:  # the history's live rows, up to a second behind
        counts = stats.live_call_count()
        listed = [
            (str(call.pk), call.caller.username, call.callee.username, call.status, call.answered_at or call.created_at)
            + (call.caller_channel, call.callee_channel)
            for call in stats.live_calls(LISTED)
        ]
    rows = [
        {
            "caller": caller,
            "callee": callee,
            "status": status,
            "url": reverse("admin:calls_call_change", args=[call_id]),
            "short_id": call_id.replace("-", "")[:8],
            "for": _seconds(now - since) if since else "–",
            "caller_session": _session_state(caller_channel, live),
            "callee_session": _session_state(callee_channel, live),
        }
        for call_id, caller, callee, status, since, caller_channel, callee_channel in listed
    ]
    return {
        "ringing": counts[CallStatus.RINGING],
        "in_progress": counts[CallStatus.ANSWERED],
        "total": sum(counts.values()),
        "rows": rows,
        "url": _calls_url(live="now"),
    }


def _online(live: LiveState) -> dict[str, Any]:
    if live.online is None:
        return {"available": False, "local_sessions": len(live.local)}
    listed = live.online[:LISTED]
    ids = dict(SignalingUser.objects.filter(username__in=[u["username"] for u in listed]).values_list("username", "pk"))
    users = [
        {
            "username": user["username"],
            "url": reverse("admin:calls_signalinguser_change", args=[ids[user["username"]]])
            if user["username"] in ids
            else "",
        }
        for user in listed
    ]
    return {
        "available": True,
        "count": len(live.online),
        "sessions": len(live.sessions),
        "local_sessions": len(live.local),
        "users": users,
    }


def dashboard_context(live: LiveState, now: datetime | None = None) -> dict[str, Any]:
    """The dashboard's figures, charts and tables: the last 24 hours by hour, 30 days by day, and now."""
    now = timezone.localtime(now)
    hours = stats.hour_bounds(now)
    since, until = hours[0], hours[-1]
    hourly = stats.calls_by_bucket(hours)
    daily = stats.calls_by_bucket(stats.day_bounds(now))
    outcome_rows = _outcome_rows(stats.outcomes(since, until), since, until)
    times = stats.answer_times(since, until)

    total = sum(row["calls"] for row in outcome_rows)
    answered = sum(row["calls"] for row in outcome_rows if row["kind"] == "answered")
    ringing = sum(row["calls"] for row in outcome_rows if row["kind"] == "ringing")
    # The rate counts the calls whose outcome is known: one still ringing may yet be answered.
    decided = total - ringing
    return {
        "now": now,
        "since": since,
        "window_url": _calls_url(**_window_filters(since, until)),
        "totals": {
            "calls": f"{total:,}",
            "answered": f"{answered:,}",
            "not_answered": f"{decided - answered:,}",
            "ringing": f"{ringing:,}",
            "answer_rate": f"{100 * answered / decided:.1f} %" if decided else "–",
            "median": _seconds(times.median),
            "p90": _seconds(times.p90),
            "timed": f"{times.answered:,}",
        },
        "hourly_chart": charts.column_chart(
            "calls-per-hour",
            "Calls per hour, last 24 hours",
            f"Calls started in each hour since {since:%Y-%m-%d %H:%M %Z}, answered ones at the bottom of each column.",
            _columns(hourly, lambda start: f"{start:%H}", "%Y-%m-%d %H:00"),
        ),
        "hourly_rows": _rows(hourly, "%H:00"),
        "daily_chart": charts.column_chart(
            "calls-per-day",
            "Calls per day, last 30 days",
            f"Calls started on each day since {daily[0].start:%Y-%m-%d}, answered ones at the bottom of each column.",
            _columns(daily, lambda start: str(start.day), "%a %Y-%m-%d"),
            label_every=3,
        ),
        "daily_rows": _rows(daily, "%a %Y-%m-%d"),
        "outcome_chart": charts.bar_chart(
            "call-outcomes",
            "How the calls of the last 24 hours ended",
            "Calls by final status and end reason: answered, then each reason a call was not answered.",
            [charts.Row(row["label"], row["calls"], row["kind"]) for row in outcome_rows],
        ),
        "outcome_rows": outcome_rows,
        "live_calls": _live_calls(live, now),
        "online": _online(live),
    }
