"""A real daphne process and a plain `websockets` client, as a client in the field."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
import websockets

from calls.testing.servers import daphne_server
from calls.tests.wire import recv_type


@pytest.fixture
def server(tmp_path):
    with daphne_server(tmp_path) as server:
        yield server


async def test_a_v1_client_completes_a_call_against_daphne(server, tmp_path):
    async with websockets.connect(server.url) as alice, websockets.connect(server.url) as bob:
        await alice.send(json.dumps({"type": "register", "username": "alice", "user_id": "u-a"}))
        assert json.loads(await alice.recv()) == {
            "type": "registered",
            "username": "alice",
            "user_id": "u-a",
            "ice_servers": [],
        }
        await bob.send(json.dumps({"type": "register", "username": "bob", "user_id": "u-b"}))
        await recv_type(bob, "registered")
        while {u["username"] for u in (await recv_type(alice, "online_users"))["users"]} != {"alice", "bob"}:
            pass

        await alice.send(json.dumps({"type": "call_request", "target_username": "bob"}))
        incoming = await recv_type(bob, "incoming_call")
        assert incoming["caller_username"] == "alice"
        await bob.send(json.dumps({"type": "call_accepted", "caller_username": "alice"}))
        assert (await recv_type(alice, "call_accepted"))["accepter_username"] == "bob"

        offer = {"type": "offer", "sdp": "v=0\r\n"}
        await alice.send(json.dumps({"type": "offer", "target_username": "bob", "data": offer}))
        assert (await recv_type(bob, "offer"))["data"] == offer
        await bob.send(json.dumps({"type": "answer", "target_username": "alice", "data": {"type": "answer"}}))
        assert (await recv_type(alice, "answer"))["from_username"] == "bob"
        candidate = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMLineIndex": 0}
        await bob.send(json.dumps({"type": "ice_candidate", "target_username": "alice", "data": candidate}))
        assert (await recv_type(alice, "ice_candidate"))["data"] == candidate

        await bob.send("{broken")
        assert (await recv_type(bob, "error"))["code"] == "invalid_json"
        await alice.send(json.dumps({"type": "call_ended", "target_username": "bob"}))
        assert (await recv_type(bob, "call_ended"))["from_username"] == "alice"

    rows = sqlite3.connect(tmp_path / "server.sqlite3").execute("SELECT status, end_reason FROM calls_call").fetchall()
    assert rows == [("completed", "hangup")]


async def test_http_get_of_root_does_not_break_the_websocket_route(server):
    async with websockets.connect(server.url.rstrip("/")) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv())["type"] == "pong"


async def test_a_socket_that_never_registers_is_closed_with_1008_on_the_wire(tmp_path):
    # autobahn refuses application close codes other than 1000 and 3000-4999, and daphne
    # then drops the connection without a close frame; the server sends 1008 itself.
    with daphne_server(tmp_path, SIGNALING_REGISTER_TIMEOUT="0.3") as server:
        ws = await websockets.connect(server.url)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
