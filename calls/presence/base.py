"""Who is online: the shape of a presence store, and what it deals in.

The store holds one lease per session (per socket). A user is online while any
of its sessions holds a live lease, on any process. `MemoryPresenceStore`
(memory.py) serves a single process; `RedisPresenceStore` (redis.py) shares
the leases between processes, so a crashed process's sessions expire on their
own. `PresenceHub` (hub.py) broadcasts the list to this process's sessions.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from calls.wire.errors import SignalingError


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One registered session: its channel name and whose it is.

    `held`: its socket is gone and it waits for a resume (or was parked by a
    process shutting down): listed, but no device is there to ring now.
    """

    channel: str
    username: str
    user_id: str
    held: bool = False


class JoinRefused(SignalingError):
    """A registration the presence rules refuse; `holders` are the sessions that hold the name (or the slots)."""

    def __init__(self, code: str, message: str, holders: tuple[SessionInfo, ...] = ()) -> None:
        super().__init__(code, message)
        self.holders = holders


class StoreUnavailable(Exception):
    """The shared store cannot be reached (Redis down or restarting)."""


class PresenceStore(Protocol):
    # Whether other processes see this store (and so can carry a parked session).
    shared: bool

    async def join(self, session: SessionInfo, max_sessions: int, ttl: float, displace: Collection[str] = ()) -> bool:
        """Add a session; return True if its user just came online.

        Usernames are compared by `text.username_key`. Raise JoinRefused when
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
        """Return the user's live sessions (the username compared by `text.username_key`)."""

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

    async def set_held(self, channel: str, held: bool) -> None:
        """Mark a session as held (its socket gone, waiting for a resume), or as live again."""

    async def clear(self) -> None:
        """Forget every session (tests)."""

    async def close(self) -> None:
        """Release connections."""
