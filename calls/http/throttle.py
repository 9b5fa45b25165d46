"""Limits on the HTTP side: counters per client in the cache, and a cap on password checks at once."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.db import connections

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Window:
    """At most `limit` events per key in a fixed window of `seconds`, counted in the cache.

    With Redis configured the cache is shared, so every process counts together.
    Keys are hashed: they hold usernames and addresses, and bound the key length.
    """

    name: str
    limit: int
    seconds: int

    def _key(self, parts: tuple[str, ...]) -> str:
        digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return f"throttle:{self.name}:{digest}"

    def reached(self, *parts: str) -> bool:
        """Return whether the key has used up its window."""
        return cache.get(self._key(parts), 0) >= self.limit

    def count(self, *parts: str) -> int:
        """Count one event for the key; return the count in this window, this one included."""
        key = self._key(parts)
        cache.add(key, 0, self.seconds)
        try:
            return cache.incr(key)
        except ValueError:
            # The window expired between add() and incr(): this event opens the next one.
            cache.set(key, 1, self.seconds)
            return 1

    def clear(self, *parts: str) -> None:
        """Forget the key's events."""
        cache.delete(self._key(parts))


class Busy(Exception):
    """Every password-check slot is taken: the caller is refused at once instead of queued."""


def _closing_connections(func: Callable[..., T], *args: Any) -> T:
    try:
        return func(*args)
    finally:
        # Pool threads can sit idle for a long time: a connection left here would
        # outlive CONN_MAX_AGE unseen (and keep a test database from being dropped).
        connections.close_all()


class PasswordChecks:
    """At most SIGNALING_LOGIN_CONCURRENCY password checks at once in this process.

    A PBKDF2 check costs a CPU core for a good part of a second; a flood of them
    queued behind each other would hold every worker thread. The counter never
    blocks, so it works from the event loop and from a sync view's thread alike.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._work: set[asyncio.Task[Any]] = set()

    @property
    def running(self) -> int:
        """Return how many password checks hold a slot now."""
        return self._running

    def _acquire(self) -> None:
        with self._lock:
            if self._running >= settings.SIGNALING_LOGIN_CONCURRENCY:
                raise Busy
            self._running += 1

    def _release(self) -> None:
        with self._lock:
            self._running -= 1

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold a slot for the block (sync code); raise Busy when none is free."""
        self._acquire()
        try:
            yield
        finally:
            self._release()

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func(*args)` in a slot, on a pool thread; raise Busy when no slot is free.

        Not asgiref's thread-sensitive executor: its one thread also runs every
        consumer's database work, which must not wait behind password hashes.
        """
        self._acquire()
        work = asyncio.ensure_future(sync_to_async(_closing_connections, thread_sensitive=False)(func, *args))
        self._work.add(work)
        work.add_done_callback(self._finished)
        # Shielded: a client that hangs up cancels the view, but its hash runs on in
        # the thread, so the slot is freed when the work ends, not when the view does.
        return await asyncio.shield(work)

    async def wait_idle(self) -> None:
        """Wait until the password work running now has ended."""
        while self._work:
            await asyncio.wait(list(self._work))

    def _finished(self, work: asyncio.Task[Any]) -> None:
        self._work.discard(work)
        self._release()
        if not work.cancelled():
            # Retrieved here too: when the view was cancelled, nobody else reads it.
            work.exception()


password_checks = PasswordChecks()
