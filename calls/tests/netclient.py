"""Clients over real sockets, for tests against daphne processes, as clients in the field are.

Its in-process counterpart is calls/tests/wsclient.py. Here:

- `Peer`: one plain `websockets` connection and the name it registers; `expect` returns the
  next message of a type and fails on any other (presence and ringing notices aside). The
  functions `recv_type`, `send`, `register`, ... do the same for a bare socket. Every message
  a `Peer` receives must conform to protocol/asyncapi.yaml (calls/tests/conformance.py).
- `ring`, `answered_call`, `signal_both_ways`: a call between peers, step by step.
- `RawClient` and `TcpProxy`: frames no well-behaved client sends, links that fail.
- `Recorder`: the events a `signaling_client.SignalingClient` delivers; `checked_connection`:
  its socket, checking every frame both ways against protocol/asyncapi.yaml.
- `start_cluster`: two daphne processes over one redis-server and one PostgreSQL database.
- `http_request`; `server_rows` and `call_row`: what a daphne process's SQLite database holds.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import jwt
import psycopg
import pytest
import signaling_client as sc
import websockets
from websockets.asyncio.client import ClientConnection

from calls.testing.servers import DaphneServer, server_env
from calls.testing.services import PostgresServer, RedisServer, ServiceMissing, in_ci
from calls.tests import conformance
from calls.tests.wsclient import SKIPPED_TYPES

# Seconds a test waits for what it expects: real processes on a loaded machine, Redis in between.
TIMEOUT = 10.0
# Seconds `Peer.nothing` waits for an event still on its way from another process.
QUIET = 0.5


# --- Plain WebSocket clients ---------------------------------------------------------------


class Peer:
    """One plain WebSocket client; `expect` passes over presence and ringing notices."""

    def __init__(self, ws: websockets.ClientConnection, name: str = "") -> None:
        self.ws = ws
        self.name = name
        # The usernames of the latest online_users list received (whoever read it), and its time.
        self.online: set[str] | None = None
        self.online_at: datetime | None = None

    async def send(self, message: dict[str, Any] | str) -> None:
        """Send a message; a str goes as it is (hand-built JSON, escapes and all)."""
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            message = json.loads(await self.ws.recv())
        conformance.check(message, conformance.SERVER)
        if message["type"] == "online_users":
            self.online = {user["username"] for user in message["users"]}
            self.online_at = datetime.fromisoformat(message["timestamp"])
        return message

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Return the next message of type `kind`; fail on any other but presence and ringing notices."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.receive()
                if message["type"] == kind:
                    return message
                assert message["type"] in SKIPPED_TYPES, f"{self.name}: expected {kind!r}, got {message!r}"

    async def expect_error(self, code: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        message = await self.expect("error", timeout)
        assert message["code"] == code, message
        return message

    async def expect_online(self, usernames: set[str], timeout: float = TIMEOUT, since: datetime | None = None) -> None:
        """Wait until the latest online_users list (made after `since`) names exactly these users."""
        async with asyncio.timeout(timeout):
            while self.online != usernames or (since is not None and self.online_at <= since):
                await self.expect("online_users")

    async def reply(self) -> dict[str, Any]:
        """Return the next message that is not a presence or ringing notice."""
        while (message := await self.receive())["type"] in SKIPPED_TYPES:
            pass
        return message

    async def still_answers(self) -> None:
        """Assert the socket is open and served: a ping gets its pong."""
        await self.send({"type": "ping"})
        await self.expect("pong")

    async def nothing(self) -> None:
        """Assert that nothing but presence and ringing notices comes, from this process or another.

        A ping's pong proves that this socket's own process sent it nothing before the
        ping: the process handles a socket's events in order. An event from another
        process comes through Redis, in no order with the socket's own frames, so no
        barrier proves it absent. Call this once the action that could have sent one has
        shown its effect on the other party (it was sent by then, if at all); QUIET
        seconds then leave it time to arrive.
        """
        await self.send({"type": "ping"})
        message = await self.reply()
        assert message["type"] == "pong", f"{self.name}: unexpected {message!r}"
        try:
            message = await self.reply_within(QUIET)
        except TimeoutError:
            return
        raise AssertionError(f"{self.name}: unexpected {message!r}")

    async def reply_within(self, seconds: float) -> dict[str, Any]:
        """Return the next message that is not a presence or ringing notice; TimeoutError after `seconds`."""
        async with asyncio.timeout(seconds):
            return await self.reply()

    async def presence_of(self, username: str, timeout: float = TIMEOUT) -> list[str]:
        """Return the changes ("online bob", "offline carol") of the presence frames received, in
        order, until one names `username` (snapshots aside)."""
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                message = await self.receive()
                if message["type"] != "presence":
                    assert message["type"] in SKIPPED_TYPES, f"{self.name}: unexpected {message!r}"
                    continue
                if message.get("snapshot"):
                    continue
                changes = [("offline", user["username"]) for user in message["offline"]]
                changes += [("online", user["username"]) for user in message["online"]]
                seen += [f"{state} {name}" for state, name in changes]
                if any(name == username for _, name in changes):
                    return seen

    async def register(self, username: str, user_id: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "register", "username": username, "user_id": user_id, **extra})
        return await self.expect("registered")

    async def close_code(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server closes the socket; return the close code it sent (None: no close frame)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else None


# The same for a bare socket, for tests that need `websockets` itself (headers, addresses, sizes).


async def recv_type(ws: websockets.ClientConnection, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Return the next message of type `kind`; fail on any other but presence and ringing notices."""
    return await Peer(ws).expect(kind, timeout)


