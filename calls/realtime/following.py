"""How a session follows presence: v1 lists, delta frames, or a watch list (calls/presence/hub.py)."""

from __future__ import annotations

from typing import Any, Protocol

from django.conf import settings

from calls.presence.hub import DELTA, FULL, WATCH
from calls.realtime.sessions import Services
from calls.wire import errors, protocol
from calls.wire.errors import SignalingError
from calls.wire.presence import Watch
from calls.wire.text import username_key


class Follower(Protocol):
    """What `change_watch` needs of the consumer."""

    channel_name: str
    services: Services
    presence_mode: str

    async def send_json(self, content: dict[str, Any]) -> None: ...


def presence_mode(message: protocol.Register) -> str:
    """How a registering session follows presence: a watch list wins over `presence`."""
    if message.watch is not None:
        check_watch_limit(len(message.watch))
        return WATCH
    return DELTA if message.presence == "delta" else FULL


def check_watch_limit(count: int) -> None:
    limit = settings.SIGNALING_WATCH_LIMIT
    if count > limit:
        raise SignalingError(errors.WATCH_LIMIT, f"A session may watch at most {limit} users")


async def change_watch(follower: Follower, message: Watch) -> None:
    """Add and remove watched users; answer with a snapshot frame of the added users who are online."""
    hub = follower.services.sessions.hub
    removed = {username_key(name) for name in message.remove}
    after = (set(hub.watched(follower.channel_name)) - removed) | {username_key(name) for name in message.add}
    check_watch_limit(len(after))
    snapshot = await hub.watch(follower.channel_name, message.add, message.remove)
    follower.presence_mode = WATCH
    if snapshot is not None:
        await follower.send_json(snapshot)
