"""Coalesced broadcasts of who is online to this process's sessions.

Changes anywhere mark the hub dirty, and at most once per window it reads the
list once, works out who came online and who went offline since the last
broadcast, and sends each local session what it follows (calls/wire/presence.py):
v1 sessions the full list (encoded once for all), "delta" sessions one
`presence` frame with the changes (encoded once for all), sessions with a watch
list one frame with the changes of the users they watch (only if any). A
session's first frame is its snapshot. With SIGNALING_PRESENCE_SCOPE=watch
nobody follows everyone: v1 sessions get one empty list, delta sessions nothing.
Watch lists are filtered here, against the whole list: every process reads it
once per window anyway, so following a watched user on another process costs
nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from django.conf import settings

from calls.observability import metrics
from calls.presence.base import PresenceStore
from calls.wire import presence as presence_wire
from calls.wire import protocol
from calls.wire.text import username_key

# After a broadcast, the next one waits at least this many times as long as the
# After a broadcast, the next one waits at least this many times as long as the
# broadcast took to build and hand to the sockets. The sockets' writes come after
# and cost about as much again, so while changes keep coming broadcasting takes
# about half of the process's time at most, however many sessions listen.
BROADCAST_BACKOFF = 3.0

logger = logging.getLogger(__name__)


SendText = Callable[[str], Awaitable[None]]
# How a session follows presence.
FULL, DELTA, WATCH = "full", "delta", "watch"


@dataclass(slots=True)
class _Listener:
    send: SendText
    mode: str
    # Watched users, by username key (watch mode).
    watch: set[str] = field(default_factory=set)
    needs_snapshot: bool = True


def _entries(users: dict[str, tuple[str, str]], keys: object) -> list[dict[str, str]]:
    return [{"username": users[key][0], "user_id": users[key][1]} for key in sorted(keys, key=lambda k: users[k][0])]


@dataclass
class PresenceHub:
    """Coalesce presence changes and send each of this process's sessions what it follows."""

    store: PresenceStore
    window: float
    _listeners: dict[str, _Listener] = field(default_factory=dict)
    # username key -> (username, user_id) as of the last broadcast.
    _snapshot: dict[str, tuple[str, str]] = field(default_factory=dict)
    # username key -> channels of the sessions watching that user.
    _watchers: dict[str, set[str]] = field(default_factory=dict)
    _flush_task: asyncio.Task | None = None
    _dirty: bool = False

    def listen(self, channel: str, send: SendText, mode: str, watch: tuple[str, ...] = ()) -> None:
        """Send presence to this session from the next broadcast on (its snapshot first)."""
        self.unlisten(channel)
        listener = self._listeners[channel] = _Listener(send, mode)
        self._add_watch(channel, listener, watch)
        self.changed()

    def unlisten(self, channel: str) -> None:
        listener = self._listeners.pop(channel, None)
        if listener is not None:
            self._remove_watch(channel, listener, listener.watch)

    def watched(self, channel: str) -> list[str]:
        """The username keys a session watches (empty when it follows no watch list)."""
        listener = self._listeners.get(channel)
        return sorted(listener.watch) if listener is not None else []

    async def watch(self, channel: str, add: tuple[str, ...], remove: tuple[str, ...]) -> dict | None:
        """Change a session's watch list; return the snapshot frame of the added users who are online."""
        listener = self._listeners.get(channel)
        if listener is None:
            return None
        if listener.mode != WATCH:  # a session starts watching: from now on it follows only its list
            listener.mode = WATCH
        self._remove_watch(channel, listener, {username_key(name) for name in remove})
        added = self._add_watch(channel, listener, add)
        users = await self.store.online_users()
        online = {username_key(user["username"]): (user["username"], user["user_id"]) for user in users}
        return presence_wire.frame(_entries(online, added & online.keys()), [], snapshot=True)

    def _add_watch(self, channel: str, listener: _Listener, names: tuple[str, ...]) -> set[str]:
        keys = {username_key(name) for name in names} - listener.watch
        listener.watch |= keys
        for key in keys:
            self._watchers.setdefault(key, set()).add(channel)
        return keys

    def _remove_watch(self, channel: str, listener: _Listener, keys: set[str]) -> None:
        for key in keys & listener.watch:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(channel)
                if not watchers:
                    del self._watchers[key]
        listener.watch -= keys

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
        current = {username_key(user["username"]): (user["username"], user["user_id"]) for user in users}
        before = self._snapshot
        # Each user in its final state only: one whose user_id changed is listed online.
        came = [key for key, entry in current.items() if before.get(key) != entry]
        went = [key for key in before if key not in current]
        self._snapshot = current
        texts = _Texts(users, current, before, came, went)
        for channel, listener in list(self._listeners.items()):
            text = texts.for_listener(channel, listener, self._watchers)
            listener.needs_snapshot = False
            if text is None:
                continue
            try:
                await listener.send(text)
            except Exception as exc:  # noqa: BLE001 - one socket's failure is not the others'
                # A socket that went away mid-broadcast: its disconnect is on its way.
                logger.info("presence not sent to one session", extra={"session": channel, "error": repr(exc)})


class _Texts:
    """The frames of one broadcast, each encoded once however many sessions get it."""

    def __init__(
        self,
        users: list[dict[str, str]],
        current: dict[str, tuple[str, str]],
        before: dict[str, tuple[str, str]],
        came: list[str],
        went: list[str],
    ) -> None:
        self.users, self.current, self.before, self.came, self.went = users, current, before, came, went
        self.global_scope = settings.SIGNALING_PRESENCE_SCOPE == "global"
        self._cache: dict[str, str] = {}
        # Watchers of the users that changed: channel -> (came online, went offline) keys.
        self._watched_changes: dict[str, tuple[list[str], list[str]]] | None = None

    def _once(self, name: str, build: Callable[[], dict]) -> str:
        if name not in self._cache:
            self._cache[name] = protocol.encode(build())
        return self._cache[name]

    def for_listener(self, channel: str, listener: _Listener, watchers: dict[str, set[str]]) -> str | None:
        if listener.mode == FULL:
            if self.global_scope:
                return self._once("full", lambda: protocol.online_users(self.users))
            return self._once("empty", lambda: protocol.online_users([])) if listener.needs_snapshot else None
        if listener.mode == DELTA:
            if not self.global_scope:
                return None
            if listener.needs_snapshot:
                return self._once(
                    "snapshot", lambda: presence_wire.frame(_entries(self.current, self.current), [], True)
                )
            if not (self.came or self.went):
                return None
            return self._once(
                "delta",
                lambda: presence_wire.frame(_entries(self.current, self.came), _entries(self.before, self.went)),
            )
        if listener.needs_snapshot:
            online = listener.watch & self.current.keys()
            return protocol.encode(presence_wire.frame(_entries(self.current, online), [], snapshot=True))
        came, went = self._changes_watched_by(watchers).get(channel, ([], []))
        if not (came or went):
            return None
        return protocol.encode(presence_wire.frame(_entries(self.current, came), _entries(self.before, went)))

    def _changes_watched_by(self, watchers: dict[str, set[str]]) -> dict[str, tuple[list[str], list[str]]]:
        # From the users that changed to who watches them: a window's changes are few,
        # the watch lists many.
        if self._watched_changes is None:
            self._watched_changes = {}
            for keys, index in ((self.came, 0), (self.went, 1)):
                for key in keys:
                    for channel in watchers.get(key, ()):
                        self._watched_changes.setdefault(channel, ([], []))[index].append(key)
        return self._watched_changes
