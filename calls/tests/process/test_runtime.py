"""Covers calls.process.runtime: the history retention job (`Runtime.trim_history`).

It deletes ended calls older than SIGNALING_HISTORY_DAYS, with their events.
"""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from calls.callflow import store as call_store
from calls.models import Call, CallEvent, SignalingUser
from calls.tests.wsclient import CALL_TIMELINES, write_call

pytestmark = pytest.mark.django_db(transaction=True)


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
    old = {await write_call(status, days_ago=91) for status in ("completed", "missed", "busy")}
    kept = await write_call("completed", days_ago=1)
    await runtime.trim_history()
    assert await kept_calls() == {kept}
    assert await calls_with_events() == {kept}
    assert old.isdisjoint(await calls_with_events())


async def test_calls_within_the_retention_stay_with_their_events(runtime, ninety_days):
    recent = {await write_call("completed", days_ago=89), await write_call("missed", days_ago=0)}
    await runtime.trim_history()
    assert await kept_calls() == recent
    assert await event_count() == len(CALL_TIMELINES["completed"]) + len(CALL_TIMELINES["missed"])


async def test_live_calls_stay_however_old(runtime, ninety_days):
    live = {await write_call("ringing", days_ago=200), await write_call("answered", days_ago=200, caller="carol")}
    await runtime.trim_history()
    assert await kept_calls() == live
    assert await calls_with_events() == live


async def test_the_users_of_deleted_calls_stay(runtime, ninety_days):
    await write_call("completed", days_ago=100)
    await runtime.trim_history()
    assert await kept_calls() == set()
    users = await database_sync_to_async(lambda: sorted(SignalingUser.objects.values_list("username", flat=True)))()
    assert users == ["alice", "bob"]


async def test_zero_days_keeps_all_history(runtime, settings):
    settings.SIGNALING_HISTORY_DAYS = 0
    ancient = {await write_call("completed", days_ago=3650), await write_call("busy", days_ago=400)}
    await runtime.trim_history()
    assert await kept_calls() == ancient
    assert await calls_with_events() == ancient


async def test_more_old_calls_than_one_batch_all_go(runtime, ninety_days, monkeypatch):
    monkeypatch.setattr(call_store, "HISTORY_DELETE_BATCH", 2)
    for _ in range(5):
        await write_call("completed", days_ago=120)
    kept = await write_call("completed", days_ago=10)
    await runtime.trim_history()
    assert await kept_calls() == {kept}
    assert await event_count() == len(CALL_TIMELINES["completed"])


async def test_a_trimmed_call_leaves_the_owners_history(runtime, connect, multi_device, ninety_days):
    old = await write_call("completed", days_ago=120)
    recent = await write_call("missed", days_ago=3)
    alice = await connect("alice")
    await alice.send({"type": "get_call_history"})
    assert [c["call_id"] for c in (await alice.expect("call_history"))["calls"]] == [recent, old]

    await runtime.trim_history()
    await alice.send({"type": "get_call_history"})
    assert [c["call_id"] for c in (await alice.expect("call_history"))["calls"]] == [recent]
    assert await kept_calls() == {recent}
