"""Presence leases in this process's memory: for one process without Redis."""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, replace

from calls.presence.base import JoinRefused, SessionInfo
from calls.wire import protocol, text


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
        self._held: set[str] = set()

    async def join(self, session: SessionInfo, max_sessions: int, ttl: float, displace: Collection[str] = ()) -> bool:
        key = text.username_key(session.username)
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
        self._held.discard(channel)
        lease = self._leases.pop(channel, None)
        if lease is None:
            return None, False
        key = text.username_key(lease.session.username)
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
        sessions = self._by_user.get(text.username_key(username), {}).values()
        return [replace(session, held=session.channel in self._held) for session in sessions]

    async def set_held(self, channel: str, held: bool) -> None:
        if held and channel in self._leases:
            self._held.add(channel)
        else:
            self._held.discard(channel)

    async def live_channels(self) -> set[str]:
        return set(self._leases)

    async def epoch(self) -> str:
        # The leases live and die with this process: they are never lost on their own.
        return "memory"

    async def park(self, channel: str, state: dict, ttl: float) -> None:
        expires = time.monotonic() + ttl
        self._parked = {c: held for c, held in self._parked.items() if held[0] > time.monotonic()}
        self._parked[channel] = (expires, state)
        await self.set_held(channel, True)
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
        self._held.clear()

    async def close(self) -> None:
        pass
