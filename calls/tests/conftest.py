"""The one conftest: fixtures every test folder under calls/tests shares, and the `database` marker.

- The database: an SQLite file (PostgreSQL in pass 2 of scripts/run-tests.sh), and the
  `database` marker on every test that touches it in this process.
- The server in-process: a fresh channel layer and runtime (`runtime`), and registered test
  clients through the real ASGI application (`connect`, `multi_device`).
- Real services and processes: `redis_server`, `postgres`, and clients of daphne processes:
  plain WebSocket peers (`peers`) and signaling_client library clients (`open_client`).
- Headless Chromium kept off the network, for the pages' tests (`browser`).
- Call boards, in memory and on a real redis-server, the same cases on both (`board`, `make_boards`).
- One process's parts wired as the runtime wires them, without its background jobs, for the
  lease keeper and the reaper alone (`process_parts`).
- A monotonic clock moved by hand, for the limits and the leases (`clock`).

What tests import lives in calls/tests/wsclient.py (in-process clients and the rows they
leave) and calls/tests/netclient.py (real sockets, real processes); a test module never
imports another.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import signaling_client as sc
import websockets
from channels.layers import channel_layers
from playwright.sync_api import Browser, sync_playwright

from calls.callflow import limits as call_limits
from calls.callflow.board import CallBoard
from calls.callflow.board_memory import MemoryCallBoard
from calls.callflow.board_redis import RedisCallBoard
from calls.callflow.history import HistoryWriter
from calls.callflow.service import CallService
from calls.presence import memory as memory_store
from calls.presence.base import PresenceStore, SessionInfo
from calls.presence.hub import PresenceHub
from calls.process.leases import LeaseKeeper
from calls.process.reaper import Reaper
from calls.process.runtime import Runtime
from calls.realtime import limits as connection_limits
from calls.realtime import security
from calls.realtime.layers import SignalingInMemoryLayer
from calls.realtime.security import mint_token
from calls.realtime.sessions import SessionRegistry
from calls.testing.servers import DaphneServer
from calls.testing.services import PostgresServer, RedisServer, in_ci
from calls.tests.netclient import TIMEOUT, Peer, Recorder, checked_connection, start_service, token_for
from calls.tests.wsclient import WRITERS, Client

# --- The database, and the `database` marker ---------------------------------------------

# Fixtures through which a test reaches the Django database of this process.
DATABASE_FIXTURES = {"db", "transactional_db", "django_db_reset_sequences", "django_db_serialized_rollback", "connect"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "database: touches the Django database in-process (run again against PostgreSQL)"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `database` every test that reaches the database in-process: pass 2 runs exactly those."""
    for item in items:
        uses_db = item.get_closest_marker("django_db") is not None or DATABASE_FIXTURES & set(
            getattr(item, "fixturenames", ())
        )
        if uses_db:
            item.add_marker(pytest.mark.database)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix, tmp_path_factory):
    """Test on an SQLite file, as production does: an in-memory database shares one
    cache between threads and reports "table is locked" instead of waiting its turn."""
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        database.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("db") / "test.sqlite3")


@pytest.fixture(scope="session", autouse=True)
def _close_database_thread_connections(django_db_setup):
    """Close the connections the ORM keeps open in asgiref's database thread (CONN_MAX_AGE).

    Otherwise PostgreSQL refuses to drop the test database at the end of the run
    ("being accessed by other users").
    """
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=10)


# --- The server in this process -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fast_presence(settings):
    """Broadcast presence quickly so tests wait less; behaviour is the same."""
    settings.SIGNALING_PRESENCE_WINDOW_MS = 20


@pytest.fixture
async def runtime():
    """A fresh in-memory channel layer and runtime, stopped after the test."""
    channel_layers.backends = {}
    runtime = Runtime.current()
    yield runtime
    await runtime.stop()
    Runtime._instances.pop(next(iter(k for k, v in Runtime._instances.items() if v is runtime)), None)
    channel_layers.backends = {}


@pytest.fixture
def multi_device(settings):
    """Token mode, where a user may register several devices (open mode allows one session per name).

    `connect` then registers each client with a token minted for its username.
    """
    settings.SIGNALING_AUTH = "token"
    settings.SIGNALING_JWT_SECRET = "test-secret-" + "x" * 32


