"""Covers calls.wire.protocol and the calls.wire.text rules it applies: every frame becomes a message or a SignalingError with its code."""

from __future__ import annotations

import json

import pytest

from calls.wire import protocol, text
from calls.wire.errors import SignalingError
from calls.wire.protocol import parse_message


def parse(obj) -> protocol.Message:
    return parse_message(json.dumps(obj))


def refusal(obj) -> SignalingError:
    """Return the SignalingError a frame (an object, or text as sent) is refused with."""
    with pytest.raises(SignalingError) as info:
        parse_message(obj if isinstance(obj, str) else json.dumps(obj))
    return info.value


def code_of(obj) -> str:
    return refusal(obj).code


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
    with pytest.raises(SignalingError) as info:
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


# --- Values no peer could be sent: lone surrogates, non-finite numbers, depth, size ----

LONE_SURROGATE = "\ud800"
REGISTER = {"type": "register", "username": "alice", "user_id": "u-1"}
OFFER = {"type": "offer", "target_username": "bob"}


@pytest.mark.parametrize(
    "frame, field",
    [
        ({**REGISTER, "username": "ali" + LONE_SURROGATE}, "username"),
        ({**REGISTER, "user_id": LONE_SURROGATE}, "user_id"),
        ({**REGISTER, "device_id": "phone" + LONE_SURROGATE}, "device_id"),
        ({**REGISTER, "token": LONE_SURROGATE + "t"}, "token"),
        ({"type": "call_request", "target_username": LONE_SURROGATE}, "target_username"),
        ({**OFFER, "data": {"a": {"b": [1, "x" + LONE_SURROGATE]}}}, "data.a.b[1]"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_its_field(frame, field):
    text = json.dumps(frame)
    assert "\\ud800" in text  # sent as the JSON escape a real socket can carry
    error = refusal(text)
    assert error.code == "invalid_message"
    assert error.message.startswith(f"'{field}' must be valid Unicode text")


def test_a_lone_surrogate_in_a_key_is_refused_naming_the_key_escaped():
    error = refusal({**OFFER, "data": {"sdp": "v=0", LONE_SURROGATE: 1}})
    assert error.code == "invalid_message"
    assert error.message.startswith("'data.\\ud800' must be valid Unicode text")
    error.message.encode("utf-8")  # the error itself can go back over the wire


def test_a_surrogate_pair_is_an_ordinary_character():
    message = parse_message('{"type": "offer", "target_username": "bob", "data": {"emoji": "\\ud83d\\ude00"}}')
    assert message.data == {"emoji": "\U0001f600"}


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize(
    "template, field",
    [
        ('{"type": "offer", "target_username": "bob", "data": {"x": %s}}', "data.x"),
        ('{"type": "offer", "target_username": "bob", "data": {"m": [0, {"level": %s}]}}', "data.m[1].level"),
        ('{"type": "get_call_history", "limit": %s}', "limit"),
    ],
)
def test_a_number_that_is_not_finite_is_refused_naming_its_field(number, template, field):
    error = refusal(template % number)
    assert (error.code, error.message) == ("invalid_message", f"'{field}' must be a finite number")


def test_large_finite_numbers_pass():
    message = parse({**OFFER, "data": {"x": 1e300, "n": -(2**70)}})
    assert message.data == {"x": 1e300, "n": -(2**70)}


def nested(levels: int) -> dict:
    """`data` nested so that the frame holds `levels` levels of objects (the frame is level 1)."""
    data: dict = {"leaf": 1}
    for _ in range(levels - 2):
        data = {"in": data}
    return {**OFFER, "data": data}


def test_a_frame_nesting_sixteen_levels_is_accepted():
    assert text.MAX_DEPTH == 16
    assert isinstance(parse(nested(16)), protocol.Signal)


def test_a_frame_nesting_seventeen_levels_is_refused():
    error = refusal(nested(17))
    assert error.code == "invalid_message"
    assert error.message == "'data" + ".in" * 15 + "' nests deeper than 16 levels"


def test_arrays_count_as_levels_too():
    data: list = []
    for _ in range(15):
        data = [data]
    assert refusal({**OFFER, "data": {"x": data}}).code == "invalid_message"


# The message object, "type", "target_username", "data" and the list: 5 values besides the items.
def test_a_frame_holding_max_nodes_values_is_accepted():
    items = text.MAX_NODES - 5
    assert len(parse({**OFFER, "data": {"x": [0] * items}}).data["x"]) == items


def test_a_frame_holding_more_than_max_nodes_values_is_refused():
    error = refusal({**OFFER, "data": {"x": [0] * (text.MAX_NODES - 4)}})
    assert (error.code, error.message) == ("invalid_message", "Message must hold at most 10000 values")


# --- Usernames: one written form, and nothing that hides or reorders text ----------------


@pytest.mark.parametrize(
    "username",
    [
        "ali\u200bce",  # zero-width space
        "\u202eecila",  # right-to-left override
        "ali\u2028ce",  # line separator
        " alice",
        "alice ",
        "\u3000alice",  # ideographic space: NFKC makes it a leading space
        "ali\ue000ce",  # private use
        "ali\u0378ce",  # unassigned
    ],
)
def test_a_username_that_can_hide_or_reorder_text_is_refused(username):
    error = refusal({**REGISTER, "username": username})
    assert error.code == "invalid_message"
    assert error.message.startswith("'username' must")


def test_a_call_target_obeys_the_username_rules():
    error = refusal({"type": "call_request", "target_username": "b\u200bob"})
    assert error.code == "invalid_message"
    assert error.message.startswith("'target_username' must")


def test_a_full_width_username_is_read_as_plain_letters():
    assert parse({**REGISTER, "username": "ＡＬＩＣＥ"}).username == "ALICE"


def test_every_username_field_is_normalised():
    assert parse({"type": "call_request", "target_username": "ｂｏｂ"}).target_username == "bob"
    answer = parse({"type": "call_accepted", "caller_username": "ｃａｒｏｌ"})
    assert answer.caller_username == "carol"


def test_a_username_keeps_its_case_and_accents():
    assert parse({**REGISTER, "username": "Émile"}).username == "Émile"


def test_usernames_differing_in_case_or_width_share_one_key():
    assert text.username_key("Alice") == text.username_key("ALICE") == text.username_key("ａｌｉｃｅ")
    assert text.username_key("alice") != text.username_key("alice2")


def test_normalize_username_refuses_with_a_reason():
    with pytest.raises(text.InvalidUsername, match="spaces"):
        text.normalize_username("alice ")


def test_register_carries_its_device_id():
    message = parse({**REGISTER, "device_id": "phone-1"})
    assert message == protocol.Register(username="alice", user_id="u-1", device_id="phone-1")


@pytest.mark.parametrize("device_id", ["", "d" * 129, "a\x00b", 7])
def test_a_bad_device_id_is_refused(device_id):
    error = refusal({**REGISTER, "device_id": device_id})
    assert error.code == "invalid_message" and "device_id" in error.message
