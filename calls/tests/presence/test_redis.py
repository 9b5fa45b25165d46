"""Covers calls.presence.redis: RedisPresenceStore against a real redis-server; two stores stand for two processes."""

from __future__ import annotations

import asyncio

import pytest

from calls.presence.base import JoinRefused, SessionInfo, StoreUnavailable
from calls.presence.redis import RedisPresenceStore
from calls.wire import protocol, text

pytestmark = pytest.mark.services

TTL = 30.0


@pytest.fixture
async def stores(redis_server):
    """Two stores on one Redis, as two server processes would have."""
    pair = RedisPresenceStore(redis_server.url), RedisPresenceStore(redis_server.url)
    yield pair
    for store in pair:
        await store.close()


@pytest.fixture
def store(stores):
    return stores[0]


def session(channel: str, username: str = "alice", user_id: str = "u-a") -> SessionInfo:
    return SessionInfo(channel, username, user_id)


async def channels_of(store: RedisPresenceStore, username: str) -> list[str]:
    return sorted(s.channel for s in await store.sessions_of(username))


async def until(condition, timeout: float = 10.0):
    """Poll an async condition until it returns something truthy; return that."""
    async with asyncio.timeout(timeout):
        while True:
            if result := await condition():
                return result
            await asyncio.sleep(0.05)


async def test_the_first_session_brings_a_user_online_and_the_second_does_not(stores):
    a, b = stores
    assert await a.join(session("c1"), 5, TTL) is True
    assert await b.join(session("c2"), 5, TTL) is False
    assert await b.online_users() == [{"username": "alice", "user_id": "u-a"}]
    assert await channels_of(a, "alice") == ["c1", "c2"]
    assert await a.live_channels() == {"c1", "c2"}


async def test_online_users_are_sorted_and_the_same_from_every_process(stores):
    a, b = stores
    await a.join(session("c1", "zoe", "u-z"), 5, TTL)
    await b.join(session("c2", "bob", "u-b"), 5, TTL)
    await a.join(session("c3", "émile", "u-e"), 5, TTL)
    expected = [
        {"username": "bob", "user_id": "u-b"},
        {"username": "zoe", "user_id": "u-z"},
        {"username": "émile", "user_id": "u-e"},
    ]
    assert await a.online_users() == expected
    assert await b.online_users() == expected


async def test_a_username_held_by_another_user_id_is_refused_on_another_process(stores):
    a, b = stores
    await a.join(session("c1", "alice", "u-a"), 5, TTL)
    with pytest.raises(JoinRefused) as refused:
        await b.join(session("c2", "alice", "u-other"), 5, TTL)
    assert refused.value.code == protocol.USERNAME_TAKEN
    assert await b.sessions_of("alice") == [session("c1", "alice", "u-a")]
    assert await b.online_users() == [{"username": "alice", "user_id": "u-a"}]


async def test_racing_joins_for_one_username_give_it_to_exactly_one_user_id(stores):
    a, b = stores
    results = await asyncio.gather(
        *((a if i % 2 else b).join(session(f"c{i}", "alice", f"u-{i}"), 50, TTL) for i in range(20)),
        return_exceptions=True,
    )
    winners = [i for i, result in enumerate(results) if result is True]
    assert len(winners) == 1
    assert all(isinstance(r, JoinRefused) and r.code == protocol.USERNAME_TAKEN for r in results if r is not True)
    assert await a.online_users() == [{"username": "alice", "user_id": f"u-{winners[0]}"}]
    assert await channels_of(a, "alice") == [f"c{winners[0]}"]


async def test_racing_joins_never_pass_the_session_cap(stores):
    a, b = stores
    results = await asyncio.gather(
        *((a if i % 2 else b).join(session(f"c{i}"), 3, TTL) for i in range(12)), return_exceptions=True
    )
    joined = [r for r in results if r is not None and not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, JoinRefused)]
    assert len(joined) == 3 and len(refused) == 9
    assert {r.code for r in refused} == {protocol.TOO_MANY_SESSIONS}
    assert len(await a.sessions_of("alice")) == 3


async def test_joining_again_with_the_same_channel_does_not_take_another_slot(store):
    await store.join(session("c1"), 1, TTL)
    assert await store.join(session("c1"), 1, TTL) is False
    assert await channels_of(store, "alice") == ["c1"]


