"""Web Push: payloads encrypted per RFC 8291 (aes128gcm), the server identified by VAPID (RFC 8292).

The browser's push service (its endpoint, from `PushManager.subscribe`)
receives one POST per push: the encrypted JSON payload, `TTL` (seconds left to
ring), `Urgency: high`, and a `Topic` derived from the call id, so the push that
ends a call replaces the one that rang it if the device has not fetched it yet.
Encryption is http-ece's, the VAPID token py-vapid's; httpx posts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from urllib.parse import urlsplit

import http_ece
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from py_vapid import Vapid02

from calls.push.delivery import Delivery, Outcome, Result, retry_after
from calls.push.subscriptions import endpoint_allowed
from calls.wire.push import WEBPUSH

logger = logging.getLogger(__name__)

# Seconds a VAPID token is valid (RFC 8292 allows up to 24 hours).
VAPID_TOKEN_LIFETIME = 12 * 3600
REQUEST_TIMEOUT = 10.0


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_vapid() -> Vapid02 | None:
    """The server's VAPID key from SIGNALING_VAPID_PRIVATE_KEY (PEM), or None when Web Push is off."""
    pem = settings.SIGNALING_VAPID_PRIVATE_KEY
    return Vapid02.from_pem(pem.encode()) if pem else None


def public_key_of(vapid: Vapid02) -> str:
    """The application server key browsers subscribe with: base64url of the uncompressed P-256 point."""
    raw = vapid.public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return b64url(raw)


def new_key_pair() -> tuple[str, str]:
    """Return a new VAPID private key (PEM) and its public key (base64url)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return pem.decode(), b64url(public)


def topic_of(call_id: str) -> str:
    """A Topic header for the call: at most 32 characters of the URL-safe base64 alphabet."""
    return b64url(hashlib.sha256(call_id.encode()).digest())[:32]


def encrypt(payload: bytes, p256dh: str, auth: str) -> bytes:
    """Encrypt a payload for one subscription (RFC 8291, aes128gcm; a fresh sender key each time)."""
    sender = ec.generate_private_key(ec.SECP256R1())
    return http_ece.encrypt(
        payload, private_key=sender, dh=b64url_decode(p256dh), auth_secret=b64url_decode(auth), version="aes128gcm"
    )


class WebPushProvider:
    """Posts encrypted pushes to browsers' push services."""

    platform = WEBPUSH

    def __init__(self, vapid: Vapid02, subject: str) -> None:
        self.vapid = vapid
        self.subject = subject
        self.public_key = public_key_of(vapid)
        self.client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT, follow_redirects=False)
        self._tokens: dict[str, tuple[float, str]] = {}

    def authorization(self, endpoint: str) -> str:
        """`vapid t=<JWT>,k=<public key>` for the endpoint's origin, reused while fresh."""
        parts = urlsplit(endpoint)
        audience = f"{parts.scheme}://{parts.netloc}"
        now = time.time()
        expires, header = self._tokens.get(audience, (0.0, ""))
        if expires - now < VAPID_TOKEN_LIFETIME / 2:
            expires = now + VAPID_TOKEN_LIFETIME
            claims = {"aud": audience, "exp": int(expires), "sub": self.subject}
            header = self.vapid.sign(claims)["Authorization"]
            self._tokens[audience] = (expires, header)
        return header

    async def send(self, delivery: Delivery) -> Result:
        target = delivery.target
        if not await endpoint_allowed(target.address):
            return Result(Outcome.GONE, "endpoint is not an https URL on a public address")
        body = encrypt(json.dumps(delivery.payload).encode(), target.p256dh, target.auth)
        headers = {
            "Authorization": self.authorization(target.address),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(delivery.ttl()),
            "Urgency": "high",
            "Topic": topic_of(delivery.call_id),
        }
        try:
            response = await self.client.post(target.address, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return Result(Outcome.RETRY, f"{type(exc).__name__}")
        return result_of(response)

    async def close(self) -> None:
        await self.client.aclose()


def result_of(response: httpx.Response) -> Result:
    """Read a push service's answer (RFC 8030): 201 sent; 404/410 gone; 429 and 5xx again later."""
    status = response.status_code
    if 200 <= status < 300:
        return Result(Outcome.SENT)
    reason = f"HTTP {status}"
    if status in (404, 410):
        return Result(Outcome.GONE, reason)
    if status == 429 or status >= 500:
        return Result(Outcome.RETRY, reason, retry_after=retry_after(response))
    return Result(Outcome.FAILED, reason)
