"""Covers the whole server against attacks from the [trust] review: each on a real daphne process, each refused.

Every test plays the attacker with plain WebSocket clients, then checks that the
refusal carries its documented code, that other users notice nothing, and what
the database holds afterwards.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import websockets

from calls.testing.servers import DaphneServer, daphne_server
from calls.tests.netclient import (
    Peer,
    RawClient,
    TcpProxy,
    answered_call,
    call_row,
    close_code,
    expect_error,
    recv_type,
    register,
    send,
    server_rows,
    still_answers,
)

# A lone surrogate as the JSON escape a client can send: valid JSON, not valid Unicode text.
SURROGATE = "\\ud800"


def lone(frame: str) -> str:
    """Return hand-built JSON with each @ replaced by a lone surrogate's escape."""
    return frame.replace("@", SURROGATE)


@pytest.fixture
def server(tmp_path: Path):
    with daphne_server(tmp_path, SIGNALING_PRESENCE_WINDOW_MS="20") as server:
        yield server


async def online_names(ws: websockets.ClientConnection) -> set[str]:
    return {user["username"] for user in (await recv_type(ws, "online_users"))["users"]}


async def wait_online(ws: websockets.ClientConnection, names: set[str]) -> None:
    while await online_names(ws) != names:
        pass


def no_errors_logged(server: DaphneServer) -> None:
    logs = server.logs()
    assert "level=error" not in logs and "Traceback" not in logs and "Exception inside" not in logs, logs[-3000:]


# --- Text that cannot be encoded --------------------------------------


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        (lone('{"type":"register","username":"m","user_id":"@"}'), "user_id"),
        (lone('{"type":"register","username":"m@","user_id":"u"}'), "username"),
        (lone('{"type":"register","username":"m","user_id":"u","device_id":"@"}'), "device_id"),
        (lone('{"type":"register","username":"m","user_id":"u","token":"@"}'), "token"),
        (lone('{"type":"call_request","target_username":"bob@"}'), "target_username"),
        (lone('{"type":"offer","target_username":"bob","data":{"sdp":"@"}}'), "data.sdp"),
        (lone('{"type":"offer","target_username":"bob","data":{"a":[{"b":"@"}]}}'), "data.a[0].b"),
        (lone('{"type":"offer","target_username":"bob","data":{"@":1}}'), "data."),
        (lone('{"type":"@"}'), "type"),
    ],
)
async def test_a_lone_surrogate_in_any_field_is_refused_naming_it_and_presence_keeps_flowing(server, frame, field):
    async with websockets.connect(server.url) as attacker, websockets.connect(server.url) as alice:
        await register(alice, "alice", "u-a")
        await send(attacker, frame)
        error = await expect_error(attacker, "invalid_message")
        assert f"'{field}" in error["message"]
        await still_answers(attacker)
        async with websockets.connect(server.url) as bob:
            # The broadcast that once raised UnicodeEncodeError for everyone still reaches everyone.
            await register(bob, "bob", "u-b")
            await wait_online(bob, {"alice", "bob"})
            await wait_online(alice, {"alice", "bob"})
    assert server_rows(server, "SELECT username FROM calls_signalinguser ORDER BY username") == [("alice",), ("bob",)]
    no_errors_logged(server)


async def test_a_surrogate_sent_to_a_ringing_callee_never_reaches_it_and_the_call_goes_on(server):
    async with websockets.connect(server.url) as alice, websockets.connect(server.url) as bob:
        await register(alice, "alice", "u-a")
        await register(bob, "bob", "u-b")
        await send(alice, {"type": "call_request", "target_username": "bob"})
        call_id = (await recv_type(bob, "incoming_call"))["call_id"]
        for _ in range(3):
            frame = lone('{"type":"ice_candidate","target_username":"bob","data":{"x":"@"}}')
            await send(alice, frame)
            await expect_error(alice, "invalid_message")
        await still_answers(bob)  # not closed with 1011, as it was
        await send(bob, {"type": "call_accepted", "call_id": call_id})
        assert (await recv_type(alice, "call_accepted"))["call_id"] == call_id
        candidate = {"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMLineIndex": 0}
        await send(alice, {"type": "ice_candidate", "target_username": "bob", "data": candidate})
        assert (await recv_type(bob, "ice_candidate"))["data"] == candidate
    assert call_row(server, call_id) in (("completed", "disconnected"), ("answered", None))
    no_errors_logged(server)


