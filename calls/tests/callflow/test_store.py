"""Covers calls.callflow.store: call persistence under concurrent transactions, and history deletion."""

from __future__ import annotations

import threading
from datetime import timedelta

from channels.db import database_sync_to_async
from django.utils import timezone

from calls.callflow import store as call_store
from calls.models import CallEvent, SignalingUser
from calls.tests.wsclient import write_call
from calls.wire.errors import SignalingError


def test_concurrent_accepts_in_the_database_let_exactly_one_win(transactional_db):
    now = timezone.now()
    alice = SignalingUser.objects.create(username="alice", user_id="a", last_seen=now)
    SignalingUser.objects.create(username="bob", user_id="b", last_seen=now)
    record = call_store.start_call(call_store.Actor("chan-a", alice.username), "bob", ring_timeout=30)
    results: list[str] = []
    barrier = threading.Barrier(4)

    def accept(session: str) -> None:
        barrier.wait()
        try:
            call_store.accept_call(record.call_id, call_store.Actor(session, "bob"))
            results.append("won")
        except SignalingError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=accept, args=(f"chan-b{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["not_ringing"] * 3 + ["won"]
    assert CallEvent.objects.filter(call_id=record.call_id, new_status="answered").count() == 1


async def test_delete_history_before_reports_how_many_calls_went(transactional_db):
    for days in (100, 95):
        await write_call("completed", days_ago=days)
    await write_call("completed", days_ago=5)
    cutoff = timezone.now() - timedelta(days=90)
    assert await database_sync_to_async(call_store.delete_history_before)(cutoff) == 2
