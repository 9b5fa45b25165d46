"""Covers calls.realtime.resume: reconciling a taken-over session's calls (alone), and resume on a real daphne.

A socket dropped without a close frame is held for the grace period; the token
works once and only for its own user.
"""

from __future__ import annotations

import pytest
import websockets

from calls.callflow.live import LiveCall
from calls.callflow.store import CallRecord
from calls.realtime.resume import reconcile
from calls.testing.servers import daphne_server
from calls.tests.netclient import Peer, answered_call, call_row, connect_registered

# --- reconcile: what a session taking over another one's calls is told ------------------

OLD, NEW = "old-channel", "new-channel"


def record(status: str, caller_channel: str = "", callee_channel: str = "", reason: str | None = None) -> CallRecord:
    return CallRecord("c1", "alice", "id-a", "bob", status, reason, caller_channel, callee_channel)


def test_an_answer_that_reached_the_old_channel_is_told_to_the_caller():
    ringing = LiveCall("c1", "bob", is_caller=True)
    calls, missed = reconcile([ringing], {"c1": record("answered", NEW, "bob-channel")}, OLD, NEW)
    assert calls["c1"].answered and calls["c1"].peer_channel == "bob-channel"
    assert missed == [{"type": "call_accepted", "accepter_username": "bob", "call_id": "c1"}]


def test_a_known_answered_call_follows_the_peer_to_its_new_channel():
    # Both parties were parked; bob resumed first, so the row names his new channel.
    mine = LiveCall("c1", "bob", is_caller=True, peer_channel="bob-old", answered=True)
    calls, missed = reconcile([mine], {"c1": record("answered", NEW, "bob-new")}, OLD, NEW)
    assert calls["c1"].peer_channel == "bob-new" and missed == []
    theirs = LiveCall("c1", "alice", is_caller=False, peer_channel="alice-old", answered=True)
    calls, missed = reconcile([theirs], {"c1": record("answered", "alice-new", NEW)}, OLD, NEW)
    assert calls["c1"].peer_channel == "alice-new" and missed == []


def test_a_call_answered_on_another_device_is_over_for_this_one():
    ringing = LiveCall("c1", "alice", is_caller=False, peer_channel="alice-channel")
    calls, missed = reconcile([ringing], {"c1": record("answered", "alice-channel", "other-device")}, OLD, NEW)
    assert calls == {}
    assert missed == [{"type": "call_ended", "from_username": "alice", "call_id": "c1", "reason": "answered_elsewhere"}]


def test_ended_and_rejected_calls_are_reported_in_their_v1_shapes():
    as_caller = LiveCall("c1", "bob", is_caller=True)
    calls, missed = reconcile([as_caller], {"c1": record("rejected", reason="rejected")}, OLD, NEW)
    assert calls == {}
    assert missed == [{"type": "call_rejected", "rejecter_username": "bob", "call_id": "c1", "reason": "rejected"}]
    as_callee = LiveCall("c1", "alice", is_caller=False, answered=True)
    calls, missed = reconcile([as_callee], {"c1": record("completed", reason="hangup")}, OLD, NEW)
    assert calls == {}
    assert missed == [{"type": "call_ended", "from_username": "alice", "call_id": "c1", "reason": "hangup"}]


def test_a_ringing_call_stays_ringing():
    ringing = LiveCall("c1", "bob", is_caller=True)
    calls, missed = reconcile([ringing], {"c1": record("ringing", NEW)}, OLD, NEW)
    assert not calls["c1"].answered and calls["c1"].peer_channel == "" and missed == []


# --- Resume on a real daphne process ---------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    with daphne_server(tmp_path, SIGNALING_RESUME_GRACE="1.5", SIGNALING_PRESENCE_WINDOW_MS="20") as server:
        yield server


async def test_the_grace_running_out_ends_the_call_for_the_peer(server):
    alice, _ = await connect_registered(server.url, "alice")
    bob, registered = await connect_registered(server.url, "bob", resume=True)
    assert registered["resume_token"]
    call_id = await answered_call(alice, bob)
    bob.ws.transport.abort()
    reconnecting = await alice.expect("peer_reconnecting")
    assert (reconnecting["username"], reconnecting["call_id"]) == ("bob", call_id)
    ended = await alice.expect("call_ended")
    assert (ended["call_id"], ended["reason"], ended["from_username"]) == (call_id, "disconnected", "bob")
    assert call_row(server, call_id) == ("completed", "disconnected")
    await alice.ws.close()


async def test_a_resume_token_works_once_and_only_for_its_user(server):
    alice, _ = await connect_registered(server.url, "alice")
    bob, registered = await connect_registered(server.url, "bob", resume=True)
    call_id = await answered_call(alice, bob)
    token = registered["resume_token"]
    bob.ws.transport.abort()
    await alice.expect("peer_reconnecting")

    # Another user presenting bob's token on a fresh socket, then bob's name with another user_id.
    attempts = [
        {"username": "mallory", "user_id": "id-mallory"},
        {"username": "bob", "user_id": "wrong"},
    ]
    refused = []
    for attempt in attempts:
        refused.append(Peer(await websockets.connect(server.url), attempt["username"]))
        await refused[-1].send({"type": "register", **attempt, "resume_token": token})
        await refused[-1].expect_error("resume_failed")

    back, resumed = await connect_registered(server.url, "bob", resume_token=token)
    assert resumed["resumed"] is True and resumed["calls"][0]["call_id"] == call_id
    assert (await alice.expect("peer_reconnected"))["call_id"] == call_id
    await alice.send({"type": "offer", "target_username": "bob", "data": {"sdp": "after"}})
    assert (await back.expect("offer"))["data"] == {"sdp": "after"}

    again = Peer(await websockets.connect(server.url), "bob")
    await again.send({"type": "register", "username": "bob", "user_id": "id-bob", "resume_token": token})
    await again.expect_error("resume_failed")
    assert call_row(server, call_id) == ("answered", None)
    for peer in (alice, back, again, *refused):
        await peer.ws.close()


async def test_a_clean_close_ends_the_session_at_once(server):
    alice, _ = await connect_registered(server.url, "alice")
    bob, _ = await connect_registered(server.url, "bob", resume=True)
    call_id = await answered_call(alice, bob)
    await bob.ws.close()
    # Straight to the end: no peer_reconnecting first (`expect` fails on any other message).
    ended = await alice.expect("call_ended")
    assert (ended["call_id"], ended["reason"]) == (call_id, "disconnected")
    assert call_row(server, call_id) == ("completed", "disconnected")
    await alice.ws.close()
