"""Covers calls.presence.memory: the presence leases of a process without Redis, alone.

Time is a fake clock (`clock`): leases and parking read `time.monotonic`.
"""

from __future__ import annotations

import pytest

from calls.presence.base import JoinRefused, SessionInfo
from calls.presence.memory import MemoryPresenceStore
from calls.wire import protocol

TTL = 30.0


@pytest.fixture
def store() -> MemoryPresenceStore:
    return MemoryPresenceStore()


def session(channel: str, username: str = "Alice", user_id: str = "u-a") -> SessionInfo:
    return SessionInfo(channel, username, user_id)


# --- The store: one owner per username key ------------------------------------------------


async def test_a_case_variant_of_an_online_name_is_taken(store):
    await store.join(session("c1", "Alice", "u-a"), 5, TTL)
    with pytest.raises(JoinRefused) as refused:
        await store.join(session("c2", "alice", "u-other"), 5, TTL)
    assert refused.value.code == protocol.USERNAME_TAKEN
    assert refused.value.holders == (session("c1", "Alice", "u-a"),)
    assert await store.sessions_of("alice") == [session("c1", "Alice", "u-a")]
    assert await store.live_channels() == {"c1"}


async def test_a_width_variant_of_an_online_name_is_taken(store):
    await store.join(session("c1", "alice", "u-a"), 5, TTL)
    with pytest.raises(JoinRefused) as refused:
        await store.join(session("c2", "ａｌｉｃｅ", "u-other"), 5, TTL)
    assert refused.value.code == protocol.USERNAME_TAKEN


async def test_the_session_cap_refuses_the_same_user_and_names_the_holders(store):
    await store.join(session("c1"), 1, TTL)
    with pytest.raises(JoinRefused) as refused:
        await store.join(session("c2"), 1, TTL)
    assert refused.value.code == protocol.TOO_MANY_SESSIONS
    assert refused.value.holders == (session("c1"),)
    assert await store.live_channels() == {"c1"}


async def test_a_displaced_session_does_not_count_against_the_cap(store):
    await store.join(session("old"), 1, TTL)
    came_online = await store.join(session("new"), 1, TTL, displace=["old"])
    assert came_online is False  # the user never went offline
    assert await store.live_channels() == {"old", "new"}
    assert await store.leave("old") == (session("old"), False)
    assert await store.sessions_of("Alice") == [session("new")]


async def test_a_displaced_session_does_not_hold_the_name_against_another_user_id(store):
    await store.join(session("old", "Alice", "u-a"), 1, TTL)
    assert await store.join(session("new", "alice", "u-b"), 1, TTL, displace=["old"]) is False
    await store.leave("old")
    assert await store.sessions_of("ALICE") == [session("new", "alice", "u-b")]


async def test_the_first_session_of_a_user_brings_it_online(store):
    assert await store.join(session("c1"), 5, TTL) is True
    assert await store.join(session("c2", "ALICE"), 5, TTL) is False
    assert await store.leave("c1") == (session("c1"), False)
    assert await store.leave("c2") == (session("c2", "ALICE"), True)
    assert await store.online_users() == []


async def test_sessions_of_ignores_case_and_keeps_each_written_name(store):
    await store.join(session("c1", "Alice"), 5, TTL)
    await store.join(session("c2", "ALICE"), 5, TTL)
    expected = [session("c1", "Alice"), session("c2", "ALICE")]
    for asked in ("alice", "ALICE", "Alice", "ａｌｉｃｅ"):
        assert sorted(await store.sessions_of(asked), key=lambda s: s.channel) == expected
    assert await store.sessions_of("bob") == []


async def test_online_users_lists_each_user_once_as_its_owner_writes_it(store):
    await store.join(session("c1", "carol", "u-c"), 5, TTL)
    await store.join(session("c2", "Alice", "u-a"), 5, TTL)
    await store.join(session("c3", "ALICE", "u-a"), 5, TTL)
    await store.join(session("c4", "bob", "u-b"), 5, TTL)
    assert await store.online_users() == [
        {"username": "Alice", "user_id": "u-a"},
        {"username": "bob", "user_id": "u-b"},
        {"username": "carol", "user_id": "u-c"},
    ]


async def test_a_name_is_free_again_once_its_last_session_leaves(store):
    await store.join(session("c1", "Alice", "u-a"), 1, TTL)
    await store.leave("c1")
    assert await store.join(session("c2", "alice", "u-b"), 1, TTL) is True
    assert await store.online_users() == [{"username": "alice", "user_id": "u-b"}]


async def test_a_lease_runs_out_unless_renewed_and_expires_once(store, clock):
    await store.join(session("c1", "alice", "u-a"), 5, TTL)
    await store.join(session("c2", "bob", "u-b"), 5, TTL)
    clock.advance(TTL - 1)
    assert await store.renew(["c1", "gone"], TTL) == ["gone"]
    clock.advance(2)
    assert await store.expire() == [session("c2", "bob", "u-b")]
    assert await store.expire() == []
    assert await store.online_users() == [{"username": "alice", "user_id": "u-a"}]


async def test_a_parked_session_is_claimed_once_and_only_with_its_nonce(store, clock):
    await store.join(session("c1", "alice", "u"), 5, TTL)
    await store.park("c1", {"nonce": "n", "username": "alice"}, 0.2)
    assert await store.claim_parked("c1", "other") is None
    assert await store.claim_parked("c1", "n") == {"nonce": "n", "username": "alice"}
    assert await store.claim_parked("c1", "n") is None


async def test_parking_shortens_the_lease_to_the_parking_time(store, clock):
    await store.join(session("c1", "alice", "u"), 5, TTL)
    await store.park("c1", {"nonce": "n"}, 0.2)
    clock.advance(0.1)
    assert await store.expire() == []
    clock.advance(0.1)
    assert await store.expire() == [session("c1", "alice", "u")]


async def test_a_parked_session_cannot_be_claimed_after_its_parking_time(store, clock):
    await store.join(session("c1", "alice", "u"), 5, TTL)
    await store.park("c1", {"nonce": "n"}, 0.2)
    clock.advance(0.2)
    assert await store.claim_parked("c1", "n") is None
