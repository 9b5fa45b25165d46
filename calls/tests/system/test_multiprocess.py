"""Covers the whole server as several processes: two daphne processes over a real redis-server and PostgreSQL.

Users on different processes reach each other, share one online list, survive a
Redis restart, and a killed process's users and calls are cleaned up by the survivor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from calls.tests.netclient import TIMEOUT, Cluster, answered_call, ring, signal_both_ways, start_cluster

pytestmark = pytest.mark.services

RING_TIMEOUT = "4"
# Token mode: where one user may have several devices (open mode allows one session per name).
TOKEN_MODE = {"SIGNALING_AUTH": "token", "SIGNALING_JWT_SECRET": "multiprocess-test-secret-" + "x" * 24}


@pytest.fixture(scope="module")
def token_pair(tmp_path_factory, postgres) -> Iterator[Cluster]:
    """Two processes in token mode, for the scenarios with several devices per user."""
    cluster = start_cluster(
        tmp_path_factory.mktemp("token-pair"), postgres, SIGNALING_RING_TIMEOUT=RING_TIMEOUT, **TOKEN_MODE
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, postgres) -> Iterator[Cluster]:
    """Two processes shared by the scenarios that leave them running (distinct usernames each)."""
    cluster = start_cluster(tmp_path_factory.mktemp("pair"), postgres, SIGNALING_RING_TIMEOUT=RING_TIMEOUT)
    yield cluster
    cluster.stop()


async def test_a_v1_call_flows_between_users_on_different_processes(pair, peers):
    alice = await peers(pair.a, "alice")
    bob = await peers(pair.b, "bob")
    listed = await alice.expect("online_users")
    while {"username": "bob", "user_id": "id-bob"} not in listed["users"]:
        listed = await alice.expect("online_users")
    await bob.expect_online({"alice", "bob"})

    call_id = await answered_call(alice, bob)
    await signal_both_ways(alice, bob, call_id)
    await alice.send({"type": "call_ended", "target_username": "bob"})
    ended = await bob.expect("call_ended")
    assert (ended["call_id"], ended["from_username"], ended["reason"]) == (call_id, "alice", "hangup")
    assert pair.call_row(call_id) == ("completed", "hangup")
    # In the order the transitions happened: each process writes its own, in its own batches.
    assert pair.rows("SELECT new_status FROM calls_callevent WHERE call_id = %s ORDER BY at, id", call_id) == [
        ("ringing",),
        ("answered",),
        ("completed",),
    ]


async def test_a_user_in_a_call_on_another_process_is_busy(pair, peers):
    carl = await peers(pair.a, "carl")
    dora = await peers(pair.b, "dora")
    call_id = await answered_call(carl, dora)
    erin = await peers(pair.b, "erin")
    for target in ("carl", "dora"):
        await erin.send({"type": "call_request", "target_username": target})
        busy = await erin.expect("call_rejected")
        assert (busy["rejecter_username"], busy["reason"]) == (target, "busy")
        assert pair.call_row(busy["call_id"]) == ("busy", "busy")
    await carl.nothing()
    await dora.nothing()
    assert pair.call_row(call_id) == ("answered", None)


async def test_an_unanswered_call_across_processes_times_out_for_both(pair, peers):
    # Answered on process B, its ring timer still runs on the caller's process A.
    sam, tess = await peers(pair.a, "sam"), await peers(pair.b, "tess")
    answered = await answered_call(sam, tess)
    fay = await peers(pair.a, "fay")
    gus = await peers(pair.b, "gus")
    call_id = await ring(fay, [gus], "gus")
    for side, peer in ((fay, "gus"), (gus, "fay")):
        ended = await side.expect("call_ended", timeout=float(RING_TIMEOUT) + TIMEOUT)
        assert (ended["call_id"], ended["reason"], ended["from_username"]) == (call_id, "timeout", peer)
    assert pair.call_row(call_id) == ("missed", "timeout")
    # The answered call's timer fired first; it left the call alone.
    await sam.nothing()
    await tess.nothing()
    assert pair.call_row(answered) == ("answered", None)


async def test_the_caller_cancels_and_the_callee_rejects_across_processes(pair, peers):
    hal = await peers(pair.a, "hal")
    ida = await peers(pair.b, "ida")
    cancelled = await ring(hal, [ida], "ida")
    await hal.send({"type": "call_ended", "call_id": cancelled})
    ended = await ida.expect("call_ended")
    assert (ended["call_id"], ended["reason"], ended["from_username"]) == (cancelled, "cancelled", "hal")
    assert pair.call_row(cancelled) == ("cancelled", "cancelled")

    rejected = await ring(hal, [ida], "ida")
    await ida.send({"type": "call_rejected", "call_id": rejected})
    reply = await hal.expect("call_rejected")
    assert (reply["call_id"], reply["rejecter_username"], reply["reason"]) == (rejected, "ida", "rejected")
    assert pair.call_row(rejected) == ("rejected", "rejected")


async def test_devices_on_both_processes_ring_and_only_the_answering_one_gets_signaling(token_pair, peers):
    jon = await peers(token_pair.a, "jon")
    phone = await peers(token_pair.a, "kim")
    laptop = await peers(token_pair.b, "kim")
    call_id = await ring(jon, [phone, laptop], "kim")
    await laptop.send({"type": "call_accepted", "call_id": call_id})
    assert (await jon.expect("call_accepted"))["call_id"] == call_id
    elsewhere = await phone.expect("call_ended")
    assert (elsewhere["call_id"], elsewhere["reason"]) == (call_id, "answered_elsewhere")

    laptop.name = "kim"
    await signal_both_ways(jon, laptop, call_id)
    await phone.nothing()
    await jon.send({"type": "call_ended", "call_id": call_id})
    assert (await laptop.expect("call_ended"))["reason"] == "hangup"
    await phone.nothing()
    assert token_pair.call_row(call_id) == ("completed", "hangup")


async def test_devices_on_both_processes_answering_at_once_give_exactly_one_answer(token_pair, peers):
    lea = await peers(token_pair.b, "lea")
    phone = await peers(token_pair.a, "max")
    laptop = await peers(token_pair.b, "max")
    call_id = await ring(lea, [phone, laptop], "max")
    await asyncio.gather(*(d.send({"type": "call_accepted", "call_id": call_id}) for d in (phone, laptop)))
    accepted = await lea.expect("call_accepted")
    assert accepted["call_id"] == call_id
    # The losing device hears of it (in either order: its answer may be handled before or
    # after the winner's); the winner hears nothing until signaling arrives.
    first_replies = {device: asyncio.ensure_future(device.reply()) for device in (phone, laptop)}
    done, pending = await asyncio.wait(first_replies.values(), timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    [loser] = [device for device, task in first_replies.items() if task in done]
    [winner] = [device for device in (phone, laptop) if device is not loser]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    heard = [first_replies[loser].result(), await loser.reply()]
    assert sorted(_describe(message) for message in heard) == ["call_ended answered_elsewhere", "error not_ringing"]
    await lea.send({"type": "offer", "target_username": "max", "data": {"sdp": "o"}})
    offer = await winner.reply()
    assert (offer["type"], offer["data"]) == ("offer", {"sdp": "o"})
    await loser.nothing()
    await lea.nothing()
    assert token_pair.call_row(call_id) == ("answered", None)
    assert token_pair.rows(
        "SELECT count(*) FROM calls_callevent WHERE call_id = %s AND new_status = 'answered'", call_id
    ) == [(1,)]


def _describe(message: dict[str, Any]) -> str:
    return f"{message['type']} {message.get('reason') or message.get('code')}"


async def test_a_username_is_taken_across_processes(pair, peers):
    await peers(pair.a, "ned")
    thief = await peers(pair.b)
    await thief.send({"type": "register", "username": "ned", "user_id": "someone-else"})
    await thief.expect_error("username_taken")
    assert pair.rows("SELECT user_id FROM calls_signalinguser WHERE username = 'ned'") == [("id-ned",)]

    first, second = await peers(pair.a), await peers(pair.b)
    await asyncio.gather(
        first.send({"type": "register", "username": "oli", "user_id": "u-1"}),
        second.send({"type": "register", "username": "oli", "user_id": "u-2"}),
    )
    outcomes = sorted([await first.reply(), await second.reply()], key=lambda m: m["type"])
    assert [m["type"] for m in outcomes] == ["error", "registered"], outcomes
    assert outcomes[0]["code"] == "username_taken"
    [(holder,)] = pair.rows("SELECT user_id FROM calls_signalinguser WHERE username = 'oli'")
    assert holder == outcomes[1]["user_id"]


async def test_a_user_is_listed_while_any_of_its_sessions_on_any_process_lives(token_pair, peers):
    watcher = await peers(token_pair.a, "pia", presence="delta")
    # One snapshot first (earlier tests' users may still be leaving), then changes only.
    snapshot = await watcher.expect("presence")
    assert snapshot["snapshot"] is True and "pia" in {user["username"] for user in snapshot["online"]}
    phone = await peers(token_pair.a, "quinn")
    laptop = await peers(token_pair.b, "quinn")
    assert (await watcher.presence_of("quinn"))[-1] == "online quinn"
    await phone.ws.close()
    await peers(token_pair.b, "rae")
    # Had quinn gone offline with the phone, the watcher would hear it before rae comes online.
    seen = await watcher.presence_of("rae")
    assert seen[-1] == "online rae" and "offline quinn" not in seen
    await laptop.ws.close()
    assert (await watcher.presence_of("quinn"))[-1] == "offline quinn"
    assert token_pair.rows("SELECT count(*) FROM calls_signalinguser WHERE username IN ('quinn', 'rae')") == [(2,)]


async def test_a_killed_process_leaves_the_list_and_its_calls_end_for_the_survivor(tmp_path, postgres, peers):
    cluster = start_cluster(
        tmp_path, postgres, SIGNALING_PRESENCE_TTL="2", SIGNALING_REAPER_INTERVAL="0.5", SIGNALING_RING_TIMEOUT="60"
    )
    try:
        alice = await peers(cluster.a, "alice")
        watcher = await peers(cluster.a, "walt", presence="delta")
        bob = await peers(cluster.b, "bob")
        carol = await peers(cluster.b, "carol")
        dave = await peers(cluster.a, "dave")
        await alice.expect_online({"alice", "walt", "bob", "carol", "dave"})
        answered = await answered_call(alice, bob)
        ringing = await ring(dave, [carol], "carol")

        cluster.b.kill()

        # Within the presence TTL (2 s here); the deadlines are generous for a loaded machine.
        ended = await alice.expect("call_ended", timeout=30)
        assert (ended["call_id"], ended["reason"], ended["from_username"]) == (answered, "disconnected", "bob")
        ended = await dave.expect("call_ended", timeout=30)
        assert (ended["call_id"], ended["reason"]) == (ringing, "disconnected")
        await alice.expect_online({"alice", "walt", "dave"}, timeout=30)
        gone: set[str] = set()
        while not {"bob", "carol"} <= gone:  # in one frame or two, as the reaper finds them
            gone |= {user["username"] for user in (await watcher.expect("presence", timeout=30))["offline"]}
        assert cluster.call_row(answered) == ("completed", "disconnected")
        assert cluster.call_row(ringing) == ("failed", "disconnected")
        assert cluster.rows("SELECT count(*) FROM calls_call WHERE status IN ('ringing', 'answered')") == [(0,)]
    finally:
        cluster.stop()


async def test_live_sessions_recover_after_redis_restarts(tmp_path, postgres, peers):
    cluster = start_cluster(tmp_path, postgres, SIGNALING_PRESENCE_TTL="3", SIGNALING_REAPER_INTERVAL="0.5")
    try:
        alice = await peers(cluster.a, "alice")
        bob = await peers(cluster.b, "bob")
        watcher = await peers(cluster.b, "walt", presence="delta")
        await alice.expect_online({"alice", "bob", "walt"})
        before = await answered_call(alice, bob)

        cluster.redis.restart()
        restarted = datetime.now(UTC)

        # Recovery: every process writes its sessions back (once the layer reaches them
        # again) and everyone gets the full list, read from the new Redis.
        await alice.expect_online({"alice", "bob", "walt"}, timeout=20, since=restarted)
        await bob.expect_online({"alice", "bob", "walt"}, timeout=20, since=restarted)
        # The call in progress survived: signaling still flows both ways, and it ends normally.
        await signal_both_ways(alice, bob, before)
        await bob.send({"type": "call_ended", "call_id": before})
        assert (await alice.expect("call_ended"))["reason"] == "hangup"
        assert cluster.call_row(before) == ("completed", "hangup")

        after = await answered_call(bob, alice)
        await signal_both_ways(bob, alice, after)
        carol = await peers(cluster.b, "carol")
        assert (await watcher.presence_of("carol"))[-1] == "online carol"
        # Read from Redis after the restart: every session was written back.
        await alice.expect_online({"alice", "bob", "walt", "carol"})
        await alice.send({"type": "call_ended", "call_id": after})
        await bob.expect("call_ended")
        call = await answered_call(carol, alice)
        await signal_both_ways(carol, alice, call)
        await carol.send({"type": "call_ended", "call_id": call})
        await alice.expect("call_ended")
        assert [cluster.call_row(c) for c in (after, call)] == [("completed", "hangup")] * 2
    finally:
        cluster.stop()


async def test_a_watched_user_on_another_process_comes_and_goes_in_the_watchers_frames(tmp_path, postgres, peers):
    cluster = start_cluster(tmp_path, postgres, SIGNALING_PRESENCE_TTL="2", SIGNALING_REAPER_INTERVAL="0.5")
    try:
        watcher = await peers(cluster.a, "wendy", watch=["xavier", "yolanda"])
        snapshot = await watcher.expect("presence")
        assert snapshot["snapshot"] is True and snapshot["online"] == []
        await peers(cluster.b, "zed")  # not watched: never in wendy's frames
        await peers(cluster.b, "xavier")
        seen = await watcher.presence_of("xavier")
        assert seen == ["online xavier"]
        cluster.b.kill()  # xavier's process dies: his lease lapses within the TTL
        seen = await watcher.presence_of("xavier", timeout=30)
        assert seen == ["offline xavier"]
    finally:
        cluster.stop()