@pytest.mark.parametrize(
    "data",
    ['{"x":NaN}', '{"x":Infinity}', '{"x":-Infinity}', '{"x":1e400}', '{"x":' * 40 + "1" + "}" * 40],
    ids=["nan", "infinity", "-infinity", "overflow", "deep"],
)
async def test_non_finite_numbers_and_deep_nesting_are_refused_before_relay(server, peers, data):
    alice, bob = await peers(server, "alice"), await peers(server, "bob")
    call_id = await answered_call(alice, bob)
    await alice.send('{"type":"offer","target_username":"bob","data":DATA}'.replace("DATA", data))
    error = await alice.expect_error("invalid_message")
    assert "'data" in error["message"]
    await alice.send({"type": "offer", "target_username": "bob", "data": {"sdp": "ok"}})
    # Bob's next signal is the good one: the bad frame reached nobody.
    assert (await bob.expect("offer"))["data"] == {"sdp": "ok"}
    assert call_row(server, call_id) == ("answered", None)
    no_errors_logged(server)


# --- Identity in open mode -------------------------------------------


async def test_a_copied_user_id_cannot_register_beside_a_holder_that_answers_pings(server, peers):
    alice, mallory = await peers(server, "alice"), await peers(server)
    # user_ids are in every online_users list: the attacker copies alice's.
    await mallory.send({"type": "register", "username": "alice", "user_id": "id-alice"})
    await mallory.expect_error("username_taken")
    await mallory.send({"type": "register", "username": "alice", "user_id": "u-other"})
    await mallory.expect_error("username_taken")
    # Alice alone rings, and answers.
    bob = await peers(server, "bob")
    call_id = await answered_call(bob, alice)
    await mallory.nothing()
    assert call_row(server, call_id) == ("answered", None)
    assert server_rows(server, "SELECT username, user_id FROM calls_signalinguser ORDER BY username") == [
        ("alice", "id-alice"),
        ("bob", "id-bob"),
    ]
    no_errors_logged(server)


async def test_a_holder_whose_link_went_silent_is_replaced_by_its_own_user_id_within_seconds(server, peers):
    async with TcpProxy(server.port) as proxy:
        phone = Peer(await websockets.connect(proxy.url, ping_interval=None), "alice")
        await phone.register("alice", "id-alice")
        bob = await peers(server, "bob")
        call_id = await answered_call(bob, phone)
        proxy.freeze()  # the phone switched networks: its old socket lingers, silent
        loop = asyncio.get_running_loop()
        started = loop.time()
        new_phone = await peers(server, "alice")
        assert loop.time() - started < 8  # the ping timeout, not daphne's 40 s
        ended = await bob.expect("call_ended")
        assert (ended["call_id"], ended["reason"]) == (call_id, "disconnected")
        # The new session is the one that rings now.
        await answered_call(bob, new_phone)
        phone.ws.transport.abort()
    assert call_row(server, call_id) == ("completed", "disconnected")
    no_errors_logged(server)


@pytest.mark.parametrize(
    "lookalike",
    ["ALICE", "Alice", "\uff41\uff4c\uff49\uff43\uff45"],  # case, and full-width letters
)
async def test_a_lookalike_of_an_online_name_is_its_owner_s(server, lookalike):
    async with websockets.connect(server.url) as alice, websockets.connect(server.url) as mallory:
        await register(alice, "alice", "u-a")
        await send(mallory, {"type": "register", "username": lookalike, "user_id": "u-m"})
        await expect_error(mallory, "username_taken")
        # And a call to the look-alike reaches the owner.
        async with websockets.connect(server.url) as bob:
            await register(bob, "bob", "u-b")
            await send(bob, {"type": "call_request", "target_username": lookalike})
            assert (await recv_type(alice, "incoming_call"))["caller_username"] == "bob"


@pytest.mark.parametrize(
    "name",
    ["ali\u200bce", "\u202ealice", " alice", "alice ", "ali\u2028ce", "a\u0000b"],
    ids=["zero-width", "bidi", "leading-space", "trailing-space", "line-separator", "nul"],
)
async def test_invisible_and_reordering_characters_in_usernames_are_refused(server, name):
    async with websockets.connect(server.url) as mallory:
        await send(mallory, {"type": "register", "username": name, "user_id": "u-m"})
        error = await expect_error(mallory, "invalid_message")
        assert "'username'" in error["message"]
    assert server_rows(server, "SELECT count(*) FROM calls_signalinguser") == [(0,)]


