"""Call limits kept per process: calls a user starts per minute, unanswered calls in a row to one callee.

Each limit is a setting with a safe default, and 0 turns it off. They are
checked before any database work, so ring-spam costs the server almost
nothing. Counts live in the memory of the caller's process.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from django.conf import settings

from calls.wire.text import username_key

CALL_WINDOW_S = 60.0
# An unanswered-calls streak from one caller to one callee is forgotten after this long.
UNANSWERED_WINDOW_S = 3600.0
# Prune the tables when they hold this many keys.
PRUNE_AT = 10_000


@dataclass(slots=True)
class _Streak:
    count: int = 0
    last: float = 0.0


@dataclass
class CallLimits:
    """Refuse ring-spam: calls a user starts per minute, unanswered calls in a row to one callee."""

    _attempts: dict[str, deque[float]] = field(default_factory=dict)
    _streaks: dict[tuple[str, str], _Streak] = field(default_factory=dict)

    def check(self, caller: str, callee: str) -> str | None:
        """Count a call attempt; return why it is refused, or None."""
        now = time.monotonic()
        per_minute = settings.SIGNALING_CALLS_PER_MINUTE
        caller_key = username_key(caller)
        if per_minute:
            attempts = self._attempts.setdefault(caller_key, deque())
            while attempts and attempts[0] <= now - CALL_WINDOW_S:
                attempts.popleft()
            if len(attempts) >= per_minute:
                return f"At most {per_minute} calls a minute; wait a little"
            attempts.append(now)
        unanswered = settings.SIGNALING_UNANSWERED_CALLS_PER_CALLEE
        if unanswered:
            pair = (caller_key, username_key(callee))
            streak = self._streaks.get(pair)
            if streak is not None and streak.last <= now - UNANSWERED_WINDOW_S:
                streak = None
            if streak is None:
                streak = self._streaks[pair] = _Streak()
            if streak.count >= unanswered:
                return f"{callee} has not answered your last {unanswered} calls; try again later"
            streak.count += 1
            streak.last = now
        if len(self._streaks) > PRUNE_AT or len(self._attempts) > PRUNE_AT:
            self._prune(now)
        return None

    def answered(self, caller: str, callee: str) -> None:
        """The callee answered: the caller's streak of unanswered calls to it starts again."""
        self._streaks.pop((username_key(caller), username_key(callee)), None)

    def _prune(self, now: float) -> None:
        self._attempts = {
            key: attempts for key, attempts in self._attempts.items() if attempts and attempts[-1] > now - CALL_WINDOW_S
        }
        self._streaks = {pair: s for pair, s in self._streaks.items() if s.last > now - UNANSWERED_WINDOW_S}