async def test_leave_reports_when_the_last_session_of_a_user_goes(stores):
    a, b = stores
    await a.join(session("c1"), 5, TTL)
    await b.join(session("c2"), 5, TTL)
    assert await b.leave("c1") == (session("c1"), False)
    assert await a.online_users() == [{"username": "alice", "user_id": "u-a"}]
    assert await a.leave("c2") == (session("c2"), True)
    assert await b.online_users() == []
    assert await b.leave("c2") == (None, False)
    assert await b.live_channels() == set()


async def test_a_lapsed_lease_is_expired_once_and_its_user_goes_offline(stores):
    a, b = stores
    await a.join(session("dead", "bob", "u-b"), 5, 0.2)
    await a.join(session("alive"), 5, TTL)

    async def expired_anywhere() -> list[SessionInfo]:
        return [s for found in await asyncio.gather(a.expire(), b.expire()) for s in found]

    assert await until(expired_anywhere) == [session("dead", "bob", "u-b")]
    assert await a.expire() == [] and await b.expire() == []
    assert await b.online_users() == [{"username": "alice", "user_id": "u-a"}]
    assert await b.live_channels() == {"alive"}


async def test_renewal_keeps_leases_alive_and_names_the_ones_already_gone(stores):
    a, b = stores
    await a.join(session("c1"), 5, 0.3)
    await a.join(session("c2", "bob", "u-b"), 5, 0.3)
    assert await a.renew(["c1", "c2"], TTL) == []
    await b.leave("c2")
    assert await a.renew(["c1", "c2", "never"], TTL) == ["c2", "never"]
    await asyncio.sleep(0.4)  # past the first lease: only the renewal keeps c1
    assert await b.expire() == []
    assert await channels_of(b, "alice") == ["c1"]


async def test_renewal_covers_more_sessions_than_one_batch(store):
    sessions = [session(f"c{i}", f"user{i}", f"u{i}") for i in range(1200)]
    assert await store.restore(sessions, 5, 0.5) == []
    assert await store.renew([s.channel for s in sessions], TTL) == []
    assert len(await store.online_users()) == 1200


async def test_a_lapsed_session_holds_neither_the_name_nor_a_slot(stores):
    a, b = stores
    await a.join(session("dead", "alice", "u-a"), 1, 0.2)
    assert await until(lambda: _lapsed(b, "alice"))
    # Not expired yet by any reaper: the join itself sees the lease ran out.
    assert await b.join(session("new", "alice", "u-new"), 1, TTL) is True
    assert await a.online_users() == [{"username": "alice", "user_id": "u-new"}]
    assert await a.live_channels() == {"new"}


async def _lapsed(store: RedisPresenceStore, username: str) -> bool:
    return not await store.sessions_of(username)


async def test_restore_reports_the_sessions_it_cannot_bring_back(store):
    await store.join(session("c0", "alice", "u-thief"), 5, TTL)
    refused = await store.restore([session("c1", "alice", "u-a"), session("c2", "bob", "u-b")], 5, TTL)
    assert [(s.channel, exc.code) for s, exc in refused] == [("c1", protocol.USERNAME_TAKEN)]
    assert await channels_of(store, "bob") == ["c2"]


async def test_a_redis_restart_changes_the_epoch_and_the_store_recovers(redis_server, stores):
    a, b = stores
    await a.join(session("c1"), 5, TTL)
    before = await a.epoch()
    assert await b.epoch() == before
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        await a.online_users()
    with pytest.raises(StoreUnavailable):
        await b.join(session("c2"), 5, TTL)
    redis_server.start()
    after = await a.epoch()
    assert after != before
    assert await b.epoch() == after
    assert await a.online_users() == []
    assert await a.renew(["c1"], TTL) == ["c1"]
    assert await b.join(session("c1"), 5, TTL) is True


async def test_clear_forgets_everything(store):
    await store.join(session("c1"), 5, TTL)
    await store.clear()
    assert await store.online_users() == []
    assert await store.live_channels() == set()


