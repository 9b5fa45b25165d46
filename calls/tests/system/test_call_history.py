"""Covers the call history of real daphne processes: complete after a burst, a SIGTERM and a kill -9.

The history is written behind the calls (calls/callflow/history.py). After a burst
every call has its row and its events in order; a graceful stop writes what was
queued; after kill -9 the reaper of a process on the same database (or of the
surviving process of a Redis cluster) leaves no call live in the database. With
two processes, an answer written by the callee's process before the call's
creation written by the caller's still leaves the row right.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest

from calls.testing.servers import METRICS_TOKEN, DaphneServer, daphne_server, server_env
from calls.testing.services import RedisServer
from calls.tests.netclient import (
    TIMEOUT,
    Cluster,
    Peer,
    answered_call,
    http_request,
    ring,
    server_rows,
    signal_both_ways,
    start_cluster,
    start_service,
)

# Many clients from one address, many calls each: no limit may refuse the burst.
BURST = {
    "SIGNALING_CALLS_PER_MINUTE": "0",
    "SIGNALING_CONNECT_RATE_PER_ADDRESS": "0",
    "SIGNALING_MAX_PENDING_PER_ADDRESS": "0",
    "SIGNALING_PRESENCE_SCOPE": "watch",
}
# A process that dies is noticed fast, and its call rows are ended by the reaper.
REAPED = {"SIGNALING_PRESENCE_TTL": "2", "SIGNALING_REAPER_INTERVAL": "0.5", "SIGNALING_RING_TIMEOUT": "60"}
TOKEN_MODE = {"SIGNALING_AUTH": "token", "SIGNALING_JWT_SECRET": "call-history-test-secret-" + "x" * 24}
COMPLETE = [("", "ringing", None), ("ringing", "answered", None), ("answered", "completed", "hangup")]
LIVE = "SELECT count(*) FROM calls_call WHERE status IN ('ringing', 'answered')"


async def full_call(caller: Peer, callee: Peer) -> str:
    """Ring, answer, and the caller hangs up; return the call id once the callee heard the end."""
    call_id = await answered_call(caller, callee)
    await caller.send({"type": "call_ended", "call_id": call_id})
    ended = await callee.expect("call_ended")
    assert (ended["call_id"], ended["reason"]) == (call_id, "hangup")
    return call_id


async def burst(server: DaphneServer, peers: Any, pairs: int, rounds: int, prefix: str = "") -> list[str]:
    """`pairs` callers each make `rounds` whole calls to their own callee, all pairs at once."""
    callers = await asyncio.gather(*(peers(server, f"{prefix}caller{i}") for i in range(pairs)))
    callees = await asyncio.gather(*(peers(server, f"{prefix}callee{i}") for i in range(pairs)))

    async def calls_of(caller: Peer, callee: Peer) -> list[str]:
        return [await full_call(caller, callee) for _ in range(rounds)]

    made = await asyncio.gather(*(calls_of(caller, callee) for caller, callee in zip(callers, callees, strict=True)))
    return [call_id for calls in made for call_id in calls]


def assert_complete_history(server: DaphneServer, call_ids: list[str]) -> None:
    """Every call is one completed row with its three events, in order of time and of writing."""
    rows = dict(
        (call_id, (status, reason))
        for call_id, status, reason in server_rows(server, "SELECT id, status, end_reason FROM calls_call")
    )
    assert rows == {call_id.replace("-", ""): ("completed", "hangup") for call_id in call_ids}
    events: defaultdict[str, list[tuple]] = defaultdict(list)
    query = "SELECT call_id, old_status, new_status, reason, at FROM calls_callevent ORDER BY id"
    for call_id, old, new, reason, at in server_rows(server, query):
        events[call_id].append((old, new, reason, datetime.fromisoformat(at)))
    assert set(events) == set(rows)
    for call_id, timeline in events.items():
        assert [event[:3] for event in timeline] == COMPLETE, call_id
        times = [event[3] for event in timeline]
        assert times == sorted(times), (call_id, times)


def backlog(server: DaphneServer) -> float:
    """Call transitions the server decided and has not written yet (its metric)."""
    status, _, body = http_request(f"{server.http_url}/metrics", Authorization=f"Bearer {METRICS_TOKEN}")
    assert status == 200
    return float(re.search(r"^signaling_history_backlog (\S+)$", body.decode(), re.MULTILINE).group(1))


async def until_none_live(rows: Any, timeout: float = 30.0) -> None:
    """Poll the database until no call row is ringing or answered."""
    deadline = time.monotonic() + timeout
    while (live := (await asyncio.to_thread(rows, LIVE))[0][0]) > 0:
        assert time.monotonic() < deadline, f"{live} calls still live in the database"
        await asyncio.sleep(0.1)


# --- One process, in memory and SQLite ------------------------------------------------------------


async def test_after_a_burst_of_500_calls_every_call_has_its_rows_in_order(tmp_path, peers):
    with daphne_server(tmp_path, **BURST) as server:
        call_ids = await burst(server, peers, pairs=50, rounds=10)
        assert len(set(call_ids)) == 500
        assert_complete_history(server, call_ids)


async def test_sigterm_right_after_a_burst_writes_all_its_history_before_the_process_exits(tmp_path, peers):
    with daphne_server(tmp_path, SIGNALING_HISTORY_DELAY_MS="1000", **BURST) as server:
        call_ids = await burst(server, peers, pairs=20, rounds=5)
        server.history_written()  # the writer is idle: the next transition waits a second for its batch
        call_ids += await burst(server, peers, pairs=20, rounds=1, prefix="late")
        assert backlog(server) > 0  # the last burst is not written yet

        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.proc.wait, 20) == 0

        assert_complete_history(server, call_ids)  # read from the file: the process is gone
        assert "Exception inside application" not in server.logs()


async def test_after_kill_9_a_process_on_the_same_database_ends_every_call_left_live(tmp_path, peers):
    env = {**REAPED, "SIGNALING_HISTORY_DELAY_MS": "1000"}
    with daphne_server(tmp_path, **env) as first:
        alice, bob, carol, dave, erin, fay = [
            await peers(first, name) for name in ("alice", "bob", "carol", "dave", "erin", "fay")
        ]
        answered = await answered_call(alice, bob)
        ringing = await ring(carol, [dave], "dave")
        hung_up = await answered_call(erin, fay)
        first.history_written()  # the live rows are in the database
        await erin.send({"type": "call_ended", "call_id": hung_up})
        assert (await fay.expect("call_ended"))["reason"] == "hangup"  # its end maybe not yet written

        first.kill()
        assert await alice.close_code() is None  # the socket dropped, no close frame

    with daphne_server(tmp_path, migrate_db=False, **env) as second:
        alice, bob = await peers(second, "alice"), await peers(second, "bob")  # their clients reconnect
        await until_none_live(lambda sql: server_rows(second, sql))
        rows = dict(
            (call_id, (status, reason))
            for call_id, status, reason in server_rows(second, "SELECT id, status, end_reason FROM calls_call")
        )
        assert rows[answered.replace("-", "")] == ("completed", "disconnected")
        assert rows[ringing.replace("-", "")] == ("failed", "disconnected")
        assert rows[hung_up.replace("-", "")][0] == "completed"
        # Nothing of the lost calls is left on the new process: alice and bob are free to talk.
        again = await answered_call(alice, bob)
        assert server_rows(second, "SELECT status FROM calls_call WHERE id = ?", again.replace("-", "")) == [
            ("answered",)
        ]


@pytest.mark.services
async def test_after_kill_9_of_one_process_of_two_no_call_stays_live_in_the_database(tmp_path, postgres, peers):
    cluster = start_cluster(tmp_path, postgres, **REAPED)
    try:
        names = ("gus", "hana", "ivan", "judy", "kate", "ned")
        gus, hana, ivan, judy, kate, ned = [
            await peers(cluster.a if name in ("kate", "ned") else cluster.b, name) for name in names
        ]
        leo, mia = await peers(cluster.b, "leo"), await peers(cluster.b, "mia")
        within_answered = await answered_call(gus, hana)
        within_ringing = await ring(ivan, [judy], "judy")
        across_answered = await answered_call(kate, leo)
        across_ringing = await ring(mia, [ned], "ned")
        assert cluster.rows(LIVE) == [(4,)]

        cluster.b.kill()

        for survivor, call_id in ((kate, across_answered), (ned, across_ringing)):
            ended = await survivor.expect("call_ended", timeout=30)
            assert (ended["call_id"], ended["reason"]) == (call_id, "disconnected")
        await until_none_live(cluster.rows)
        assert [cluster.call_row(c) for c in (within_answered, within_ringing, across_answered, across_ringing)] == [
            ("completed", "disconnected"),
            ("failed", "disconnected"),
            ("completed", "disconnected"),
            ("failed", "disconnected"),
        ]
    finally:
        cluster.stop()


# --- Two processes that write at different paces ------------------------------------------------


@pytest.fixture(scope="module")
def paced_pair(tmp_path_factory, postgres) -> Iterator[Cluster]:
    """Two processes in token mode: A writes its history a second behind, B at once.

    No reaper sweep flushes A's writer early (a long reaper interval).
    """
    redis = start_service(RedisServer)
    env = server_env(
        tmp_path_factory.mktemp("paced"),
        REDIS_URL=redis.url,
        DATABASE_URL=postgres.new_database(),
        SIGNALING_PRESENCE_WINDOW_MS="20",
        SIGNALING_REAPER_INTERVAL="60",
        SIGNALING_PRESENCE_TTL="300",
        **TOKEN_MODE,
    )
    logs = tmp_path_factory.mktemp("paced-logs")
    cluster = Cluster(
        redis,
        env["DATABASE_URL"],
        DaphneServer({**env, "SIGNALING_HISTORY_DELAY_MS": "1000"}, logs / "a.log"),
        DaphneServer({**env, "SIGNALING_HISTORY_DELAY_MS": "0"}, logs / "b.log"),
    )
    try:
        cluster.a.start()
        cluster.b.start()
        yield cluster
    finally:
        cluster.stop()


def events_of(cluster: Cluster, call_id: str) -> list[tuple]:
    """A call's events in order of time: (old status, new status, reason, who acted, device, session)."""
    return cluster.rows(
        "SELECT old_status, new_status, reason, username, device, session FROM calls_callevent"
        " WHERE call_id = %s ORDER BY at, id",
        call_id,
    )


