"""The in-memory presence store and the hub that broadcasts the list, without sockets."""

from __future__ import annotations

import json

import pytest

from calls.presence.base import JoinRefused, SessionInfo
from calls.presence.hub import PresenceHub
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


# --- The hub: one list, sent to every listener ---------------------------------------------


class Listener:
    """An async send callable that keeps what it was sent, or fails every send."""

    def __init__(self, fails: bool = False) -> None:
        self.fails = fails
        self.texts: list[str] = []

    async def __call__(self, text: str) -> None:
        if self.fails:
            raise ConnectionError("socket gone")
        self.texts.append(text)

    def listed(self) -> list[list[dict[str, str]]]:
        return [json.loads(text)["users"] for text in self.texts]


@pytest.fixture
async def hub(store):
    # A window long enough that only flush_now broadcasts during a test.
    hub = PresenceHub(store, window=60.0)
    yield hub
    if hub._flush_task is not None:
        hub._flush_task.cancel()


async def test_a_listener_whose_send_fails_does_not_stop_the_others(store, hub, caplog):
    await store.join(session("c1", "alice", "u-a"), 5, TTL)
    first, broken, last = Listener(), Listener(fails=True), Listener()
    hub.listen("first", first, delta=False)
    hub.listen("broken", broken, delta=False)
    hub.listen("last", last, delta=False)
    await hub.flush_now()
    assert first.listed() == last.listed() == [[{"username": "alice", "user_id": "u-a"}]]
    assert "presence not sent to one session" in caplog.text


async def test_the_hub_keeps_broadcasting_to_the_others_after_a_failed_send(store, hub):
    first, broken, last = Listener(), Listener(fails=True), Listener()
    for channel, listener in (("first", first), ("broken", broken), ("last", last)):
        hub.listen(channel, listener, delta=False)
    await hub.flush_now()
    await store.join(session("c1", "bob", "u-b"), 5, TTL)
    hub.changed()
    await hub.flush_now()
    assert first.listed() == last.listed() == [[], [{"username": "bob", "user_id": "u-b"}]]


async def test_nothing_is_broadcast_when_nothing_changed(store, hub):
    listener = Listener()
    hub.listen("one", listener, delta=False)
    await hub.flush_now()
    await hub.flush_now()
    assert listener.listed() == [[]]
