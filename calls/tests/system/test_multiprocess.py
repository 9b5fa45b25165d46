"""Two daphne processes over a real redis-server and PostgreSQL: users on different
processes reach each other, share one online list, survive a Redis restart, and
a killed process's users and calls are cleaned up by the survivor."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
import websockets

from calls.testing.servers import DaphneServer, server_env
from calls.testing.services import RedisServer
from calls.tests.conftest_services import start_service

pytestmark = pytest.mark.services

# Informational messages `expect` passes over unless asked for one by name.
SKIPPED_TYPES = {"online_users", "user_online", "user_offline", "call_ringing"}
TIMEOUT = 10.0
RING_TIMEOUT = "4"


@dataclass
class Cluster:
    redis: RedisServer
    database_url: str
    a: DaphneServer
    b: DaphneServer

    def rows(self, sql: str, *params: Any) -> list[tuple]:
        with psycopg.connect(self.database_url) as conn:
            return conn.execute(sql, params).fetchall()

    def call_row(self, call_id: str) -> tuple[str, str | None]:
        [row] = self.rows("SELECT status, end_reason FROM calls_call WHERE id = %s", call_id)
        return row

    def stop(self) -> None:
        for server in (self.a, self.b):
            server.stop()
        self.redis.close()


def start_cluster(tmp_path: Path, postgres, **settings: str) -> Cluster:
    """A redis-server, a fresh PostgreSQL database, and two daphne processes using both."""
    redis = start_service(RedisServer)
    database_url = postgres.new_database()
    env = server_env(
        tmp_path,
        REDIS_URL=redis.url,
        DATABASE_URL=database_url,
        SIGNALING_PRESENCE_WINDOW_MS="20",
        LOG_LEVEL="info",
        **settings,
    )
    cluster = Cluster(redis, database_url, DaphneServer(env, tmp_path / "a.log"), DaphneServer(env, tmp_path / "b.log"))
    try:
        cluster.a.start()
        cluster.b.start()
    except Exception:
        cluster.stop()
        raise
    return cluster


# Token mode: where one user may have several devices (open mode allows one session per name).
TOKEN_MODE = {"SIGNALING_AUTH": "token", "SIGNALING_JWT_SECRET": "multiprocess-test-secret-" + "x" * 24}


def token_for(username: str) -> str:
    """A registration token as a team's backend would mint it (HS256, stable user_id claim)."""
    claims = {"sub": username, "user_id": f"id-{username}", "exp": datetime.now(UTC) + timedelta(hours=1)}
    return jwt.encode(claims, TOKEN_MODE["SIGNALING_JWT_SECRET"], algorithm="HS256")


@pytest.fixture(scope="module")
def token_pair(tmp_path_factory, postgres) -> Iterator[Cluster]:
    """Two processes in token mode, for the scenarios with several devices per user."""
    cluster = start_cluster(
        tmp_path_factory.mktemp("token-pair"), postgres, SIGNALING_RING_TIMEOUT=RING_TIMEOUT, **TOKEN_MODE
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, postgres) -> Iterator[Cluster]:
    """Two processes shared by the scenarios that leave them running (distinct usernames each)."""
    cluster = start_cluster(tmp_path_factory.mktemp("pair"), postgres, SIGNALING_RING_TIMEOUT=RING_TIMEOUT)
    yield cluster
    cluster.stop()


