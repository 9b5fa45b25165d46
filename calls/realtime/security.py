"""Who may connect and how much they may send: origins, tokens, rate limits."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import jwt
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.utils.http import is_same_domain

from calls.wire.protocol import USER_ID_MAX
from calls.wire.text import InvalidUsername, normalize_username

JWT_ALGORITHM = "HS256"


def forwarded_client(peer: str, forwarded_for: list[str], trusted_hops: int) -> str:
    """Return the client's address, believing X-Forwarded-For only as far as `trusted_hops` proxies.

    Each trusted proxy appends the address it received the request from, so the
    client is the entry `trusted_hops` from the right; entries further left were
    written by the client itself and prove nothing. With no trusted proxy (the
    default) the address is the TCP peer's.
    """
    if trusted_hops <= 0:
        return peer
    entries = [entry.strip() for header in forwarded_for for entry in header.split(",") if entry.strip()]
    if not entries:
        return peer
    return entries[-trusted_hops] if len(entries) >= trusted_hops else entries[0]


def scope_client_address(scope: dict) -> str:
    """Return the client address of an ASGI connection (see `forwarded_client`)."""
    client = scope.get("client") or ("", 0)
    forwarded = [
        value.decode("latin1") for name, value in scope.get("headers", []) if name.lower() == b"x-forwarded-for"
    ]
    return forwarded_client(str(client[0] or ""), forwarded, settings.SIGNALING_TRUSTED_PROXIES)


def request_client_address(request: Any) -> str:
    """Return the client address of a Django request (see `forwarded_client`)."""
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
    return forwarded_client(
        request.META.get("REMOTE_ADDR", ""), [forwarded] if forwarded else [], settings.SIGNALING_TRUSTED_PROXIES
    )


def _allowed_origin_patterns() -> list[str]:
    return settings.SIGNALING_ALLOWED_ORIGINS or list(settings.ALLOWED_HOSTS)


def origin_allowed(origin: str | None, patterns: list[str]) -> bool:
    """Return whether a browser's Origin may open a socket; no Origin (native apps) may."""
    if origin is None:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    for pattern in patterns:
        if pattern == "*":
            return True
        if "://" in pattern:
            if origin.rstrip("/").lower() == pattern.rstrip("/").lower():
                return True
        elif is_same_domain(parts.hostname, pattern.lower().strip("[]")) or is_same_domain(
            parts.netloc.lower(), pattern.lower()
        ):
            return True
    return False


class OriginValidator:
    """ASGI middleware: refuse a WebSocket handshake from a browser page of another site."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        origin = None
        for name, value in scope.get("headers", []):
            if name == b"origin":
                origin = value.decode("latin1")
        if origin_allowed(origin, _allowed_origin_patterns()):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)


@dataclass(slots=True)
class TokenBucket:
    """Allow `rate` messages a second on average, with bursts of up to `burst`."""

    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def parse_rate(value: str) -> tuple[float, float]:
    """Parse SIGNALING_RATE, "RATE/BURST" messages per second, e.g. "50/200"."""
    try:
        rate_text, burst_text = value.split("/")
        rate, burst = float(rate_text), float(burst_text)
    except ValueError:
        raise ValueError(f"SIGNALING_RATE must look like 50/200, not {value!r}") from None
    if rate <= 0 or burst < 1:
        raise ValueError(f"SIGNALING_RATE needs a positive rate and a burst of 1 or more, not {value!r}")
    return rate, burst


def new_bucket() -> TokenBucket:
    rate, burst = parse_rate(settings.SIGNALING_RATE)
    return TokenBucket(rate, burst)


class TokenInvalid(Exception):
    """A registration token that is missing, forged, expired or malformed."""


def mint_token(username: str, ttl: int | None = None, user_id: str | None = None) -> tuple[str, datetime]:
    """Return a signed token for `username` (and its account's stable `user_id`) and when it expires."""
    expires = datetime.now(UTC) + timedelta(seconds=ttl or settings.SIGNALING_TOKEN_TTL)
    claims: dict[str, Any] = {"sub": username, "exp": expires, "iat": datetime.now(UTC)}
    if user_id is not None:
        claims["user_id"] = user_id
    return jwt.encode(claims, settings.SIGNALING_JWT_SECRET, algorithm=JWT_ALGORITHM), expires


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """Who a valid token proves the bearer is: the username and the account's stable user_id."""

    username: str
    user_id: str


def token_identity(token: str | None) -> TokenIdentity:
    """Return the identity a valid token proves; raise TokenInvalid otherwise.

    `user_id` is the token's `user_id` claim (the account's stable id, the same on
    every device), or the username when a backend's tokens carry none.
    """
    if not token:
        raise TokenInvalid("A token is required to register")
    try:
        claims = jwt.decode(
            token,
            settings.SIGNALING_JWT_SECRET,
            algorithms=[JWT_ALGORITHM],
            options={"require": ["exp", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenInvalid("The token has expired") from None
    except jwt.InvalidTokenError:
        raise TokenInvalid("The token is not valid") from None
    subject = claims["sub"]
    try:
        username = normalize_username(subject) if isinstance(subject, str) else normalize_username("")
    except InvalidUsername:
        raise TokenInvalid("The token's subject is not a valid username") from None
    user_id = claims.get("user_id")
    if not isinstance(user_id, str) or not 1 <= len(user_id) <= USER_ID_MAX or not _sendable(user_id):
        user_id = username
    return TokenIdentity(username, user_id)


def _sendable(text: str) -> bool:
    """Whether text can go on the wire: UTF-8 encodable, no control characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return text.isprintable()


def verify_token(token: str | None) -> str:
    """Return the username a valid token was issued for; raise TokenInvalid otherwise."""
    return token_identity(token).username
