"""Channel-layer group names: one per user, and one every process joins for presence."""

from __future__ import annotations

import hashlib

from calls.wire.text import username_key

# Every process's runtime channel is a member: presence changes are announced to it.
PRESENCE_GROUP = "presence"


def user_group(username: str) -> str:
    """Return the channel-layer group of a user's sessions (safe for any username).

    Names with one `username_key` (case, width) share the group, as they share an owner.
    """
    return "user." + hashlib.sha256(username_key(username).encode()).hexdigest()[:40]
