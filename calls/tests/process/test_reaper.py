"""Covers calls.process.reaper: `Reaper.reap_once` ends what dead sessions and overdue calls left behind.

Most tests run the reaper among one process's parts (`process_parts`: a memory store on
a fake clock, an in-memory channel layer, the call service) and read what each party was
sent from the layer and what the call rows hold; the last one runs through the real application.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from calls.callflow import store as call_store
from calls.models import Call, SignalingUser
from calls.presence.memory import MemoryPresenceStore
from calls.realtime.groups import user_group
from calls.tests.wsclient import call_row, ring, timeline
from calls.wire import events

pytestmark = pytest.mark.django_db(transaction=True)

SHORT = 5.0
DAY = timedelta(days=1)


@pytest.fixture
async def process(clock, process_parts):
    """A process on the memory store; alice and bob have user rows."""
    await database_sync_to_async(call_store.touch_users)({"alice": "id-alice", "bob": "id-bob"})
    return process_parts(MemoryPresenceStore())


@database_sync_to_async
def ringing_call(caller_channel: str, deadline_passed: bool = False) -> str:
    """alice calls bob from `caller_channel`; return the call id."""
    record = call_store.start_call(call_store.Actor(caller_channel, "alice"), "bob", ring_timeout=60)
    if deadline_passed:
        Call.objects.filter(pk=record.call_id).update(ring_deadline=timezone.now() - timedelta(seconds=1))
    return record.call_id


@database_sync_to_async
def answered_call(caller_channel: str, callee_channel: str) -> str:
    record = call_store.start_call(call_store.Actor(caller_channel, "alice"), "bob", ring_timeout=60)
    call_store.accept_call(record.call_id, call_store.Actor(callee_channel, "bob"))
    return record.call_id


async def test_a_session_whose_lease_ran_out_has_its_calls_ended_as_disconnected(process, clock):
    alice = await process.listed("alice", lease=SHORT)
    bob = await process.listed("bob")
    call_id = await answered_call(alice, bob)
    clock.advance(SHORT + 1)  # alice's process died: nobody renews her lease

    await process.reaper.reap_once()

    assert await process.heard(bob) == events.call_ended(call_id, "disconnected")
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("completed", "disconnected")
    assert (await timeline(call_id))[-1] == ("answered", "completed", "disconnected")
    assert await process.store.online_users() == [{"username": "bob", "user_id": "id-bob"}]
    assert process.announced == 1


async def test_a_call_that_rang_past_its_deadline_ends_with_timeout_for_both(process):
    alice = await process.listed("alice")
    bob = await process.listed("bob")
    await process.layer.group_add(user_group("bob"), bob)
    call_id = await ringing_call(alice, deadline_passed=True)

    await process.reaper.reap_once()

    assert await process.heard(alice) == events.call_ended(call_id, "timeout")
    assert await process.heard(bob) == events.call_ended(call_id, "timeout")
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("missed", "timeout")
    assert process.announced == 0


async def test_a_call_still_within_its_deadline_keeps_ringing(process):
    alice = await process.listed("alice")
    await process.listed("bob")
    call_id = await ringing_call(alice)
    await process.reaper.reap_once()
    assert (await call_row(call_id)).status == "ringing"


@database_sync_to_async
def calls_left_by_a_crash() -> tuple[str, str]:
    """A ringing and an answered call whose sessions were on a process that died, and no process lists."""
    alice, bob = SignalingUser.objects.get(username="alice"), SignalingUser.objects.get(username="bob")
    ringing = Call.objects.create(
        caller=alice, callee=bob, status="ringing", caller_channel="gone.1", ring_deadline=timezone.now() + DAY
    )
    answered = Call.objects.create(
        caller=bob, callee=alice, status="answered", caller_channel="gone.2", callee_channel="gone.3"
    )
    return str(ringing.pk), str(answered.pk)


async def test_calls_of_sessions_gone_from_the_store_are_ended_as_disconnected(process):
    ringing, answered = await calls_left_by_a_crash()

    await process.reaper.reap_once()

    assert [((row := await call_row(c)).status, row.end_reason) for c in (ringing, answered)] == [
        ("failed", "disconnected"),
        ("completed", "disconnected"),
    ]


async def test_a_session_of_this_process_is_alive_whatever_the_store_says(process):
    # Registered here but missing from the store (its lease being written back): not dead.
    alice = await process.session("alice", "id-alice")
    await process.store.leave(alice.channel_name)
    bob = await process.listed("bob")
    call_id = await answered_call(alice.channel_name, bob)

    await process.reaper.reap_once()

    assert ((await call_row(call_id)).status, (await call_row(call_id)).end_reason) == ("answered", None)


async def test_the_reaper_ends_a_ringing_call_whose_timer_was_lost(connect, runtime):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, bob)
    runtime.calls.cancel_ring_timeout(call_id)
    await database_sync_to_async(
        lambda: Call.objects.filter(pk=call_id).update(ring_deadline=timezone.now() - timedelta(seconds=1))
    )()
    await runtime.reaper.reap_once()
    assert (await bob.expect("call_ended"))["reason"] == "timeout"
    assert (await alice.expect("call_ended"))["reason"] == "timeout"
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("missed", "timeout")
