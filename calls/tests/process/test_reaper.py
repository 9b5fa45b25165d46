"""Covers calls.process.reaper: `Reaper.reap_once` ends what dead sessions and overdue calls left behind.

Most tests run the reaper among one process's parts (`process_parts`: a memory store on
a fake clock, an in-memory channel layer, the call service) and read what each party was
sent from the layer and what the call rows hold; the last one runs through the real application.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from calls.callflow import service
from calls.callflow import store as call_store
from calls.callflow.board import Actor
from calls.callflow.board_memory import MemoryCallBoard
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


def pass_deadline(board: MemoryCallBoard, call_id: str) -> None:
    """The call's ring deadline has passed (its ring timer was on a process that died)."""
    record = board._live[call_id]
    board._live[call_id] = replace(record, ring_deadline=timezone.now() - timedelta(seconds=1))


async def ringing_call(process: Any, caller_channel: str, deadline_passed: bool = False) -> str:
    """alice calls bob from `caller_channel`; return the call id."""
    record = await process.calls.start(Actor(caller_channel, "alice"), "id-alice", "bob")
    process.calls.cancel_ring_timeout(record.call_id)
    if deadline_passed:
        pass_deadline(process.board, record.call_id)
    return record.call_id


async def answered_call(process: Any, caller_channel: str, callee_channel: str) -> str:
    call_id = await ringing_call(process, caller_channel)
    await process.calls.accept(call_id, Actor(callee_channel, "bob"))
    return call_id


async def test_a_session_whose_lease_ran_out_has_its_calls_ended_as_disconnected(process, clock):
    alice = await process.listed("alice", lease=SHORT)
    bob = await process.listed("bob")
    call_id = await answered_call(process, alice, bob)
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
    call_id = await ringing_call(process, alice, deadline_passed=True)
    await process.layer.group_add(user_group("bob"), bob)

    await process.reaper.reap_once()

    assert await process.heard(alice) == events.call_ended(call_id, "timeout")
    assert await process.heard(bob) == events.call_ended(call_id, "timeout")
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("missed", "timeout")
    assert process.announced == 0


async def test_a_call_still_within_its_deadline_keeps_ringing(process):
    alice = await process.listed("alice")
    await process.listed("bob")
    call_id = await ringing_call(process, alice)
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


async def test_call_rows_a_killed_process_left_live_are_ended_as_disconnected(process, monkeypatch):
    # Rows live in the database and on no board: their process died before writing their end.
    monkeypatch.setattr(service, "ORPHAN_GRACE", timedelta(0))
    ringing, answered = await calls_left_by_a_crash()

    await process.reaper.end_orphans()

    assert [((row := await call_row(c)).status, row.end_reason) for c in (ringing, answered)] == [
        ("failed", "disconnected"),
        ("completed", "disconnected"),
    ]


async def test_a_session_of_this_process_is_alive_whatever_the_store_says(process):
    # Registered here but missing from the store (its lease being written back): not dead.
    alice = await process.session("alice", "id-alice")
    await process.store.leave(alice.channel_name)
    bob = await process.listed("bob")
    call_id = await answered_call(process, alice.channel_name, bob)

    await process.reaper.reap_once()

    assert ((await call_row(call_id)).status, (await call_row(call_id)).end_reason) == ("answered", None)


async def test_the_reaper_ends_a_ringing_call_whose_timer_was_lost(connect, runtime):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, bob)
    runtime.calls.cancel_ring_timeout(call_id)
    pass_deadline(runtime.board, call_id)
    await runtime.reaper.reap_once()
    assert (await bob.expect("call_ended"))["reason"] == "timeout"
    assert (await alice.expect("call_ended"))["reason"] == "timeout"
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("missed", "timeout")
