"""A browser's push service on loopback, and the browser's side of a subscription.

`PushService` stands in for the service behind a Web Push endpoint: it records
each POST, checks it as RFC 8030/8292 say (the VAPID JWT and its claims, the
headers), decrypts the payload with the subscription's private key (RFC 8291),
and answers with the status a test sets for that endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class BrowserSubscription:
    """What a browser keeps for one subscription: its private key and auth secret."""

    endpoint: str
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    def to_json(self) -> dict[str, Any]:
        """`PushSubscription.toJSON()`, as a page sends it."""
        public = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": b64url(public), "auth": b64url(self.auth)},
        }

    def decrypt(self, body: bytes) -> dict[str, Any]:
        return json.loads(http_ece.decrypt(body, private_key=self.key, auth_secret=self.auth, version="aes128gcm"))


@dataclass
class Push:
    """One POST the push service received."""

    path: str
    headers: dict[str, str]
    body: bytes

    def vapid(self, server_public_key: str, subject: str, audience: str) -> dict[str, Any]:
        """Check the VAPID authorization (RFC 8292) and return its claims."""
        scheme, _, params = self.headers["authorization"].partition(" ")
        assert scheme == "vapid", self.headers["authorization"]
        fields = dict(part.strip().split("=", 1) for part in params.split(","))
        assert fields["k"] == server_public_key
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(fields["k"]))
        claims = jwt.decode(fields["t"], public, algorithms=["ES256"], audience=audience)
        assert claims["sub"] == subject
        return claims


class PushService:
    """An HTTP server on 127.0.0.1 standing in for browsers' push services."""

    def __init__(self) -> None:
        self.pushes: queue.Queue[Push] = queue.Queue()
        # The status to answer per endpoint path (201 unless set).
        self.statuses: dict[str, int] = {}
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {name.lower(): value for name, value in self.headers.items()}
                service.pushes.put(Push(self.path, headers, body))
                self.send_response(service.statuses.get(self.path, 201))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def subscription(self, name: str) -> BrowserSubscription:
        return BrowserSubscription(f"{self.origin}/push/{name}")

    async def next_push(self, timeout: float = 10.0) -> Push:
        """Wait for the next POST."""
        return await asyncio.to_thread(self.pushes.get, True, timeout)

    def received(self) -> int:
        return self.pushes.qsize()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
