"""Covers the whole server against fuzzing: 10,000 random and malformed frames through the real application.

Frames are text (JSON or not) drawn from all of Unicode, lone surrogates included,
hand-written JSON carrying surrogate escapes, non-finite numbers, deep nesting and too
many values, and binary frames (not UTF-8, or JSON as bytes). Each frame is followed by
a ping, so every reply before the pong belongs to that frame. No frame may cause an
internal error or close the socket, every reply must be a known message that is valid
UTF-8, and a call between two other users completes during and after the barrage.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from calls.process.runtime import Runtime
from calls.tests.wsclient import Client, complete_call
from calls.wire import protocol, text

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
FIELDS = [
    "username",
    "user_id",
    "device_id",
    "target_username",
    "caller_username",
    "call_id",
    "data",
    "limit",
    "token",
    "presence",
]
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
    protocol.CALL_RATE_LIMITED,
}

# Every code point, lone surrogates (category Cs) included. Those are a sliver of the code
# space that st.text all but never draws, so half the strings are built a character at a
# time with one in two a lone surrogate. json.dumps (ASCII by default) turns them into the
# "\ud800" escapes a real socket can carry; raw text frames carry them as they are.
any_char = st.characters(exclude_categories=())
lone_surrogates = st.integers(0xD800, 0xDFFF).map(chr)


def texts(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(any_char, min_size=min_size, max_size=max_size) | st.lists(
        any_char | lone_surrogates, min_size=min_size, max_size=max_size
    ).map("".join)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | texts(80),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts(10), children, max_size=4),
    max_leaves=12,
)
# The fuzzer may ring carol and signal anyone; alice and bob stay free for their call
# (ringing them would rightly make them busy), so no look-alike of theirs is listed.
look_alikes = ["CAROL", "ｃａｒｏｌ", "car\u200bol", "\u202ecarol", " carol", "carol\u2028", "car\ud800ol"]
names = st.sampled_from(["carol", "fuzzer", "nobody", "", "x" * 65, "a\x00b", *look_alikes]) | texts(70)
field_values = names | json_values | st.uuids().map(str)
shaped = st.fixed_dictionaries(
    {"type": st.sampled_from(KNOWN_TYPES) | texts(20) | json_values},
    optional={field: field_values for field in FIELDS},
)

# Frames written by hand, to carry what json.dumps never writes: JSON escapes of lone or
# misordered surrogates in either case, numbers that are not finite, deep nesting, and
# more values than a frame may hold.
surrogate_escapes = st.integers(0xD800, 0xDFFF).flatmap(
    lambda code: st.sampled_from([f"\\u{code:04x}", f"\\u{code:04X}"])
)
escaped_strings = st.lists(
    surrogate_escapes | st.sampled_from(["a", "\\ud83d\\ude00", "\\ude00\\ud83d", "\\u0000", "\\u202e", '\\"']),
    min_size=1,
    max_size=4,
).map("".join)


def escaped_frame(kind: str, field: str, value: str, in_data: bool) -> str:
    """A frame carrying `value` (JSON escapes) in one field, or as a key and a value inside `data`."""
    if in_data:
        return f'{{"type": "{kind}", "target_username": "carol", "data": {{"sdp": "v=0", "{value}": "{value}"}}}}'
    return f'{{"type": "{kind}", "username": "fuzzer", "user_id": "id-fuzzer", "{field}": "{value}"}}'


def number_frame(kind: str, number: str) -> str:
    return f'{{"type": "{kind}", "target_username": "carol", "limit": {number}, "data": {{"n": [{number}]}}}}'


def nested_frame(depth: int, arrays: bool) -> str:
    inner = "[" * depth + "]" * depth if arrays else '{"a": ' * depth + "1" + "}" * depth
    return f'{{"type": "offer", "target_username": "carol", "data": {{"x": {inner}}}}}'


def crowded_frame(count: int) -> str:
    return '{"type": "offer", "target_username": "carol", "data": {"x": [' + ",".join(["0"] * count) + "]}}"


hand_made = st.one_of(
    st.builds(escaped_frame, st.sampled_from(KNOWN_TYPES), st.sampled_from(FIELDS), escaped_strings, st.booleans()),
    st.builds(
        number_frame,
        st.sampled_from(KNOWN_TYPES),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1e308", "-0.0"]),
    ),
    st.builds(nested_frame, st.integers(0, 40), st.booleans())
    | st.builds(crowded_frame, st.integers(text.MAX_NODES - 8, text.MAX_NODES)),
)
# Binary frames: bytes that are not UTF-8 (each holds a byte no UTF-8 text has), and JSON as bytes.
never_utf8 = st.sampled_from([b"\xff", b"\xfe", b"\xc0\xaf", b"\xc1\xbf", b"\xed\xa0\x80", b"\xf5\x80\x80\x80"])
binary_frames = st.tuples(st.binary(max_size=30), never_utf8, st.binary(max_size=30)).map(b"".join) | shaped.map(
    lambda frame: json.dumps(frame).encode()
)
frames = st.one_of(
    shaped.map(json.dumps),
    json_values.map(json.dumps),
    hand_made,
    texts(200, min_size=1),
    st.binary(min_size=1, max_size=60).map(lambda raw: raw.decode("latin1")),
    binary_frames,
)


async def next_reply(client: Client, frame: str | bytes) -> dict:
    """Return the client's next message; fail at once, naming `frame`, if the application dies first.

    A crashed consumer sends nothing: without this, each failing example would wait
    out the receive timeout.
    """
    receiving = asyncio.ensure_future(client.receive())
    await asyncio.wait([receiving, client.comm.future], return_when=asyncio.FIRST_COMPLETED)
    if receiving.done():
        return receiving.result()
    receiving.cancel()
    try:
        client.comm.future.result()
    except Exception as exc:
        raise AssertionError(f"the application died handling {frame!r}: {exc!r}") from exc
    raise AssertionError(f"the application ended handling {frame!r}")


async def fuzz(batch: list[str | bytes]) -> None:
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
            if isinstance(frame, bytes):
                await fuzzer.comm.send_to(bytes_data=frame)
            else:
                await fuzzer.send(frame)
            await fuzzer.send({"type": "ping"})
            while (reply := await next_reply(fuzzer, frame))["type"] != "pong":
                assert reply["type"] in REPLY_TYPES, (frame, reply)
                # Nothing the server sends may be what a real socket cannot carry.
                json.dumps(reply, ensure_ascii=False).encode("utf-8")
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
    # No shrinking: every frame is followed by a ping, so a failure already names the one
    # frame that caused it, and shrinking 100 frames a run would take minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(frames, min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE))
def test_ten_thousand_random_frames_break_nothing(batch, settings):
    settings.SIGNALING_RATE = "1000000/1000000"
    async_to_sync(fuzz)(batch)


# The fuzzer's find, kept as an example of its own: a text frame holding a lone surrogate
# as a character (which an in-process or lenient ASGI server can hand over; a strict one
# refuses such a frame before the application sees it) gets an error like any bad frame.
async def test_a_text_frame_holding_a_lone_surrogate_character_is_refused_and_the_socket_stays_usable(connect):
    fuzzer = await connect("fuzzer")
    await fuzzer.send('{"type": "ping", "x": "\ud800"}')
    refused = await fuzzer.expect_error(protocol.INVALID_MESSAGE)
    assert refused["message"].startswith("'x' must be valid Unicode text")
    await fuzzer.send({"type": "ping"})
    await fuzzer.expect("pong")
