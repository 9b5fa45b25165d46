"""Push subscriptions on the wire: `push_subscribe` / `push_unsubscribe`, and the pushes' payloads.

Pure code. The same subscription object is accepted over the socket and by
`POST /api/push-subscriptions`:

- Web Push: the browser's `PushSubscription.toJSON()` as it is, under
  `subscription` (`endpoint`, `keys.p256dh`, `keys.auth`);
- FCM: a registration `token`;
- APNs: a device `token` (hex), with `voip: true` for PushKit VoIP tokens (CallKit).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from calls.wire.errors import INVALID_MESSAGE, SignalingError
from calls.wire.text import field, text_field

PUSH_SUBSCRIBE = "push_subscribe"
PUSH_UNSUBSCRIBE = "push_unsubscribe"
PUSH_SUBSCRIBED = "push_subscribed"
PUSH_UNSUBSCRIBED = "push_unsubscribed"

WEBPUSH, FCM, APNS = "webpush", "fcm", "apns"
PLATFORMS = (WEBPUSH, FCM, APNS)
ENDPOINT_MAX = 2048
TOKEN_MAX = 1024
DEVICE_ID_MAX = 128
# An uncompressed P-256 point (0x04, x, y) and Web Push's 16-byte authentication secret.
P256DH_BYTES = 65
AUTH_BYTES = 16

# Payload types: what a woken app reads from the push.
INCOMING_CALL = "incoming_call"
CALL_ENDED = "call_ended"


@dataclass(frozen=True, slots=True)
class Subscription:
    """Where to push: a Web Push endpoint and its keys, or an FCM or APNs token."""

    platform: str
    # The endpoint (Web Push) or the token (FCM, APNs): one subscription per platform and address.
    address: str
    p256dh: str = ""
    auth: str = ""
    voip: bool = False
    device_id: str = ""


@dataclass(frozen=True, slots=True)
class PushSubscribe:
    subscription: Subscription


@dataclass(frozen=True, slots=True)
class PushUnsubscribe:
    subscription_id: str


def _base64url(text: str, name: str, size: int) -> str:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SignalingError(INVALID_MESSAGE, f"'{name}' must be base64url") from None
    if len(raw) != size or (size == P256DH_BYTES and raw[0] != 0x04):
        raise SignalingError(INVALID_MESSAGE, f"'{name}' must encode {size} bytes")
    return text.rstrip("=")


def parse_subscription(obj: dict[str, Any]) -> Subscription:
    """Read a subscription from a `push_subscribe` frame or an HTTP body, or raise SignalingError."""
    platform = field(obj, "platform", str)
    if platform not in PLATFORMS:
        raise SignalingError(INVALID_MESSAGE, "'platform' must be 'webpush', 'fcm' or 'apns'")
    device_id = text_field(obj, "device_id", DEVICE_ID_MAX, required=False) or ""
    if platform == WEBPUSH:
        browser = field(obj, "subscription", dict)
        endpoint = text_field(browser, "endpoint", ENDPOINT_MAX)
        parts = urlsplit(endpoint)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise SignalingError(INVALID_MESSAGE, "'subscription.endpoint' must be an https URL")
        keys = field(browser, "keys", dict)
        p256dh = _base64url(text_field(keys, "p256dh", 200), "subscription.keys.p256dh", P256DH_BYTES)
        auth = _base64url(text_field(keys, "auth", 100), "subscription.keys.auth", AUTH_BYTES)
        return Subscription(WEBPUSH, endpoint, p256dh=p256dh, auth=auth, device_id=device_id)
    token = text_field(obj, "token", TOKEN_MAX)
    if platform == APNS:
        if len(token) % 2 or not 32 <= len(token) <= 400 or any(ch not in "0123456789abcdefABCDEF" for ch in token):
            raise SignalingError(INVALID_MESSAGE, "'token' must be an APNs device token in hex")
        voip = bool(field(obj, "voip", bool, required=False))
        return Subscription(APNS, token.lower(), voip=voip, device_id=device_id)
    return Subscription(FCM, token, device_id=device_id)


def parse_subscribe(obj: dict[str, Any]) -> PushSubscribe:
    return PushSubscribe(parse_subscription(obj))


def parse_unsubscribe(obj: dict[str, Any]) -> PushUnsubscribe:
    return PushUnsubscribe(subscription_id(field(obj, "subscription_id", str)))


def subscription_id(value: str) -> str:
    """Return a subscription id in its one written form, or raise SignalingError."""
    try:
        return str(UUID(value))
    except ValueError:
        raise SignalingError(INVALID_MESSAGE, "'subscription_id' must be a UUID") from None


def subscribed(subscription_id: str) -> dict[str, Any]:
    return {"type": PUSH_SUBSCRIBED, "subscription_id": subscription_id}


def unsubscribed(subscription_id: str) -> dict[str, Any]:
    return {"type": PUSH_UNSUBSCRIBED, "subscription_id": subscription_id}


def incoming_call_payload(call_id: str, caller_username: str, caller_id: str, expires_at: str) -> dict[str, Any]:
    """What a push carries to wake the callee's device."""
    return {
        "type": INCOMING_CALL,
        "call_id": call_id,
        "caller_username": caller_username,
        "caller_id": caller_id,
        "expires_at": expires_at,
    }


def call_ended_payload(call_id: str, reason: str) -> dict[str, Any]:
    """What a push carries to stop the callee's device ringing."""
    return {"type": CALL_ENDED, "call_id": call_id, "reason": reason}
