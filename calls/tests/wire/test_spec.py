"""Covers protocol/asyncapi.yaml, the wire protocol's one source, against the code and its renderings.

Its examples validate against their own schemas; the message types, error codes, call
statuses and end reasons it lists are the ones calls/wire and calls/callflow define; the
messages the server's builders make conform; the conformance check refuses what the spec
does not describe; docs/protocol.md is what `python -m protocol.render` makes of it now;
and the reference AsyncAPI parser (protocol/validate.mjs) finds no error in it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from calls.callflow.states import CallStatus, EndReason
from calls.testing.services import in_ci
from calls.tests import conformance
from calls.tests.conformance import CLIENT, SERVER
from calls.wire import errors, protocol, push
from protocol import render

ROOT = Path(__file__).resolve().parents[3]
CALL_ID = "3f1d7c52-0b8e-4a43-9c1d-3c1f4c2b0a01"
SUBSCRIPTION_ID = "9b2f7c1e-5d4a-4c3b-8e2f-1a0b9c8d7e6f"


def spec_examples() -> list:
    """(sender, message key, payload) for every example in the spec, named after the message and the example."""
    return [
        pytest.param(sender, key, example["payload"], id=f"{key}:{example['name']}")
        for sender in conformance.OPERATIONS
        for key, message in conformance.messages(sender)
        for example in message.get("examples", [])
    ]


def choices(schema_name: str) -> set[str]:
    return {option["const"] for option in conformance.spec()["components"]["schemas"][schema_name]["oneOf"]}


def types_sent_by(sender: str) -> set[str]:
    return {conformance.message_type(message) for _, message in conformance.messages(sender)}


@pytest.mark.parametrize(("sender", "key", "payload"), spec_examples())
def test_every_example_validates_against_its_own_schema(sender, key, payload):
    assert conformance.problems(payload, sender) == []
    assert key == f"{sender}.{payload['type']}"


def test_every_message_has_an_example():
    without = [
        key
        for sender in conformance.OPERATIONS
        for key, message in conformance.messages(sender)
        if not message.get("examples")
    ]
    assert without == []


def differences(in_code: set[str], in_spec: set[str]) -> dict[str, list[str]]:
    return {
        "in the code, not in the spec": sorted(in_code - in_spec),
        "in the spec, not in the code": sorted(in_spec - in_code),
    }


def test_the_client_messages_are_the_ones_the_server_parses():
    assert differences(set(protocol._PARSERS), types_sent_by(CLIENT)) == differences(set(), set())


def test_the_error_codes_are_the_ones_the_server_has():
    codes = {value for name, value in vars(errors).items() if name.isupper() and isinstance(value, str)}
    assert differences(codes, choices("ErrorCode")) == differences(set(), set())


def test_the_call_statuses_and_end_reasons_are_the_state_machines():
    assert choices("CallStatus") == set(CallStatus.values)
    assert choices("EndReason") == set(EndReason.values)
    assert choices("CallEndedReason") == (set(EndReason.values) - {EndReason.BUSY}) | {"answered_elsewhere"}
    assert choices("CallRejectedReason") == {EndReason.REJECTED, EndReason.BUSY}


def test_the_close_codes_are_the_documented_set():
    codes = [code["code"] for code in conformance.spec()["channels"]["signaling"]["x-close-codes"]]
    assert codes == [1000, 1006, 1007, 1008, 1009, 1011, 1012, 4401]


def test_the_messages_the_servers_builders_make_conform():
    built = [
        protocol.error(errors.NOT_IN_CALL, "You are not in a call with bob"),
        protocol.online_users([{"username": "alice", "user_id": "u-a"}]),
        protocol.signal(protocol.OFFER, "alice", {"type": "offer", "sdp": "v=0"}, CALL_ID),
        protocol.signal(protocol.ANSWER, "bob", {"type": "answer", "sdp": "v=0"}, CALL_ID),
        protocol.signal(protocol.ICE_CANDIDATE, "bob", {"candidate": "candidate:1"}, CALL_ID),
        protocol.call_ended("alice", CALL_ID, EndReason.HANGUP),
        protocol.call_ended("alice", CALL_ID, "answered_elsewhere"),
        protocol.call_rejected("bob", CALL_ID, EndReason.BUSY),
        protocol.call_accepted("bob", CALL_ID),
        protocol.incoming_call("alice", "u-a", CALL_ID),
        protocol.call_ringing(CALL_ID, "bob"),
        protocol.call_ringing(CALL_ID, "bob", pushed=True),
        protocol.peer_reconnecting("bob", CALL_ID),
        protocol.peer_reconnected("bob", CALL_ID),
        protocol.call_history([]),
        protocol.pong(),
        push.subscribed(SUBSCRIPTION_ID),
        push.unsubscribed(SUBSCRIPTION_ID),
    ]
    assert {message["type"]: conformance.problems(protocol.encode(message), SERVER) for message in built} == {
        message["type"]: [] for message in built
    }


def test_the_push_payloads_conform_to_their_schemas():
    incoming = push.incoming_call_payload(CALL_ID, "alice", "u-a", "2026-12-01T16:00:45+00:00")
    ended = push.call_ended_payload(CALL_ID, "cancelled")
    for payload, schema in ((incoming, "PushIncomingCall"), (ended, "PushCallEnded")):
        assert list(conformance.validator(f"#/components/schemas/{schema}").iter_errors(payload)) == []


# --- The check can fail ----------------------------------------------------------------------


def test_a_server_message_with_a_field_the_spec_lacks_does_not_conform():
    message = {**protocol.pong(), "load": 0.5}
    with pytest.raises(conformance.NonConforming, match="'load' was unexpected"):
        conformance.check(message, SERVER)


def test_a_server_message_of_a_type_the_spec_lacks_does_not_conform():
    with pytest.raises(conformance.NonConforming, match="no server-to-client message of type 'call_parked'"):
        conformance.check({"type": "call_parked", "call_id": CALL_ID}, SERVER)


def test_a_server_message_missing_a_field_or_with_a_wrong_value_does_not_conform():
    assert conformance.problems({"type": "call_accepted", "call_id": CALL_ID}, SERVER) == [
        "(message): 'accepter_username' is a required property"
    ]
    assert conformance.problems({**protocol.incoming_call("alice", "u-a", CALL_ID), "call_id": "7"}, SERVER) == [
        "call_id: '7' is not a 'uuid'"
    ]
    assert conformance.problems(protocol.error("no_such_code", "?"), SERVER) != []
    assert conformance.problems({"type": "pong", "server_time": "yesterday"}, SERVER) == [
        "server_time: 'yesterday' is not a 'date-time'"
    ]


def test_a_frame_that_is_not_a_json_object_does_not_conform():
    assert conformance.problems("{not json", SERVER) == ["the frame is not JSON"]
    assert conformance.problems("[1]", SERVER) == ["the frame is not a JSON object"]


def test_a_client_message_may_carry_fields_the_server_ignores():
    assert conformance.problems({"type": "ping", "sent_at": 12}, CLIENT) == []


def test_a_client_message_the_server_would_refuse_does_not_conform():
    assert conformance.problems({"type": "offer", "call_id": CALL_ID, "data": {}}, CLIENT) == [
        "(message): 'target_username' is a required property"
    ]
    assert conformance.problems({"type": "call_accepted"}, CLIENT) != []
    assert conformance.problems({"type": "get_call_history", "limit": 101}, CLIENT) != []
    assert conformance.problems({"type": "push_subscribe", "platform": "fcm"}, CLIENT) != []


# --- Its renderings ---------------------------------------------------------------------------


def test_docs_protocol_md_is_what_the_spec_renders_to():
    fresh = render.render(render.load())
    assert (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8") == fresh, (
        "docs/protocol.md is stale: run `python -m protocol.render` (make protocol-docs)"
    )


def test_the_reference_asyncapi_parser_finds_no_error_in_the_spec():
    node = shutil.which("node")
    parser = ROOT / "protocol" / "node_modules" / "@asyncapi" / "parser"
    if node is None or not parser.exists():
        message = "node and @asyncapi/parser are needed: run `npm ci --prefix protocol` (make protocol-deps)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [node, str(ROOT / "protocol" / "validate.mjs")], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid AsyncAPI 3.0.0" in result.stdout
