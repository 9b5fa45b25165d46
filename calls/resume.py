"""Session resume: signed one-time tokens, and the hand-over of a held session.

When a session that asked for resume loses its socket, its consumer stays alive
for the grace period and holds the session (see `SignalingConsumer.hold`): it keeps
its presence lease, keeps reading its channel into a bounded queue, and answers a
`session.resume` request from a new socket that proves ownership with the token.
The request goes to the old channel by name, so the new socket may be on another
process. The hand-over carries the calls and the queued events, replayed in order.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from django.core import signing

if TYPE_CHECKING:
    from calls.consumers import SignalingConsumer

SALT = "calls.resume"
MAX_AGE_S = 24 * 3600


def make_token(channel: str, username: str, user_id: str) -> tuple[str, str]:
    """Return a signed resume token for this session, and its one-time nonce."""
    nonce = secrets.token_urlsafe(16)
    return signing.dumps({"c": channel, "u": username, "i": user_id, "n": nonce}, salt=SALT), nonce


def read_token(token: str, username: str, user_id: str) -> tuple[str, str] | None:
    """Return (old channel, nonce) if the token is genuine and names this user."""
    try:
        claims = signing.loads(token, salt=SALT, max_age=MAX_AGE_S)
    except signing.BadSignature:
        return None
    if not isinstance(claims, dict) or claims.get("u") != username or claims.get("i") != user_id:
        return None
    return claims["c"], claims["n"]


def handover_event(consumer: SignalingConsumer, queued: list[dict[str, Any]], dropped: int) -> dict[str, Any]:
    """Build the layer event that gives a held session to its new socket."""
    return {
        "type": "session.handover",
        "old_channel": consumer.channel_name,
        "username": consumer.session.username,
        "user_id": consumer.session.user_id,
        "calls": [asdict(call) for call in consumer.calls.values()],
        "queued": queued,
        "dropped": dropped,
        "delta": consumer.delta_presence,
    }
