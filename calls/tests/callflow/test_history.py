"""Covers calls.callflow.history and the history side of calls.callflow.store: call transitions written behind.

Group commit, `flush` and `stop`, rows that only move forward whichever writer
lands first, retries, the backlog metric, and the call rows a killed process
left live (`live_rows`, `end_orphans`, `CallService.end_orphan_rows`).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import replace
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from calls.callflow import board, history, service
from calls.callflow import store as call_store
from calls.callflow.board import SERVER, Actor, CallRecord, Transition
from calls.callflow.history import HistoryWriter
from calls.callflow.states import EndReason
from calls.models import Call, CallEvent
from calls.observability import metrics
from calls.presence.memory import MemoryPresenceStore
from calls.tests.wsclient import call_row, timeline

pytestmark = pytest.mark.django_db(transaction=True)

ALICE = Actor("chan.alice", "alice", "alice-phone")
BOB = Actor("chan.bob", "bob", "bob-phone")
WAIT = 10.0


def new_call(age: timedelta = timedelta(0)) -> CallRecord:
    """A call alice starts to bob, `age` ago."""
    return board.new_call(ALICE, "id-alice", "bob", timezone.now() - age, 45)


def created(record: CallRecord) -> Transition:
    return Transition(record, "", ALICE, record.created_at)


def lifecycle(record: CallRecord) -> list[Transition]:
    """The transitions of a whole call: created, answered by bob a second later, hung up by alice a minute later."""
    answered_at, ended_at = record.created_at + timedelta(seconds=1), record.created_at + timedelta(seconds=61)
    answered = replace(
        record, status="answered", callee_channel=BOB.session, callee_device=BOB.device, answered_at=answered_at
    )
    ended = replace(answered, status="completed", end_reason="hangup", ended_at=ended_at)
    return [
        created(record),
        Transition(answered, "ringing", BOB, answered_at),
        Transition(ended, "answered", ALICE, ended_at),
    ]


def backlog_metric() -> float:
    return metrics.REGISTRY.get_sample_value("signaling_history_backlog") or 0.0


@database_sync_to_async
def counts() -> tuple[int, int]:
    return Call.objects.count(), CallEvent.objects.count()


@pytest.fixture
async def writers():
    """Make history writers (each one a process's); stopped afterwards."""
    made: list[HistoryWriter] = []

    def make(delay: float = 0.0) -> HistoryWriter:
        made.append(HistoryWriter(delay))
        return made[-1]

    yield make
    for writer in made:
        await writer.stop()


class Gate:
    """Stands in for `store.write_history`: holds writes until released (if `hold`), fails the first `failures`.

    Records the size of every batch written and the queries it took.
    """

    def __init__(self, hold: bool = False, failures: int = 0) -> None:
        self.write = call_store.write_history
        self.loop = asyncio.get_running_loop()
        self.entered = asyncio.Event()
        self.failed = asyncio.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.failures = failures
        self.attempts: list[int] = []
        self.batches: list[int] = []
        self.queries: list[int] = []

    def __call__(self, transitions: list[Transition]) -> None:
        self.attempts.append(len(transitions))
        self.loop.call_soon_threadsafe(self.entered.set)
        self.release.wait(WAIT)
        if self.failures:
            self.failures -= 1
            self.loop.call_soon_threadsafe(self.failed.set)
            raise OperationalError("database is locked")
        with CaptureQueriesContext(connection) as queries:
            self.write(transitions)
        self.batches.append(len(transitions))
        self.queries.append(len(queries))


@pytest.fixture
def gate(monkeypatch):
    """Put a `Gate` in place of the history's database write."""

    def install(**options: object) -> Gate:
        installed = Gate(**options)
        monkeypatch.setattr(call_store, "write_history", installed)
        return installed

    return install


# --- The writer ---------------------------------------------------------------------------------


async def test_transitions_queued_during_a_write_share_the_next_transaction(writers, gate):
    held = gate(hold=True)
    writer = writers()
    writer.add(created(new_call()))
    async with asyncio.timeout(WAIT):
        await held.entered.wait()
    for _ in range(20):
        writer.add(created(new_call()))
    assert writer.backlog == 21
    flushed = asyncio.ensure_future(writer.flush())
    held.release.set()
    async with asyncio.timeout(WAIT):
        await flushed
    assert held.batches == [1, 20]
    # A batch costs a few statements, not a few per transition (the first also wrote the users).
    assert held.queries[1] <= held.queries[0]
    assert writer.backlog == 0
    assert await counts() == (21, 21)


async def test_flush_writes_everything_queued_without_waiting_out_the_delay(writers):
    writer = writers(delay=60.0)
    await writer.flush()  # nothing queued: returns at once
    records = [new_call() for _ in range(3)]
    for record in records:
        writer.add(created(record))
    async with asyncio.timeout(WAIT):
        await writer.flush()
    assert writer.backlog == 0
    assert [(await call_row(record.call_id)).status for record in records] == ["ringing"] * 3
    assert await counts() == (3, 3)


async def test_stop_writes_what_is_queued_before_the_writer_goes(writers):
    writer = writers(delay=60.0)
    transitions = lifecycle(new_call())
    for transition in transitions:
        writer.add(transition)
    async with asyncio.timeout(WAIT):
        await writer.stop()
    row = await call_row(transitions[0].record.call_id)
    assert (row.status, row.end_reason) == ("completed", "hangup")
    assert await counts() == (1, 3)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=str)
