"""Covers calls.presence.hub: the coalesced broadcast of who is online, with a memory store and no sockets."""

from __future__ import annotations

import json

import pytest

from calls.presence.base import SessionInfo
from calls.presence.hub import PresenceHub
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
    await store.join(SessionInfo("c1", "bob", "u-b"), 5, TTL)
    hub.changed()
    await hub.flush_now()
    assert first.listed() == last.listed() == [[], [{"username": "bob", "user_id": "u-b"}]]


async def test_nothing_is_broadcast_when_nothing_changed(store, hub):
    listener = Listener()
    hub.listen("one", listener, delta=False)
    await hub.flush_now()
    await hub.flush_now()
    assert listener.listed() == [[]]


async def test_a_delta_listener_gets_the_whole_list_first_then_only_what_changed(store, hub):
    await store.join(SessionInfo("c1", "alice", "u-a"), 5, TTL)
    listener = Listener()
    hub.listen("one", listener, delta=True)
    await hub.flush_now()
    await store.join(SessionInfo("c2", "bob", "u-b"), 5, TTL)
    await store.leave("c1")
    hub.changed()
    await hub.flush_now()
    sent = [json.loads(text) for text in listener.texts]
    assert [(m["type"], m.get("users", m.get("username"))) for m in sent] == [
        ("online_users", [{"username": "alice", "user_id": "u-a"}]),
        ("user_offline", "alice"),
        ("user_online", "bob"),
    ]


async def test_a_session_that_stopped_listening_is_sent_nothing_more(store, hub):
    listener = Listener()
    hub.listen("one", listener, delta=False)
    await hub.flush_now()
    hub.unlisten("one")
    await store.join(SessionInfo("c1", "bob", "u-b"), 5, TTL)
    hub.changed()
    await hub.flush_now()
    assert listener.listed() == [[]]
