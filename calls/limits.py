"""Abuse limits kept per process: sockets per client address and per process, calls per user.

Each limit is a setting with a safe default, and 0 turns it off. They are
checked before any database or presence work, so a flood costs the server
almost nothing. Counts live in this process's memory: with several processes
behind a load balancer, a client spread over N of them gets up to N times a
limit (a connection flood from one address usually lands on all of them).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from django.conf import settings

from calls.protocol import username_key
from calls.security import TokenBucket

# Forget an address's connection bucket once it has been idle this long (it is full again).
BUCKET_IDLE_S = 60.0
# Prune idle buckets after this many admissions.
PRUNE_EVERY = 1000
CALL_WINDOW_S = 60.0
# An unanswered-calls streak from one caller to one callee is forgotten after this long.
UNANSWERED_WINDOW_S = 3600.0


class ConnectionLimits:
    """Admit or refuse new sockets: per address (rate, unregistered) and per process (total)."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._pending: Counter[str] = Counter()
        self._admitted = 0
        self.open = 0

    def admit(self, address: str) -> str | None:
        """Count a new socket from `address`; return why it is refused, or None."""
        total = settings.SIGNALING_MAX_CONNECTIONS
        if total and self.open >= total:
            return f"This server holds its maximum of {total} connections; try another or retry later"
        rate = settings.SIGNALING_CONNECT_RATE_PER_ADDRESS
        if rate:
            bucket = self._buckets.get(address)
            if bucket is None:
                bucket = self._buckets[address] = TokenBucket(rate, max(rate, 1.0))
            if not bucket.take():
                return f"Too many new connections from your address (at most {rate:g} a second)"
        pending = settings.SIGNALING_MAX_PENDING_PER_ADDRESS
        if pending and self._pending[address] >= pending:
            return f"Too many connections from your address that have not registered (at most {pending})"
        self._pending[address] += 1
        self.open += 1
        self._admitted += 1
        if self._admitted % PRUNE_EVERY == 0:
            self._prune()
        return None

    def registered(self, address: str) -> None:
        """An admitted socket registered: it no longer counts as pending for its address."""
        self._release_pending(address)

    def closed(self, address: str, pending: bool) -> None:
        """An admitted socket closed (`pending`: before it registered)."""
        self.open -= 1
        if pending:
            self._release_pending(address)

    def _release_pending(self, address: str) -> None:
        self._pending[address] -= 1
        if self._pending[address] <= 0:
            del self._pending[address]

    def _prune(self) -> None:
        idle_since = time.monotonic() - BUCKET_IDLE_S
        self._buckets = {address: bucket for address, bucket in self._buckets.items() if bucket.stamp > idle_since}


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
        if len(self._streaks) > 10 * PRUNE_EVERY or len(self._attempts) > 10 * PRUNE_EVERY:
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