@pytest.fixture
async def connect(runtime, transactional_db, settings):
    """Open registered (or unregistered) test clients; every one is closed afterwards."""
    opened: list[Client] = []

    async def open_client(username: str | None = None, user_id: str | None = None, **extra) -> Client:
        client = Client()
        await client.connect()
        opened.append(client)
        if username is not None:
            if settings.SIGNALING_AUTH == "token":
                extra.setdefault("token", mint_token(username, user_id=user_id or f"id-{username}")[0])
            await client.register(username, user_id or f"id-{username}", **extra)
        return client

    yield open_client
    for client in opened:
        await client.close()


# --- Real services and processes -------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole run; `postgres.new_database()` gives a migrated database."""
    server = start_service(PostgresServer)
    yield server
    server.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test (nothing persisted, restartable)."""
    server = start_service(RedisServer)
    yield server
    server.close()


@pytest.fixture
async def peers():
    """Open plain WebSocket clients on a daphne process, registered as `id-<name>`; all closed afterwards.

    On a server in token mode each registers with a token minted with the server's secret.
    """
    opened: list[Peer] = []

    async def open_peer(server: DaphneServer, username: str | None = None, **extra: Any) -> Peer:
        ws = await websockets.connect(server.url, open_timeout=TIMEOUT)
        peer = Peer(ws, username or "anonymous")
        opened.append(peer)
        if username is not None:
            if server.env.get("SIGNALING_AUTH") == "token":
                extra.setdefault("token", token_for(username, server.env["SIGNALING_JWT_SECRET"]))
            await peer.register(username, f"id-{username}", **extra)
        return peer

    yield open_peer
    for peer in opened:
        await peer.ws.close()


@pytest.fixture
async def open_client():
    """Connect registered signaling_client library clients; all are closed afterwards.

    Each connects to a daphne process (on one in token mode, with a token minted with its
    secret) or to a URL, and reconnects with a fast backoff (0.1 s to 0.5 s). Every frame
    each one sends must conform to protocol/asyncapi.yaml, unless `malformed` (the test makes
    it send a malformed message on purpose), and every frame it receives, unless `scripted`
    (a stand-in server that sends what it likes): the test fails otherwise.
    """
    opened: list[sc.SignalingClient] = []
    violations: list[str] = []

    async def factory(
        target: DaphneServer | str, username: str, *, scripted: bool = False, malformed: bool = False, **options: Any
    ) -> tuple[sc.SignalingClient, Recorder]:
        url = target
        if isinstance(target, DaphneServer):
            url = target.url
            if target.env.get("SIGNALING_AUTH") == "token":
                options.setdefault("token", token_for(username, target.env["SIGNALING_JWT_SECRET"]))
        options.setdefault(
            "create_connection", checked_connection(violations, sent=not malformed, received=not scripted)
        )
        client = sc.SignalingClient(
            url, username, f"id-{username}", **{"backoff_initial": 0.1, "backoff_max": 0.5, **options}
        )
        recorder = Recorder(client)
        opened.append(client)
        await client.connect()
        return client, recorder

    yield factory
    for client in opened:
        await client.close()
    assert violations == [], "frames that do not conform to protocol/asyncapi.yaml:\n" + "\n".join(violations)


# --- Call boards ---------------------------------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.services)])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    """None for the memory call board, or the URL of a fresh redis-server (each case runs on both)."""
    return None if request.param == "memory" else request.getfixturevalue("redis_server").url


@pytest.fixture
async def make_boards(redis_url: str | None) -> AsyncIterator[Callable[..., tuple[CallBoard, CallBoard]]]:
    """Build two call boards that share their calls, as two processes do (the memory board: one, twice)."""
    made: list[CallBoard] = []

    def make(live_ttl: float = 60.0, keep_ended: float = 300.0) -> tuple[CallBoard, CallBoard]:
        if redis_url is None:
            return (board := MemoryCallBoard(keep_ended)), board
        made.extend(RedisCallBoard(redis_url, live_ttl, keep_ended) for _ in range(2))
        return made[-2], made[-1]

    yield make
    for board in made:
        await board.close()


@pytest.fixture
def board(make_boards) -> CallBoard:
    """A call board: in memory, then on a real redis-server."""
    return make_boards()[0]


# --- A browser ------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    # Never talk to Google services, update servers or QUIC endpoints from tests.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # A fake camera (test pattern) and microphone (beeps), granted without a prompt.
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    # WebRTC host candidates on loopback, as plain IP addresses (see system/test_browser.py).
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium (Playwright's sync API: a module of browser tests holds no async tests)."""
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (make system-packages installs the Debian chromium package)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    args = list(CHROMIUM_ARGS)
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield browser
        browser.close()


