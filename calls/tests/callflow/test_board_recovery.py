"""Covers calls.callflow.board, board_memory and board_redis where steps race or Redis loses its data.

The same cases on both boards where both apply (`board`, from conftest); Redis's own after.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from calls.callflow.board import Actor, CallBoard, CallRecord, new_call
from calls.callflow.states import CallStatus, EndReason

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ALICE = Actor("chan.alice", "alice", "alice-phone")
BOB = Actor("chan.bob", "bob", "bob-phone")
CAROL = Actor("chan.carol", "carol", "carol-phone")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ringing(caller: Actor, callee: str, pushed: bool = False) -> CallRecord:
    return new_call(caller, f"id-{caller.username}", callee, at(0), 45, pushed)


async def test_an_end_timed_before_an_answer_decided_elsewhere_never_comes_before_it(board: CallBoard):
    # The hang-up's time was read on one process, the answer's a moment later on another,
    # and the answer's script ran first: the end is put at the answer, not before it.
    call = await board.start(ringing(ALICE, "bob"), caller_multi=False, callee_multi=False)
    await board.accept(call.call_id, BOB, at(10))
    ended = await board.end(call.call_id, EndReason.HANGUP, ALICE, True, at(9))
    assert (ended.status, ended.answered_at, ended.ended_at) == (CallStatus.COMPLETED, at(10), at(10))


async def test_a_busy_attempt_is_not_marked_pushed(board: CallBoard):
    await board.start(ringing(ALICE, "bob"), caller_multi=False, callee_multi=False)
    busy = await board.start(ringing(CAROL, "bob", pushed=True), caller_multi=False, callee_multi=False)
    assert (busy.status, busy.end_reason, busy.pushed) == (CallStatus.BUSY, EndReason.BUSY, False)


@pytest.mark.parametrize("redis_url", [pytest.param("redis", marks=pytest.mark.services)], indirect=True)
async def test_a_call_hung_up_while_redis_had_lost_it_is_not_written_back(board: CallBoard):
    call = await board.start(ringing(ALICE, "bob"), caller_multi=False, callee_multi=False)
    answered = await board.accept(call.call_id, BOB, at(5))
    await board.redis.flushall()  # Redis restarted without its data

    # The hang-up finds nothing to end; the callee's process then writes back what its session knew.
    assert await board.end(call.call_id, EndReason.HANGUP, ALICE, True, at(6)) is None
    assert await board.restore([answered]) == 0
    assert await board.get([call.call_id]) == {}
    assert await board.live() == []
    # Both parties may call again.
    again = await board.start(ringing(ALICE, "bob"), caller_multi=False, callee_multi=False)
    assert again.status == CallStatus.RINGING


@pytest.mark.parametrize("redis_url", [pytest.param("redis", marks=pytest.mark.services)], indirect=True)
async def test_no_key_of_a_call_nobody_renews_outlives_it(make_boards):
    # Every process died: nothing renews the call, and nothing of it stays in Redis for good.
    board, _ = make_boards(live_ttl=0.3)
    await board.start(ringing(ALICE, "bob"), caller_multi=False, callee_multi=False)
    async with asyncio.timeout(10):  # polled: expiry is Redis's own clock, nothing to wait on
        while True:
            if not await board.redis.exists("signaling:calls:user:alice", "signaling:calls:user:bob"):
                break
            await asyncio.sleep(0.05)
    per_call = [
        key async for key in board.redis.scan_iter(match="signaling:calls:*") if not key.endswith(("live", "deadlines"))
    ]
    assert per_call == []
