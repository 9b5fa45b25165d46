"""Covers calls.realtime.security (tokens, origins) and the consumer's hardening, through the real ASGI application.

Hijacks, tokens, origins, sizes, floods, deadlines, session caps. The frame size
limit that is daphne's own is in calls/tests/server/test_daphne.py.
"""

from __future__ import annotations

import time

import jwt
import pytest

from calls.realtime.security import mint_token
from calls.tests.wsclient import Client, call_row, calls_in_db, complete_call, ring, users_in_db

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"


@pytest.fixture
def token_mode(settings):
    settings.SIGNALING_AUTH = "token"
    settings.SIGNALING_JWT_SECRET = SECRET


# --- open mode: a username is held by its user_id --------------------------


async def test_a_hijack_attempt_is_refused_and_the_holder_keeps_its_call(connect):
    alice, bob = await connect("alice", "real-alice"), await connect("bob")
    await bob.send({"type": "call_request", "target_username": "alice"})
    call_id = (await alice.expect("incoming_call"))["call_id"]
    await alice.send({"type": "call_accepted", "call_id": call_id})
    await bob.expect("call_accepted")

    mallory = await connect()
    await mallory.send({"type": "register", "username": "alice", "user_id": "not-alice"})
    await mallory.expect_error("username_taken")
    await mallory.send({"type": "offer", "target_username": "bob", "data": {}})
    await mallory.expect_error("not_registered")

    await bob.send({"type": "offer", "target_username": "alice", "data": {"sdp": "for alice"}})
    assert (await alice.expect("offer"))["data"] == {"sdp": "for alice"}
    await mallory.nothing()
    assert (await call_row(call_id)).status == "answered"


async def test_an_account_may_open_another_session_in_token_mode(connect, multi_device):
    # Open mode holds one live session per name (calls/tests/realtime/test_identity.py).
    token = mint_token("alice", user_id="acct-alice")[0]
    phone, laptop = await connect(), await connect()
    for device in (phone, laptop):
        registered = await device.register("alice", "whatever-the-device-sends", token=token)
        assert (registered["username"], registered["user_id"]) == ("alice", "acct-alice")
    bob = await connect("bob")
    listed = await bob.expect_online({"alice", "bob"})
    assert listed["users"] == [{"username": "alice", "user_id": "acct-alice"}, {"username": "bob", "user_id": "id-bob"}]
    call_id = await ring(bob, phone, laptop)
    [call] = await calls_in_db()
    assert (str(call.id), call.caller.username, call.callee.username, call.status) == (
        call_id,
        "bob",
        "alice",
        "ringing",
    )
    assert await users_in_db() == {"alice": "acct-alice", "bob": "id-bob"}


async def test_a_username_is_free_again_once_its_holder_left(connect):
    holder = await connect("alice", "first")
    await holder.close()
    await connect("alice", "second")


async def test_sessions_per_user_are_capped(connect, multi_device, settings):
    settings.SIGNALING_MAX_SESSIONS_PER_USER = 2
    await connect("alice", "a")
    await connect("alice", "a")
    third = await connect()
    await third.send(
        {"type": "register", "username": "alice", "user_id": "a", "token": mint_token("alice", user_id="a")[0]}
    )
    await third.expect_error("too_many_sessions")


# --- token mode ----------------------------------------------------------


async def test_a_valid_token_registers_as_its_subject(connect, token_mode):
    token, _ = mint_token("alice")
    client = await connect()
    await client.send({"type": "register", "username": "ignored", "user_id": "u-1", "token": token})
    registered = await client.expect("registered")
    assert registered["username"] == "alice"


@pytest.mark.parametrize(
    "token",
    [
        None,
        jwt.encode({"sub": "alice", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, "some-other-secret-" * 3, algorithm="HS256"),
        jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
        "not.a.jwt",
    ],
    ids=["missing", "expired", "forged", "no-exp", "garbage"],
)
async def test_a_bad_token_is_unauthorized_and_closes_the_socket(connect, token_mode, token):
    client = await connect()
    frame = {"type": "register", "username": "alice", "user_id": "u-1"}
    if token is not None:
        frame["token"] = token
    await client.send(frame)
    await client.expect_error("unauthorized")
    assert await client.expect_closed() == 4401


# --- origins ---------------------------------------------------------------


@pytest.mark.parametrize(
    "origin, allowed",
    [
        (None, True),
        (b"http://localhost:8765", True),
        (b"https://127.0.0.1", True),
        (b"https://evil.example", False),
        (b"null", False),
    ],
)
async def test_browser_origins_are_checked_and_native_apps_pass(runtime, transactional_db, origin, allowed):
    client = Client(headers=[(b"origin", origin)] if origin else None)
    assert await client.connect() is allowed
    if allowed:
        await client.register("alice", "u-a")
    await client.close()


async def test_configured_origins_replace_the_default(runtime, transactional_db, settings):
    settings.SIGNALING_ALLOWED_ORIGINS = ["https://app.example.com"]
    configured = Client(headers=[(b"origin", b"https://app.example.com")])
    default = Client(headers=[(b"origin", b"http://localhost")])
    try:
        assert await configured.connect()
        assert not await default.connect()
    finally:
        await configured.close()
        await default.close()


# --- size, rate, deadlines ---------------------------------------------------


async def test_a_message_over_the_limit_is_refused_and_the_socket_survives(connect, settings):
    settings.SIGNALING_MAX_MESSAGE_BYTES = 2048
    alice = await connect("alice")
    await alice.send({"type": "ping", "padding": "x" * 4096})
    await alice.expect_error("message_too_large")
    await alice.send({"type": "ping"})
    await alice.expect("pong")


async def test_a_flood_is_rate_limited_then_cut_off_while_others_call(connect, settings):
    settings.SIGNALING_RATE = "20/40"
    flooder, alice, bob = await connect("flooder"), await connect("alice"), await connect("bob")
    for _ in range(200):
        await flooder.send({"type": "ping"})
    codes = []
    try:
        while True:
            message = await flooder.receive()
            if message["type"] == "error":
                codes.append(message["code"])
    except Exception:  # noqa: BLE001 - the close ends the loop
        pass
    assert flooder.closed_code == 1008
    assert "rate_limited" in codes
    await complete_call(alice, bob)


async def test_a_socket_that_never_registers_is_closed(connect, settings):
    settings.SIGNALING_REGISTER_TIMEOUT = 0.2
    idle = await connect()
    assert await idle.expect_closed() == 1008


async def test_binary_frames_get_an_error(connect):
    alice = await connect("alice")
    await alice.comm.send_to(bytes_data=b"\x00\x01")
    await alice.expect_error("invalid_message")


# --- whole calls ---------------------------------------------------------------


async def test_token_mode_still_serves_a_call(connect, token_mode):
    alice, bob = await connect(), await connect()
    for client, name in ((alice, "alice"), (bob, "bob")):
        await client.register(name, name, token=mint_token(name)[0])
    call_id = await complete_call(alice, bob)
    row = await call_row(call_id)
    assert (row.caller.username, row.callee.username, row.status, row.end_reason) == (
        "alice",
        "bob",
        "completed",
        "hangup",
    )


async def test_history_never_shows_other_peoples_calls(connect):
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    call_id = await complete_call(alice, bob)
    await carol.send({"type": "get_call_history", "limit": 100})
    assert (await carol.expect("call_history"))["calls"] == []
    assert [str(call.id) for call in await calls_in_db()] == [call_id]
