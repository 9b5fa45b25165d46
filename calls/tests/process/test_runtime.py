"""History retention: `Runtime.trim_history` deletes ended calls older than SIGNALING_HISTORY_DAYS."""

from __future__ import annotations

from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from calls.callflow import store as call_store
from calls.callflow.states import CallStatus
from calls.models import Call, CallEvent, SignalingUser

pytestmark = pytest.mark.django_db(transaction=True)

# Each status a call can end in, or still be in, with the timeline that leads there.
TIMELINES: dict[str, list[tuple[str, str, str | None]]] = {
    CallStatus.COMPLETED: [("", "ringing", None), ("ringing", "answered", None), ("answered", "completed", "hangup")],
    CallStatus.MISSED: [("", "ringing", None), ("ringing", "missed", "timeout")],
    CallStatus.BUSY: [("", "busy", "busy")],
    CallStatus.RINGING: [("", "ringing", None)],
    CallStatus.ANSWERED: [("", "ringing", None), ("ringing", "answered", None)],
}


@database_sync_to_async
def make_call(status: str, days_ago: float, caller: str = "alice", callee: str = "bob") -> str:
    """Write a call in `status` with its events, started `days_ago` days ago; return its id."""
    now = timezone.now()
    users = [
        SignalingUser.objects.get_or_create(username=name, defaults={"user_id": f"u-{name}", "last_seen": now})[0]
        for name in (caller, callee)
    ]
    timeline = TIMELINES[status]
    call = Call.objects.create(caller=users[0], callee=users[1], status=status, end_reason=timeline[-1][2])
    for old, new, reason in timeline:
        CallEvent.objects.create(call=call, old_status=old, new_status=new, reason=reason, username=caller)
    # created_at is auto_now_add: only an update can put it in the past.
    Call.objects.filter(pk=call.pk).update(created_at=now - timedelta(days=days_ago))
    return str(call.pk)


@database_sync_to_async
def kept_calls() -> set[str]:
    return {str(pk) for pk in Call.objects.values_list("pk", flat=True)}


@database_sync_to_async
def calls_with_events() -> set[str]:
    return {str(pk) for pk in CallEvent.objects.values_list("call_id", flat=True)}


@database_sync_to_async
def event_count() -> int:
    return CallEvent.objects.count()


@pytest.fixture
def ninety_days(settings):
    settings.SIGNALING_HISTORY_DAYS = 90


async def test_ended_calls_older_than_the_retention_go_with_their_events(runtime, ninety_days):
    old = {await make_call(status, days_ago=91) for status in ("completed", "missed", "busy")}
    kept = await make_call("completed", days_ago=1)
    await runtime.trim_history()
    assert await kept_calls() == {kept}
    assert await calls_with_events() == {kept}
    assert old.isdisjoint(await calls_with_events())


async def test_calls_within_the_retention_stay_with_their_events(runtime, ninety_days):
    recent = {await make_call("completed", days_ago=89), await make_call("missed", days_ago=0)}
    await runtime.trim_history()
    assert await kept_calls() == recent
    assert await event_count() == len(TIMELINES["completed"]) + len(TIMELINES["missed"])


async def test_live_calls_stay_however_old(runtime, ninety_days):
    live = {await make_call("ringing", days_ago=200), await make_call("answered", days_ago=200, caller="carol")}
    await runtime.trim_history()
    assert await kept_calls() == live
    assert await calls_with_events() == live


async def test_the_users_of_deleted_calls_stay(runtime, ninety_days):
    await make_call("completed", days_ago=100)
    await runtime.trim_history()
    assert await kept_calls() == set()
    users = await database_sync_to_async(lambda: sorted(SignalingUser.objects.values_list("username", flat=True)))()
    assert users == ["alice", "bob"]


async def test_zero_days_keeps_all_history(runtime, settings):
    settings.SIGNALING_HISTORY_DAYS = 0
    ancient = {await make_call("completed", days_ago=3650), await make_call("busy", days_ago=400)}
    await runtime.trim_history()
    assert await kept_calls() == ancient
    assert await calls_with_events() == ancient


async def test_more_old_calls_than_one_batch_all_go(runtime, ninety_days, monkeypatch):
    monkeypatch.setattr(call_store, "HISTORY_DELETE_BATCH", 2)
    for _ in range(5):
        await make_call("completed", days_ago=120)
    kept = await make_call("completed", days_ago=10)
    await runtime.trim_history()
    assert await kept_calls() == {kept}
    assert await event_count() == len(TIMELINES["completed"])


async def test_delete_history_before_reports_how_many_calls_went(transactional_db):
    for days in (100, 95):
        await make_call("completed", days_ago=days)
    await make_call("completed", days_ago=5)
    cutoff = timezone.now() - timedelta(days=90)
    assert await database_sync_to_async(call_store.delete_history_before)(cutoff) == 2


async def test_a_trimmed_call_leaves_the_owners_history(runtime, connect, multi_device, ninety_days):
    old = await make_call("completed", days_ago=120)
    recent = await make_call("missed", days_ago=3)
    alice = await connect("alice")
    await alice.send({"type": "get_call_history"})
    assert [c["call_id"] for c in (await alice.expect("call_history"))["calls"]] == [recent, old]

    await runtime.trim_history()
    await alice.send({"type": "get_call_history"})
    assert [c["call_id"] for c in (await alice.expect("call_history"))["calls"]] == [recent]
    assert await kept_calls() == {recent}
