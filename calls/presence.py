"""Who is online: session leases in a store, and coalesced broadcasts of the list.

The store holds one lease per session (per socket). A user is online while any
of its sessions holds a live lease, on any process. `MemoryPresenceStore` serves
a single process; `RedisPresenceStore` (calls/presence_redis.py) shares the
leases between processes, so a crashed process's sessions expire on their own.

`PresenceHub` is the per-process broadcaster: changes anywhere mark it dirty,
and at most once per window it reads the list once, encodes it once, and sends
it to every local session (full list for v1 clients, deltas for clients that
asked for them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from calls import metrics, protocol

# After a broadcast, the next one waits at least this many times as long as the
# broadcast took to build and hand to the sockets. The sockets' writes come after
# and cost about as much again, so while changes keep coming broadcasting takes
# about half of the process's time at most, however many sessions listen.
BROADCAST_BACKOFF = 3.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One registered socket: its channel name and whose it is."""

    channel: str
    username: str
    user_id: str


class JoinRefused(Exception):
    """A registration the presence rules refuse; `code` goes back to the client.

    `holders` are the sessions that hold the name (or the slots) against it.
    """

    def __init__(self, code: str, message: str, holders: tuple[SessionInfo, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.holders = holders


class StoreUnavailable(Exception):
    """The shared store cannot be reached (Redis down or restarting)."""


class PresenceStore(Protocol):
    # Whether other processes see this store (and so can carry a parked session).
    shared: bool

    async def join(self, session: SessionInfo, max_sessions: int, ttl: float, displace: Collection[str] = ()) -> bool:
        """Add a session; return True if its user just came online.

        Usernames are compared by `protocol.username_key`. Raise JoinRefused when
        another user_id holds the username, or the user already has
        `max_sessions` sessions; sessions named in `displace` (found dead, or
        held for a resume) count for neither.
        """

    async def leave(self, channel: str) -> tuple[SessionInfo | None, bool]:
        """Remove a session; return it and whether its user went offline."""

    async def restore(
        self, sessions: list[SessionInfo], max_sessions: int, ttl: float
    ) -> list[tuple[SessionInfo, JoinRefused]]:
        """Join these sessions again (after the store lost them); return the refused ones."""

    async def renew(self, channels: list[str], ttl: float) -> list[str]:
        """Extend the leases of these sessions by `ttl` seconds from now.

        Return the channels that had no lease left (expired by another process,
        or lost with the store's data): their sessions must join again.
        """

    async def expire(self) -> list[SessionInfo]:
        """Remove and return the sessions whose lease ran out."""

    async def online_users(self) -> list[dict[str, str]]:
        """Return the online users, one entry each, sorted by username."""

    async def sessions_of(self, username: str) -> list[SessionInfo]:
        """Return the user's live sessions (the username compared by `protocol.username_key`)."""

    async def live_channels(self) -> set[str]:
        """Return the channel names of every live session."""

    async def epoch(self) -> str:
        """Return an id that changes whenever the store loses its data (a Redis restart)."""

    async def park(self, channel: str, state: dict, ttl: float) -> None:
        """Keep a session of a process that is shutting down for `ttl` seconds.

        Its lease is set to run out after `ttl` too; `state` (JSON-able, with the
        session's one-time resume `nonce`) is what a new socket takes over.
        """

    async def claim_parked(self, channel: str, nonce: str) -> dict | None:
        """Take a parked session's state, once, if `nonce` is its resume nonce."""

    async def clear(self) -> None:
        """Forget every session (tests)."""

    async def close(self) -> None:
        """Release connections."""


@dataclass(slots=True)
class _Lease:
    session: SessionInfo
    expires: float


class MemoryPresenceStore:
    """Leases in this process's memory: for one process without Redis."""

    shared = False

    def __init__(self) -> None:
        self._leases: dict[str, _Lease] = {}
        self._by_user: dict[str, dict[str, SessionInfo]] = {}
        self._parked: dict[str, tuple[float, dict]] = {}

    async def join(self, session: SessionInfo, max_sessions: int, ttl: float, displace: Collection[str] = ()) -> bool:
        key = protocol.username_key(session.username)
        held = self._by_user.get(key, {})
        others = tuple(
            other for channel, other in held.items() if channel != session.channel and channel not in displace
        )
        if any(other.user_id != session.user_id for other in others):
            raise JoinRefused(protocol.USERNAME_TAKEN, "That username is in use by another user_id", others)
        if len(others) >= max_sessions:
            raise JoinRefused(protocol.TOO_MANY_SESSIONS, f"At most {max_sessions} sessions per user", others)
        self._leases[session.channel] = _Lease(session, time.monotonic() + ttl)
        self._by_user.setdefault(key, {})[session.channel] = session
        return not held

    async def leave(self, channel: str) -> tuple[SessionInfo | None, bool]:
        lease = self._leases.pop(channel, None)
        if lease is None:
            return None, False
        key = protocol.username_key(lease.session.username)
        held = self._by_user.get(key, {})
        held.pop(channel, None)
        if not held:
            self._by_user.pop(key, None)
        return lease.session, not held

    async def restore(
        self, sessions: list[SessionInfo], max_sessions: int, ttl: float
    ) -> list[tuple[SessionInfo, JoinRefused]]:
        refused = []
        for session in sessions:
            try:
                await self.join(session, max_sessions, ttl)
            except JoinRefused as exc:
                refused.append((session, exc))
        return refused

    async def renew(self, channels: list[str], ttl: float) -> list[str]:
        expires = time.monotonic() + ttl
        missing = []
        for channel in channels:
            lease = self._leases.get(channel)
            if lease is None:
                missing.append(channel)
            else:
                lease.expires = expires
        return missing

    async def expire(self) -> list[SessionInfo]:
        now = time.monotonic()
        gone = [lease.session for lease in self._leases.values() if lease.expires <= now]
        for session in gone:
            await self.leave(session.channel)
        return gone

    async def online_users(self) -> list[dict[str, str]]:
        firsts = [next(iter(sessions.values())) for sessions in self._by_user.values()]
        return [
            {"username": first.username, "user_id": first.user_id} for first in sorted(firsts, key=lambda s: s.username)
        ]

    async def sessions_of(self, username: str) -> list[SessionInfo]:
        return list(self._by_user.get(protocol.username_key(username), {}).values())

    async def live_channels(self) -> set[str]:
        return set(self._leases)

    async def epoch(self) -> str:
        # The leases live and die with this process: they are never lost on their own.
        return "memory"

    async def park(self, channel: str, state: dict, ttl: float) -> None:
        expires = time.monotonic() + ttl
        self._parked = {c: held for c, held in self._parked.items() if held[0] > time.monotonic()}
        self._parked[channel] = (expires, state)
        lease = self._leases.get(channel)
        if lease is not None:
            lease.expires = expires

    async def claim_parked(self, channel: str, nonce: str) -> dict | None:
        expires, state = self._parked.get(channel, (0.0, {}))
        if expires <= time.monotonic() or state.get("nonce") != nonce:
            return None
        del self._parked[channel]
        return state

    async def clear(self) -> None:
        self._leases.clear()
        self._by_user.clear()
        self._parked.clear()

    async def close(self) -> None:
        pass


SendText = Callable[[str], Awaitable[None]]


@dataclass(slots=True)
class _Listener:
    send: SendText
    delta: bool
    needs_snapshot: bool = True


@dataclass
class PresenceHub:
    """Coalesce presence changes and send the list to this process's sessions."""

    store: PresenceStore
    window: float
    _listeners: dict[str, _Listener] = field(default_factory=dict)
    _snapshot: dict[str, str] = field(default_factory=dict)
    _flush_task: asyncio.Task | None = None
    _dirty: bool = False

    def listen(self, channel: str, send: SendText, delta: bool) -> None:
        """Send presence to this session from the next broadcast on (a full list first)."""
        self._listeners[channel] = _Listener(send, delta)
        self.changed()

    def unlisten(self, channel: str) -> None:
        self._listeners.pop(channel, None)

    def changed(self) -> None:
        """Note that the list may have changed; a broadcast follows within the window."""
        self._dirty = True
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_soon())

    async def flush_now(self) -> None:
        """Broadcast at once if anything changed (tests and shutdown)."""
        if self._dirty:
            await self._broadcast()

    async def _flush_soon(self) -> None:
        while self._dirty:
            await asyncio.sleep(self.window)
            started = time.monotonic()
            try:
                await self._broadcast()
            except Exception:
                logger.exception("presence broadcast failed; retrying next window")
                self._dirty = True
                await asyncio.sleep(1)
                continue
            # A broadcast to many sessions is costly: a sign-in storm must not turn
            # into back-to-back lists.
            await asyncio.sleep(BROADCAST_BACKOFF * (time.monotonic() - started))

    async def _broadcast(self) -> None:
        self._dirty = False
        users = await self.store.online_users()
        metrics.online_users(len(users))
        current = {user["username"]: user["user_id"] for user in users}
        full_text = protocol.encode(protocol.online_users(users))
        deltas = [
            protocol.encode({"type": protocol.USER_OFFLINE, "username": name, "user_id": uid})
            for name, uid in self._snapshot.items()
            if current.get(name) != uid
        ] + [
            protocol.encode({"type": protocol.USER_ONLINE, "username": name, "user_id": uid})
            for name, uid in current.items()
            if self._snapshot.get(name) != uid
        ]
        self._snapshot = current
        for channel, listener in list(self._listeners.items()):
            try:
                if not listener.delta or listener.needs_snapshot:
                    listener.needs_snapshot = False
                    await listener.send(full_text)
                else:
                    for text in deltas:
                        await listener.send(text)
            except Exception as exc:  # noqa: BLE001 - one socket's failure is not the others'
                # A socket that went away mid-broadcast: its disconnect is on its way.
                logger.info("presence not sent to one session", extra={"session": channel, "error": repr(exc)})
