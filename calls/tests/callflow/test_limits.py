"""Covers calls.callflow.limits: calls a user starts per minute, unanswered calls in a row to one callee, alone.

Time is a fake clock (`clock`): the limits read `time.monotonic`.
"""

from __future__ import annotations

import pytest

from calls.callflow.limits import CALL_WINDOW_S, UNANSWERED_WINDOW_S, CallLimits


@pytest.fixture
def call_settings(settings):
    """Every call limit off; each test turns on the one it is about."""
    settings.SIGNALING_CALLS_PER_MINUTE = 0
    settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE = 0
    return settings


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
