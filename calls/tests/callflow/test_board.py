"""Covers calls.callflow.board, board_memory and board_redis: the call state machine, the same cases on both boards.

Every case runs against `MemoryCallBoard` and against `RedisCallBoard` on a real redis-server;
the last ones are Redis's own, where two boards on one Redis are two processes: races between
them, expiry of calls nobody renews, and restore.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from calls.callflow.board import SERVER, Actor, CallBoard, CallRecord, new_call
from calls.callflow.states import END_STATUS, CallStatus, EndReason
from calls.wire import protocol
from calls.wire.errors import SignalingError

# Whole milliseconds: the Redis board keeps times to the millisecond.
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RING_S = 45
SHORT_TTL = 0.3  # seconds a live call outlives its last renewal (Redis: the expiry cases)

ALICE = Actor("chan.alice", "alice", "alice-phone")
BOB = Actor("chan.bob", "bob", "bob-phone")
BOB_LAPTOP = Actor("chan.bob-laptop", "bob", "bob-laptop")
CAROL = Actor("chan.carol", "carol", "carol-phone")
DAVE = Actor("chan.dave", "dave", "dave-phone")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ringing(caller: Actor, callee: str, started: float = 0.0, pushed: bool = False) -> CallRecord:
    """A new call as the call service hands it to `start`."""
    return new_call(caller, f"id-{caller.username}", callee, at(started), RING_S, pushed)


async def rung(board: CallBoard, caller: Actor, callee: str, started: float = 0.0, multi: bool = False) -> CallRecord:
    """Start a call that rings (both parties may have several calls with `multi`)."""
    record = await board.start(ringing(caller, callee, started), caller_multi=multi, callee_multi=multi)
    assert record.status == CallStatus.RINGING, record
    return record


async def answered(board: CallBoard, caller: Actor = ALICE, callee: Actor = BOB) -> CallRecord:
    record = await rung(board, caller, callee.username)
    return await board.accept(record.call_id, callee, at(5))


REDIS = pytest.param("redis", marks=pytest.mark.services)
# The cases of Redis alone: two boards on one redis-server are two processes.
REDIS_ONLY = pytest.mark.parametrize("redis_url", [REDIS], indirect=True)


async def live_ids(board: CallBoard) -> set[str]:
    return {record.call_id for record in await board.live()}


async def absent(board: CallBoard, call_id: str) -> bool:
    return call_id not in await board.get([call_id])


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an async condition until it holds; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.05)


# --- Starting a call ------------------------------------------------------------------------


async def test_a_started_call_rings_and_reads_back_with_every_field(board):
    record = ringing(ALICE, "bob", pushed=True)
    assert await board.start(record, caller_multi=False, callee_multi=False) == record
    assert await board.get([record.call_id, "unknown"]) == {record.call_id: record}
    assert await board.live() == [record]
    assert await board.calls_of_session(ALICE.session) == [record.call_id]
    assert await board.ringing_for("bob") == [record]
    assert await board.ringing_for("alice") == []


async def live_call(board: CallBoard, party: Actor, role: str) -> CallRecord:
    """A live call of `party` with dave: one it makes, one ringing for it, or one it answered."""
    if role == "calling":
        return await rung(board, party, "dave")
    return await (rung(board, DAVE, party.username) if role == "rung" else answered(board, DAVE, party))


ROLES = pytest.mark.parametrize("role", ["calling", "rung", "answered"])


@ROLES
async def test_a_callee_with_a_live_call_is_busy_and_the_busy_call_is_not_live(board, role):
    first = await live_call(board, BOB, role)
    attempt = ringing(CAROL, "bob", started=1)
    busy = await board.start(attempt, caller_multi=False, callee_multi=False)
    assert busy == replace(attempt, status="busy", end_reason="busy", ring_deadline=None, ended_at=attempt.created_at)
    assert await live_ids(board) == {first.call_id}
    assert await board.calls_of_session(CAROL.session) == []
    # The caller of a busy call is free to call someone else.
    await rung(board, CAROL, "alice")


@ROLES
async def test_a_caller_with_a_live_call_may_not_start_another(board, role):
    first = await live_call(board, ALICE, role)
    with pytest.raises(SignalingError) as refused:
        await board.start(ringing(ALICE, "carol", started=1), caller_multi=False, callee_multi=False)
    assert refused.value.code == protocol.ALREADY_IN_CALL
    assert await live_ids(board) == {first.call_id}
    assert await board.ringing_for("carol") == []


async def test_multi_call_users_may_make_and_receive_several_calls(board):
    calls = [await rung(board, ALICE, callee, multi=True) for callee in ("bob", "carol")]
    calls.append(await board.start(ringing(DAVE, "bob", started=1), caller_multi=False, callee_multi=True))
    assert await live_ids(board) == {record.call_id for record in calls}
    assert sorted(await board.calls_of_session(ALICE.session)) == sorted(record.call_id for record in calls[:2])
    assert [record.call_id for record in await board.ringing_for("bob")] == [calls[0].call_id, calls[2].call_id]


# --- Answering a call --------------------------------------------------------------------------


async def test_the_first_accept_wins_and_a_second_device_gets_not_ringing(board):
    record = await rung(board, ALICE, "bob")
    accepted = await board.accept(record.call_id, BOB, at(5))
    assert accepted == replace(
        record, status="answered", callee_channel=BOB.session, callee_device=BOB.device, answered_at=at(5)
    )
    with pytest.raises(SignalingError) as refused:
        await board.accept(record.call_id, BOB_LAPTOP, at(6))
    assert refused.value.code == protocol.NOT_RINGING
    assert await board.get([record.call_id]) == {record.call_id: accepted}
    assert await board.calls_of_session(BOB.session) == [record.call_id]
    assert await board.calls_of_session(BOB_LAPTOP.session) == []
    assert await board.ringing_for("bob") == []


@pytest.mark.parametrize("who", [CAROL, ALICE, None], ids=["a stranger", "the caller", "a call nobody started"])
async def test_only_the_callee_of_a_ringing_call_may_accept(board, who):
    record = await rung(board, ALICE, "bob")
    with pytest.raises(SignalingError) as refused:
        await board.accept(record.call_id if who else str(uuid.uuid4()), who or BOB, at(5))
    assert refused.value.code == protocol.NOT_RINGING
    assert (await board.get([record.call_id]))[record.call_id] == record


@pytest.mark.parametrize("variant", ["BOB", "Ｂｏｂ", "ｂｏｂ"])
async def test_the_callee_answers_under_a_case_or_width_variant_of_its_name(board, variant):
    record = await rung(board, ALICE, "Bob")
    assert await board.ringing_for(variant) == [record]
    accepted = await board.accept(record.call_id, Actor("chan.b", variant, "d"), at(5))
    assert (accepted.status, accepted.callee_channel, accepted.callee_username) == ("answered", "chan.b", "Bob")
    # Busy under every spelling of the name.
    assert (await board.start(ringing(CAROL, variant, 6), False, False)).status == "busy"


# --- Ending a call --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, reason, actor, party, status, why",
    [
        pytest.param(False, "rejected", BOB, True, "rejected", "rejected", id="callee rejects"),
        pytest.param(False, "hangup", ALICE, True, "cancelled", "cancelled", id="caller hangs up while ringing"),
        pytest.param(False, "cancelled", ALICE, True, "cancelled", "cancelled", id="caller cancels"),
        pytest.param(False, "hangup", BOB_LAPTOP, True, "rejected", "rejected", id="callee hangs up while ringing"),
        pytest.param(False, "timeout", SERVER, False, "missed", "timeout", id="ring timeout"),
        pytest.param(False, "disconnected", ALICE, False, "failed", "disconnected", id="caller drops while ringing"),
        pytest.param(True, "hangup", ALICE, True, "completed", "hangup", id="caller hangs up"),
        pytest.param(True, "hangup", BOB, True, "completed", "hangup", id="callee hangs up"),
        pytest.param(True, "disconnected", SERVER, False, "completed", "disconnected", id="a party drops"),
    ],
)
async def test_a_live_call_ends_as_the_transition_table_says(board, answer, reason, actor, party, status, why):
    record = await (answered(board) if answer else rung(board, ALICE, "bob"))
    ended = await board.end(record.call_id, EndReason(reason), actor, party, at(20))
    assert ended == replace(record, status=status, end_reason=why, ended_at=at(20))
    assert await board.get([record.call_id]) == {record.call_id: ended}
    assert await board.live() == []
    assert await board.calls_of_session(ALICE.session) == await board.calls_of_session(BOB.session) == []
    assert await board.overdue(at(1000)) == []
    await rung(board, ALICE, "dave")  # both parties are free again
    await rung(board, CAROL, "bob")


async def test_every_entry_of_the_end_table_is_reached(board):
    for (old, reason), new in END_STATUS.items():
        record = await (answered(board) if old == CallStatus.ANSWERED else rung(board, ALICE, "bob"))
        ended = await board.end(record.call_id, reason, SERVER, False, at(20))
        assert (ended.status, ended.end_reason) == (new, reason), (old, reason)


@pytest.mark.parametrize(
    "answer, reason, actor, party",
    [
        pytest.param(True, EndReason.TIMEOUT, SERVER, False, id="timeout after the answer"),
        pytest.param(False, EndReason.HANGUP, CAROL, True, id="a stranger hangs up a ringing call"),
        pytest.param(True, EndReason.HANGUP, CAROL, True, id="a stranger hangs up an answered call"),
        pytest.param(True, EndReason.REJECTED, BOB, True, id="the callee rejects after the answer: not ringing"),
    ],
)
async def test_an_end_that_does_not_apply_changes_nothing(board, answer, reason, actor, party):
    record = await (answered(board) if answer else rung(board, ALICE, "bob"))
    if reason == EndReason.REJECTED:
        with pytest.raises(SignalingError) as refused:
            await board.end(record.call_id, reason, actor, party, at(20))
        assert refused.value.code == protocol.NOT_RINGING
    else:
        assert await board.end(record.call_id, reason, actor, party, at(20)) is None
    assert await board.get([record.call_id]) == {record.call_id: record}
    assert await live_ids(board) == {record.call_id}


async def test_an_ended_call_ends_only_once(board):
    record = await answered(board)
    first = await board.end(record.call_id, EndReason.HANGUP, ALICE, True, at(20))
    assert await board.end(record.call_id, EndReason.DISCONNECTED, SERVER, False, at(21)) is None
    assert await board.end(record.call_id, EndReason.HANGUP, BOB, True, at(22)) is None
    assert await board.end(str(uuid.uuid4()), EndReason.HANGUP, BOB, True, at(22)) is None
    assert await board.get([record.call_id]) == {record.call_id: first}


# --- Reading calls ---------------------------------------------------------------------------------


async def test_overdue_lists_the_ringing_calls_past_their_deadline_only(board):
    early = await rung(board, ALICE, "bob", started=0)
    late = await rung(board, CAROL, "dave", started=10)
    await answered(board, Actor("chan.erin", "erin"), Actor("chan.fay", "fay"))  # its deadline passes too
    assert await board.overdue(at(RING_S - 1)) == []
    assert await board.overdue(at(RING_S)) == [early.call_id]
    assert sorted(await board.overdue(at(RING_S + 10))) == sorted([early.call_id, late.call_id])


async def test_ringing_for_lists_only_calls_ringing_for_that_user_oldest_first(board):
    newest = await rung(board, ALICE, "bob", started=5, multi=True)
    oldest = await rung(board, CAROL, "bob", started=1, multi=True)
    taken = await rung(board, DAVE, "bob", started=0, multi=True)
    await board.accept(taken.call_id, BOB, at(6))
    mine = await rung(board, BOB_LAPTOP, "erin", started=2, multi=True)
    assert await board.ringing_for("bob") == [oldest, newest]
    assert await board.ringing_for("erin") == [mine]


async def test_a_moved_session_takes_its_calls_to_its_new_channel(board):
    record = await answered(board)
    await board.move_session(ALICE.session, "chan.alice-resumed")
    await board.move_session(BOB.session, "chan.bob-resumed")
    moved = (await board.get([record.call_id]))[record.call_id]
    assert (moved.caller_channel, moved.callee_channel) == ("chan.alice-resumed", "chan.bob-resumed")
    assert await board.calls_of_session("chan.alice-resumed") == [record.call_id]
    assert await board.calls_of_session(ALICE.session) == []
    ended = await board.end(record.call_id, EndReason.HANGUP, ALICE, True, at(20))
    assert (ended.status, ended.caller_channel) == ("completed", "chan.alice-resumed")
    assert await board.calls_of_session("chan.alice-resumed") == []


async def test_get_returns_an_ended_call_for_a_while_then_forgets_it(make_boards):
    board, _ = make_boards(keep_ended=0.3)
    record = await answered(board)
    ended = await board.end(record.call_id, EndReason.HANGUP, ALICE, True, at(20))
    assert await board.get([record.call_id]) == {record.call_id: ended}
    await until(lambda: absent(board, record.call_id))


# --- Redis: two processes, expiry, restore -------------------------------------------------------


@REDIS_ONLY
async def test_of_two_devices_on_two_processes_accepting_at_once_exactly_one_wins(make_boards):
    a, b = make_boards()
    for _ in range(50):
        record = await rung(a, ALICE, "bob")
        outcomes = await asyncio.gather(
            a.accept(record.call_id, BOB, at(5)), b.accept(record.call_id, BOB_LAPTOP, at(5)), return_exceptions=True
        )
        winner, loser = sorted(outcomes, key=lambda outcome: isinstance(outcome, SignalingError))
        assert isinstance(winner, CallRecord), outcomes
        assert isinstance(loser, SignalingError) and loser.code == protocol.NOT_RINGING, outcomes
        assert (await b.get([record.call_id]))[record.call_id] == winner
        await b.end(record.call_id, EndReason.HANGUP, ALICE, True, at(9))


@REDIS_ONLY
async def test_of_two_callers_on_two_processes_calling_one_callee_at_once_exactly_one_rings(make_boards):
    a, b = make_boards()
    for _ in range(50):
        outcomes = await asyncio.gather(
            a.start(ringing(ALICE, "bob"), False, False), b.start(ringing(CAROL, "bob"), False, False)
        )
        assert sorted(record.status for record in outcomes) == ["busy", "ringing"]
        [call_id] = [record.call_id for record in outcomes if record.status == "ringing"]
        assert await live_ids(b) == {call_id}
        await a.end(call_id, EndReason.HANGUP, SERVER, False, at(9))


@REDIS_ONLY
async def test_an_accept_racing_a_ring_timeout_has_one_outcome(make_boards):
    a, b = make_boards()
    for _ in range(50):
        record = await rung(a, ALICE, "bob")
        accept, timeout = await asyncio.gather(
            a.accept(record.call_id, BOB, at(5)),
            b.end(record.call_id, EndReason.TIMEOUT, SERVER, False, at(5)),
            return_exceptions=True,
        )
        now = (await a.get([record.call_id]))[record.call_id]
        if isinstance(accept, CallRecord):
            assert (timeout, now) == (None, accept)
        else:
            assert isinstance(accept, SignalingError) and now == timeout and now.status == "missed"
        await a.end(record.call_id, EndReason.HANGUP, ALICE, True, at(9))


def renewing_until_gone(board: CallBoard, channels: list[str], call_id: str) -> Callable[[], Awaitable[bool]]:
    """A condition for `until`: renew these sessions, then tell whether the call is gone."""

    async def gone() -> bool:
        await board.renew(channels, 0.0)
        return await absent(board, call_id)

    return gone


@REDIS_ONLY
async def test_a_call_whose_sessions_nobody_renews_vanishes_and_a_renewed_one_stays(make_boards):
    a, b = make_boards(SHORT_TTL)
    kept = await answered(a)
    lost = await answered(a, CAROL, DAVE)
    await until(renewing_until_gone(b, [ALICE.session, BOB.session], lost.call_id))
    assert await live_ids(b) == {kept.call_id}
    assert await a.calls_of_session(DAVE.session) == []
    await until(lambda: absent(a, kept.call_id))  # no more renewals
    assert await b.live() == []


@REDIS_ONLY
async def test_a_renewed_call_keeps_its_parties_busy_past_the_live_ttl(make_boards):
    a, b = make_boards(SHORT_TTL)
    kept = await answered(a)
    witness = await rung(a, CAROL, "dave")  # not renewed: gone once the TTL has passed
    await until(renewing_until_gone(b, [ALICE.session, BOB.session], witness.call_id))
    assert await live_ids(a) == {kept.call_id}
    assert (await b.start(ringing(CAROL, "bob", 30), False, False)).status == "busy"
    with pytest.raises(SignalingError) as refused:
        await b.start(ringing(ALICE, "dave", 30), False, False)
    assert refused.value.code == protocol.ALREADY_IN_CALL


@REDIS_ONLY
async def test_restore_writes_back_only_the_calls_the_board_lost(make_boards):
    a, b = make_boards()
    present = await answered(a)
    lost_ringing = ringing(CAROL, "dave", started=3)
    lost_answered = replace(
        ringing(Actor("chan.erin", "erin"), "fay"), status="answered", callee_channel="chan.fay", answered_at=at(4)
    )
    stale_view = replace(present, status="ringing", callee_channel="")
    assert await b.restore([stale_view, lost_ringing, lost_answered]) == 2
    assert await a.get([present.call_id]) == {present.call_id: present}
    assert await live_ids(a) == {present.call_id, lost_ringing.call_id, lost_answered.call_id}
    assert await a.ringing_for("dave") == [lost_ringing]
    assert await a.calls_of_session("chan.fay") == [lost_answered.call_id]
    assert await a.overdue(at(3 + RING_S)) == [lost_ringing.call_id]
    assert (await a.start(ringing(Actor("chan.gus", "gus"), "fay", 5), False, False)).status == "busy"
    assert await b.restore([lost_ringing]) == 0
