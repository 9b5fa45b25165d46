"""Covers the signaling_client library (./clients/python) against the whole server under daphne.

What a real server cannot be made to do on cue is played by small scripted websockets servers.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import signaling_client as sc
from websockets.asyncio.server import ServerConnection, serve

from calls.testing.servers import DaphneServer, daphne_server, migrate, server_env
from calls.tests.netclient import TIMEOUT, Recorder, TcpProxy, call_row, server_rows, until_online

FAST = {"SIGNALING_PRESENCE_WINDOW_MS": "20"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One daphne process for the call-flow tests; each test uses its own usernames."""
    with daphne_server(tmp_path_factory.mktemp("client"), **FAST) as server:
        yield server


async def answered_call(caller: tuple[sc.SignalingClient, Recorder], callee: tuple[sc.SignalingClient, Recorder]):
    """Ring `callee` from `caller` and accept, as library clients do; return the call id."""
    (a, a_events), (b, b_events) = caller, callee
    await until_online(a_events, b.username)
    call_id = await a.call(b.username)
    await b_events.expect(sc.IncomingCall, call_id=call_id, caller_username=a.username)
    await b.accept(call_id)
    await a_events.expect(sc.CallAccepted, call_id=call_id, accepter_username=b.username)
    return call_id


# --- Call flows against daphne ---------------------------------------------------


