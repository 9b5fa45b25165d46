"""APNs: one HTTP/2 request per push, authorised by a provider token (token-based authentication).

Each push is `POST {base}/3/device/{device token}` on one kept HTTP/2 connection,
with `authorization: bearer <provider token>`: an ES256 JWT naming the key (`kid`)
and the team (`iss`, `iat`), reused for 50 minutes. A PushKit VoIP token gets a
`voip` push on the `<bundle id>.voip` topic carrying the payload alone (the app
reports it to CallKit); any other token gets an `alert` push whose `aps` the
system shows without the app. Every push expires at the ring deadline
(`apns-expiration`) and collapses by call id (`apns-collapse-id`).

How a `call_ended` stops a ringing phone (Apple's "Sending notification requests to
APNs" and "Pushing background updates to your app"):

- VoIP token: it rang through CallKit, and iOS 13+ requires every VoIP push to be
  reported to CallKit, so `call_ended` is a `voip` push too: the app reports the call
  (CallKit refuses it as already known when it is ringing) and ends it at once.
- Alert token: it rang as a notification. A background push (`content-available`,
  priority 5) is throttled, may be held back or dropped and never wakes an app the
  user force-quit, so it cannot be counted on within a ring. An alert with the same
  `apns-collapse-id` replaces the ringing notification on the device without the app
  running: a silent "Missed call" (or "Call ended") takes the place of "Incoming call".
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from calls.push.delivery import Delivery, Outcome, Result, retry_after
from calls.wire.push import APNS, INCOMING_CALL

logger = logging.getLogger(__name__)

PRODUCTION = "https://api.push.apple.com"
SANDBOX = "https://api.sandbox.push.apple.com"
# Seconds a provider token is reused: Apple refuses one older than an hour (ExpiredProviderToken)
# and one renewed more often than every 20 minutes (TooManyProviderTokenUpdates).
TOKEN_LIFETIME = 50 * 60
REQUEST_TIMEOUT = 10.0
COLLAPSE_ID_MAX_BYTES = 64
# What Apple answers (with 400) for a token that will never work for this app on this host.
DEAD_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})
# The alert that replaces a ringing notification, by the call's end reason.
ENDED_TITLES = {
    "timeout": "Missed call",
    "cancelled": "Missed call",
    "answered_elsewhere": "Answered on another device",
}


def load_key(path: str) -> ec.EllipticCurvePrivateKey:
    """Read the .p8 signing key Apple issued: a PKCS#8 PEM P-256 private key."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ImproperlyConfigured(f"SIGNALING_APNS_KEY_FILE is not a readable .p8 key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ImproperlyConfigured("SIGNALING_APNS_KEY_FILE must hold a P-256 (ES256) private key")
    return key


class ApnsProvider:
    """Sends VoIP and alert pushes to iOS apps through APNs."""

    platform = APNS

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        topic: str,
        base_url: str,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.key = key
        self.key_id = key_id
        self.team_id = team_id
        self.topic = topic
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(http2=True, verify=verify, timeout=REQUEST_TIMEOUT, follow_redirects=False)
        self._token: tuple[float, str] | None = None

    @classmethod
    def from_settings(cls) -> ApnsProvider:
        host = SANDBOX if settings.SIGNALING_APNS_USE_SANDBOX else PRODUCTION
        ca_file = settings.SIGNALING_APNS_CA_FILE
        return cls(
            load_key(settings.SIGNALING_APNS_KEY_FILE),
            settings.SIGNALING_APNS_KEY_ID,
            settings.SIGNALING_APNS_TEAM_ID,
            settings.SIGNALING_APNS_TOPIC,
            settings.SIGNALING_APNS_BASE_URL or host,
            # A CA file replaces the system's trust store: only the stand-in it signed is trusted.
            ssl.create_default_context(cafile=ca_file) if ca_file else True,
        )

    def provider_token(self, refused: str | None = None) -> str:
        """Return the provider token, renewed after TOKEN_LIFETIME or when Apple called `refused` expired."""
        now = time.time()
        if self._token is None or now - self._token[0] >= TOKEN_LIFETIME or self._token[1] == refused:
            claims = {"iss": self.team_id, "iat": int(now)}
            self._token = (now, jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.key_id}))
        return self._token[1]

    async def send(self, delivery: Delivery) -> Result:
        url = f"{self.base_url}/3/device/{delivery.target.address}"
        headers = headers_of(delivery, self.topic)
        body = body_of(delivery)

        async def post(token: str) -> httpx.Response:
            return await self.client.post(url, content=body, headers={**headers, "authorization": f"bearer {token}"})

        try:
            token = self.provider_token()
            response = await post(token)
            if response.status_code == 403 and reason_of(response) == "ExpiredProviderToken":
                # Apple's clock says the token is past its hour: one new token, one more try.
                logger.info("apns provider token expired early", extra={"call": delivery.call_id})
                response = await post(self.provider_token(refused=token))
        except httpx.HTTPError as exc:
            return Result(Outcome.RETRY, type(exc).__name__)
        return result_of(response)

    async def close(self) -> None:
        await self.client.aclose()


def collapse_id(call_id: str) -> str:
    """The call's `apns-collapse-id`: its id, or the id's SHA-256 when longer than Apple's 64 bytes."""
    if len(call_id.encode()) <= COLLAPSE_ID_MAX_BYTES:
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()


def headers_of(delivery: Delivery, topic: str) -> dict[str, str]:
    """The `apns-*` headers of one push (the authorization is added when sending)."""
    voip = delivery.target.voip
    return {
        "apns-topic": f"{topic}.voip" if voip else topic,
        "apns-push-type": "voip" if voip else "alert",
        # Immediately: both ring (or stop a ring) now, and each alert shows something.
        "apns-priority": "10",
        "apns-expiration": str(int(delivery.deadline)),
        "apns-collapse-id": collapse_id(delivery.call_id),
    }


def body_of(delivery: Delivery) -> bytes:
    """The JSON body: the payload, and for an alert push the `aps` the system shows."""
    body = dict(delivery.payload)
    if not delivery.target.voip:
        body["aps"] = aps_of(delivery.payload)
    return json.dumps(body, separators=(",", ":")).encode()


def aps_of(payload: dict[str, Any]) -> dict[str, Any]:
    """An alert that rings for `incoming_call`, or silently replaces it for `call_ended`."""
    if payload["type"] == INCOMING_CALL:
        alert = {"title": "Incoming call", "body": f"Incoming call from {payload['caller_username']}"}
        return {"alert": alert, "sound": "default"}
    return {"alert": {"title": ENDED_TITLES.get(payload.get("reason", ""), "Call ended")}}


def reason_of(response: httpx.Response) -> str:
    """Apple's `reason` for a refusal (BadDeviceToken, Unregistered, ...), or ""."""
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("reason", "")) if isinstance(body, dict) else ""


def result_of(response: httpx.Response) -> Result:
    """Read Apple's answer: 200 sent; 410 and a token Apple rejects gone; 429 and 5xx again later."""
    status = response.status_code
    if status == 200:
        return Result(Outcome.SENT)
    reason = reason_of(response) or f"HTTP {status}"
    # BadDeviceToken also means a sandbox token sent to production (or the reverse): Apple's
    # answer is the same, and such a token never works on this server's host either.
    if status == 410 or (status == 400 and reason in DEAD_TOKEN_REASONS):
        return Result(Outcome.GONE, reason)
    if status == 429 or status >= 500:
        return Result(Outcome.RETRY, reason, retry_after=retry_after(response))
    return Result(Outcome.FAILED, reason)
