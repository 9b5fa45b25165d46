"""Covers calls.callflow.store: history deletion (the history writes: test_history.py)."""

from __future__ import annotations

from datetime import timedelta

from channels.db import database_sync_to_async
from django.utils import timezone

from calls.callflow import store as call_store
from calls.tests.wsclient import write_call


async def test_delete_history_before_reports_how_many_calls_went(transactional_db):
    for days in (100, 95):
        await write_call("completed", days_ago=days)
    await write_call("completed", days_ago=5)
    cutoff = timezone.now() - timedelta(days=90)
    assert await database_sync_to_async(call_store.delete_history_before)(cutoff) == 2