async def test_a_call_runs_from_request_to_hang_up(server, open_client):
    alice, a_events = await open_client(server.url, "alice1")
    bob, b_events = await open_client(server.url, "bob1")
    registered = a_events.of(sc.Registered)[0]
    assert (registered.username, registered.user_id, registered.ice_servers) == ("alice1", "id-alice1", ())

    call_id = await answered_call((alice, a_events), (bob, b_events))
    assert alice.calls[call_id] == sc.CallInfo(call_id, "bob1", outgoing=True, status="answered")
    assert bob.calls[call_id] == sc.CallInfo(call_id, "alice1", outgoing=False, status="answered")

    offer = {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"}
    await alice.send_offer(call_id, offer)
    got_offer = await b_events.expect(sc.Offer, call_id=call_id)
    assert (got_offer.from_username, got_offer.data) == ("alice1", offer)
    answer = {"type": "answer", "sdp": "v=0\r\n"}
    await bob.send_answer(call_id, answer)
    assert (await a_events.expect(sc.Answer, call_id=call_id)).data == answer
    candidates = [
        {"candidate": f"candidate:{n} 1 udp 2122260223 127.0.0.1 5000{n} typ host", "sdpMLineIndex": 0}
        for n in range(3)
    ]
    for candidate in candidates:
        await bob.send_ice_candidate(call_id, candidate)
    for candidate in candidates:
        assert (await a_events.expect(sc.IceCandidate, call_id=call_id)).data == candidate

    await alice.hang_up(call_id)
    ended = await b_events.expect(sc.CallEnded, call_id=call_id)
    assert (ended.from_username, ended.reason) == ("alice1", "hangup")
    assert alice.calls == {} and bob.calls == {}
    assert call_row(server, call_id) == ("completed", "hangup")
    history = await bob.get_call_history(limit=5)
    assert [(h.call_id, h.caller_username, h.status, h.end_reason) for h in history] == [
        (call_id, "alice1", "completed", "hangup")
    ]


async def test_a_rejected_call_tells_the_caller(server, open_client):
    alice, a_events = await open_client(server.url, "alice2")
    bob, b_events = await open_client(server.url, "bob2")
    await until_online(a_events, "bob2")
    call_id = await alice.call("bob2")
    await b_events.expect(sc.IncomingCall, call_id=call_id)
    await bob.reject(call_id)
    rejected = await a_events.expect(sc.CallRejected, call_id=call_id)
    assert (rejected.rejecter_username, rejected.reason) == ("bob2", "rejected")
    assert alice.calls == {} and bob.calls == {}
    assert call_row(server, call_id) == ("rejected", "rejected")


async def test_calling_a_user_in_a_call_fails_with_busy(server, open_client):
    alice, a_events = await open_client(server.url, "alice3")
    bob, b_events = await open_client(server.url, "bob3")
    carol, c_events = await open_client(server.url, "carol3")
    first = await answered_call((alice, a_events), (bob, b_events))
    await until_online(c_events, "bob3")
    with pytest.raises(sc.CallFailed) as failure:
        await carol.call("bob3")
    assert failure.value.code == "busy"
    busy = c_events.of(sc.CallRejected)[-1]
    assert (busy.rejecter_username, busy.reason) == ("bob3", "busy")
    assert call_row(server, busy.call_id) == ("busy", "busy")
    assert call_row(server, first) == ("answered", None)
    assert not b_events.of(sc.IncomingCall)[1:], "bob must not ring for a busy call"


async def test_hanging_up_before_the_answer_cancels_the_call(server, open_client):
    alice, a_events = await open_client(server.url, "alice4")
    bob, b_events = await open_client(server.url, "bob4")
    await until_online(a_events, "bob4")
    call_id = await alice.call("bob4")
    await b_events.expect(sc.IncomingCall, call_id=call_id)
    await alice.hang_up(call_id)
    ended = await b_events.expect(sc.CallEnded, call_id=call_id)
    assert (ended.from_username, ended.reason) == ("alice4", "cancelled")
    assert bob.calls == {}
    assert call_row(server, call_id) == ("cancelled", "cancelled")


async def test_calling_an_offline_user_fails_with_user_offline(server, open_client):
    alice, a_events = await open_client(server.url, "alice5")
    with pytest.raises(sc.CallFailed) as failure:
        await alice.call("nobody5")
    assert failure.value.code == "user_offline"
    assert a_events.of(sc.Error)[-1].code == "user_offline"
    assert alice.calls == {}
    assert server_rows(
        server,
        "SELECT count(*) FROM calls_call c JOIN calls_signalinguser u ON c.callee_id = u.id WHERE u.username = ?",
        "nobody5",
    ) == [(0,)]


async def test_ping_gets_a_pong_with_the_server_time(server, open_client):
    alice, _ = await open_client(server.url, "alice6")
    pong = await alice.ping()
    assert pong.server_time and pong.server_time.endswith("+00:00")


async def test_the_cli_lists_users_and_places_a_call(server, open_client):
    bob, b_events = await open_client(server.url, "bob7")
    bob.on(sc.IncomingCall, lambda event: bob.accept(event.call_id))
    cli = str(Path(sys.executable).parent / "signaling-client")

    online = await asyncio.create_subprocess_exec(
        cli, "--url", server.url, "--username", "carol7", "online", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(online.communicate(), TIMEOUT)
    assert online.returncode == 0
    lines = out.decode().splitlines()
    assert "bob7\tid-bob7" in lines
    assert any(line.startswith("carol7\t") for line in lines)

    caller = await asyncio.create_subprocess_exec(
        cli,
        "--url",
        server.url,
        "--username",
        "alice7",
        "call",
        "bob7",
        "--hang-up-after",
        "0.2",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(caller.communicate(), TIMEOUT)
    assert caller.returncode == 0, out.decode()
    call_id = b_events.of(sc.IncomingCall)[0].call_id
    assert f"ringing bob7 (call {call_id})" in out.decode()
    assert "CallAccepted accepter_username=bob7" in out.decode()
    ended = await b_events.expect(sc.CallEnded, call_id=call_id)
    assert (ended.from_username, ended.reason) == ("alice7", "hangup")
    assert call_row(server, call_id) == ("completed", "hangup")


async def test_delta_presence_keeps_the_online_list_current(server, open_client):
    alice, a_events = await open_client(server.url, "alice9", presence="delta")
    snapshot = await a_events.expect(sc.Presence)
    assert snapshot.snapshot and sc.User("alice9", "id-alice9") in snapshot.online
    bob, _ = await open_client(server.url, "bob9")
    assert await a_events.expect(sc.UserOnline, username="bob9") == sc.UserOnline("bob9", "id-bob9")
    assert sc.User("bob9", "id-bob9") in alice.online_users
    await bob.close()
    await a_events.expect(sc.UserOffline, username="bob9")
    assert "bob9" not in {user.username for user in alice.online_users}


async def test_a_watch_list_follows_only_its_users(server, open_client):
    walt, w_events = await open_client(server.url, "walt9", watch=["dan9"])
    assert (await w_events.expect(sc.Presence)).online == ()
    await open_client(server.url, "eve9")  # not watched
    dan, _ = await open_client(server.url, "dan9")
    frame = await w_events.expect(sc.Presence, snapshot=False)
    assert frame.online == (sc.User("dan9", "id-dan9"),) and frame.offline == ()
    assert {user.username for user in walt.online_users} == {"dan9"}
    added = await walt.watch(add=["eve9"])
    assert added.snapshot and added.online == (sc.User("eve9", "id-eve9"),)
    assert {user.username for user in walt.online_users} == {"dan9", "eve9"}


# --- Reconnection and resume against daphne -----------------------------------


async def test_the_client_reconnects_after_a_server_restart_and_calls_again(tmp_path, open_client):
    env = server_env(tmp_path, **FAST)
    migrate(env)
    server = DaphneServer(env, tmp_path / "daphne.log")
    server.start()
    try:
        alice, a_events = await open_client(server.url, "alice")
        bob, b_events = await open_client(server.url, "bob")
        await until_online(a_events, "bob")

        await asyncio.to_thread(server.stop)
        await a_events.expect(sc.Reconnecting, attempt=1)
        await b_events.expect(sc.Reconnecting, attempt=2)  # the server is still down: attempts go on
        await asyncio.to_thread(server.start)
        for events in (a_events, b_events):
            await events.expect(sc.Reconnected)
            assert len(events.of(sc.Registered)) == 2
        assert alice.connected and bob.connected

        call_id = await answered_call((alice, a_events), (bob, b_events))
        await bob.hang_up(call_id)
        await a_events.expect(sc.CallEnded, call_id=call_id, reason="hangup")
        assert call_row(server, call_id) == ("completed", "hangup")
        delays = [event.delay for event in b_events.of(sc.Reconnecting)]
        assert all(0 < delay <= 0.5 for delay in delays)
    finally:
        server.stop()


async def test_a_dropped_socket_resumes_the_session_and_its_call(server, open_client):
    async with TcpProxy(server.port) as proxy:
        alice, a_events = await open_client(server.url, "alice8")
        bob, b_events = await open_client(proxy.url, "bob8")
        first = b_events.of(sc.Registered)[0]
        assert first.resume_token, "register with resume: true must return a resume_token"
        call_id = await answered_call((alice, a_events), (bob, b_events))

        proxy.refusing = True
        proxy.cut()
        await b_events.expect(sc.Reconnecting, attempt=1)
        await a_events.expect(sc.PeerReconnecting, username="bob8", call_id=call_id)
        gap_candidate = {"candidate": "candidate:1 1 udp 1 127.0.0.1 40000 typ host", "sdpMLineIndex": 0}
        await alice.send_ice_candidate(call_id, gap_candidate)
        held_candidate = {"candidate": "candidate:2 1 udp 1 127.0.0.1 40002 typ host", "sdpMLineIndex": 0}
        await bob.send_ice_candidate(call_id, held_candidate)  # held by the client until the session is back
        proxy.refusing = False

        resumed = await b_events.expect(sc.Registered, resumed=True)
        assert resumed.resume_token and resumed.resume_token != first.resume_token
        assert [(c.call_id, c.peer_username, c.status) for c in resumed.calls] == [(call_id, "alice8", "answered")]
        await b_events.expect(sc.Reconnected, resumed=True)
        assert (await b_events.expect(sc.IceCandidate, call_id=call_id)).data == gap_candidate
        await a_events.expect(sc.PeerReconnected, username="bob8", call_id=call_id)
        assert (await a_events.expect(sc.IceCandidate, call_id=call_id)).data == held_candidate
        assert bob.calls[call_id].status == "answered"
        assert not b_events.of(sc.CallEnded) and not a_events.of(sc.CallEnded)

        await bob.hang_up(call_id)
        await a_events.expect(sc.CallEnded, call_id=call_id, reason="hangup")
        assert call_row(server, call_id) == ("completed", "hangup")


async def test_token_auth_uses_a_fresh_token_on_every_registration(tmp_path, open_client):
    secret = "test-secret-" + "x" * 32
    issued: list[str] = []

    async def token() -> str:
        issued.append(jwt.encode({"sub": "dana", "exp": int(time.time()) + 600}, secret, algorithm="HS256"))
        return issued[-1]

    with daphne_server(tmp_path, SIGNALING_AUTH="token", SIGNALING_JWT_SECRET=secret, **FAST) as server:
        with pytest.raises(sc.RegistrationError) as refused:
            await open_client(server.url, "mallory", token="not-a-token")
        assert refused.value.code == "unauthorized"

        async with TcpProxy(server.port) as proxy:
            client, events = await open_client(proxy.url, "dana", token=token)
            assert client.registered.username == "dana"
            proxy.cut()
            await events.expect(sc.Reconnected)
        assert len(issued) == 2


# --- Behaviour a real server cannot be made to show on cue: scripted servers -------


@asynccontextmanager
async def scripted_server(script: Callable[[ServerConnection, int], Awaitable[None]]) -> AsyncIterator[str]:
    """A websockets server on 127.0.0.1 running `script(ws, n)` for its n-th connection."""
    count = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal count
        count += 1
        await script(ws, count)

    async with serve(handler, "127.0.0.1", 0) as stub:
        yield f"ws://127.0.0.1:{stub.sockets[0].getsockname()[1]}/"


async def recv_json(ws: ServerConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


def registered(username: str, **extra: Any) -> str:
    return json.dumps(
        {"type": "registered", "username": username, "user_id": f"id-{username}", "ice_servers": [], **extra}
    )


async def test_unknown_and_malformed_messages_do_not_break_the_client(open_client):
    async def script(ws: ServerConnection, n: int) -> None:
        await recv_json(ws)
        await ws.send(registered("ann"))
        await ws.send(json.dumps({"type": "from_the_future", "detail": {"x": 1}}))
        await ws.send("{not json")
        await ws.send(json.dumps(["a", "list"]))
        await ws.send(b"\x00binary")
        await ws.send(json.dumps({"type": "incoming_call", "caller_username": "v1-caller", "caller_id": 7}))
        while (await recv_json(ws))["type"] == "ping":
            await ws.send(json.dumps({"type": "pong", "server_time": "2026-01-01T00:00:00+00:00"}))

    async with scripted_server(script) as url:
        client, events = await open_client(url, "ann", scripted=True, ping_interval=None)
        unknown = await events.expect(sc.UnknownEvent)
        assert (unknown.type, unknown.raw["detail"]) == ("from_the_future", {"x": 1})
        incoming = await events.expect(sc.IncomingCall)
        assert (incoming.caller_username, incoming.caller_id, incoming.call_id) == ("v1-caller", "", None)
        assert (await client.ping()).server_time == "2026-01-01T00:00:00+00:00"
        assert client.connected
        assert [type(e) for e in events.events] == [sc.Registered, sc.UnknownEvent, sc.IncomingCall, sc.Pong]


async def test_a_missing_pong_drops_the_socket_and_resumes_with_held_messages(open_client):
    answer_pings = asyncio.Event()
    answer_pings.set()
    second_session: list[dict[str, Any]] = []
    call_id = "6f1d7c52-1111-4a43-9c1d-3c1f4c2b0a01"

    async def script(ws: ServerConnection, n: int) -> None:
        register = await recv_json(ws)
        if n == 1:
            assert register == {"type": "register", "username": "ann", "user_id": "id-ann", "resume": True}
            await ws.send(registered("ann", resume_token="tok-1"))
            await ws.send(
                json.dumps({"type": "incoming_call", "caller_username": "bo", "caller_id": "b", "call_id": call_id})
            )
            async for frame in ws:
                if json.loads(frame)["type"] == "ping" and answer_pings.is_set():
                    await ws.send(json.dumps({"type": "pong", "server_time": "t"}))
            return
        second_session.append(register)
        calls = [{"call_id": call_id, "peer_username": "bo", "status": "answered"}]
        await ws.send(registered("ann", resume_token="tok-2", resumed=True, calls=calls))
        second_session.append(await recv_json(ws))
        async for frame in ws:
            if json.loads(frame)["type"] == "ping":
                await ws.send(json.dumps({"type": "pong", "server_time": "t"}))

    async with scripted_server(script) as url:
        client, events = await open_client(url, "ann", scripted=True, ping_interval=0.1, ping_timeout=0.3)
        await events.expect(sc.IncomingCall, call_id=call_id)
        await client.accept(call_id)
        answer_pings.clear()
        await events.expect(sc.Reconnecting, attempt=1)
        await client.send_ice_candidate(call_id, {"candidate": "candidate:9", "sdpMLineIndex": 0})
        await events.expect(sc.Reconnected, resumed=True)
        await events.expect(sc.Pong)  # keepalive runs on the new socket

        assert second_session == [
            {"type": "register", "username": "ann", "user_id": "id-ann", "resume": True, "resume_token": "tok-1"},
            {
                "type": "ice_candidate",
                "target_username": "bo",
                "data": {"candidate": "candidate:9", "sdpMLineIndex": 0},
                "call_id": call_id,
            },
        ]
        assert client.calls == {call_id: sc.CallInfo(call_id, "bo", outgoing=False, status="answered")}
        assert not events.of(sc.CallEnded)


async def test_a_refused_resume_registers_afresh_and_reports_the_lost_call(open_client):
    call_id = "6f1d7c52-2222-4a43-9c1d-3c1f4c2b0a02"
    registers: list[dict[str, Any]] = []

    async def script(ws: ServerConnection, n: int) -> None:
        registers.append(await recv_json(ws))
        if n == 1:
            await ws.send(registered("ann", resume_token="tok-1"))
            await ws.send(
                json.dumps({"type": "incoming_call", "caller_username": "bo", "caller_id": "b", "call_id": call_id})
            )
            await recv_json(ws)  # the accept
            ws.transport.abort()
            return
        await ws.send(json.dumps({"type": "error", "code": "resume_failed", "message": "unknown session"}))
        registers.append(await recv_json(ws))
        await ws.send(registered("ann", resume_token="tok-3"))
        # A late notice for the call the client already reported lost is not repeated.
        await ws.send(
            json.dumps({"type": "call_ended", "from_username": "bo", "call_id": call_id, "reason": "disconnected"})
        )
        await ws.send(json.dumps({"type": "from_the_future"}))
        await ws.wait_closed()

    async with scripted_server(script) as url:
        client, events = await open_client(url, "ann", scripted=True, ping_interval=None)
        await events.expect(sc.IncomingCall, call_id=call_id)
        await client.accept(call_id)
        lost = await events.expect(sc.CallEnded, call_id=call_id)
        assert (lost.from_username, lost.reason, lost.raw) == ("bo", "disconnected", {})
        await events.expect(sc.Reconnected, resumed=False)
        await events.expect(sc.UnknownEvent)
        assert len(events.of(sc.CallEnded)) == 1
        assert client.calls == {}
        assert [r.get("resume_token") for r in registers] == [None, "tok-1", None]
        assert all(r["resume"] is True for r in registers)


async def test_a_refused_registration_on_reconnect_closes_the_client(open_client):
    async def script(ws: ServerConnection, n: int) -> None:
        await recv_json(ws)
        if n == 1:
            await ws.send(registered("ann"))
            await ws.close(1011)
            return
        await ws.send(json.dumps({"type": "error", "code": "unauthorized", "message": "token expired"}))
        await ws.wait_closed()

    async with scripted_server(script) as url:
        client, events = await open_client(url, "ann", scripted=True, ping_interval=None)
        closed = await events.expect(sc.Closed)
        assert closed.reason == "unauthorized"
        assert client.closed and not client.connected
        assert [e async for e in client.events()][-1] == closed
        with pytest.raises(sc.ClientClosedError):
            await client.hang_up("any")
