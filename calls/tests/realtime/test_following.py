"""Covers calls.realtime.following: how a session follows presence (v1 lists, delta frames, a watch list)."""

from __future__ import annotations

import pytest

from calls.tests.wsclient import Client


def names(frame: dict) -> tuple[list[str], list[str]]:
    return [user["username"] for user in frame["online"]], [user["username"] for user in frame["offline"]]


async def test_a_delta_session_gets_a_snapshot_then_one_frame_per_window(connect):
    await connect("alice")
    watcher = await connect("walt", presence="delta")
    snapshot = await watcher.expect("presence")
    assert snapshot["snapshot"] is True and names(snapshot) == (["alice", "walt"], [])
    bob = await connect("bob")
    assert names(await watcher.expect("presence")) == (["bob"], [])
    await bob.close()
    assert names(await watcher.expect("presence")) == ([], ["bob"])


async def test_a_watch_list_in_register_follows_those_users_only(connect):
    await connect("alice")
    await connect("bob")
    watcher = await connect("walt", watch=["bob", "Carol"])
    snapshot = await watcher.expect("presence")
    assert snapshot["snapshot"] is True and names(snapshot) == (["bob"], [])
    await connect("dave")  # not watched
    carol = await connect("carol")
    assert names(await watcher.expect("presence")) == (["carol"], [])
    await carol.close()
    assert names(await watcher.expect("presence")) == ([], ["carol"])
    await watcher.nothing()


async def test_watch_adds_and_removes_users_and_answers_with_the_added_ones_online(connect):
    await connect("alice")
    watcher = await connect("walt", watch=[])
    await watcher.expect("presence")
    await watcher.send({"type": "watch", "add": ["alice", "zoe"]})
    answer = await watcher.expect("presence")
    assert answer["snapshot"] is True and names(answer) == (["alice"], [])
    await watcher.send({"type": "watch", "remove": ["alice"]})
    await watcher.expect("presence")  # the (empty) snapshot of nothing added
    zoe = await connect("zoe")
    assert names(await watcher.expect("presence")) == (["zoe"], [])
    await zoe.close()
    assert names(await watcher.expect("presence")) == ([], ["zoe"])


async def test_a_session_watching_too_many_users_is_refused_with_watch_limit(connect, settings):
    settings.SIGNALING_WATCH_LIMIT = 2
    client = Client()
    await client.connect()
    await client.send({"type": "register", "username": "walt", "user_id": "id-walt", "watch": ["a", "b", "c"]})
    await client.expect_error("watch_limit")
    await client.register("walt", "id-walt", watch=["a", "b"])
    await client.send({"type": "watch", "add": ["c"]})
    await client.expect_error("watch_limit")
    await client.send({"type": "watch", "add": ["c"], "remove": ["a"]})
    assert (await client.expect("presence"))["snapshot"] is True
    await client.close()


@pytest.mark.parametrize(
    "frame", [{"type": "watch"}, {"type": "watch", "add": "bob"}, {"type": "watch", "add": [" bob"]}]
)
async def test_a_malformed_watch_frame_is_refused_naming_the_field(connect, frame):
    watcher = await connect("walt", watch=[])
    await watcher.send(frame)
    assert (await watcher.expect_error("invalid_message"))["message"]
    await watcher.send({"type": "ping"})
    await watcher.expect("pong")


async def test_in_watch_scope_a_v1_client_gets_an_empty_list_and_calls_still_reach_anyone(connect, settings):
    settings.SIGNALING_PRESENCE_SCOPE = "watch"
    alice = await connect("alice")
    bob = await connect("bob")
    assert (await bob.expect("online_users"))["users"] == []
    await alice.send({"type": "call_request", "target_username": "bob"})
    assert (await bob.expect("incoming_call"))["caller_username"] == "alice"
