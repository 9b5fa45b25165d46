"""Covers calls.callflow.states: the table of allowed call transitions."""

from __future__ import annotations

import pytest

from calls.callflow.states import TRANSITIONS, CallStatus, EndReason, IllegalTransition, check_transition


@pytest.mark.parametrize(
    "old, new, reason",
    [
        (CallStatus.ANSWERED, CallStatus.RINGING, None),
        (CallStatus.COMPLETED, CallStatus.ANSWERED, None),
        (CallStatus.RINGING, CallStatus.COMPLETED, EndReason.HANGUP),
        (CallStatus.ANSWERED, CallStatus.MISSED, EndReason.TIMEOUT),
        (CallStatus.RINGING, CallStatus.REJECTED, EndReason.HANGUP),
    ],
)
def test_the_state_machine_refuses_transitions_outside_its_table(old, new, reason):
    with pytest.raises(IllegalTransition):
        check_transition(old, new, reason)


def test_every_transition_in_the_table_is_allowed_with_each_of_its_reasons():
    for old, targets in TRANSITIONS.items():
        for new, reasons in targets.items():
            for reason in reasons:
                check_transition(old, new, reason)