async def test_a_parked_session_is_claimed_once_and_only_with_its_nonce(stores):
    first, second = stores
    await first.join(session("c1"), 5, TTL)
    state = {"nonce": "right", "username": "alice", "calls": [{"call_id": "x"}]}
    await first.park("c1", state, 5.0)
    assert await second.claim_parked("c1", "wrong") is None
    assert await second.claim_parked("c1", "right") == state
    assert await first.claim_parked("c1", "right") is None
    # The lease now runs out with the parking, not with the old renewal period.
    lease_ms = await first.redis.zscore("signaling:presence:leases", "c1")
    now_s, now_us = await first.redis.time()
    assert 4_000 < lease_ms - (now_s * 1000 + now_us // 1000) <= 5_000


# --- One owner per username key, displacement, and who holds a refused name -------------


async def test_a_case_variant_of_a_name_held_on_another_process_is_taken(stores):
    a, b = stores
    await a.join(session("c1", "Alice", "u-a"), 5, TTL)
    with pytest.raises(JoinRefused) as refused:
        await b.join(session("c2", "alice", "u-other"), 5, TTL)
    assert refused.value.code == protocol.USERNAME_TAKEN
    assert refused.value.holders == (session("c1", "Alice", "u-a"),)
    assert await b.live_channels() == {"c1"}
    assert await b.online_users() == [{"username": "Alice", "user_id": "u-a"}]


async def test_a_width_variant_of_a_held_name_is_taken(stores):
    a, b = stores
    await a.join(session("c1", "alice", "u-a"), 5, TTL)
    with pytest.raises(JoinRefused) as refused:
        await b.join(session("c2", "ａｌｉｃｅ", "u-other"), 5, TTL)
    assert refused.value.code == protocol.USERNAME_TAKEN


async def test_the_session_cap_names_the_sessions_holding_the_slots(stores):
    a, b = stores
    await a.join(session("c1"), 2, TTL)
    await b.join(session("c2", "ALICE"), 2, TTL)
    with pytest.raises(JoinRefused) as refused:
        await a.join(session("c3", "alice"), 2, TTL)
    assert refused.value.code == protocol.TOO_MANY_SESSIONS
    assert sorted(refused.value.holders, key=lambda s: s.channel) == [session("c1"), session("c2", "ALICE")]
    assert await b.live_channels() == {"c1", "c2"}


async def test_a_displaced_session_counts_for_neither_the_cap_nor_the_name(stores):
    a, b = stores
    await a.join(session("old", "Alice", "u-a"), 1, TTL)
    assert await b.join(session("same", "Alice", "u-a"), 1, TTL, displace=["old"]) is False
    assert await b.join(session("other", "alice", "u-b"), 1, TTL, displace=["old", "same"]) is False
    assert await a.live_channels() == {"old", "same", "other"}


async def test_a_displaced_sessions_leaving_keeps_the_newcomer_online(stores):
    a, b = stores
    await a.join(session("old"), 1, TTL)
    await b.join(session("new"), 1, TTL, displace=["old"])
    assert await a.leave("old") == (session("old"), False)
    assert await b.sessions_of("alice") == [session("new")]
    assert await a.online_users() == [{"username": "alice", "user_id": "u-a"}]


async def test_sessions_of_ignores_case_and_keeps_each_written_name(stores):
    a, b = stores
    await a.join(session("c1", "Alice"), 5, TTL)
    await b.join(session("c2", "ALICE"), 5, TTL)
    for asked in ("alice", "ALICE", "ａｌｉｃｅ"):
        found = sorted(await b.sessions_of(asked), key=lambda s: s.channel)
        assert found == [session("c1", "Alice"), session("c2", "ALICE")]
    assert await a.sessions_of("bob") == []


async def test_a_case_variant_brings_no_second_user_online(stores):
    a, b = stores
    assert await a.join(session("c1", "Alice"), 5, TTL) is True
    assert await b.join(session("c2", "ALICE"), 5, TTL) is False
    [listed] = await a.online_users()
    assert listed["user_id"] == "u-a" and text.username_key(listed["username"]) == "alice"
    assert await b.leave("c1") == (session("c1", "Alice"), False)
    assert await a.leave("c2") == (session("c2", "ALICE"), True)
    assert await b.online_users() == []


async def test_online_users_show_the_written_form_and_the_same_on_every_process(stores):
    a, b = stores
    await a.join(session("c1", "carol", "u-c"), 5, TTL)
    await b.join(session("c2", "Alice", "u-a"), 5, TTL)
    await a.join(session("c3", "bob", "u-b"), 5, TTL)
    expected = [
        {"username": "Alice", "user_id": "u-a"},
        {"username": "bob", "user_id": "u-b"},
        {"username": "carol", "user_id": "u-c"},
    ]
    assert await a.online_users() == expected
    assert await b.online_users() == expected


async def test_a_later_session_written_differently_does_not_rename_the_user(stores):
    """As in the memory store: the list shows the name as the user's first session wrote it."""
    a, b = stores
    await a.join(session("c1", "Alice"), 5, TTL)
    await b.join(session("c2", "ALICE"), 5, TTL)
    assert await a.online_users() == [{"username": "Alice", "user_id": "u-a"}]
