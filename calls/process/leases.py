"""Keep this process's sessions listed in the presence store, through a Redis restart.

`LeaseKeeper` is the runtime's collaborator for two of its background jobs:

- Lease renewal, every T/4 (T = SIGNALING_PRESENCE_TTL). A lease that lapsed
  while the store kept its data (this process stalled) is written again.
- A watch on the store's epoch, which changes when the store loses its data (a
  Redis restart). Then the process waits until the channel layer delivers to it
  again, joins its groups again, writes its sessions' leases back (closing with
  1012 a session whose username went to another user meanwhile), writes the
  calls its sessions know of back to the call board (it lived in the same
  Redis), and announces the change. For a lease period and a probe timeout
  after that, the reaper does not take a session missing from the store for a
  dead one (`may_reap_vanished`): other processes may still be writing theirs back.

It lives in the process layer rather than with presence: restoring touches the
channel layer's groups and the sessions' sockets, which presence knows nothing of.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

from calls.callflow.board import Actor
from calls.callflow.service import CallService
from calls.presence.base import PresenceStore, StoreUnavailable
from calls.realtime.groups import PRESENCE_GROUP, user_group
from calls.realtime.sessions import Session, SessionRegistry
from calls.wire import events, protocol

logger = logging.getLogger(__name__)

# Seconds between checks that the presence store still holds this process's data.
STORE_WATCH_INTERVAL = 1.0
# Seconds to wait for the channel layer to deliver to this process again after a Redis restart.
LAYER_PROBE_TIMEOUT = 10.0


class LeaseKeeper:
    """Renew this process's leases, and restore them after the store lost them."""

    def __init__(
        self,
        store: PresenceStore,
        layer: Any,
        sessions: SessionRegistry,
        calls: CallService,
        lease_seconds: float,
        presence_changed: Callable[[], Awaitable[None]],
        name: str,
    ) -> None:
        self.store = store
        self.layer = layer
        self.sessions = sessions
        self.calls = calls
        self.lease_seconds = lease_seconds
        self.presence_changed = presence_changed
        self.name = name
        # The store's data set this process's state was last written to (None: unknown yet).
        self.epoch: str | None = None
        self._store_down = False
        # After the store lost its data, other processes need a lease period to
        # write their sessions back; until then a missing session is not a dead one.
        self._vanished_hold_until = 0.0
        self._layer_probes: dict[str, asyncio.Future] = {}

    async def start(self) -> None:
        try:
            self.epoch = await self.store.epoch()
        except StoreUnavailable:
            self.epoch = None

    async def every(self, interval: float, step: Callable[[], Awaitable[None]], failure: str) -> None:
        """Run `step` every `interval` seconds for good: a store outage or an error is logged, then retried."""
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except StoreUnavailable as exc:
                self.store_unreachable(exc)
            except Exception:
                logger.exception(failure, extra={"runtime": self.name})

    async def renew(self) -> None:
        channels = self.sessions.channels()
        missing = await self.store.renew(channels, self.lease_seconds)
        self._store_reachable()
        # A shared board lets the calls of sessions nobody renews expire.
        await self.calls.board.renew(channels, self.lease_seconds)
        # After a store restart every lease is missing: the watch restores those.
        if missing and await self.store_unchanged():
            logger.warning(
                "session leases had lapsed; joining again", extra={"runtime": self.name, "count": len(missing)}
            )
            await self._rejoin([s for c in missing if (s := self.sessions.get(c)) is not None])
            await self.presence_changed()

    async def _rejoin(self, consumers: list[Session]) -> None:
        """Write these sessions' leases again; close the ones whose username went to another user_id."""
        sessions = [consumer.session for consumer in consumers if consumer.session is not None]
        refused = await self.store.restore(sessions, settings.SIGNALING_MAX_SESSIONS_PER_USER, self.lease_seconds)
        for session, exc in refused:
            consumer = self.sessions.get(session.channel)
            logger.warning(
                "session cannot be listed again",
                extra={"session": session.channel, "user": session.username, "code": exc.code},
            )
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await consumer.send_error(exc.code, exc.message)
                    await consumer.close(code=protocol.CLOSE_SERVICE_RESTART)

    async def check_store(self, process_channel: str) -> None:
        """Restore this process's state if the store lost its data since the last check."""
        epoch = await self.store.epoch()
        self._store_reachable()
        if self.epoch is None:
            # Started while the store was down: whatever joined since is in this data set.
            self.epoch = epoch
        elif epoch != self.epoch:
            self._hold_vanished()
            await self._restore_after_store_loss(process_channel)
            self.epoch = epoch
            self._hold_vanished()

    async def store_unchanged(self) -> bool:
        epoch = await self.store.epoch()
        return self.epoch is None or epoch == self.epoch

    def may_reap_vanished(self) -> bool:
        """Whether a session missing from the store may be taken for a dead one now."""
        return asyncio.get_running_loop().time() >= self._vanished_hold_until

    def _hold_vanished(self) -> None:
        # Every process needs a probe and a renewal to write its sessions back.
        hold = self.lease_seconds + LAYER_PROBE_TIMEOUT
        self._vanished_hold_until = asyncio.get_running_loop().time() + hold

    async def _restore_after_store_loss(self, process_channel: str) -> None:
        """Re-subscribe, re-add every local session to its user group, and write the leases again."""
        logger.warning(
            "presence store lost its data (Redis restarted?); restoring",
            extra={"runtime": self.name, "sessions": len(self.sessions)},
        )
        # Sessions are listed again only once the layer can reach them: a caller who
        # sees them may signal them straight away.
        await self._layer_delivers(process_channel)
        # The core layer keeps group members in Redis (lost); pub/sub subscriptions are
        # restored by the client on reconnect, where these calls change nothing.
        if process_channel:
            await self.layer.group_add(PRESENCE_GROUP, process_channel)
        consumers = self.sessions.consumers()
        for consumer in consumers:
            if consumer.session is not None:
                await self.layer.group_add(user_group(consumer.session.username), consumer.channel_name)
        await self._rejoin(consumers)
        # The board lived in the same Redis: each session writes back the calls it knows of.
        restored = 0
        for consumer in consumers:
            if consumer.session is not None:
                actor = Actor(consumer.channel_name, consumer.session.username)
                restored += await self.calls.restore(actor, consumer.live_calls())
        await self.presence_changed()
        logger.info("calls written back to the board", extra={"runtime": self.name, "calls": restored})
        logger.info("state restored after the presence store came back", extra={"runtime": self.name})

    async def _layer_delivers(self, process_channel: str) -> None:
        """Return once a message sent to this process's channel comes back through the layer.

        After a Redis restart the layer's subscriber reconnects (and subscribes
        again) on its own schedule; until then messages to local sessions are lost.
        """
        if not process_channel:
            return
        token = uuid.uuid4().hex
        arrived = asyncio.get_running_loop().create_future()
        self._layer_probes[token] = arrived
        try:
            async with asyncio.timeout(LAYER_PROBE_TIMEOUT):
                while not arrived.done():
                    with contextlib.suppress(Exception):
                        await self.layer.send(process_channel, events.runtime_probe(token))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(arrived), 0.5)
        finally:
            self._layer_probes.pop(token, None)

    def layer_probe_arrived(self, token: str) -> None:
        arrived = self._layer_probes.get(token)
        if arrived is not None and not arrived.done():
            arrived.set_result(None)

    def store_unreachable(self, exc: Exception) -> None:
        if not self._store_down:
            logger.warning("presence store unreachable; retrying", extra={"runtime": self.name, "error": repr(exc)})
        self._store_down = True

    def _store_reachable(self) -> None:
        if self._store_down:
            logger.info("presence store reachable again", extra={"runtime": self.name})
        self._store_down = False
