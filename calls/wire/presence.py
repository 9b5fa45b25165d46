"""Presence on the wire: the `presence` frame, and watch lists (`register.watch`, `watch`).

Pure code. Three ways to follow who is online:
- v1 (`presence` absent or "full"): an `online_users` list after every change;
- "delta": one `presence` frame per broadcast window with the users who came
  online and went offline in it; the first, after `registered`, is the snapshot;
- a watch list (`register` with `watch`, changed with `watch` frames): the same
  frames, for the watched users only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from calls.wire.errors import INVALID_MESSAGE, SignalingError
from calls.wire.text import InvalidUsername, normalize_username

PRESENCE = "presence"
WATCH = "watch"


@dataclass(frozen=True, slots=True)
class Watch:
    """Change this session's watch list."""

    add: tuple[str, ...]
    remove: tuple[str, ...]


def usernames(obj: dict[str, Any], name: str, limit: int) -> tuple[str, ...] | None:
    """Read a list of usernames (each by the username rule, none twice), or None when absent."""
    values = obj.get(name)
    if values is None:
        return None
    if not isinstance(values, list):
        raise SignalingError(INVALID_MESSAGE, f"'{name}' must be a list of usernames")
    if len(values) > limit:
        raise SignalingError(INVALID_MESSAGE, f"'{name}' may name at most {limit} users")
    names: dict[str, None] = {}
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise SignalingError(INVALID_MESSAGE, f"'{name}[{index}]' must be a string")
        try:
            names[normalize_username(value)] = None
        except InvalidUsername as exc:
            raise SignalingError(INVALID_MESSAGE, f"'{name}[{index}]' {exc}") from None
    return tuple(names)


# A watch frame may name at most this many users at once; the session's limit is a setting.
WATCH_FRAME_MAX = 10_000


def parse_watch(obj: dict[str, Any]) -> Watch:
    add = usernames(obj, "add", WATCH_FRAME_MAX)
    remove = usernames(obj, "remove", WATCH_FRAME_MAX)
    if add is None and remove is None:
        raise SignalingError(INVALID_MESSAGE, "'add' or 'remove' is required")
    return Watch(add=add or (), remove=remove or ())


def frame(online: list[dict[str, str]], offline: list[dict[str, str]], snapshot: bool = False) -> dict[str, Any]:
    """One presence frame: users who came online and who went offline (each as {username, user_id}).

    A snapshot frame states the whole picture of the users it covers: after
    `registered`, everyone in the session's scope; in answer to `watch`, the
    users just added.
    """
    message: dict[str, Any] = {"type": PRESENCE}
    if snapshot:
        message["snapshot"] = True
    message["online"] = online
    message["offline"] = offline
    return message