async def test_a_row_only_moves_forward_whichever_writer_lands_first(writers, order):
    # Each transition decided on another process, each written by that process's writer.
    record = new_call()
    transitions = lifecycle(record)
    for index in order:
        writer = writers()
        writer.add(transitions[index])
        await writer.flush()
    row = await call_row(record.call_id)
    ended = transitions[-1].record
    assert (row.status, row.end_reason, row.created_at, row.answered_at, row.ended_at) == (
        "completed",
        "hangup",
        record.created_at,
        ended.answered_at,
        ended.ended_at,
    )
    assert (row.caller_channel, row.callee_channel, row.callee_device) == (ALICE.session, BOB.session, BOB.device)
    assert await timeline(record.call_id) == [
        ("", "ringing", None),
        ("ringing", "answered", None),
        ("answered", "completed", "hangup"),
    ]


async def test_a_failing_write_is_retried_and_nothing_is_lost(writers, gate, monkeypatch):
    monkeypatch.setattr(history, "RETRY_DELAYS", (0.01,))
    failing = gate(failures=2)
    writer = writers()
    first, second = new_call(), new_call()
    writer.add(created(first))
    async with asyncio.timeout(WAIT):
        await failing.failed.wait()
        writer.add(created(second))  # queued while the database refuses
        await writer.flush()
    assert len(failing.attempts) == 3 and failing.batches == [2]
    assert writer.backlog == 0
    assert [(await call_row(call.call_id)).status for call in (first, second)] == ["ringing", "ringing"]
    assert await counts() == (2, 2)


async def test_the_backlog_metric_counts_unwritten_transitions_and_returns_to_zero(writers, gate):
    held = gate(hold=True)
    before = backlog_metric()
    writer = writers()
    for transition in lifecycle(new_call()):
        writer.add(transition)
    assert (writer.backlog, backlog_metric()) == (3, before + 3)
    async with asyncio.timeout(WAIT):
        await held.entered.wait()
    writer.add(created(new_call()))
    assert backlog_metric() == before + 4
    held.release.set()
    async with asyncio.timeout(WAIT):
        await writer.flush()
    assert (writer.backlog, backlog_metric()) == (0, before)
    assert await counts() == (2, 4)


# --- Rows a killed process left live --------------------------------------------------------------


async def written(*transitions: Transition) -> None:
    await database_sync_to_async(call_store.write_history)(list(transitions))


async def test_end_orphans_ends_live_rows_as_a_lost_party_would(writers):
    minute = timedelta(minutes=1)
    ringing, answered, completed = new_call(minute), new_call(minute), new_call(minute)
    await written(created(ringing), *lifecycle(answered)[:2], *lifecycle(completed))
    live_rows = database_sync_to_async(call_store.live_rows)
    assert sorted(await live_rows(timezone.now())) == sorted([ringing.call_id, answered.call_id])
    assert await live_rows(timezone.now() - 2 * minute) == []
    before = timezone.now()

    ids = [ringing.call_id, answered.call_id, completed.call_id]
    assert await database_sync_to_async(call_store.end_orphans)(ids) == 2

    rows = [await call_row(call_id) for call_id in ids]
    assert [(row.status, row.end_reason) for row in rows] == [
        ("failed", "disconnected"),
        ("completed", "disconnected"),
        ("completed", "hangup"),
    ]
    assert rows[0].ended_at >= before and rows[2].ended_at == lifecycle(completed)[-1].at
    assert (await timeline(ringing.call_id))[-1] == ("ringing", "failed", "disconnected")
    assert (await timeline(answered.call_id))[-1] == ("answered", "completed", "disconnected")
    assert await live_rows(timezone.now()) == []
    assert await database_sync_to_async(call_store.end_orphans)(ids) == 0


@pytest.fixture
def parts(process_parts, monkeypatch):
    """One process's call service, on a memory board, with a short orphan grace."""
    monkeypatch.setattr(service, "ORPHAN_GRACE", timedelta(seconds=0.3))
    return process_parts(MemoryPresenceStore())


async def sweep_until(parts, condition, timeout: float = WAIT) -> None:
    """Run the orphan sweep every 50 ms until the async condition holds."""
    async with asyncio.timeout(timeout):
        while True:
            await parts.calls.end_orphan_rows()
            if await condition():
                return
            await asyncio.sleep(0.05)


