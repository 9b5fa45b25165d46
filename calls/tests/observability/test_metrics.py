"""Covers calls.observability.metrics: the counters, gauges and histogram alone, and the calls gauge read from the database."""

from __future__ import annotations

import pytest

from calls.callflow import store as call_store
from calls.callflow.board import Actor
from calls.callflow.board_memory import MemoryCallBoard
from calls.callflow.states import EndReason
from calls.models import Call
from calls.observability import metrics
from calls.tests.wsclient import played_call
from calls.wire import protocol


def sample_or_none(name: str, **labels: str) -> float | None:
    """Read one sample, collecting only the metric that has it (the calls gauge queries the database)."""
    for family in metrics.REGISTRY.restricted_registry([name]).collect():
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def sample(name: str, **labels: str) -> float:
    return sample_or_none(name, **labels) or 0.0


def test_connection_and_session_gauges_go_up_and_down():
    connections, sessions = sample("signaling_connections"), sample("signaling_registered_sessions")
    opened = sample("signaling_connections_opened_total")
    metrics.connection_opened()
    metrics.session_registered()
    assert sample("signaling_connections") == connections + 1
    assert sample("signaling_registered_sessions") == sessions + 1
    metrics.session_closed()
    metrics.connection_closed()
    assert sample("signaling_connections") == connections
    assert sample("signaling_registered_sessions") == sessions
    assert sample("signaling_connections_opened_total") == opened + 1


def test_message_types_from_clients_are_folded_into_a_bounded_set():
    offers, other = (
        sample("signaling_messages_received_total", type="offer"),
        sample("signaling_messages_received_total", type="other"),
    )
    metrics.message_received("offer")
    metrics.message_received("x" * 500)
    metrics.message_received("call.signal")
    assert sample("signaling_messages_received_total", type="offer") == offers + 1
    assert sample("signaling_messages_received_total", type="other") == other + 2
    assert sample_or_none("signaling_messages_received_total", type="x" * 500) is None


def test_message_type_names_every_parsed_inbound_message():
    frames = {
        '{"type":"register","username":"a","user_id":"1"}': "register",
        '{"type":"call_request","target_username":"b"}': "call_request",
        '{"type":"call_rejected","caller_username":"b"}': "call_rejected",
        '{"type":"call_ended","target_username":"b"}': "call_ended",
        '{"type":"answer","target_username":"b","data":{}}': "answer",
        '{"type":"get_call_history"}': "get_call_history",
        '{"type":"ping"}': "ping",
    }
    for frame, kind in frames.items():
        assert metrics.message_type(protocol.parse_message(frame)) == kind


def test_errors_and_transitions_count_by_label():
    errors = sample("signaling_errors_sent_total", code="rate_limited")
    hangups = sample("signaling_call_transitions_total", status="completed", reason="hangup")
    ringing = sample("signaling_call_transitions_total", status="ringing", reason="")
    metrics.error_sent("rate_limited")
    metrics.call_transition("completed", "hangup")
    metrics.call_transition("ringing", None)
    metrics.call_transition("no-such-status", "no-such-reason")
    assert sample("signaling_errors_sent_total", code="rate_limited") == errors + 1
    assert sample("signaling_call_transitions_total", status="completed", reason="hangup") == hangups + 1
    assert sample("signaling_call_transitions_total", status="ringing", reason="") == ringing + 1
    assert sample("signaling_call_transitions_total", status="other", reason="other") >= 1


def test_relay_latency_lands_in_the_histogram():
    count, total = sample("signaling_relay_seconds_count"), sample("signaling_relay_seconds_sum")
    under_5ms = sample("signaling_relay_seconds_bucket", le="0.005")
    metrics.observe_relay(0.003)
    assert sample("signaling_relay_seconds_count") == count + 1
    assert sample("signaling_relay_seconds_sum") == pytest.approx(total + 0.003)
    assert sample("signaling_relay_seconds_bucket", le="0.005") == under_5ms + 1


@pytest.mark.django_db
def test_calls_by_status_are_counted_from_the_database_at_scrape_time():
    call_store.touch_users({"alice": "u-a", "bob": "u-b", "carol": "u-c"})
    board = MemoryCallBoard()
    played_call(Actor("chan-a", "alice"), "bob", board=board)  # left ringing on the board
    played_call(Actor("chan-c", "carol"), "bob", board=board)  # bob is being called already: busy
    played_call(Actor("chan-d", "alice"), "carol", (EndReason.HANGUP, Actor("chan-d", "alice")))
    # The first call's row is still live in the database, as the board holds it.
    assert sample("signaling_calls", status="ringing") == 1
    call_store.end_orphans([str(pk) for pk in Call.objects.filter(status="ringing").values_list("pk", flat=True)])

    assert sample("signaling_calls", status="cancelled") == 1
    assert sample("signaling_calls", status="busy") == 1
    assert sample("signaling_calls", status="failed") == 1
    assert sample("signaling_calls", status="ringing") == 0
    assert sample("signaling_calls_scrape_error") == 0
