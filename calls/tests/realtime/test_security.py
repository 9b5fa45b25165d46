"""Authentication and hardening through the real ASGI application (and daphne where the
limit is daphne's): hijacks, tokens, origins, sizes, floods, deadlines, session caps."""

from __future__ import annotations

import json
import time

import jwt
import pytest
import websockets
from channels.db import database_sync_to_async

from calls.models import Call
from calls.realtime.security import mint_token
from calls.testing.servers import daphne_server
from calls.tests.wsclient import Client

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"


@pytest.fixture
def token_mode(settings):
    settings.SIGNALING_AUTH = "token"
    settings.SIGNALING_JWT_SECRET = SECRET


async def complete_a_call(caller: Client, callee: Client, callee_name: str = "bob") -> None:
    await caller.send({"type": "call_request", "target_username": callee_name})
    incoming = await callee.expect("incoming_call")
    await callee.send({"type": "call_accepted", "call_id": incoming["call_id"]})
    await caller.expect("call_accepted")
    await caller.send({"type": "offer", "target_username": callee_name, "data": {"sdp": "o"}})
    assert (await callee.expect("offer"))["data"] == {"sdp": "o"}
    await caller.send({"type": "call_ended", "call_id": incoming["call_id"]})
    assert (await callee.expect("call_ended"))["reason"] == "hangup"


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
    assert (await database_sync_to_async(Call.objects.get)(pk=call_id)).status == "answered"


async def test_an_account_may_open_another_session_in_token_mode(connect, multi_device):
    # Open mode holds one live session per name (calls/tests/test_identity.py).
    await connect("alice", "real-alice")
    second = await connect("alice", "real-alice")
    assert second.connected


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
    assert await Client(headers=[(b"origin", b"https://app.example.com")]).connect()
    assert not await Client(headers=[(b"origin", b"http://localhost")]).connect()


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
    await complete_a_call(alice, bob)


async def test_a_socket_that_never_registers_is_closed(connect, settings):
    settings.SIGNALING_REGISTER_TIMEOUT = 0.2
    idle = await connect()
    assert await idle.expect_closed() == 1008


async def test_binary_frames_get_an_error(connect):
    alice = await connect("alice")
    await alice.comm.send_to(bytes_data=b"\x00\x01")
    await alice.expect_error("invalid_message")


async def test_a_one_mebibyte_frame_never_reaches_the_app(tmp_path):
    with daphne_server(tmp_path) as server:
        ws = await websockets.connect(server.url, max_size=None)
        try:
            await ws.send(json.dumps({"type": "ping", "padding": "x" * (100 * 1024)}))
            reply = json.loads(await ws.recv())
            assert (reply["type"], reply["code"]) == ("error", "message_too_large")
            # daphne cuts the connection (1009, or a plain drop) before the app runs:
            # the app would have answered message_too_large and kept the socket open.
            with pytest.raises((websockets.ConnectionClosed, ConnectionResetError)) as closed:
                await ws.send(json.dumps({"type": "ping", "padding": "x" * (1024 * 1024)}))
                await ws.recv()
            rcvd = getattr(closed.value, "rcvd", None)
            assert rcvd is None or rcvd.code == 1009
        finally:
            ws.transport.abort()
        async with websockets.connect(server.url) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await ws.recv())["type"] == "pong"


# --- whole calls ---------------------------------------------------------------


async def test_token_mode_still_serves_a_call(connect, token_mode):
    alice, bob = await connect(), await connect()
    for client, name in ((alice, "alice"), (bob, "bob")):
        await client.send({"type": "register", "username": name, "user_id": name, "token": mint_token(name)[0]})
        await client.expect("registered")
    await complete_a_call(alice, bob)


async def test_history_never_shows_other_peoples_calls(connect):
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    await complete_a_call(alice, bob)
    await carol.send({"type": "get_call_history", "limit": 100})
    assert (await carol.expect("call_history"))["calls"] == []
