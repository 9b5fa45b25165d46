"""Shared fixtures: a fresh channel layer and runtime per test, and a test client."""

from __future__ import annotations

import pytest
from channels.layers import channel_layers

from calls.process.runtime import Runtime
from calls.realtime.security import mint_token
from calls.tests.conftest_services import *  # noqa: F403 - service fixtures and the database marker
from calls.tests.wsclient import Client


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