# --- One process's parts, for the lease keeper and the reaper alone ---------------------------


class StandInSession:
    """A socket's consumer as the registry and the lease keeper see it (`calls.realtime.sessions.Session`).

    It keeps what it is sent and how it was closed.
    """

    def __init__(self, channel_name: str, username: str, user_id: str) -> None:
        self.channel_name = channel_name
        self.session: SessionInfo | None = SessionInfo(channel_name, username, user_id)
        self.delta_presence = False
        self.events: list[dict[str, Any]] = []
        self.texts: list[str] = []
        self.errors: list[tuple[str, str]] = []
        self.closed_with: int | None = None

    def enqueue(self, event: dict[str, Any]) -> bool:
        self.events.append(event)
        return True

    def post(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    async def send_text(self, text: str) -> None:
        self.texts.append(text)

    async def send_error(self, code: str, message: str) -> None:
        self.errors.append((code, message))

    def live_calls(self) -> list:
        return []

    async def close(self, code: int | None = None) -> None:
        self.closed_with = code


class NoPush:
    """The call service's `Pusher` on a process where no user has a device to wake."""

    async def has_subscriptions(self, username: str) -> bool:
        return False

    def ring(self, record: Any) -> None:
        pass

    def ring_ended(self, record: Any, reason: str) -> None:
        pass


class ProcessParts:
    """One process's parts as calls/process/runtime.py wires them, around a given store, with no jobs running.

    `announced` counts the calls of `presence_changed`, the callback the keeper and the reaper share.
    """

    LEASE = 20.0

    def __init__(self, store: PresenceStore) -> None:
        self.store = store
        self.layer = SignalingInMemoryLayer()
        self.sessions = SessionRegistry(self.layer, PresenceHub(store, window=60.0))
        self.background: set[asyncio.Task] = set()
        self.board = MemoryCallBoard()
        self.history = HistoryWriter(0.0)
        WRITERS.append(self.history)
        self.calls = CallService(self.board, self.history, self.sessions, NoPush(), self.background.add)
        self.announced = 0
        self.leases = LeaseKeeper(
            store, self.layer, self.sessions, self.calls, self.LEASE, self.presence_changed, "test"
        )
        self.reaper = Reaper(store, self.sessions, self.calls, self.leases, self.presence_changed, "test")

    async def presence_changed(self) -> None:
        self.announced += 1

    async def session(self, username: str, user_id: str) -> StandInSession:
        """A session registered on this process and listed in the store, as a consumer's register does it."""
        consumer = StandInSession(await self.layer.new_channel(), username, user_id)
        self.sessions.add(consumer)
        await self.store.join(consumer.session, 5, self.LEASE)
        return consumer

    async def listed(self, username: str, lease: float = LEASE) -> str:
        """A session of another process, listed in the store for `lease` seconds; return its channel."""
        channel = await self.layer.new_channel()
        await self.store.join(SessionInfo(channel, username, f"id-{username}"), 5, lease)
        return channel

    async def heard(self, channel: str) -> dict[str, Any]:
        """The next event the layer holds for `channel`."""
        return await asyncio.wait_for(self.layer.receive(channel), TIMEOUT)


@pytest.fixture
def process_parts() -> Iterator[Callable[[PresenceStore], ProcessParts]]:
    """Build one process's parts around a store; their ring timers are cancelled afterwards."""
    built: list[ProcessParts] = []

    def build(store: PresenceStore) -> ProcessParts:
        built.append(ProcessParts(store))
        return built[-1]

    yield build
    for parts in built:
        parts.calls.stop()
        WRITERS.remove(parts.history)


# --- Time -------------------------------------------------------------------------------------


class Clock:
    """Stands in for the `time` module: a monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """A hand-moved clock for every module whose deadlines read `time.monotonic`: the
    connection and call limits (and the token buckets they use), and the memory store's leases."""
    clock = Clock()
    for module in (connection_limits, call_limits, security, memory_store):
        monkeypatch.setattr(module, "time", clock)
    return clock
