"""Covers the whole server under daphne as a v1 client in the field meets it: the page, the socket, a call.

One real daphne process and plain `websockets` clients.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from calls.testing.servers import daphne_server
from calls.tests.netclient import http_request, recv_type, register, server_rows, still_answers


@pytest.fixture
def server(tmp_path):
    with daphne_server(tmp_path) as server:
        yield server


async def test_a_v1_client_completes_a_call_against_daphne(server):
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

    assert server_rows(server, "SELECT status, end_reason FROM calls_call") == [("completed", "hangup")]


async def test_http_get_of_root_does_not_break_the_websocket_route(server):
    status, headers, page = await asyncio.to_thread(http_request, f"{server.http_url}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "<title>Video calls · test page</title>" in page.decode()
    # The same path, on the same port, still upgrades to the signaling socket.
    async with websockets.connect(server.url.rstrip("/")) as ws:
        await register(ws, "alice", "u-a")
        await still_answers(ws)
    assert server_rows(server, "SELECT username, user_id FROM calls_signalinguser") == [("alice", "u-a")]