class Peer:
    """One real WebSocket client; `expect` passes over presence and ringing notices."""

    def __init__(self, ws: websockets.ClientConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        # The usernames of the latest online_users list received (whoever read it), and its time.
        self.online: set[str] | None = None
        self.online_at: datetime | None = None

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            message = json.loads(await self.ws.recv())
        if message["type"] == "online_users":
            self.online = {user["username"] for user in message["users"]}
            self.online_at = datetime.fromisoformat(message["timestamp"])
        return message

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Return the next message of type `kind`; fail on any other non-presence message."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.receive()
                if message["type"] == kind:
                    return message
                assert message["type"] in SKIPPED_TYPES, f"{self.name}: expected {kind!r}, got {message!r}"

    async def expect_error(self, code: str) -> None:
        message = await self.expect("error")
        assert message["code"] == code, message

    async def expect_online(self, usernames: set[str], timeout: float = TIMEOUT, since: datetime | None = None) -> None:
        """Wait until the latest online_users list (made after `since`) names exactly these users."""
        async with asyncio.timeout(timeout):
            while self.online != usernames or (since is not None and self.online_at <= since):
                await self.expect("online_users")

    async def nothing(self, quiet: float = 0.5) -> None:
        """Assert that no message other than presence arrives within `quiet` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + quiet
        while (remaining := deadline - loop.time()) > 0:
            try:
                message = await self.receive(remaining)
            except TimeoutError:
                return
            assert message["type"] in SKIPPED_TYPES, f"{self.name}: unexpected {message!r}"

    async def reply(self) -> dict[str, Any]:
        """Return the next message that is not a presence or ringing notice."""
        while (message := await self.receive())["type"] in SKIPPED_TYPES:
            pass
        return message

    async def presence_of(self, username: str, timeout: float = TIMEOUT) -> list[str]:
        """Return the delta types (user_online/user_offline) received until one names `username`, in order."""
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                message = await self.receive()
                if message["type"] in {"user_online", "user_offline"}:
                    seen.append(f"{message['type']} {message['username']}")
                    if message["username"] == username:
                        return seen
                else:
                    assert message["type"] in SKIPPED_TYPES, f"{self.name}: unexpected {message!r}"

    async def register(self, username: str, user_id: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "register", "username": username, "user_id": user_id, **extra})
        return await self.expect("registered")


@pytest.fixture
async def peers():
    """Open clients on a given server; all are closed after the test."""
    opened: list[Peer] = []

    async def open_peer(server: DaphneServer, username: str | None = None, **extra: Any) -> Peer:
        ws = await websockets.connect(server.url, open_timeout=TIMEOUT)
        peer = Peer(ws, username or "anonymous")
        opened.append(peer)
        if username is not None:
            if server.env.get("SIGNALING_AUTH") == "token":
                extra.setdefault("token", token_for(username))
            await peer.register(username, f"id-{username}", **extra)
        return peer

    yield open_peer
    for peer in opened:
        await peer.ws.close()


async def ring(caller: Peer, callee_sessions: list[Peer], target: str) -> str:
    await caller.send({"type": "call_request", "target_username": target})
    ringing = await caller.expect("call_ringing")
    for session in callee_sessions:
        incoming = await session.expect("incoming_call")
        assert incoming["call_id"] == ringing["call_id"] and incoming["caller_username"] == caller.name
    return ringing["call_id"]


async def answered_call(caller: Peer, callee: Peer) -> str:
    call_id = await ring(caller, [callee], callee.name)
    await callee.send({"type": "call_accepted", "call_id": call_id})
    accepted = await caller.expect("call_accepted")
    assert (accepted["call_id"], accepted["accepter_username"]) == (call_id, callee.name)
    return call_id


async def signal_both_ways(caller: Peer, callee: Peer, call_id: str) -> None:
    offer = {"type": "offer", "sdp": "v=0\r\n"}
    await caller.send({"type": "offer", "target_username": callee.name, "data": offer})
    got = await callee.expect("offer")
    assert (got["data"], got["from_username"], got["call_id"]) == (offer, caller.name, call_id)
    await callee.send({"type": "answer", "target_username": caller.name, "data": {"type": "answer"}})
    assert (await caller.expect("answer"))["from_username"] == callee.name
    candidate = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMLineIndex": 0}
    await callee.send({"type": "ice_candidate", "target_username": caller.name, "data": candidate})
    assert (await caller.expect("ice_candidate"))["data"] == candidate


async def test_a_v1_call_flows_between_users_on_different_processes(pair, peers):
    alice = await peers(pair.a, "alice")
    bob = await peers(pair.b, "bob")
    listed = await alice.expect("online_users")
    while {"username": "bob", "user_id": "id-bob"} not in listed["users"]:
        listed = await alice.expect("online_users")
    await bob.expect_online({"alice", "bob"})

    call_id = await answered_call(alice, bob)
    await signal_both_ways(alice, bob, call_id)
    await alice.send({"type": "call_ended", "target_username": "bob"})
    ended = await bob.expect("call_ended")
    assert (ended["call_id"], ended["from_username"], ended["reason"]) == (call_id, "alice", "hangup")
    assert pair.call_row(call_id) == ("completed", "hangup")
    assert pair.rows("SELECT new_status FROM calls_callevent WHERE call_id = %s ORDER BY id", call_id) == [
        ("ringing",),
        ("answered",),
        ("completed",),
    ]


async def test_a_user_in_a_call_on_another_process_is_busy(pair, peers):
    carl = await peers(pair.a, "carl")
    dora = await peers(pair.b, "dora")
    call_id = await answered_call(carl, dora)
    erin = await peers(pair.b, "erin")
    for target in ("carl", "dora"):
        await erin.send({"type": "call_request", "target_username": target})
        busy = await erin.expect("call_rejected")
        assert (busy["rejecter_username"], busy["reason"]) == (target, "busy")
        assert pair.call_row(busy["call_id"]) == ("busy", "busy")
    await carl.nothing(0.3)
    await dora.nothing(0.3)
    assert pair.call_row(call_id) == ("answered", None)


async def test_an_unanswered_call_across_processes_times_out_for_both(pair, peers):
    # Answered on process B, its ring timer still runs on the caller's process A.
    sam, tess = await peers(pair.a, "sam"), await peers(pair.b, "tess")
    answered = await answered_call(sam, tess)
    fay = await peers(pair.a, "fay")
    gus = await peers(pair.b, "gus")
    call_id = await ring(fay, [gus], "gus")
    for side, peer in ((fay, "gus"), (gus, "fay")):
        ended = await side.expect("call_ended", timeout=float(RING_TIMEOUT) + TIMEOUT)
        assert (ended["call_id"], ended["reason"], ended["from_username"]) == (call_id, "timeout", peer)
    assert pair.call_row(call_id) == ("missed", "timeout")
    # The answered call's timer fired first; it left the call alone.
    await sam.nothing(0.2)
    await tess.nothing(0.2)
    assert pair.call_row(answered) == ("answered", None)


async def test_the_caller_cancels_and_the_callee_rejects_across_processes(pair, peers):
    hal = await peers(pair.a, "hal")
    ida = await peers(pair.b, "ida")
    cancelled = await ring(hal, [ida], "ida")
    await hal.send({"type": "call_ended", "call_id": cancelled})
    ended = await ida.expect("call_ended")
    assert (ended["call_id"], ended["reason"], ended["from_username"]) == (cancelled, "cancelled", "hal")
    assert pair.call_row(cancelled) == ("cancelled", "cancelled")

    rejected = await ring(hal, [ida], "ida")
    await ida.send({"type": "call_rejected", "call_id": rejected})
    reply = await hal.expect("call_rejected")
    assert (reply["call_id"], reply["rejecter_username"], reply["reason"]) == (rejected, "ida", "rejected")
    assert pair.call_row(rejected) == ("rejected", "rejected")


async def test_devices_on_both_processes_ring_and_only_the_answering_one_gets_signaling(token_pair, peers):
    jon = await peers(token_pair.a, "jon")
    phone = await peers(token_pair.a, "kim")
    laptop = await peers(token_pair.b, "kim")
    call_id = await ring(jon, [phone, laptop], "kim")
    await laptop.send({"type": "call_accepted", "call_id": call_id})
    assert (await jon.expect("call_accepted"))["call_id"] == call_id
    elsewhere = await phone.expect("call_ended")
    assert (elsewhere["call_id"], elsewhere["reason"]) == (call_id, "answered_elsewhere")

    laptop.name = "kim"
    await signal_both_ways(jon, laptop, call_id)
    await phone.nothing()
    await jon.send({"type": "call_ended", "call_id": call_id})
    assert (await laptop.expect("call_ended"))["reason"] == "hangup"
    await phone.nothing(0.3)
    assert token_pair.call_row(call_id) == ("completed", "hangup")


async def test_devices_on_both_processes_answering_at_once_give_exactly_one_answer(token_pair, peers):
    lea = await peers(token_pair.b, "lea")
    phone = await peers(token_pair.a, "max")
    laptop = await peers(token_pair.b, "max")
    call_id = await ring(lea, [phone, laptop], "max")
    await asyncio.gather(*(d.send({"type": "call_accepted", "call_id": call_id}) for d in (phone, laptop)))
    accepted = await lea.expect("call_accepted")
    assert accepted["call_id"] == call_id
    # The losing device hears of it (in either order: its answer may be handled before or
    # after the winner's); the winner hears nothing until signaling arrives.
    first_replies = {device: asyncio.ensure_future(device.reply()) for device in (phone, laptop)}
    done, pending = await asyncio.wait(first_replies.values(), timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    [loser] = [device for device, task in first_replies.items() if task in done]
    [winner] = [device for device in (phone, laptop) if device is not loser]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    heard = [first_replies[loser].result(), await loser.reply()]
    assert sorted(_describe(message) for message in heard) == ["call_ended answered_elsewhere", "error not_ringing"]
    await lea.send({"type": "offer", "target_username": "max", "data": {"sdp": "o"}})
    offer = await winner.reply()
    assert (offer["type"], offer["data"]) == ("offer", {"sdp": "o"})
    await loser.nothing()
    await lea.nothing(0.3)
    assert token_pair.call_row(call_id) == ("answered", None)
    assert token_pair.rows(
        "SELECT count(*) FROM calls_callevent WHERE call_id = %s AND new_status = 'answered'", call_id
    ) == [(1,)]


def _describe(message: dict[str, Any]) -> str:
    return f"{message['type']} {message.get('reason') or message.get('code')}"


async def test_a_username_is_taken_across_processes(pair, peers):
    await peers(pair.a, "ned")
    thief = await peers(pair.b)
    await thief.send({"type": "register", "username": "ned", "user_id": "someone-else"})
    await thief.expect_error("username_taken")
    assert pair.rows("SELECT user_id FROM calls_signalinguser WHERE username = 'ned'") == [("id-ned",)]

    first, second = await peers(pair.a), await peers(pair.b)
    await asyncio.gather(
        first.send({"type": "register", "username": "oli", "user_id": "u-1"}),
        second.send({"type": "register", "username": "oli", "user_id": "u-2"}),
    )
    outcomes = sorted([await first.reply(), await second.reply()], key=lambda m: m["type"])
    assert [m["type"] for m in outcomes] == ["error", "registered"], outcomes
    assert outcomes[0]["code"] == "username_taken"
    [(holder,)] = pair.rows("SELECT user_id FROM calls_signalinguser WHERE username = 'oli'")
    assert holder == outcomes[1]["user_id"]


async def test_a_user_is_listed_while_any_of_its_sessions_on_any_process_lives(token_pair, peers):
    watcher = await peers(token_pair.a, "pia", presence="delta")
    # One snapshot first (earlier tests' users may still be leaving), then deltas only.
    assert "pia" in {user["username"] for user in (await watcher.expect("online_users"))["users"]}
    phone = await peers(token_pair.a, "quinn")
    laptop = await peers(token_pair.b, "quinn")
    assert (await watcher.presence_of("quinn"))[-1] == "user_online quinn"
    await phone.ws.close()
    await peers(token_pair.b, "rae")
    # Had quinn gone offline with the phone, the watcher would hear it before rae comes online.
    seen = await watcher.presence_of("rae")
    assert seen[-1] == "user_online rae" and "user_offline quinn" not in seen
    await laptop.ws.close()
    assert (await watcher.presence_of("quinn"))[-1] == "user_offline quinn"
    assert token_pair.rows("SELECT count(*) FROM calls_signalinguser WHERE username IN ('quinn', 'rae')") == [(2,)]


async def test_a_killed_process_leaves_the_list_and_its_calls_end_for_the_survivor(tmp_path, postgres, peers):
    cluster = start_cluster(
        tmp_path, postgres, SIGNALING_PRESENCE_TTL="2", SIGNALING_REAPER_INTERVAL="0.5", SIGNALING_RING_TIMEOUT="60"
    )
    try:
        alice = await peers(cluster.a, "alice")
        watcher = await peers(cluster.a, "walt", presence="delta")
        bob = await peers(cluster.b, "bob")
        carol = await peers(cluster.b, "carol")
        dave = await peers(cluster.a, "dave")
        await alice.expect_online({"alice", "walt", "bob", "carol", "dave"})
        answered = await answered_call(alice, bob)
        ringing = await ring(dave, [carol], "carol")

        cluster.b.kill()

        # Within the presence TTL (2 s here); the deadlines are generous for a loaded machine.
        ended = await alice.expect("call_ended", timeout=30)
        assert (ended["call_id"], ended["reason"], ended["from_username"]) == (answered, "disconnected", "bob")
        ended = await dave.expect("call_ended", timeout=30)
        assert (ended["call_id"], ended["reason"]) == (ringing, "disconnected")
        await alice.expect_online({"alice", "walt", "dave"}, timeout=30)
        gone = {(await watcher.expect("user_offline", timeout=30))["username"] for _ in range(2)}
        assert gone == {"bob", "carol"}
        assert cluster.call_row(answered) == ("completed", "disconnected")
        assert cluster.call_row(ringing) == ("failed", "disconnected")
        assert cluster.rows("SELECT count(*) FROM calls_call WHERE status IN ('ringing', 'answered')") == [(0,)]
    finally:
        cluster.stop()


async def test_live_sessions_recover_after_redis_restarts(tmp_path, postgres, peers):
    cluster = start_cluster(tmp_path, postgres, SIGNALING_PRESENCE_TTL="3", SIGNALING_REAPER_INTERVAL="0.5")
    try:
        alice = await peers(cluster.a, "alice")
        bob = await peers(cluster.b, "bob")
        watcher = await peers(cluster.b, "walt", presence="delta")
        await alice.expect_online({"alice", "bob", "walt"})
        before = await answered_call(alice, bob)

        cluster.redis.restart()
        restarted = datetime.now(UTC)

        # Recovery: every process writes its sessions back (once the layer reaches them
        # again) and everyone gets the full list, read from the new Redis.
        await alice.expect_online({"alice", "bob", "walt"}, timeout=20, since=restarted)
        await bob.expect_online({"alice", "bob", "walt"}, timeout=20, since=restarted)
        # The call in progress survived: signaling still flows both ways, and it ends normally.
        await signal_both_ways(alice, bob, before)
        await bob.send({"type": "call_ended", "call_id": before})
        assert (await alice.expect("call_ended"))["reason"] == "hangup"
        assert cluster.call_row(before) == ("completed", "hangup")

        after = await answered_call(bob, alice)
        await signal_both_ways(bob, alice, after)
        carol = await peers(cluster.b, "carol")
        assert (await watcher.presence_of("carol"))[-1] == "user_online carol"
        # Read from Redis after the restart: every session was written back.
        await alice.expect_online({"alice", "bob", "walt", "carol"})
        await alice.send({"type": "call_ended", "call_id": after})
        await bob.expect("call_ended")
        call = await answered_call(carol, alice)
        await signal_both_ways(carol, alice, call)
        await carol.send({"type": "call_ended", "call_id": call})
        await alice.expect("call_ended")
        assert [cluster.call_row(c) for c in (after, call)] == [("completed", "hangup")] * 2
    finally:
        cluster.stop()