@pytest.mark.services
async def test_a_call_across_processes_is_recorded_whole_though_its_answer_is_written_first(paced_pair, peers):
    alice = await peers(paced_pair.a, "alice", device_id="alice-phone")
    bob = await peers(paced_pair.b, "bob", device_id="bob-laptop")
    call_id = await ring(alice, [bob], "bob")
    await bob.send({"type": "call_accepted", "call_id": call_id})
    assert (await alice.expect("call_accepted"))["call_id"] == call_id

    # B wrote the answer (and so the row) while A still holds the call's creation.
    with psycopg.connect(paced_pair.database_url) as db:
        deadline = time.monotonic() + TIMEOUT
        while not db.execute("SELECT 1 FROM calls_call WHERE id = %s", (call_id,)).fetchall():
            assert time.monotonic() < deadline, "B never wrote the answer"
            await asyncio.sleep(0.02)
        written = db.execute("SELECT new_status FROM calls_callevent WHERE call_id = %s", (call_id,)).fetchall()
    assert written == [("answered",)]

    await signal_both_ways(alice, bob, call_id)
    await bob.send({"type": "call_ended", "call_id": call_id})
    assert (await alice.expect("call_ended"))["reason"] == "hangup"

    [(*row, caller_channel, callee_channel)] = paced_pair.rows(
        "SELECT status, end_reason, caller_device, callee_device, created_at < answered_at AND answered_at < ended_at,"
        " caller_channel, callee_channel FROM calls_call WHERE id = %s",
        call_id,
    )
    assert row == ["completed", "hangup", "alice-phone", "bob-laptop", True]
    assert caller_channel and callee_channel and caller_channel != callee_channel
    assert events_of(paced_pair, call_id) == [
        ("", "ringing", None, "alice", "alice-phone", caller_channel),
        ("ringing", "answered", None, "bob", "bob-laptop", callee_channel),
        ("answered", "completed", "hangup", "bob", "bob-laptop", callee_channel),
    ]