# --- Abuse of shared resources -------------------------------------------


async def test_ring_spam_is_refused_and_leaves_the_victim_reachable(tmp_path):
    with daphne_server(tmp_path, SIGNALING_UNANSWERED_CALLS_PER_CALLEE="3") as server:
        async with (
            websockets.connect(server.url) as spammer,
            websockets.connect(server.url) as bob,
            websockets.connect(server.url) as carol,
        ):
            await register(spammer, "spammer", "u-s")
            await register(bob, "bob", "u-b")
            await register(carol, "carol", "u-c")
            for _ in range(3):
                await send(spammer, {"type": "call_request", "target_username": "bob"})
                call_id = (await recv_type(bob, "incoming_call"))["call_id"]
                await send(spammer, {"type": "call_ended", "call_id": call_id})
                await recv_type(bob, "call_ended")
            await send(spammer, {"type": "call_request", "target_username": "bob"})
            await expect_error(spammer, "call_rate_limited")
            await send(carol, {"type": "call_request", "target_username": "bob"})
            assert (await recv_type(bob, "incoming_call"))["caller_username"] == "carol"
    by_caller = "SELECT u.username, c.status FROM calls_call c JOIN calls_signalinguser u ON u.id = c.caller_id"
    calls = server_rows(server, by_caller)
    assert sorted(status for caller, status in calls if caller == "spammer") == ["cancelled"] * 3
    assert [caller for caller, _ in calls if caller != "spammer"] == ["carol"]


async def test_a_connection_flood_from_one_address_leaves_other_addresses_connecting(tmp_path):
    with daphne_server(tmp_path, SIGNALING_MAX_PENDING_PER_ADDRESS="3") as server:
        flood = [await websockets.connect(server.url) for _ in range(3)]
        try:
            refused = await websockets.connect(server.url)
            await expect_error(refused, "too_many_connections")
            assert await close_code(refused) == 1008
            # Another client address (loopback has all of 127/8) is not affected.
            async with websockets.connect(server.url, local_addr=("127.0.0.2", 0)) as other:
                await register(other, "other", "u-o")
            # Registered sockets do not count: the flood's own address can go on once they register.
            await register(flood[0], "first", "u-1")
            async with websockets.connect(server.url) as again:
                await still_answers(again)
        finally:
            for ws in flood:
                await ws.close()


async def test_new_connections_per_second_are_limited_per_address(tmp_path):
    with daphne_server(tmp_path, SIGNALING_CONNECT_RATE_PER_ADDRESS="0.5") as server:
        async with websockets.connect(server.url) as first:
            await still_answers(first)
            async with websockets.connect(server.url) as second:
                await expect_error(second, "too_many_connections")
                assert await close_code(second) == 1008
            async with websockets.connect(server.url, local_addr=("127.0.0.3", 0)) as elsewhere:
                await still_answers(elsewhere)


@pytest.mark.parametrize(("trusted", "second_admitted"), [("0", False), ("1", True)])
async def test_forwarded_addresses_count_only_through_trusted_proxies(tmp_path, trusted, second_admitted):
    env = {"SIGNALING_MAX_PENDING_PER_ADDRESS": "1", "SIGNALING_TRUSTED_PROXIES": trusted}
    with daphne_server(tmp_path, **env) as server:
        # Header values only (TEST-NET addresses): nothing is sent to them.
        first = await websockets.connect(server.url, additional_headers=[("X-Forwarded-For", "192.0.2.1")])
        try:
            await still_answers(first)
            async with websockets.connect(server.url, additional_headers=[("X-Forwarded-For", "192.0.2.2")]) as second:
                if second_admitted:
                    await still_answers(second)
                else:  # the header is the client's own word: both are 127.0.0.1
                    await expect_error(second, "too_many_connections")
        finally:
            await first.close()


