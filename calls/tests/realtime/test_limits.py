"""Covers calls.realtime.limits: sockets per address and per process, alone.

Time is a fake clock (`clock`): the limits and their token buckets read `time.monotonic`.
"""

from __future__ import annotations

import pytest

from calls.realtime.limits import ConnectionLimits


@pytest.fixture
def connection_settings(settings):
    """Every connection limit off; each test turns on the one it is about."""
    settings.SIGNALING_CONNECT_RATE_PER_ADDRESS = 0
    settings.SIGNALING_MAX_PENDING_PER_ADDRESS = 0
    settings.SIGNALING_MAX_CONNECTIONS = 0
    return settings


def admitted(connections: ConnectionLimits, address: str, times: int) -> list[str | None]:
    return [connections.admit(address) for _ in range(times)]


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
