"""Covers calls.presence.hub: the coalesced broadcast of who is online, with a memory store and no sockets."""

from __future__ import annotations

import json

import pytest

from calls.presence.base import SessionInfo
from calls.presence.hub import DELTA, FULL, WATCH, PresenceHub
from calls.presence.memory import MemoryPresenceStore

TTL = 30.0


@pytest.fixture
def store() -> MemoryPresenceStore:
    return MemoryPresenceStore()


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
    await store.join(SessionInfo("c1", "alice", "u-a"), 5, TTL)
    first, broken, last = Listener(), Listener(fails=True), Listener()
    hub.listen("first", first, FULL)
    hub.listen("broken", broken, FULL)
    hub.listen("last", last, FULL)
    await hub.flush_now()
    assert first.listed() == last.listed() == [[{"username": "alice", "user_id": "u-a"}]]
    assert "presence not sent to one session" in caplog.text


async def test_the_hub_keeps_broadcasting_to_the_others_after_a_failed_send(store, hub):
    first, broken, last = Listener(), Listener(fails=True), Listener()
    for channel, listener in (("first", first), ("broken", broken), ("last", last)):
        hub.listen(channel, listener, FULL)
    await hub.flush_now()
    await store.join(SessionInfo("c1", "bob", "u-b"), 5, TTL)
    hub.changed()
    await hub.flush_now()
    assert first.listed() == last.listed() == [[], [{"username": "bob", "user_id": "u-b"}]]


async def test_nothing_is_broadcast_when_nothing_changed(store, hub):
    listener = Listener()
    hub.listen("one", listener, FULL)
    await hub.flush_now()
    await hub.flush_now()
    assert listener.listed() == [[]]


async def test_a_delta_listener_gets_the_whole_list_first_then_only_what_changed(store, hub):
    await store.join(SessionInfo("c1", "alice", "u-a"), 5, TTL)
    listener = Listener()
    hub.listen("one", listener, DELTA)
    await hub.flush_now()
    await store.join(SessionInfo("c2", "bob", "u-b"), 5, TTL)
    await store.leave("c1")
    hub.changed()
    await hub.flush_now()
    sent = [json.loads(text) for text in listener.texts]
    assert sent == [
        {"type": "presence", "snapshot": True, "online": [{"username": "alice", "user_id": "u-a"}], "offline": []},
        {
            "type": "presence",
            "online": [{"username": "bob", "user_id": "u-b"}],
            "offline": [{"username": "alice", "user_id": "u-a"}],
        },
    ]


async def test_a_session_that_stopped_listening_is_sent_nothing_more(store, hub):
    listener = Listener()
    hub.listen("one", listener, FULL)
    await hub.flush_now()
    hub.unlisten("one")
    await store.join(SessionInfo("c1", "bob", "u-b"), 5, TTL)
    hub.changed()
    await hub.flush_now()
    assert listener.listed() == [[]]


async def test_changes_within_one_window_make_one_frame_for_every_delta_session(store, hub):
    listeners = [Listener() for _ in range(3)]
    for index, listener in enumerate(listeners):
        hub.listen(f"s{index}", listener, DELTA)
    await hub.flush_now()
    for index in range(50):
        await store.join(SessionInfo(f"c{index}", f"user{index}", f"u{index}"), 5, TTL)
    await store.leave("c7")
    hub.changed()
    await hub.flush_now()
    for listener in listeners:
        frames = [json.loads(text) for text in listener.texts]
        assert len(frames) == 2 and frames[1]["offline"] == []
        assert {user["username"] for user in frames[1]["online"]} == {f"user{i}" for i in range(50)} - {"user7"}
    # Encoded once for all of them.
    assert listeners[0].texts[1] is listeners[1].texts[1]


async def test_a_user_who_left_and_came_back_in_a_window_is_listed_once_in_its_final_state(store, hub):
    await store.join(SessionInfo("c1", "alice", "u-a"), 5, TTL)
    listener = Listener()
    hub.listen("one", listener, DELTA)
    await hub.flush_now()
    await store.leave("c1")
    await store.join(SessionInfo("c2", "alice", "u-a2"), 5, TTL)  # back, with another user_id
    hub.changed()
    await hub.flush_now()
    frame = json.loads(listener.texts[-1])
    assert (frame["online"], frame["offline"]) == ([{"username": "alice", "user_id": "u-a2"}], [])


async def test_a_watch_list_gets_its_users_only(store, hub):
    await store.join(SessionInfo("c1", "alice", "u-a"), 5, TTL)
    await store.join(SessionInfo("c2", "bob", "u-b"), 5, TTL)
    watcher = Listener()
    hub.listen("w", watcher, WATCH, ("Bob", "carol"))
    await hub.flush_now()
    await store.join(SessionInfo("c3", "carol", "u-c"), 5, TTL)
    await store.join(SessionInfo("c4", "dave", "u-d"), 5, TTL)
    await store.leave("c1")
    hub.changed()
    await hub.flush_now()
    await store.join(SessionInfo("c5", "erin", "u-e"), 5, TTL)  # nobody watched changed: no frame
    hub.changed()
    await hub.flush_now()
    frames = [json.loads(text) for text in watcher.texts]
    assert frames == [
        {"type": "presence", "snapshot": True, "online": [{"username": "bob", "user_id": "u-b"}], "offline": []},
        {"type": "presence", "online": [{"username": "carol", "user_id": "u-c"}], "offline": []},
    ]


async def test_watching_more_users_answers_with_the_added_ones_online(store, hub):
    await store.join(SessionInfo("c1", "alice", "u-a"), 5, TTL)
    watcher = Listener()
    hub.listen("w", watcher, WATCH, ())
    snapshot = await hub.watch("w", ("alice", "zoe"), ())
    assert snapshot == {
        "type": "presence",
        "snapshot": True,
        "online": [{"username": "alice", "user_id": "u-a"}],
        "offline": [],
    }
    await hub.flush_now()
    await hub.watch("w", (), ("alice",))
    await store.leave("c1")
    hub.changed()
    await hub.flush_now()
    assert hub.watched("w") == ["zoe"]
    assert all("alice" not in text for text in watcher.texts[1:])


async def test_in_watch_scope_nobody_follows_everyone(store, hub, settings):
    settings.SIGNALING_PRESENCE_SCOPE = "watch"
    await store.join(SessionInfo("c1", "alice", "u-a"), 5, TTL)
    v1, delta = Listener(), Listener()
    hub.listen("v1", v1, FULL)
    hub.listen("delta", delta, DELTA)
    await hub.flush_now()
    await store.join(SessionInfo("c2", "bob", "u-b"), 5, TTL)
    hub.changed()
    await hub.flush_now()
    assert v1.listed() == [[]] and delta.texts == []
