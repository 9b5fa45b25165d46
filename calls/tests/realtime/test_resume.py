"""Resume against a real daphne process: a socket dropped without a close frame is held
for the grace period; the token works once and only for its own user."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
import websockets

from calls.testing.servers import daphne_server


@pytest.fixture
def server(tmp_path):
    with daphne_server(tmp_path, SIGNALING_RESUME_GRACE="1.5", SIGNALING_PRESENCE_WINDOW_MS="20") as server:
        yield server


async def next_of(ws, kind: str, timeout: float = 10) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return message


async def register(url: str, username: str, **extra) -> tuple[websockets.ClientConnection, dict]:
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"type": "register", "username": username, "user_id": f"id-{username}", **extra}))
    return ws, await next_of(ws, "registered")


async def answered_call(alice, bob) -> str:
    await alice.send(json.dumps({"type": "call_request", "target_username": "bob"}))
    call_id = (await next_of(bob, "incoming_call"))["call_id"]
    await bob.send(json.dumps({"type": "call_accepted", "call_id": call_id}))
    await next_of(alice, "call_accepted")
    return call_id


async def test_the_grace_running_out_ends_the_call_for_the_peer(server, tmp_path):
    alice, _ = await register(server.url, "alice")
    bob, registered = await register(server.url, "bob", resume=True)
    assert registered["resume_token"]
    call_id = await answered_call(alice, bob)
    bob.transport.abort()
    reconnecting = await next_of(alice, "peer_reconnecting")
    assert (reconnecting["username"], reconnecting["call_id"]) == ("bob", call_id)
    ended = await next_of(alice, "call_ended")
    assert (ended["call_id"], ended["reason"], ended["from_username"]) == (call_id, "disconnected", "bob")
    db = sqlite3.connect(tmp_path / "server.sqlite3")
    assert db.execute("SELECT status, end_reason FROM calls_call").fetchall() == [("completed", "disconnected")]
    await alice.close()


async def test_a_resume_token_works_once_and_only_for_its_user(server):
    alice, _ = await register(server.url, "alice")
    bob, registered = await register(server.url, "bob", resume=True)
    call_id = await answered_call(alice, bob)
    token = registered["resume_token"]
    bob.transport.abort()
    await next_of(alice, "peer_reconnecting")

    # Another user presenting bob's token on a fresh socket.
    thief = await websockets.connect(server.url)
    await thief.send(
        json.dumps({"type": "register", "username": "mallory", "user_id": "id-mallory", "resume_token": token})
    )
    assert (await next_of(thief, "error"))["code"] == "resume_failed"
    impostor = await websockets.connect(server.url)
    await impostor.send(json.dumps({"type": "register", "username": "bob", "user_id": "wrong", "resume_token": token}))
    assert (await next_of(impostor, "error"))["code"] == "resume_failed"

    back = await websockets.connect(server.url)
    await back.send(json.dumps({"type": "register", "username": "bob", "user_id": "id-bob", "resume_token": token}))
    resumed = await next_of(back, "registered")
    assert resumed["resumed"] is True and resumed["calls"][0]["call_id"] == call_id
    assert (await next_of(alice, "peer_reconnected"))["call_id"] == call_id
    await alice.send(json.dumps({"type": "offer", "target_username": "bob", "data": {"sdp": "after"}}))
    assert (await next_of(back, "offer"))["data"] == {"sdp": "after"}

    again = await websockets.connect(server.url)
    await again.send(json.dumps({"type": "register", "username": "bob", "user_id": "id-bob", "resume_token": token}))
    assert (await next_of(again, "error"))["code"] == "resume_failed"
    for ws in (alice, back, again, impostor, thief):
        await ws.close()


async def test_a_clean_close_ends_the_session_at_once(server):
    alice, _ = await register(server.url, "alice")
    bob, _ = await register(server.url, "bob", resume=True)
    call_id = await answered_call(alice, bob)
    await bob.close()
    heard = []
    async with asyncio.timeout(10):
        while not heard or heard[-1]["type"] != "call_ended":
            heard.append(json.loads(await alice.recv()))
    assert "peer_reconnecting" not in [message["type"] for message in heard]
    assert (heard[-1]["call_id"], heard[-1]["reason"]) == (call_id, "disconnected")
    await alice.close()