async def send(ws: websockets.ClientConnection, message: dict[str, Any] | str) -> None:
    """Send a message; a str goes as it is (hand-built JSON, escapes and all)."""
    await Peer(ws).send(message)


async def register(ws: websockets.ClientConnection, username: str, user_id: str, **extra: Any) -> dict[str, Any]:
    return await Peer(ws).register(username, user_id, **extra)


async def expect_error(ws: websockets.ClientConnection, code: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    return await Peer(ws).expect_error(code, timeout)


async def still_answers(ws: websockets.ClientConnection) -> None:
    """Assert the socket is open and served: a ping gets its pong."""
    await Peer(ws).still_answers()


async def close_code(ws: websockets.ClientConnection, timeout: float = TIMEOUT) -> int | None:
    """Read until the server closes the socket; return the close code it sent (None: no close frame)."""
    return await Peer(ws).close_code(timeout)


async def connect_registered(url: str, username: str, **extra: Any) -> tuple[Peer, dict[str, Any]]:
    """Open a socket and register it as `username` (user_id `id-<username>`); return it and `registered`."""
    peer = Peer(await websockets.connect(url, open_timeout=TIMEOUT), username)
    return peer, await peer.register(username, f"id-{username}", **extra)


def token_for(username: str, secret: str) -> str:
    """A registration token as a team's backend would mint it (HS256, stable user_id claim)."""
    claims = {"sub": username, "user_id": f"id-{username}", "exp": datetime.now(UTC) + timedelta(hours=1)}
    return jwt.encode(claims, secret, algorithm="HS256")


# --- A call between peers ------------------------------------------------------------------


async def ring(caller: Peer, callee_sessions: list[Peer], target: str) -> str:
    """Have `caller` call `target`; return the call id once the caller hears ringing and every session rang."""
    await caller.send({"type": "call_request", "target_username": target})
    ringing = await caller.expect("call_ringing")
    for session in callee_sessions:
        incoming = await session.expect("incoming_call")
        assert incoming["call_id"] == ringing["call_id"] and incoming["caller_username"] == caller.name
    return ringing["call_id"]


async def answered_call(caller: Peer, callee: Peer) -> str:
    """Ring `callee` from `caller` and answer; return the call id once the caller heard the answer."""
    call_id = await ring(caller, [callee], callee.name)
    await callee.send({"type": "call_accepted", "call_id": call_id})
    accepted = await caller.expect("call_accepted")
    assert (accepted["call_id"], accepted["accepter_username"]) == (call_id, callee.name)
    return call_id


async def signal_both_ways(caller: Peer, callee: Peer, call_id: str) -> None:
    """An offer one way, an answer and a candidate the other: each arrives as sent, with the call id."""
    offer = {"type": "offer", "sdp": "v=0\r\n"}
    await caller.send({"type": "offer", "target_username": callee.name, "data": offer})
    got = await callee.expect("offer")
    assert (got["data"], got["from_username"], got["call_id"]) == (offer, caller.name, call_id)
    await callee.send({"type": "answer", "target_username": caller.name, "data": {"type": "answer"}})
    assert (await caller.expect("answer"))["from_username"] == callee.name
    candidate = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMLineIndex": 0}
    await callee.send({"type": "ice_candidate", "target_username": caller.name, "data": candidate})
    assert (await caller.expect("ice_candidate"))["data"] == candidate


# --- What no well-behaved client does -----------------------------------------------------


class RawClient:
    """A WebSocket client written by hand, for frames a well-behaved library will not send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """Write one masked frame (opcode 1 text, 8 close) with any payload, valid or not."""
        mask = b"\x01\x02\x03\x04"
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        if len(payload) < 126:
            header = bytes([0x80 | opcode, 0x80 | len(payload)])
        else:
            header = bytes([0x80 | opcode, 0x80 | 126]) + len(payload).to_bytes(2, "big")
        self.writer.write(header + mask + masked)

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def send_close(self, code: int = 1000) -> None:
        self.send_frame(0x8, code.to_bytes(2, "big"))

    async def read_close_code(self, timeout: float = TIMEOUT) -> int:
        """Read frames until a close frame; return its code."""
        async with asyncio.timeout(timeout):
            while True:
                first, second = await self.reader.readexactly(2)
                length = second & 0x7F
                if length == 126:
                    length = int.from_bytes(await self.reader.readexactly(2), "big")
                elif length == 127:
                    length = int.from_bytes(await self.reader.readexactly(8), "big")
                payload = await self.reader.readexactly(length)
                if first & 0x0F == 0x8:
                    return int.from_bytes(payload[:2], "big")

    def close(self) -> None:
        self.writer.close()


class TcpProxy:
    """A TCP relay on loopback between clients and a server, whose links the test breaks as networks fail.

    `freeze()` stops carrying bytes either way and leaves the connections open (a
    blackholed link); `cut()` resets every open connection at both ends; while
    `refusing`, a new connection is reset at once.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut()
        for task in self._tasks:
            task.cancel()
        self._server.close()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def freeze(self) -> None:
        """Stop carrying bytes either way; the TCP connections stay open."""
        self.flowing.clear()

    def cut(self) -> None:
        """Reset every open connection at both ends."""
        for down, up in self._links:
            down.transport.abort()
            up.transport.abort()
        self._links.clear()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            client_writer.transport.abort()
            return
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._links.append((client_writer, server_writer))
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.get_running_loop().create_task(self._pump(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


# --- The signaling_client library -------------------------------------------------------------

E = TypeVar("E", bound=sc.Event)


class Recorder:
    """Every event a library client delivers, in order; `expect` finds the next one that matches."""

    def __init__(self, client: sc.SignalingClient) -> None:
        self.events: list[sc.Event] = []
        self.cursor = 0
        self._changed = asyncio.Event()
        client.on(sc.Event, self._add)

    def _add(self, event: sc.Event) -> None:
        self.events.append(event)
        self._changed.set()

    async def expect(self, kind: type[E], timeout: float = TIMEOUT, **fields: Any) -> E:
        """Return the next event of `kind` with these field values, passing over others."""
        async with asyncio.timeout(timeout):
            while True:
                for index in range(self.cursor, len(self.events)):
                    event = self.events[index]
                    if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
                        self.cursor = index + 1
                        return event
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: type[E]) -> list[E]:
        return [event for event in self.events if isinstance(event, kind)]


def checked_connection(violations: list[str], *, sent: bool = True, received: bool = True) -> type[ClientConnection]:
    """A socket class for a library client (its `create_connection`) that checks its frames against the spec.

    What the library sends is checked as client-to-server (unless not `sent`: a test that
    makes it send a malformed message on purpose), what it receives as server-to-client
    (unless not `received`: a scripted stand-in server). A frame that does not conform is
    recorded in `violations`, not raised: raised in the library's reader task, it would
    only stop the client.
    """

    def note(frame: str, sender: str) -> None:
        violations.extend(f"{sender} frame {frame}: {problem}" for problem in conformance.problems(frame, sender))

    class CheckedConnection(ClientConnection):
        async def send(self, message: Any, *, text: bool | None = None) -> None:
            if sent and isinstance(message, str):
                note(message, conformance.CLIENT)
            await super().send(message, text=text)

        async def recv(self, decode: bool | None = None) -> Any:
            frame = await super().recv(decode)
            if received and isinstance(frame, str):
                note(frame, conformance.SERVER)
            return frame

    return CheckedConnection


async def until_online(recorder: Recorder, *usernames: str) -> None:
    """Wait for a presence update that lists every one of `usernames`."""
    while not set(usernames) <= {u.username for u in (await recorder.expect(sc.OnlineUsers)).users}:
        pass


# --- HTTP and the database of a daphne process ------------------------------------------------


def http_request(url: str, body: Any = None, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """GET a URL, or POST `body` as JSON; return the status, headers and body (error statuses included)."""
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310 - a loopback test server
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def server_rows(server: DaphneServer, sql: str, *params: Any) -> list[tuple]:
    """Run a query on the SQLite database of a daphne process (call ids are stored without dashes).

    First waits until the server has written the call history it decided.
    """
    server.history_written()
    with sqlite3.connect(Path(server.env["DATABASE_URL"].removeprefix("sqlite:///"))) as db:
        return db.execute(sql, params).fetchall()


def call_row(server: DaphneServer, call_id: str) -> tuple[str, str | None]:
    """Return (status, end_reason) of one call, as the server stored it."""
    rows = server_rows(server, "SELECT status, end_reason FROM calls_call WHERE id = ?", call_id.replace("-", ""))
    assert rows, f"no call {call_id} in the database"
    return rows[0]


# --- Services and clusters ---------------------------------------------------------------------


def start_service(factory: type[RedisServer] | type[PostgresServer]) -> RedisServer | PostgresServer:
    """Start a service; skip when it is not installed, except in CI, where that fails."""
    try:
        service = factory()
    except ServiceMissing as exc:
        if in_ci():
            pytest.fail(f"{exc} (CI=true: tests are never skipped for a missing component)")
        pytest.skip(str(exc))
    try:
        service.start()
    except Exception:
        service.close()
        raise
    return service


@dataclass
class Cluster:
    """Two daphne processes sharing one redis-server and one PostgreSQL database."""

    redis: RedisServer
    database_url: str
    a: DaphneServer
    b: DaphneServer

    def rows(self, sql: str, *params: Any) -> list[tuple]:
        """Run a query on the cluster's database, once both processes have written their call history."""
        for server in (self.a, self.b):
            server.history_written()
        with psycopg.connect(self.database_url) as conn:
            return conn.execute(sql, params).fetchall()

    def call_row(self, call_id: str) -> tuple[str, str | None]:
        [row] = self.rows("SELECT status, end_reason FROM calls_call WHERE id = %s", call_id)
        return row

    def stop(self) -> None:
        for server in (self.a, self.b):
            server.stop()
        self.redis.close()


def start_cluster(tmp_path: Path, postgres: PostgresServer, **settings: str) -> Cluster:
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