def describe(message: dict[str, Any]) -> str:
    return f"{message['type']} {message.get('reason') or message.get('code')}"


@pytest.mark.services
async def test_of_two_devices_answering_at_once_on_two_processes_the_history_names_the_one_that_won(paced_pair, peers):
    lea = await peers(paced_pair.b, "lea")
    devices = {"phone": await peers(paced_pair.a, "max", device_id="phone")}
    devices["laptop"] = await peers(paced_pair.b, "max", device_id="laptop")
    for _ in range(3):
        call_id = await ring(lea, list(devices.values()), "max")
        await asyncio.gather(
            *(device.send({"type": "call_accepted", "call_id": call_id}) for device in devices.values())
        )
        assert (await lea.expect("call_accepted"))["call_id"] == call_id
        await lea.send({"type": "call_ended", "call_id": call_id})

        [(winner, channel)] = paced_pair.rows(
            "SELECT callee_device, callee_channel FROM calls_call WHERE id = %s", call_id
        )
        [loser] = [name for name in devices if name != winner]
        assert describe(await devices[winner].reply()) == "call_ended hangup"
        heard = sorted([describe(await devices[loser].reply()) for _ in range(2)])
        assert heard == ["call_ended answered_elsewhere", "error not_ringing"]
        assert [event[:5] for event in events_of(paced_pair, call_id)] == [
            ("", "ringing", None, "lea", ""),
            ("ringing", "answered", None, "max", winner),
            ("answered", "completed", "hangup", "lea", ""),
        ]
        assert events_of(paced_pair, call_id)[1][5] == channel
    await lea.nothing()  # one call_accepted a call, no more
    for device in devices.values():
        await device.nothing()
