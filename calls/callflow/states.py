"""The call state machine: statuses, end reasons and the allowed transitions.

Pure code. `calls/callflow/store.py` applies these transitions to the database; nothing
else changes a call's status.
"""

from __future__ import annotations

from django.db import models


class CallStatus(models.TextChoices):
    RINGING = "ringing", "Ringing"
    ANSWERED = "answered", "Answered (in progress)"
    COMPLETED = "completed", "Completed"
    REJECTED = "rejected", "Rejected"
    BUSY = "busy", "Busy"
    MISSED = "missed", "Missed (ring timeout)"
    CANCELLED = "cancelled", "Cancelled"
    FAILED = "failed", "Failed (party vanished before an answer)"


class EndReason(models.TextChoices):
    HANGUP = "hangup", "Hang-up"
    REJECTED = "rejected", "Rejected"
    BUSY = "busy", "Busy"
    TIMEOUT = "timeout", "Ring timeout"
    CANCELLED = "cancelled", "Cancelled by caller"
    DISCONNECTED = "disconnected", "A party disconnected"


LIVE_STATUSES = (CallStatus.RINGING, CallStatus.ANSWERED)

# What a call may become from each status, and with which end reason.
# None as a reason means the call is still live after the transition.
TRANSITIONS: dict[CallStatus, dict[CallStatus, frozenset[EndReason | None]]] = {
    CallStatus.RINGING: {
        CallStatus.ANSWERED: frozenset({None}),
        CallStatus.REJECTED: frozenset({EndReason.REJECTED}),
        CallStatus.MISSED: frozenset({EndReason.TIMEOUT}),
        CallStatus.CANCELLED: frozenset({EndReason.CANCELLED}),
        CallStatus.FAILED: frozenset({EndReason.DISCONNECTED}),
    },
    CallStatus.ANSWERED: {
        CallStatus.COMPLETED: frozenset({EndReason.HANGUP, EndReason.DISCONNECTED}),
    },
}

# The status a live call ends in for each reason, by its status before the end.
END_STATUS: dict[tuple[CallStatus, EndReason], CallStatus] = {
    (CallStatus.RINGING, EndReason.REJECTED): CallStatus.REJECTED,
    (CallStatus.RINGING, EndReason.TIMEOUT): CallStatus.MISSED,
    (CallStatus.RINGING, EndReason.CANCELLED): CallStatus.CANCELLED,
    (CallStatus.RINGING, EndReason.DISCONNECTED): CallStatus.FAILED,
    (CallStatus.ANSWERED, EndReason.HANGUP): CallStatus.COMPLETED,
    (CallStatus.ANSWERED, EndReason.DISCONNECTED): CallStatus.COMPLETED,
}


class IllegalTransition(Exception):
    """A transition the table does not allow (a race lost, or a stale request)."""


def check_transition(old: str, new: str, reason: str | None) -> None:
    """Raise IllegalTransition unless `old -> new` with `reason` is in the table."""
    allowed = TRANSITIONS.get(CallStatus(old), {}).get(CallStatus(new))
    if allowed is None or reason not in allowed:
        raise IllegalTransition(f"{old} -> {new} ({reason}) is not allowed")
