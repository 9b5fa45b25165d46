"""Fixtures for real services (redis-server, PostgreSQL), and the `database` marker.

Imported by calls/tests/conftest.py. Every test that touches the Django database
in this process is marked `database`, so scripts/run-tests.sh can run exactly
those again against PostgreSQL (`pytest -m database` with DATABASE_URL set).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from calls.testing.services import PostgresServer, RedisServer, ServiceMissing, in_ci

__all__ = [
    "pytest_collection_modifyitems",
    "pytest_configure",
    "postgres",
    "redis_server",
]

# Fixtures through which a test reaches the Django database of this process.
DATABASE_FIXTURES = {"db", "transactional_db", "django_db_reset_sequences", "django_db_serialized_rollback", "connect"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "database: touches the Django database in-process (run again against PostgreSQL)"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        uses_db = item.get_closest_marker("django_db") is not None or DATABASE_FIXTURES & set(
            getattr(item, "fixturenames", ())
        )
        if uses_db:
            item.add_marker(pytest.mark.database)


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
