"""Pure pieces of session handling: reconciling a taken-over session's calls, and the
in-memory store's parking (no server, no database)."""

from __future__ import annotations

import asyncio

from calls.callflow.live import LiveCall
from calls.callflow.store import CallRecord
from calls.presence.base import SessionInfo
from calls.presence.memory import MemoryPresenceStore
from calls.realtime.resume import reconcile

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


def test_the_memory_store_parks_once_with_its_nonce():
    async def scenario() -> None:
        store = MemoryPresenceStore()
        await store.join(SessionInfo("c1", "alice", "u"), 5, 30.0)
        await store.park("c1", {"nonce": "n", "username": "alice"}, 0.2)
        assert await store.claim_parked("c1", "other") is None
        assert await store.claim_parked("c1", "n") == {"nonce": "n", "username": "alice"}
        assert await store.claim_parked("c1", "n") is None
        # The lease was shortened to the parking time.
        await asyncio.sleep(0.25)
        assert [s.channel for s in await store.expire()] == ["c1"]

    asyncio.run(scenario())
