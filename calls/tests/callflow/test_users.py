"""Covers calls.callflow.users: user rows written in batches."""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext

from calls.callflow import store as call_store
from calls.callflow.users import UserRows
from calls.models import SignalingUser

pytestmark = pytest.mark.django_db(transaction=True)


def _rows() -> dict[str, str]:
    return dict(SignalingUser.objects.values_list("username", "user_id"))


async def test_registrations_arriving_together_share_one_statement(monkeypatch):
    batches: list[int] = []
    write = call_store.touch_users

    def counted(users: dict[str, str]) -> dict:
        with CaptureQueriesContext(connection) as queries:
            ringing = write(users)
        batches.append((len(users), sum(q["sql"].startswith("INSERT") for q in queries.captured_queries)))
        return ringing

    monkeypatch.setattr(call_store, "touch_users", counted)
    users = UserRows()
    # All 100 arrive before the writer's first turn: one statement writes them all.
    await asyncio.gather(*(users.touch(f"user{i}", f"id-{i}") for i in range(100)))
    assert batches == [(100, 1)]
    # One arriving while a write is under way waits for it, then goes in the next.
    first = asyncio.ensure_future(users.touch("early", "e"))
    await asyncio.sleep(0)  # the writer has started on "early"
    await asyncio.gather(first, users.touch("late", "l"), users.touch("later", "l2"))
    assert batches[1:] == [(1, 1), (2, 1)]
    expected = {f"user{i}": f"id-{i}" for i in range(100)} | {"early": "e", "late": "l", "later": "l2"}
    assert await database_sync_to_async(_rows)() == expected


async def test_the_latest_user_id_of_a_name_wins_within_a_batch():
    users = UserRows()
    await asyncio.gather(users.touch("first", "a"), users.touch("ann", "old"), users.touch("ann", "new"))
    assert await database_sync_to_async(_rows)() == {"first": "a", "ann": "new"}


async def test_a_failed_write_fails_every_registration_waiting_on_it(monkeypatch):
    def broken(users: dict[str, str]) -> None:
        raise RuntimeError("database down")

    monkeypatch.setattr(call_store, "touch_users", broken)
    users = UserRows()
    results = await asyncio.gather(users.touch("a", "1"), users.touch("b", "2"), return_exceptions=True)
    assert [str(r) for r in results] == ["database down", "database down"]
    monkeypatch.undo()
    await users.touch("a", "1")  # the writer recovers for the next registration
    assert await database_sync_to_async(_rows)() == {"a": "1"}