async def test_a_row_on_no_board_ends_after_the_grace_and_one_live_on_the_board_never(parts):
    loop = asyncio.get_running_loop()
    orphan = new_call(timedelta(minutes=1))
    await written(created(orphan))
    on_board = await parts.calls.start(Actor("chan.carol", "carol", "carol-phone"), "id-carol", "dave")
    parts.calls.cancel_ring_timeout(on_board.call_id)
    first_seen = loop.time()

    await parts.calls.end_orphan_rows()
    assert (await call_row(orphan.call_id)).status == "ringing"  # seen once: within the grace

    async def orphan_ended() -> bool:
        return (await call_row(orphan.call_id)).status != "ringing"

    await sweep_until(parts, orphan_ended)
    assert loop.time() - first_seen >= service.ORPHAN_GRACE.total_seconds()
    row = await call_row(orphan.call_id)
    assert (row.status, row.end_reason) == ("failed", "disconnected")

    # The board's call: old enough to be looked at, live on the board, left alone sweep after sweep.
    watched_until = loop.time() + 3 * service.ORPHAN_GRACE.total_seconds()

    async def watched() -> bool:
        return loop.time() >= watched_until

    await sweep_until(parts, watched)
    assert on_board.call_id in await database_sync_to_async(call_store.live_rows)(timezone.now() - service.ORPHAN_GRACE)
    row = await call_row(on_board.call_id)
    assert (row.status, row.end_reason) == ("ringing", None)
    assert [record.call_id for record in await parts.board.live()] == [on_board.call_id]


async def test_a_call_whose_end_is_still_queued_ends_with_its_own_reason(parts, monkeypatch):
    monkeypatch.setattr(service, "ORPHAN_GRACE", timedelta(0))
    call = await parts.calls.start(ALICE, "id-alice", "bob")
    await parts.history.flush()  # its row is written live
    await parts.calls.end(call.call_id, EndReason.HANGUP, ALICE)  # its end is queued

    await parts.calls.end_orphan_rows()

    row = await call_row(call.call_id)
    assert (row.status, row.end_reason) == ("cancelled", "cancelled")
    assert await timeline(call.call_id) == [("", "ringing", None), ("ringing", "cancelled", "cancelled")]
    assert await parts.board.live() == []


async def test_transitions_by_the_server_are_recorded_with_no_actor(writers):
    record = new_call()
    missed = replace(record, status="missed", end_reason="timeout", ended_at=timezone.now())
    writer = writers()
    writer.add(created(record))
    writer.add(Transition(missed, "ringing", SERVER, missed.ended_at))
    await writer.flush()
    event = await database_sync_to_async(CallEvent.objects.filter(call_id=record.call_id).last)()
    assert (event.new_status, event.session, event.username, event.device) == ("missed", "", "", "")
    row = await call_row(record.call_id)
    assert (row.status, row.end_reason, row.caller_device) == ("missed", "timeout", ALICE.device)


async def test_the_reaper_and_a_history_request_do_not_wait_for_a_database_that_is_down(parts, gate, monkeypatch):
    monkeypatch.setattr(history, "RETRY_DELAYS", (0.01,))
    monkeypatch.setattr(service, "FLUSH_TIMEOUT", 0.2)
    gate(failures=1_000_000)  # every write refused
    call = await parts.calls.start(Actor("chan-a", "alice"), "id-a", "bob")
    assert not await parts.history.flush(timeout=0.1)
    async with asyncio.timeout(WAIT):
        await parts.calls.end_orphan_rows()  # returns: the sweep skips while the history is behind
    assert parts.history.backlog == 1
    assert (await parts.board.get([call.call_id]))[call.call_id].status == "ringing"
    monkeypatch.setattr(history, "STOP_TIMEOUT", 0.1)
    await parts.history.stop()  # a shutdown gives up after its timeout too


async def test_a_row_whose_end_the_board_decided_but_no_writer_wrote_gets_that_end(parts):
    # The process that decided the hang-up was killed before its writer ran: the board
    # (Redis, shared) still holds how the call ended, and the sweep writes that, not "disconnected".
    call = await parts.calls.start(ALICE, "id-alice", "bob")
    parts.calls.cancel_ring_timeout(call.call_id)
    await parts.calls.accept(call.call_id, Actor("chan.bob", "bob", "bob-phone"))
    await parts.history.flush()
    ended = await parts.board.end(call.call_id, EndReason.HANGUP, ALICE, True, timezone.now())

    async def row_ended() -> bool:
        return (await call_row(call.call_id)).status != "answered"

    await sweep_until(parts, row_ended)
    row = await call_row(call.call_id)
    assert (row.status, row.end_reason, row.ended_at) == ("completed", "hangup", ended.ended_at)
    assert (await timeline(call.call_id))[-1] == ("answered", "completed", "hangup")


async def test_a_batch_holding_a_call_s_steps_out_of_order_leaves_the_row_at_the_furthest(writers):
    # Two steps of one call, queued by two coroutines in the other order than the board made them.
    steps = lifecycle(new_call())
    writer = writers()
    for transition in (steps[0], steps[2], steps[1]):
        writer.add(transition)
    await writer.flush()
    row = await call_row(steps[0].record.call_id)
    assert (row.status, row.end_reason) == ("completed", "hangup")
