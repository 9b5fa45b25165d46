"""The reaper: no session or call outlives its process.

Each sweep expires the presence leases of dead processes and ends their
sessions' calls, ends calls that rang past their deadline (a ring timer is
only an early wake-up: the deadline is on the call board), ends live calls
whose caller, answering session or ringing callee is gone from the store, and
ends call rows the database still shows live though no board holds them (a
process killed before its history writer wrote their end). Every process
sweeps; the board makes the outcome the same whichever does it first.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from calls.callflow.board import Actor
from calls.callflow.service import CallService
from calls.presence.base import PresenceStore
from calls.process.leases import LeaseKeeper
from calls.realtime.sessions import SessionRegistry

logger = logging.getLogger(__name__)


class Reaper:
    """End what dead processes and overdue calls left behind; one per process."""

    def __init__(
        self,
        store: PresenceStore,
        sessions: SessionRegistry,
        calls: CallService,
        leases: LeaseKeeper,
        presence_changed: Callable[[], Awaitable[None]],
        name: str,
    ) -> None:
        self.store = store
        self.sessions = sessions
        self.calls = calls
        self.leases = leases
        self.presence_changed = presence_changed
        self.name = name

    async def reap_once(self) -> None:
        """Expire dead leases and end their calls, then end overdue calls and calls whose party vanished."""
        expired = await self.store.expire()
        if expired:
            logger.info("session leases expired", extra={"runtime": self.name, "count": len(expired)})
            online = {user["username"] for user in await self.store.online_users()}
            lost = [Actor(session.channel, session.username) for session in expired]
            await self.calls.end_calls_of_lost_sessions(lost, online)
            await self.presence_changed()
        await self.calls.end_overdue()
        if self.leases.may_reap_vanished() and await self.leases.store_unchanged():
            # This process's own sessions are alive whatever the store says.
            live = await self.store.live_channels() | set(self.sessions.channels())
            online = [user["username"] for user in await self.store.online_users()]
            # A store that restarted between the two checks holds a partial picture.
            if await self.leases.store_unchanged():
                await self.calls.end_vanished(live, online)

    async def end_orphans(self) -> None:
        """End call rows the database shows live and no board holds (a job of its own: it waits on the database)."""
        if self.leases.may_reap_vanished() and await self.leases.store_unchanged():
            await self.calls.end_orphan_rows()
