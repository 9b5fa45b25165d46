"""Property-based fuzzing: 10,000 random and malformed frames through the real application.

Each frame is followed by a ping, so every reply before the pong belongs to that frame.
No frame may cause an internal error or close the socket, every reply must be a known
message, and a call between two other users completes during and after the barrage.
"""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calls import protocol
from calls.runtime import Runtime
from calls.tests.wsclient import Client

EXAMPLES = 100
FRAMES_PER_EXAMPLE = 100  # 100 x 100 = 10,000 frames

KNOWN_TYPES = [
    "register",
    "call_request",
    "call_accepted",
    "call_rejected",
    "call_ended",
    "offer",
    "answer",
    "ice_candidate",
    "get_call_history",
    "ping",
]
FIELDS = ["username", "user_id", "target_username", "caller_username", "call_id", "data", "limit", "token", "presence"]
REPLY_TYPES = {
    "error",
    "registered",
    "call_ringing",
    "call_rejected",
    "call_ended",
    "call_history",
    "pong",
    "online_users",
    "incoming_call",
}
ERROR_CODES = {
    protocol.INVALID_JSON,
    protocol.INVALID_MESSAGE,
    protocol.UNKNOWN_TYPE,
    protocol.ALREADY_REGISTERED,
    protocol.USER_OFFLINE_CODE,
    protocol.NOT_IN_CALL,
    protocol.NOT_RINGING,
    protocol.ALREADY_IN_CALL,
    protocol.USERNAME_TAKEN,
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
# The fuzzer may ring carol and signal anyone; alice and bob stay free for their call
# (ringing them would rightly make them busy).
names = st.sampled_from(["carol", "fuzzer", "nobody", "", "x" * 65, "a\x00b"]) | st.text(max_size=70)
field_values = names | json_values | st.uuids().map(str)
shaped = st.fixed_dictionaries(
    {"type": st.sampled_from(KNOWN_TYPES) | st.text(max_size=20) | json_values},
    optional={field: field_values for field in FIELDS},
)
frames = st.one_of(
    shaped.map(json.dumps),
    json_values.map(json.dumps),
    st.text(min_size=1, max_size=200),
    st.binary(min_size=1, max_size=60).map(lambda raw: raw.decode("latin1")),
)


async def complete_call(alice: Client, bob: Client) -> None:
    await alice.send({"type": "call_request", "target_username": "bob"})
    call_id = (await bob.expect("incoming_call"))["call_id"]
    await bob.send({"type": "call_accepted", "call_id": call_id})
    await alice.expect("call_accepted")
    await alice.send({"type": "offer", "target_username": "bob", "data": {"sdp": "o"}})
    await bob.expect("offer")
    await bob.send({"type": "answer", "target_username": "alice", "data": {"sdp": "a"}})
    await alice.expect("answer")
    await alice.send({"type": "call_ended", "call_id": call_id})
    assert (await bob.expect("call_ended"))["reason"] == "hangup"


async def fuzz(batch: list[str]) -> None:
    channel_layers.backends = {}
    clients = [Client() for _ in range(4)]
    alice, bob, fuzzer, _carol = clients
    try:
        for client, name in zip(clients, ["alice", "bob", "fuzzer", "carol"], strict=True):
            assert await client.connect()
            await client.register(name, f"id-{name}")
        half = len(batch) // 2
        for index, frame in enumerate(batch):
            if index == half:
                await complete_call(alice, bob)
            await fuzzer.send(frame)
            await fuzzer.send({"type": "ping"})
            while (reply := await fuzzer.receive())["type"] != "pong":
                assert reply["type"] in REPLY_TYPES, (frame, reply)
                if reply["type"] == "error":
                    assert reply["code"] in ERROR_CODES, (frame, reply)
                    assert reply["message"], reply
        await complete_call(alice, bob)
    finally:
        for client in clients:
            await client.close()
        runtime = Runtime.current()
        await runtime.stop()
        Runtime._instances.clear()


@pytest.mark.django_db(transaction=True)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(frames, min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE))
def test_ten_thousand_random_frames_break_nothing(batch, settings):
    settings.SIGNALING_RATE = "1000000/1000000"
    async_to_sync(fuzz)(batch)
