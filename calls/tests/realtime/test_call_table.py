"""Covers calls.realtime.call_table, with the calls.callflow.service behind it, through the real ASGI application.

The call lifecycle as clients see it: ids, reasons, busy, timeout, several devices,
who may signal whom, history, the call limits, and the rows each step leaves.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from calls.tests.wsclient import answered_call, call_row, calls_in_db, end_call, ring, timeline

pytestmark = pytest.mark.django_db(transaction=True)


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
    ringing = await ring(alice, bob)
    await carol.send({"type": "call_request", "target_username": "bob"})
    busy = await carol.expect("call_rejected")
    assert busy["reason"] == "busy"
    await bob.nothing()
    assert [(str(c.id), c.status) for c in await calls_in_db()] == [(ringing, "ringing"), (busy["call_id"], "busy")]


async def test_a_caller_already_in_a_call_cannot_ring_someone_else(connect):
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    await answered_call(alice, bob)
    await alice.send({"type": "call_request", "target_username": "carol"})
    await alice.expect_error("already_in_call")
    await carol.nothing()
    assert [c.callee.username for c in await calls_in_db()] == ["bob"]


async def test_an_unanswered_call_times_out_for_both(connect, settings):
    settings.SIGNALING_RING_TIMEOUT = 0.3
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, bob)
    for side, peer in ((alice, "bob"), (bob, "alice")):
        ended = await side.expect("call_ended")
        assert (ended["call_id"], ended["reason"], ended["from_username"]) == (call_id, "timeout", peer)
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("missed", "timeout")


async def test_the_caller_cancels_a_ringing_call(connect):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, bob)
    await alice.send({"type": "call_ended", "target_username": "bob"})
    ended = await bob.expect("call_ended")
    assert (ended["call_id"], ended["reason"], ended["from_username"]) == (call_id, "cancelled", "alice")
    await alice.nothing()
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("cancelled", "cancelled")


async def test_a_rejection_carries_its_reason(connect):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, bob)
    await bob.send({"type": "call_rejected", "call_id": call_id})
    rejected = await alice.expect("call_rejected")
    assert (rejected["call_id"], rejected["reason"], rejected["rejecter_username"]) == (call_id, "rejected", "bob")
    row = await call_row(call_id)
    assert (row.status, row.end_reason) == ("rejected", "rejected")


async def test_a_ringing_caller_disconnecting_fails_the_call(connect):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, bob)
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
    call_id = await ring(alice, phone, laptop)
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
    call_id = await ring(alice, phone, laptop)
    accept = {"type": "call_accepted", "call_id": call_id}
    await asyncio.gather(phone.send(accept), laptop.send(accept))
    await alice.expect("call_accepted")
    # The loser is told twice, in either order: its accept is refused, and the call
    # was answered elsewhere. The winner hears nothing more.
    heard = {device: await device.heard() for device in (phone, laptop)}
    outcomes = sorted(sorted((m["type"], m.get("code") or m.get("reason")) for m in msgs) for msgs in heard.values())
    assert outcomes == [[], [("call_ended", "answered_elsewhere"), ("error", "not_ringing")]]
    await alice.nothing()
    assert await timeline(call_id) == [("", "ringing", None), ("ringing", "answered", None)]


async def test_a_rejection_from_one_device_stops_the_others_ringing(connect, multi_device):
    alice = await connect("alice")
    phone, laptop = await connect("bob", "u-b"), await connect("bob", "u-b")
    call_id = await ring(alice, phone, laptop)
    await laptop.send({"type": "call_rejected", "caller_username": "alice"})
    assert (await alice.expect("call_rejected"))["reason"] == "rejected"
    stopped = await phone.expect("call_ended")
    assert (stopped["call_id"], stopped["reason"]) == (call_id, "rejected")
    await laptop.nothing()


async def test_one_ringing_device_leaving_keeps_the_call_ringing(connect, multi_device):
    alice = await connect("alice")
    phone, laptop = await connect("bob", "u-b"), await connect("bob", "u-b")
    call_id = await ring(alice, phone, laptop)
    await laptop.close()
    await alice.nothing()
    await phone.send({"type": "call_accepted", "call_id": call_id})
    await alice.expect("call_accepted")
    assert (await call_row(call_id)).status == "answered"


async def test_history_lists_the_askers_own_calls_newest_first(connect):
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    first = await answered_call(alice, bob)
    await alice.send({"type": "call_ended", "call_id": first})
    await bob.expect("call_ended")
    second = await ring(carol, bob)
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


# --- The call limits (calls.callflow.limits) as a caller meets them ---------------------------


async def test_a_callee_who_never_answers_stops_ringing_for_that_caller(connect, settings):
    settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE = 2
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    for _ in range(2):
        await end_call(alice, bob, await ring(alice, bob), "cancelled")

    await alice.send({"type": "call_request", "target_username": "bob"})
    refused = await alice.expect_error("call_rate_limited")
    assert "bob" in refused["message"]
    await bob.nothing()
    assert len(await calls_in_db()) == 2

    await ring(carol, bob)
    assert len(await calls_in_db()) == 3


async def test_an_answered_call_lets_the_caller_ring_that_callee_again(connect, settings):
    settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE = 1
    alice, bob = await connect("alice"), await connect("bob")
    first = await answered_call(alice, bob)
    await end_call(alice, bob, first, "hangup")
    await end_call(alice, bob, await ring(alice, bob), "cancelled")
    await alice.send({"type": "call_request", "target_username": "bob"})
    await alice.expect_error("call_rate_limited")
    await bob.nothing()
    assert len(await calls_in_db()) == 2


async def test_a_caller_may_start_only_so_many_calls_a_minute(connect, settings):
    settings.SIGNALING_CALLS_PER_MINUTE = 2
    alice, bob, carol, dave = [await connect(name) for name in ("alice", "bob", "carol", "dave")]
    await end_call(alice, bob, await ring(alice, bob), "cancelled")
    await end_call(alice, carol, await ring(alice, carol), "cancelled")

    await alice.send({"type": "call_request", "target_username": "dave"})
    await alice.expect_error("call_rate_limited")
    await dave.nothing()
    assert [call.callee.username for call in await calls_in_db()] == ["bob", "carol"]
