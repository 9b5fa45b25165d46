"""The parser alone: every frame becomes a message or a ProtocolError with its code."""

from __future__ import annotations

import json

import pytest

from calls import protocol
from calls.protocol import ProtocolError, parse_message


def parse(obj) -> protocol.Message:
    return parse_message(json.dumps(obj))


def code_of(obj) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_message(obj if isinstance(obj, str) else json.dumps(obj))
    return info.value.code


def test_it_parses_a_v1_register():
    message = parse({"type": "register", "username": "alice", "user_id": "u-1"})
    assert message == protocol.Register(username="alice", user_id="u-1")


def test_it_parses_register_additions():
    message = parse(
        {"type": "register", "username": "a", "user_id": "1", "presence": "delta", "resume": True, "token": "t"}
    )
    assert (message.presence, message.resume, message.token) == ("delta", True, "t")


@pytest.mark.parametrize(
    "frame, code",
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ({"username": "a"}, "invalid_message"),
        ({"type": 5}, "invalid_message"),
        ({"type": "dance"}, "unknown_type"),
        ({"type": "register", "user_id": "1"}, "invalid_message"),
        ({"type": "register", "username": "", "user_id": "1"}, "invalid_message"),
        ({"type": "register", "username": "x" * 65, "user_id": "1"}, "invalid_message"),
        ({"type": "register", "username": "a\nb", "user_id": "1"}, "invalid_message"),
        ({"type": "register", "username": "a", "user_id": "x" * 129}, "invalid_message"),
        ({"type": "register", "username": "a", "user_id": 7}, "invalid_message"),
        ({"type": "register", "username": "a", "user_id": "1", "presence": "some"}, "invalid_message"),
        ({"type": "call_request"}, "invalid_message"),
        ({"type": "call_accepted"}, "invalid_message"),
        ({"type": "call_accepted", "caller_username": "a", "call_id": "nope"}, "invalid_message"),
        ({"type": "offer", "target_username": "b"}, "invalid_message"),
        ({"type": "offer", "target_username": "b", "data": "sdp"}, "invalid_message"),
        ({"type": "ice_candidate", "target_username": "b", "data": [1]}, "invalid_message"),
        ({"type": "call_ended"}, "invalid_message"),
        ({"type": "get_call_history", "limit": 0}, "invalid_message"),
        ({"type": "get_call_history", "limit": True}, "invalid_message"),
        ("[" * 100000, "invalid_json"),
    ],
)
def test_it_refuses_bad_frames_with_their_code(frame, code):
    assert code_of(frame) == code


def test_the_error_names_the_missing_field():
    with pytest.raises(ProtocolError) as info:
        parse({"type": "call_request"})
    assert "target_username" in info.value.message


def test_call_id_lets_call_ended_omit_the_target():
    call_id = "3f1c8f8e-2a47-4b51-9f49-1d8e4d7f0a11"
    assert parse({"type": "call_ended", "call_id": call_id}) == protocol.CallEnd(None, call_id)


def test_signal_keeps_data_as_sent():
    data = {"candidate": "candidate:1 1 UDP 1 127.0.0.1 5000 typ host", "sdpMLineIndex": 0, "nested": {"a": [1]}}
    message = parse({"type": "ice_candidate", "target_username": "bob", "data": data})
    assert message.data == data


def test_outbound_messages_round_trip():
    text = protocol.encode(protocol.signal("offer", "alice", {"sdp": "v=0"}, "id-1"))
    assert json.loads(text) == {"type": "offer", "from_username": "alice", "data": {"sdp": "v=0"}, "call_id": "id-1"}


def test_history_limit_defaults_to_twenty():
    assert parse({"type": "get_call_history"}) == protocol.HistoryRequest(limit=20)
