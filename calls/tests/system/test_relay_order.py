"""Covers the relay between two daphne processes through Redis: signals arrive in the order they were sent.

The caller's process publishes in batches (calls/realtime/redis_layer.py). Before
the answer a signal goes to the callee's group, after it straight to the answering
session: a stream of candidates that crosses the answer switches from one to the
other, and must still arrive in order, behind the `incoming_call` it follows.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest

from calls.tests.netclient import Cluster, Peer, start_cluster

pytestmark = pytest.mark.services

CANDIDATES = 500
# Every candidate may be sent at once: the default rate limit (50 a second) would spread them over seconds.
UNLIMITED_RATE = "1000000/1000000"


@pytest.fixture(scope="module")
def pair(tmp_path_factory, postgres) -> Iterator[Cluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("relay-order"), postgres, SIGNALING_RATE=UNLIMITED_RATE)
    yield cluster
    cluster.stop()


def candidate(n: int) -> dict[str, object]:
    return {"candidate": f"candidate:{n} 1 udp 2122260223 127.0.0.1 {40000 + n} typ host", "sdpMLineIndex": 0}


def number_of(message: dict[str, object]) -> int:
    return int(re.match(r"candidate:(\d+) ", message["data"]["candidate"])[1])


async def test_candidates_sent_across_the_answer_arrive_in_order_on_the_other_process(pair, peers):
    alice: Peer = await peers(pair.a, "alice")
    bob: Peer = await peers(pair.b, "bob")
    await alice.send({"type": "call_request", "target_username": "bob"})
    call_id = (await alice.expect("call_ringing"))["call_id"]

    async def send_candidates(numbers: range) -> None:
        for n in numbers:
            await alice.send(
                {"type": "ice_candidate", "target_username": "bob", "call_id": call_id, "data": candidate(n)}
            )

    async def alice_side() -> None:
        # The first half streams while bob answers (group sends, then maybe direct ones);
        # the second half goes once alice knows of the answer (direct sends only).
        await send_candidates(range(CANDIDATES // 2))
        assert (await alice.expect("call_accepted"))["call_id"] == call_id
        await send_candidates(range(CANDIDATES // 2, CANDIDATES))

    sending = asyncio.ensure_future(alice_side())
    incoming = await bob.expect("incoming_call")
    assert incoming["call_id"] == call_id
    await bob.send({"type": "call_accepted", "call_id": call_id})
    heard = [await bob.expect("ice_candidate") for _ in range(CANDIDATES)]
    await sending

    assert [number_of(message) for message in heard] == list(range(CANDIDATES))
    assert {(message["call_id"], message["from_username"]) for message in heard} == {(call_id, "alice")}
    await bob.nothing()
    assert pair.call_row(call_id) == ("answered", None)
