"""ICE servers handed to clients: STUN/TURN from settings, TURN credentials per user.

TURN credentials follow the TURN REST API that coturn's `use-auth-secret` checks:
the username is "<expiry unix time>:<username>" and the credential is
base64(HMAC-SHA1(secret, that username)).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from django.conf import settings


def turn_credentials(username: str, secret: str, ttl: int, now: float | None = None) -> tuple[str, str]:
    """Return a (username, credential) pair valid for `ttl` seconds."""
    expiry = int((now if now is not None else time.time()) + ttl)
    turn_username = f"{expiry}:{username}"
    digest = hmac.new(secret.encode(), turn_username.encode(), hashlib.sha1).digest()
    return turn_username, base64.b64encode(digest).decode()


def ice_servers_for(username: str) -> list[dict[str, Any]]:
    """Return the RTCIceServer list for one user: the configured ones, then TURN."""
    servers = [dict(server) for server in settings.SIGNALING_ICE_SERVERS]
    if settings.SIGNALING_TURN_URLS:
        turn_username, credential = turn_credentials(
            username, settings.SIGNALING_TURN_SECRET, settings.SIGNALING_TURN_TTL
        )
        servers.append(
            {"urls": list(settings.SIGNALING_TURN_URLS), "username": turn_username, "credential": credential}
        )
    return servers
