"""Connection limits kept per process: new sockets and unregistered sockets per client address, sockets per process.

Each limit is a setting with a safe default, and 0 turns it off. They are
checked before any other work, so a flood costs the server almost nothing.
Counts live in this process's memory: with several processes behind a load
balancer, a client spread over N of them gets up to N times a limit.
"""

from __future__ import annotations

import time
from collections import Counter

from django.conf import settings

from calls.realtime.security import TokenBucket

# Forget an address's connection bucket once it has been idle this long (it is full again).
BUCKET_IDLE_S = 60.0
# Prune idle buckets after this many admissions.
PRUNE_EVERY = 1000


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
