"""Covers calls.realtime.consumer: the v1 protocol through the real ASGI application, and the rows it leaves."""

from __future__ import annotations

from datetime import datetime

import pytest

from calls.tests.wsclient import Client, calls_in_db, users_in_db

pytestmark = pytest.mark.django_db(transaction=True)


async def test_register_replies_registered_then_online_users(connect):
    alice = await connect()
    await alice.send({"type": "register", "username": "alice", "user_id": "u-a"})
    reply = await alice.receive()
    assert reply == {"type": "registered", "username": "alice", "user_id": "u-a", "ice_servers": []}
    listed = await alice.expect_online({"alice"})
    assert listed["users"] == [{"username": "alice", "user_id": "u-a"}]
    assert datetime.fromisoformat(listed["timestamp"]).utcoffset().total_seconds() == 0
    assert await users_in_db() == {"alice": "u-a"}


async def test_every_session_sees_a_newcomer(connect):
    alice = await connect("alice")
    await alice.expect_online({"alice"})
    bob = await connect("bob")
    await bob.expect_online({"alice", "bob"})
    await alice.expect_online({"alice", "bob"})


async def test_a_user_with_two_sessions_is_listed_once(connect, multi_device):
    phone = await connect("alice", "u-a")
    laptop = await connect("alice", "u-a")
    listed = await laptop.expect_online({"alice"})
    assert len(listed["users"]) == 1
    await phone.expect_online({"alice"})


async def test_the_socket_answers_at_ws_path_too(runtime, transactional_db):
    client = Client("/ws/")
    assert await client.connect()
    await client.register("alice", "u-a")
    await client.close()


async def test_call_request_rings_the_target(connect):
    alice, bob = await connect("alice", "u-a"), await connect("bob", "u-b")
    await alice.send({"type": "call_request", "target_username": "bob"})
    incoming = await bob.expect("incoming_call")
    assert (incoming["caller_username"], incoming["caller_id"]) == ("alice", "u-a")
    [call] = await calls_in_db()
    assert (call.caller.username, call.callee.username, call.status) == ("alice", "bob", "ringing")


async def test_accept_reaches_the_caller_and_marks_the_call_answered(connect):
    alice, bob = await connect("alice"), await connect("bob")
    await alice.send({"type": "call_request", "target_username": "bob"})
    await bob.expect("incoming_call")
    await bob.send({"type": "call_accepted", "caller_username": "alice"})
    accepted = await alice.expect("call_accepted")
    assert accepted["accepter_username"] == "bob"
    [call] = await calls_in_db()
    assert call.status == "answered" and call.answered_at is not None


async def test_reject_reaches_the_caller_and_is_stored(connect):
    alice, bob = await connect("alice"), await connect("bob")
    await alice.send({"type": "call_request", "target_username": "bob"})
    await bob.expect("incoming_call")
    await bob.send({"type": "call_rejected", "caller_username": "alice"})
    rejected = await alice.expect("call_rejected")
    assert rejected["rejecter_username"] == "bob"
    [call] = await calls_in_db()
    assert (call.status, call.end_reason) == ("rejected", "rejected")


@pytest.mark.parametrize("kind", ["offer", "answer", "ice_candidate"])
async def test_signals_are_relayed_with_the_same_data(connect, kind):
    alice, bob = await connect("alice"), await connect("bob")
    await alice.send({"type": "call_request", "target_username": "bob"})
    await bob.expect("incoming_call")
    await bob.send({"type": "call_accepted", "caller_username": "alice"})
    await alice.expect("call_accepted")
    data = {"sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n", "type": kind, "extra": [1, {"x": None}]}
    await alice.send({"type": kind, "target_username": "bob", "data": data})
    relayed = await bob.expect(kind)
    assert (relayed["from_username"], relayed["data"]) == ("alice", data)
    await bob.send({"type": kind, "target_username": "alice", "data": {"back": True}})
    assert (await alice.expect(kind))["data"] == {"back": True}


async def test_from_username_is_the_senders_never_the_clients(connect):
    alice, bob = await connect("alice"), await connect("bob")
    await alice.send({"type": "call_request", "target_username": "bob", "caller_username": "mallory"})
    incoming = await bob.expect("incoming_call")
    assert incoming["caller_username"] == "alice"
    await bob.send({"type": "call_accepted", "caller_username": "alice", "accepter_username": "eve"})
    assert (await alice.expect("call_accepted"))["accepter_username"] == "bob"
    await alice.send({"type": "offer", "target_username": "bob", "from_username": "eve", "data": {}})
    assert (await bob.expect("offer"))["from_username"] == "alice"


async def test_call_ended_reaches_the_target_and_completes_the_call(connect):
    alice, bob = await connect("alice"), await connect("bob")
    await alice.send({"type": "call_request", "target_username": "bob"})
    await bob.expect("incoming_call")
    await bob.send({"type": "call_accepted", "caller_username": "alice"})
    await alice.expect("call_accepted")
    await alice.send({"type": "call_ended", "target_username": "bob"})
    ended = await bob.expect("call_ended")
    assert ended["from_username"] == "alice"
    [call] = await calls_in_db()
    assert (call.status, call.end_reason) == ("completed", "hangup")
    assert call.ended_at is not None and call.duration is not None


@pytest.mark.parametrize(
    "frame, code",
    [
        ("not json at all", "invalid_json"),
        ({"type": "teleport"}, "unknown_type"),
        ({"type": "call_request"}, "invalid_message"),
        ({"type": "offer", "target_username": "bob", "data": 5}, "invalid_message"),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_stays_usable(connect, frame, code):
    alice = await connect("alice")
    await alice.send(frame)
    error = await alice.expect_error(code)
    assert error["message"]
    await alice.send({"type": "ping"})
    await alice.expect("pong")


async def test_anything_before_register_is_not_registered(connect):
    client = await connect()
    await client.send({"type": "call_request", "target_username": "bob"})
    await client.expect_error("not_registered")
    await client.register("carol", "u-c")


async def test_calling_an_offline_user_is_user_offline(connect):
    alice = await connect("alice")
    await alice.send({"type": "call_request", "target_username": "nobody"})
    await alice.expect_error("user_offline")
    assert await calls_in_db() == []


async def test_disconnect_removes_the_user_and_tells_the_rest(connect):
    alice, bob = await connect("alice"), await connect("bob")
    await alice.expect_online({"alice", "bob"})
    await bob.close()
    await alice.expect_online({"alice"})


async def test_disconnect_ends_the_call_for_the_peer(connect):
    alice, bob = await connect("alice"), await connect("bob")
    await alice.send({"type": "call_request", "target_username": "bob"})
    await bob.expect("incoming_call")
    await bob.send({"type": "call_accepted", "caller_username": "alice"})
    await alice.expect("call_accepted")
    await bob.close()
    ended = await alice.expect("call_ended")
    assert (ended["from_username"], ended["reason"]) == ("bob", "disconnected")
    [call] = await calls_in_db()
    assert (call.status, call.end_reason) == ("completed", "disconnected")


async def test_one_of_two_sessions_leaving_keeps_the_user_online(connect, multi_device):
    observer = await connect("zed")
    phone = await connect("alice", "u-a")
    await connect("alice", "u-a")
    await observer.expect_online({"alice", "zed"})
    await phone.close()
    # A list made after the phone left (it names the newcomer) still names alice.
    await connect("yan")
    await observer.expect_online({"alice", "yan", "zed"})
    await observer.send({"type": "call_request", "target_username": "alice"})
    await observer.expect("call_ringing")
    [call] = await calls_in_db()
    assert (call.callee.username, call.status) == ("alice", "ringing")
