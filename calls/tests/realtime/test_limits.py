"""The abuse limits alone: sockets per address and per process, calls per user and per callee.

Time is a fake clock: the limits (and the token buckets they use) read `time.monotonic`.
"""

from __future__ import annotations

import pytest

from calls.callflow import limits as call_limits
from calls.callflow.limits import CALL_WINDOW_S, UNANSWERED_WINDOW_S, CallLimits
from calls.realtime import limits, security
from calls.realtime.limits import ConnectionLimits


class Clock:
    """Stands in for the `time` module: a monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(limits, "time", clock)
    monkeypatch.setattr(call_limits, "time", clock)
    monkeypatch.setattr(security, "time", clock)
    return clock


@pytest.fixture
def connection_settings(settings):
    """Every connection limit off; each test turns on the one it is about."""
    settings.SIGNALING_CONNECT_RATE_PER_ADDRESS = 0
    settings.SIGNALING_MAX_PENDING_PER_ADDRESS = 0
    settings.SIGNALING_MAX_CONNECTIONS = 0
    return settings


@pytest.fixture
def call_settings(settings):
    """Every call limit off; each test turns on the one it is about."""
    settings.SIGNALING_CALLS_PER_MINUTE = 0
    settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE = 0
    return settings


def admitted(connections: ConnectionLimits, address: str, times: int) -> list[str | None]:
    return [connections.admit(address) for _ in range(times)]


# --- ConnectionLimits ------------------------------------------------------------------


def test_an_address_may_open_a_burst_of_sockets_then_is_refused(clock, connection_settings):
    connection_settings.SIGNALING_CONNECT_RATE_PER_ADDRESS = 3
    connections = ConnectionLimits()
    assert admitted(connections, "10.0.0.1", 3) == [None, None, None]
    refusal = connections.admit("10.0.0.1")
    assert refusal is not None and "Too many new connections from your address" in refusal
    assert connections.open == 3


def test_another_address_is_admitted_while_one_is_refused(clock, connection_settings):
    connection_settings.SIGNALING_CONNECT_RATE_PER_ADDRESS = 2
    connections = ConnectionLimits()
    admitted(connections, "10.0.0.1", 2)
    assert connections.admit("10.0.0.1") is not None
    assert connections.admit("10.0.0.2") is None


def test_the_connection_rate_refills_with_time(clock, connection_settings):
    connection_settings.SIGNALING_CONNECT_RATE_PER_ADDRESS = 2
    connections = ConnectionLimits()
    admitted(connections, "10.0.0.1", 2)
    assert connections.admit("10.0.0.1") is not None
    clock.advance(0.5)  # one token back at two a second
    assert connections.admit("10.0.0.1") is None
    assert connections.admit("10.0.0.1") is not None


def test_unregistered_sockets_per_address_are_capped(clock, connection_settings):
    connection_settings.SIGNALING_MAX_PENDING_PER_ADDRESS = 2
    connections = ConnectionLimits()
    assert admitted(connections, "10.0.0.1", 2) == [None, None]
    refusal = connections.admit("10.0.0.1")
    assert refusal is not None and "have not registered (at most 2)" in refusal
    assert connections.admit("10.0.0.2") is None


def test_registering_frees_a_pending_slot_of_its_address(clock, connection_settings):
    connection_settings.SIGNALING_MAX_PENDING_PER_ADDRESS = 2
    connections = ConnectionLimits()
    admitted(connections, "10.0.0.1", 2)
    connections.registered("10.0.0.1")
    assert connections.admit("10.0.0.1") is None
    assert connections.admit("10.0.0.1") is not None


def test_closing_before_registering_frees_a_pending_slot(clock, connection_settings):
    connection_settings.SIGNALING_MAX_PENDING_PER_ADDRESS = 2
    connections = ConnectionLimits()
    admitted(connections, "10.0.0.1", 2)
    connections.closed("10.0.0.1", pending=True)
    assert connections.admit("10.0.0.1") is None
    assert connections.open == 2


def test_closing_a_registered_socket_frees_no_pending_slot_twice(clock, connection_settings):
    connection_settings.SIGNALING_MAX_PENDING_PER_ADDRESS = 1
    connections = ConnectionLimits()
    assert connections.admit("10.0.0.1") is None
    connections.registered("10.0.0.1")
    assert connections.admit("10.0.0.1") is None  # the second one is pending
    connections.closed("10.0.0.1", pending=False)  # the first, registered, closes
    assert connections.admit("10.0.0.1") is not None


def test_the_process_holds_at_most_its_total_of_sockets(clock, connection_settings):
    connection_settings.SIGNALING_MAX_CONNECTIONS = 2
    connections = ConnectionLimits()
    assert connections.admit("10.0.0.1") is None
    assert connections.admit("10.0.0.2") is None
    refusal = connections.admit("10.0.0.3")
    assert refusal is not None and "maximum of 2 connections" in refusal


def test_registering_does_not_free_a_total_slot_but_closing_does(clock, connection_settings):
    connection_settings.SIGNALING_MAX_CONNECTIONS = 2
    connections = ConnectionLimits()
    admitted(connections, "10.0.0.1", 2)
    connections.registered("10.0.0.1")
    assert connections.admit("10.0.0.3") is not None
    connections.closed("10.0.0.1", pending=False)
    assert connections.admit("10.0.0.3") is None
    assert connections.open == 2


def test_a_refused_socket_takes_no_slot(clock, connection_settings):
    connection_settings.SIGNALING_MAX_PENDING_PER_ADDRESS = 1
    connections = ConnectionLimits()
    assert connections.admit("10.0.0.1") is None
    assert all(refusal is not None for refusal in admitted(connections, "10.0.0.1", 5))
    assert connections.open == 1
    connections.registered("10.0.0.1")  # the one admitted; the refused ones never counted
    assert connections.admit("10.0.0.1") is None


CONNECTION_LIMITS = [
    "SIGNALING_CONNECT_RATE_PER_ADDRESS",
    "SIGNALING_MAX_PENDING_PER_ADDRESS",
    "SIGNALING_MAX_CONNECTIONS",
]


@pytest.mark.parametrize("setting", CONNECTION_LIMITS)
def test_zero_turns_a_connection_limit_off(clock, connection_settings, setting):
    for other in CONNECTION_LIMITS:
        setattr(connection_settings, other, 10_000)
    setattr(connection_settings, setting, 0)
    connections = ConnectionLimits()
    # Sockets from one address at one instant, past each default (20 a second, 50 pending).
    assert admitted(connections, "10.0.0.1", 1000) == [None] * 1000


# --- CallLimits -----------------------------------------------------------------------


def test_a_caller_may_start_at_most_its_calls_a_minute(clock, call_settings):
    call_settings.SIGNALING_CALLS_PER_MINUTE = 2
    calls = CallLimits()
    assert calls.check("alice", "bob") is None
    assert calls.check("alice", "carol") is None
    refusal = calls.check("alice", "dave")
    assert refusal is not None and "At most 2 calls a minute" in refusal


def test_the_calls_a_minute_are_counted_per_caller(clock, call_settings):
    call_settings.SIGNALING_CALLS_PER_MINUTE = 1
    calls = CallLimits()
    assert calls.check("alice", "bob") is None
    assert calls.check("alice", "bob") is not None
    assert calls.check("carol", "bob") is None


def test_the_calls_a_minute_come_back_as_the_minute_passes(clock, call_settings):
    call_settings.SIGNALING_CALLS_PER_MINUTE = 2
    calls = CallLimits()
    calls.check("alice", "bob")
    clock.advance(30)
    calls.check("alice", "carol")
    assert calls.check("alice", "dave") is not None
    clock.advance(CALL_WINDOW_S - 30)  # the first attempt is a minute old
    assert calls.check("alice", "dave") is None
    assert calls.check("alice", "erin") is not None


def test_a_caller_written_in_another_case_shares_its_calls_a_minute(clock, call_settings):
    call_settings.SIGNALING_CALLS_PER_MINUTE = 2
    calls = CallLimits()
    calls.check("alice", "bob")
    calls.check("ALICE", "carol")
    assert calls.check("Alice", "dave") is not None


def test_unanswered_calls_to_one_callee_are_capped(clock, call_settings):
    call_settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE = 2
    calls = CallLimits()
    assert calls.check("alice", "bob") is None
    assert calls.check("alice", "bob") is None
    refusal = calls.check("alice", "bob")
    assert refusal is not None and "bob has not answered your last 2 calls" in refusal


def test_another_callee_is_not_affected_by_an_unanswered_streak(clock, call_settings):
    call_settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE = 1
    calls = CallLimits()
    calls.check("alice", "bob")
    assert calls.check("alice", "bob") is not None
    assert calls.check("alice", "carol") is None
    assert calls.check("dave", "bob") is None


def test_an_answer_starts_the_unanswered_streak_again(clock, call_settings):
    call_settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE = 2
    calls = CallLimits()
    calls.check("alice", "bob")
    calls.check("alice", "bob")
    calls.answered("alice", "bob")
    assert calls.check("alice", "bob") is None
    assert calls.check("alice", "bob") is None
    assert calls.check("alice", "bob") is not None


def test_an_answer_from_another_callee_does_not_reset_the_streak(clock, call_settings):
    call_settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE = 1
    calls = CallLimits()
    calls.check("alice", "bob")
    calls.answered("alice", "carol")
    calls.answered("bob", "alice")
    assert calls.check("alice", "bob") is not None


def test_the_unanswered_streak_ignores_case_on_both_sides(clock, call_settings):
    call_settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE = 2
    calls = CallLimits()
    calls.check("alice", "bob")
    calls.check("ALICE", "Bob")
    assert calls.check("Alice", "BOB") is not None
    calls.answered("aLiCe", "bOb")
    assert calls.check("alice", "bob") is None


def test_an_unanswered_streak_is_forgotten_after_its_window(clock, call_settings):
    call_settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE = 1
    calls = CallLimits()
    calls.check("alice", "bob")
    clock.advance(UNANSWERED_WINDOW_S - 1)
    assert calls.check("alice", "bob") is not None
    clock.advance(UNANSWERED_WINDOW_S)
    assert calls.check("alice", "bob") is None


@pytest.mark.parametrize("setting", ["SIGNALING_CALLS_PER_MINUTE", "SIGNALING_UNANSWERED_CALLS_PER_CALLEE"])
def test_zero_turns_a_call_limit_off(clock, call_settings, setting):
    setattr(call_settings, setting, 0)
    calls = CallLimits()
    assert [calls.check("alice", "bob") for _ in range(100)] == [None] * 100
