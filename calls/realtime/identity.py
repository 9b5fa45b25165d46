"""Who may hold a name: one live session per name in open mode, the token's word in token mode."""

from __future__ import annotations

import logging

from django.conf import settings

from calls.presence.base import JoinRefused, SessionInfo
from calls.realtime.sessions import Services
from calls.wire import protocol
from calls.wire.errors import SignalingError

logger = logging.getLogger(__name__)


async def join_presence(services: Services, session: SessionInfo) -> bool:
    """List the session; return whether its user came online. Raise SignalingError when refused.

    In open mode nothing proves who owns a name, so a name has one live
    session: a second register is refused, whatever user_id it carries. The
    exception keeps v1 phones working across a network switch, where the old
    socket lingers until the ping timeout: when the newcomer carries the
    holder's user_id, the holder is probed, and one that does not answer
    is ended as a drop and gives way.
    """
    store, lease = services.store, services.lease_seconds
    if settings.SIGNALING_AUTH == "token":
        return await store.join(session, settings.SIGNALING_MAX_SESSIONS_PER_USER, lease)
    taken = SignalingError(protocol.USERNAME_TAKEN, "That username is online on another connection")
    try:
        return await store.join(session, 1, lease)
    except JoinRefused as exc:
        holders = exc.holders
    if not holders or any(holder.user_id != session.user_id for holder in holders):
        raise taken
    gone = await services.sessions.probe([holder.channel for holder in holders])
    if len(gone) < len(holders):
        raise taken
    logger.info("register replaces a silent session", extra={"session": session.channel, "replaced": len(gone)})
    try:
        return await store.join(session, 1, lease, displace=gone)
    except JoinRefused:
        raise taken from None