async def test_a_frame_over_the_limit_ends_with_close_code_1009(server):
    async with websockets.connect(server.url) as bystander:
        await register(bystander, "bystander", "u-b")
        huge = await websockets.connect(server.url, max_size=None)
        await huge.send("x" * (1 << 20))
        assert await close_code(huge) == 1009
        await still_answers(bystander)
    no_errors_logged(server)


async def test_text_that_is_not_utf8_ends_with_close_code_1007_and_hurts_no_one(server):
    async with websockets.connect(server.url) as bystander:
        await register(bystander, "bystander", "u-b")
        raw = await RawClient.connect(server.port)
        raw.send_frame(0x1, b"\xff\xfe not utf-8")
        assert await raw.read_close_code() == 1007
        raw.close()
        await still_answers(bystander)
    no_errors_logged(server)


async def test_sockets_closing_during_broadcasts_do_not_stop_them_or_log_errors(tmp_path):
    with daphne_server(tmp_path, SIGNALING_PRESENCE_WINDOW_MS="20", SIGNALING_CONNECT_RATE_PER_ADDRESS="0") as server:
        await churn(server)
    logs = server.logs()
    assert "presence broadcast failed" not in logs
    no_errors_logged(server)


async def churn(server: DaphneServer) -> None:
    """Users sign in while others are being closed, their sockets still listed for a moment.

    Every third floods until the server closes it (1008); it never answers the
    close and keeps its TCP connection open, as a phone on a bad link does. Its
    socket is closing, where a send fails, while the sign-ins after it broadcast.
    """
    clients, leaving = [], []
    try:
        for index in range(30):
            frame = json.dumps({"type": "register", "username": f"user{index}", "user_id": f"u{index}"})
            if index % 3:
                ws = await websockets.connect(server.url)
                clients.append(ws)
                await ws.send(frame)
                continue
            raw = await RawClient.connect(server.port)
            leaving.append(raw)
            raw.send_text(frame)
            for _ in range(300):  # past the burst and the strikes: cut off with 1008
                raw.send_text('{"type":"ping"}')
        async with websockets.connect(server.url) as late:
            await register(late, "late", "u-late")
            expected = {f"user{i}" for i in range(30) if i % 3} | {"late"}
            await wait_online(late, expected)
    finally:
        for ws in clients:
            await ws.close()
        for raw in leaving:
            raw.close()


async def test_a_held_session_keeps_at_most_its_byte_budget(tmp_path, peers):
    env = {"SIGNALING_RESUME_GRACE": "5", "SIGNALING_RESUME_QUEUE_BYTES": "4096", "SIGNALING_PRESENCE_WINDOW_MS": "20"}
    with daphne_server(tmp_path, **env) as server:
        phone = await peers(server)
        phone.name = "alice"
        token = (await phone.register("alice", "id-alice", resume=True))["resume_token"]
        bob = await peers(server, "bob")
        call_id = await answered_call(bob, phone)
        phone.ws.transport.abort()  # dropped without a close: held for a resume
        await bob.expect("peer_reconnecting")
        for index in range(10):  # 10 x ~1 KB: more than the 4 KB budget
            await bob.send({"type": "offer", "target_username": "alice", "data": {"sdp": f"{index}" * 1000}})
        back = await peers(server)
        resumed = await back.register("alice", "id-alice", resume_token=token)
        assert resumed["resumed"] is True
        kept = [await back.expect("offer") for _ in range(3)]
        assert [offer["data"]["sdp"][0] for offer in kept] == ["0", "1", "2"]
        overflow = await back.expect_error("resume_overflow")
        assert overflow["message"].startswith("7 ")
        assert call_row(server, call_id) == ("answered", None)
    no_errors_logged(server)


async def test_frames_from_an_attacker_leave_stored_history_intact(server, peers):
    alice, bob = await peers(server, "alice"), await peers(server, "bob")
    call_id = await answered_call(alice, bob)
    await alice.send({"type": "call_ended", "call_id": call_id})
    await bob.expect("call_ended")
    for frame in ('{"type":"get_call_history","limit":1e400}', lone('{"type":"call_ended","call_id":"@"}')):
        await bob.send(frame)
        await bob.expect_error("invalid_message")
    await alice.send({"type": "get_call_history"})
    [item] = (await alice.expect("call_history"))["calls"]
    assert (item["call_id"], item["status"]) == (call_id, "completed")
    assert server_rows(server, "SELECT count(*) FROM calls_callevent") == [(3,)]
