"""The call lifecycle through the real ASGI application: ids, reasons, busy, timeout,
several devices, who may signal whom, history, and the rows each step leaves."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from calls.callflow import store as call_store
from calls.callflow.states import CallStatus, EndReason, IllegalTransition, check_transition
from calls.models import Call, CallEvent, SignalingUser
from calls.wire.errors import SignalingError

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def call_row(call_id: str) -> Call:
    return Call.objects.get(pk=call_id)


@database_sync_to_async
def timeline(call_id: str) -> list[tuple[str, str, str | None]]:
    return list(CallEvent.objects.filter(call_id=call_id).values_list("old_status", "new_status", "reason"))


async def ring(caller, callee_sessions, target: str = "bob") -> str:
    """Have `caller` call `target`; return the call id once every session rang."""
    await caller.send({"type": "call_request", "target_username": target})
    ids = {(await session.expect("incoming_call"))["call_id"] for session in callee_sessions}
    ringing = await caller.expect("call_ringing")
    assert ids == {ringing["call_id"]} and ringing["target_username"] == target
    return ringing["call_id"]


async def answered_call(caller, callee, caller_name: str = "alice") -> str:
    call_id = await ring(caller, [callee])
    await callee.send({"type": "call_accepted", "caller_username": caller_name})
    accepted = await caller.expect("call_accepted")
    assert accepted["call_id"] == call_id
    return call_id


async def test_every_call_message_carries_the_server_call_id(connect):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await answered_call(alice, bob)
    uuid.UUID(call_id)
    await bob.send({"type": "call_ended", "call_id": call_id})
    ended = await alice.expect("call_ended")
    assert (ended["call_id"], ended["reason"], ended["from_username"]) == (call_id, "hangup", "bob")
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("completed", "hangup")
    assert await timeline(call_id) == [
        ("", "ringing", None),
        ("ringing", "answered", None),
        ("answered", "completed", "hangup"),
    ]


async def test_the_caller_hears_ringing_after_the_callee_rang(connect):
    alice, bob = await connect("alice"), await connect("bob")
    await alice.send({"type": "call_request", "target_username": "bob"})
    ringing = await alice.expect("call_ringing")
    incoming = await bob.expect("incoming_call")
    assert ringing["call_id"] == incoming["call_id"]


async def test_a_user_in_a_call_is_busy(connect):
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    await answered_call(alice, bob)
    await carol.send({"type": "call_request", "target_username": "bob"})
    rejected = await carol.expect("call_rejected")
    assert (rejected["rejecter_username"], rejected["reason"]) == ("bob", "busy")
    await bob.nothing()
    row = await call_row(rejected["call_id"])
    assert (row.status, row.end_reason) == ("busy", "busy") and row.ended_at is not None


async def test_a_ringing_user_is_busy_too(connect):
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    await ring(alice, [bob])
    await carol.send({"type": "call_request", "target_username": "bob"})
    assert (await carol.expect("call_rejected"))["reason"] == "busy"
    await bob.nothing()


async def test_a_caller_already_in_a_call_cannot_ring_someone_else(connect):
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    await answered_call(alice, bob)
    await alice.send({"type": "call_request", "target_username": "carol"})
    await alice.expect_error("already_in_call")
    await carol.nothing()


async def test_an_unanswered_call_times_out_for_both(connect, settings):
    settings.SIGNALING_RING_TIMEOUT = 0.3
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, [bob])
    for side, peer in ((alice, "bob"), (bob, "alice")):
        ended = await side.expect("call_ended")
        assert (ended["call_id"], ended["reason"], ended["from_username"]) == (call_id, "timeout", peer)
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("missed", "timeout")


async def test_the_reaper_expires_a_call_whose_timer_was_lost(connect, runtime):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, [bob])
    runtime.calls.cancel_ring_timeout(call_id)
    await database_sync_to_async(
        lambda: Call.objects.filter(pk=call_id).update(ring_deadline=timezone.now() - timedelta(seconds=1))
    )()
    await runtime.reaper.reap_once()
    assert (await bob.expect("call_ended"))["reason"] == "timeout"
    assert (await alice.expect("call_ended"))["reason"] == "timeout"
    assert (await call_row(call_id)).status == "missed"


async def test_the_caller_cancels_a_ringing_call(connect):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, [bob])
    await alice.send({"type": "call_ended", "target_username": "bob"})
    ended = await bob.expect("call_ended")
    assert (ended["call_id"], ended["reason"], ended["from_username"]) == (call_id, "cancelled", "alice")
    await alice.nothing()
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("cancelled", "cancelled")


async def test_a_rejection_carries_its_reason(connect):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, [bob])
    await bob.send({"type": "call_rejected", "call_id": call_id})
    rejected = await alice.expect("call_rejected")
    assert (rejected["call_id"], rejected["reason"], rejected["rejecter_username"]) == (call_id, "rejected", "bob")


async def test_a_ringing_caller_disconnecting_fails_the_call(connect):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, [bob])
    await alice.close()
    ended = await bob.expect("call_ended")
    assert (ended["reason"], ended["from_username"]) == ("disconnected", "alice")
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("failed", "disconnected")


async def test_a_third_party_cannot_signal_into_a_call(connect):
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    call_id = await answered_call(alice, bob)
    await carol.send({"type": "offer", "target_username": "bob", "data": {"sdp": "evil"}})
    await carol.expect_error("not_in_call")
    await carol.send({"type": "ice_candidate", "target_username": "bob", "call_id": call_id, "data": {}})
    await carol.expect_error("not_in_call")
    await bob.nothing()
    await alice.nothing()


async def test_signaling_with_no_call_at_all_is_refused(connect):
    alice, bob = await connect("alice"), await connect("bob")
    await alice.send({"type": "offer", "target_username": "bob", "data": {"sdp": "x"}})
    await alice.expect_error("not_in_call")
    await bob.nothing()


async def test_signaling_after_the_call_ended_is_refused(connect):
    alice, bob = await connect("alice"), await connect("bob")
    await answered_call(alice, bob)
    await alice.send({"type": "call_ended", "target_username": "bob"})
    await bob.expect("call_ended")
    await alice.send({"type": "ice_candidate", "target_username": "bob", "data": {"candidate": ""}})
    await alice.expect_error("not_in_call")
    await bob.nothing()


async def test_accepting_or_rejecting_a_call_that_is_not_ringing(connect):
    alice, bob = await connect("alice"), await connect("bob")
    await bob.send({"type": "call_accepted", "caller_username": "alice"})
    await bob.expect_error("not_ringing")
    await bob.send({"type": "call_rejected", "caller_username": "alice"})
    await bob.expect_error("not_ringing")
    call_id = await answered_call(alice, bob)
    await bob.send({"type": "call_accepted", "call_id": call_id})
    await bob.expect_error("not_ringing")
    await alice.send({"type": "call_accepted", "call_id": call_id})
    await alice.expect_error("not_ringing")


async def test_every_device_rings_and_the_first_answer_wins(connect, multi_device):
    alice = await connect("alice")
    phone, laptop = await connect("bob", "u-b"), await connect("bob", "u-b")
    call_id = await ring(alice, [phone, laptop])
    await phone.send({"type": "call_accepted", "call_id": call_id})
    assert (await alice.expect("call_accepted"))["accepter_username"] == "bob"
    elsewhere = await laptop.expect("call_ended")
    assert (elsewhere["call_id"], elsewhere["reason"]) == (call_id, "answered_elsewhere")

    await alice.send({"type": "offer", "target_username": "bob", "data": {"sdp": "o"}})
    assert (await phone.expect("offer"))["data"] == {"sdp": "o"}
    await laptop.nothing()
    await laptop.send({"type": "answer", "target_username": "alice", "data": {"sdp": "a"}})
    await laptop.expect_error("not_in_call")
    await alice.nothing()
    row = await call_row(call_id)
    assert row.status == "answered" and row.callee_channel


async def test_two_devices_accepting_at_once_exactly_one_wins(connect, multi_device):
    alice = await connect("alice")
    phone, laptop = await connect("bob", "u-b"), await connect("bob", "u-b")
    call_id = await ring(alice, [phone, laptop])
    accept = {"type": "call_accepted", "call_id": call_id}
    await asyncio.gather(phone.send(accept), laptop.send(accept))
    await alice.expect("call_accepted")
    # The loser is told twice, in either order: its accept is refused, and the call
    # was answered elsewhere. The winner hears nothing more.
    heard = {device: await device.drain() for device in (phone, laptop)}
    outcomes = sorted(sorted((m["type"], m.get("code") or m.get("reason")) for m in msgs) for msgs in heard.values())
    assert outcomes == [[], [("call_ended", "answered_elsewhere"), ("error", "not_ringing")]]
    await alice.nothing()
    assert await timeline(call_id) == [("", "ringing", None), ("ringing", "answered", None)]


def test_concurrent_accepts_in_the_database_let_exactly_one_win(transactional_db):
    now = timezone.now()
    alice = SignalingUser.objects.create(username="alice", user_id="a", last_seen=now)
    SignalingUser.objects.create(username="bob", user_id="b", last_seen=now)
    record = call_store.start_call(call_store.Actor("chan-a", alice.username), "bob", ring_timeout=30)
    results: list[str] = []
    barrier = threading.Barrier(4)

    def accept(session: str) -> None:
        barrier.wait()
        try:
            call_store.accept_call(record.call_id, call_store.Actor(session, "bob"))
            results.append("won")
        except SignalingError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=accept, args=(f"chan-b{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["not_ringing"] * 3 + ["won"]
    assert CallEvent.objects.filter(call_id=record.call_id, new_status="answered").count() == 1


async def test_a_rejection_from_one_device_stops_the_others_ringing(connect, multi_device):
    alice = await connect("alice")
    phone, laptop = await connect("bob", "u-b"), await connect("bob", "u-b")
    call_id = await ring(alice, [phone, laptop])
    await laptop.send({"type": "call_rejected", "caller_username": "alice"})
    assert (await alice.expect("call_rejected"))["reason"] == "rejected"
    stopped = await phone.expect("call_ended")
    assert (stopped["call_id"], stopped["reason"]) == (call_id, "rejected")
    await laptop.nothing()


async def test_one_ringing_device_leaving_keeps_the_call_ringing(connect, multi_device):
    alice = await connect("alice")
    phone, laptop = await connect("bob", "u-b"), await connect("bob", "u-b")
    call_id = await ring(alice, [phone, laptop])
    await laptop.close()
    await alice.nothing()
    await phone.send({"type": "call_accepted", "call_id": call_id})
    await alice.expect("call_accepted")


async def test_history_lists_the_askers_own_calls_newest_first(connect):
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    first = await answered_call(alice, bob)
    await alice.send({"type": "call_ended", "call_id": first})
    await bob.expect("call_ended")
    second = await ring(carol, [bob], target="bob")
    await bob.send({"type": "call_rejected", "call_id": second})
    await carol.expect("call_rejected")

    await bob.send({"type": "get_call_history"})
    calls = (await bob.expect("call_history"))["calls"]
    assert [c["call_id"] for c in calls] == [second, first]
    latest, earlier = calls
    assert (latest["caller_username"], latest["status"], latest["end_reason"]) == ("carol", "rejected", "rejected")
    assert latest["answered_at"] is None and latest["duration_s"] is None
    assert (earlier["status"], earlier["end_reason"]) == ("completed", "hangup")
    assert earlier["duration_s"] >= 0 and earlier["started_at"] <= earlier["answered_at"] <= earlier["ended_at"]

    await alice.send({"type": "get_call_history", "limit": 5})
    assert [c["call_id"] for c in (await alice.expect("call_history"))["calls"]] == [first]
    await bob.send({"type": "get_call_history", "limit": 1})
    assert [c["call_id"] for c in (await bob.expect("call_history"))["calls"]] == [second]


async def test_a_live_call_shows_in_history_without_an_end_reason(connect):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await answered_call(alice, bob)
    await alice.send({"type": "get_call_history"})
    [item] = (await alice.expect("call_history"))["calls"]
    assert (item["call_id"], item["status"], item["end_reason"], item["ended_at"]) == (
        call_id,
        "answered",
        None,
        None,
    )


async def test_stale_calls_left_by_a_crash_are_closed_by_the_reaper(runtime, transactional_db):
    @database_sync_to_async
    def leave_stale_calls() -> tuple[str, str]:
        now = timezone.now()
        a = SignalingUser.objects.create(username="a", user_id="1", last_seen=now)
        b = SignalingUser.objects.create(username="b", user_id="2", last_seen=now)
        ringing = Call.objects.create(
            caller=a, callee=b, status="ringing", caller_channel="gone.1", ring_deadline=now + timedelta(hours=1)
        )
        answered = Call.objects.create(
            caller=b, callee=a, status="answered", caller_channel="gone.2", callee_channel="gone.3", answered_at=now
        )
        return str(ringing.pk), str(answered.pk)

    ringing, answered = await leave_stale_calls()
    await runtime.reaper.reap_once()
    assert ((await call_row(ringing)).status, (await call_row(ringing)).end_reason) == ("failed", "disconnected")
    assert ((await call_row(answered)).status, (await call_row(answered)).end_reason) == ("completed", "disconnected")


@pytest.mark.parametrize(
    "old, new, reason",
    [
        (CallStatus.ANSWERED, CallStatus.RINGING, None),
        (CallStatus.COMPLETED, CallStatus.ANSWERED, None),
        (CallStatus.RINGING, CallStatus.COMPLETED, EndReason.HANGUP),
        (CallStatus.ANSWERED, CallStatus.MISSED, EndReason.TIMEOUT),
        (CallStatus.RINGING, CallStatus.REJECTED, EndReason.HANGUP),
    ],
)
def test_the_state_machine_refuses_transitions_outside_its_table(old, new, reason):
    with pytest.raises(IllegalTransition):
        check_transition(old, new, reason)
