"""A session's view of its calls: kept by the consumer, carried by a hand-over."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class LiveCall:
    """This session's view of a call it is party to."""

    call_id: str
    peer_username: str
    is_caller: bool
    # Where the other party's signaling goes: one session, or (before the answer,
    # from the caller) every session of the callee.
    peer_channel: str = ""
    answered: bool = False
    # The caller's user_id, and whether the callee was woken by push: what a call board
    # that lost the call (a Redis restart) needs to have it back whole.
    caller_id: str = ""
    pushed: bool = False
