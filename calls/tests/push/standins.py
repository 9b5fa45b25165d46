"""Stand-ins for the push services, on 127.0.0.1: Google's token endpoint and FCM, and APNs.

Each is a small ASGI app served by hypercorn (APNs over HTTP/2 with TLS, from a
trustme test CA). It checks every request as the service documents it and refuses
what the service would refuse, with the service's own error; a request that
passes is answered with what the test queued, or the service's success. Every
request is recorded, for the test to read what went over the wire.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import jwt
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypercorn.asyncio import serve
from hypercorn.config import Config

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Google's token endpoint: the audience of every service account assertion, wherever it is posted.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


@dataclass(frozen=True)
class Received:
    """One request as it arrived."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    http_version: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


class StandIn:
    """An ASGI app that records each request and answers it through `answer`."""

    def __init__(self) -> None:
        self.url = ""
        self.received: list[Received] = []
        self.queued: list[Answer] = []

    def answer_next(self, *answers: Answer) -> None:
        """Answer the next requests that pass the checks with these, in order."""
        self.queued.extend(answers)

    def answer(self, request: Received) -> Answer:
        return self.queued.pop(0) if self.queued else self.success(request)

    def success(self, request: Received) -> Answer:
        return Answer()

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        request = Received(scope["method"], scope["path"], headers, body, scope["http_version"])
        self.received.append(request)
        answer = self.answer(request)
        response_headers = [(b"content-type", b"application/json")]
        response_headers += [(name.encode(), value.encode()) for name, value in answer.headers.items()]
        await send({"type": "http.response.start", "status": answer.status, "headers": response_headers})
        await send({"type": "http.response.body", "body": json.dumps(answer.body).encode() if answer.body else b""})


@asynccontextmanager
async def serving(app: StandIn, certificate: trustme.LeafCert | None = None) -> AsyncIterator[StandIn]:
    """Serve a stand-in on a fresh 127.0.0.1 port (over TLS with `certificate`) and set its `url`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # Listening before hypercorn runs: a first request waits in the backlog instead of being refused.
    sock.listen()
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.errorlog = None
    config.graceful_timeout = 1
    stop = asyncio.Event()
    with ExitStack() as files:
        if certificate is not None:
            config.certfile = config.keyfile = files.enter_context(
                certificate.private_key_and_cert_chain_pem.tempfile()
            )
        server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))
        app.url = f"{'https' if certificate else 'http'}://127.0.0.1:{port}"
        try:
            yield app
        finally:
            stop.set()
            await server


# --- Google: the OAuth2 token endpoint and FCM HTTP v1 -----------------------------------------


def service_account_key(key: rsa.RSAPrivateKey, project_id: str, client_email: str, token_uri: str) -> dict[str, Any]:
    """A service account's JSON key as the Google Cloud console issues it, for a test key."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": "test-key-1",
        "private_key": pem.decode(),
        "client_email": client_email,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }


def google_error(code: int, status: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    """An error body in Google's format (google.rpc.Status), as FCM answers."""
    return {"error": {"code": code, "message": message, "status": status, "details": list(details)}}


def fcm_error(code: int, status: str, error_code: str, message: str = "") -> dict[str, Any]:
    """An FCM error answer whose details carry an FcmError with `error_code`."""
    detail = {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}
    return google_error(code, status, message or error_code, detail)


def bad_request(field_path: str, description: str) -> dict[str, Any]:
    """FCM's answer to a message with a bad field: INVALID_ARGUMENT with a BadRequest detail naming it."""
    detail = {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": field_path, "description": description}],
    }
    return google_error(400, "INVALID_ARGUMENT", description, detail)


# Data keys FCM reserves (HTTP v1 reference, Message.data), whole or as prefixes.
RESERVED_DATA_KEYS = ("from", "notification", "message_type")
RESERVED_DATA_PREFIXES = ("google", "gcm")
MESSAGE_FIELDS = {"token", "data", "notification", "android", "apns", "webpush", "fcm_options", "name"}
ANDROID_FIELDS = {
    "collapse_key",
    "priority",
    "ttl",
    "restricted_package_name",
    "data",
    "notification",
    "fcm_options",
    "direct_boot_ok",
}


def message_problem(body: Any) -> tuple[str, str]:
    """The field FCM would refuse in a `messages:send` body and why, or ("", "")."""
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, dict) or set(body) != {"message"}:
        return "message", "Invalid JSON payload received."
    if unknown := set(message) - MESSAGE_FIELDS:
        return "message", f"Unknown name {sorted(unknown)[0]!r} at 'message'"
    if not isinstance(message.get("token"), str) or not message["token"]:
        return "message.token", "A message needs a registration token."
    data = message.get("data", {})
    if not isinstance(data, dict):
        return "message.data", "Invalid value at 'message.data'"
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            return f"message.data[{index}].value", f"Invalid value at 'message.data[{index}].value' (TYPE_STRING)"
        if key in RESERVED_DATA_KEYS or key.startswith(RESERVED_DATA_PREFIXES):
            return f"message.data[{index}].key", f"Reserved data key {key!r}"
    android = message.get("android", {})
    if unknown := set(android) - ANDROID_FIELDS:
        return "message.android", f"Unknown name {sorted(unknown)[0]!r} at 'message.android'"
    if android.get("priority", "normal") not in ("normal", "high"):
        return "message.android.priority", "Invalid value at 'message.android.priority'"
    if "ttl" in android and not re.fullmatch(r"\d+(\.\d{1,9})?s", str(android["ttl"])):
        return "message.android.ttl", "Invalid value at 'message.android.ttl' (Duration)"
    return "", ""


class GoogleStandIn(StandIn):
    """Google's OAuth2 token endpoint (`/token`) and FCM's `messages:send`, for one service account."""

    def __init__(self, project_id: str, client_email: str, public_key: rsa.RSAPublicKey) -> None:
        super().__init__()
        self.project_id = project_id
        self.client_email = client_email
        self.public_key = public_key
        # Access tokens handed out, in order.
        self.issued: list[str] = []

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    @property
    def token_requests(self) -> list[Received]:
        return [r for r in self.received if r.path == "/token"]

    @property
    def fcm_requests(self) -> list[Received]:
        return [r for r in self.received if r.path != "/token"]

    def answer(self, request: Received) -> Answer:
        if request.path == "/token":
            return self.grant(request)
        if request.method != "POST" or request.path != f"/v1/projects/{self.project_id}/messages:send":
            return Answer(403, google_error(403, "PERMISSION_DENIED", "Permission denied on resource project."))
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or token not in self.issued:
            return Answer(401, google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."))
        if not request.headers.get("content-type", "").startswith("application/json"):
            return Answer(400, google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received."))
        field_path, description = message_problem(request.json())
        if field_path:
            return Answer(400, bad_request(field_path, description))
        return super().answer(request)

    def success(self, request: Received) -> Answer:
        return Answer(200, {"name": f"projects/{self.project_id}/messages/0:{len(self.received)}"})

    def grant(self, request: Received) -> Answer:
        """Check a JWT bearer grant (RFC 7523) as Google does, and hand out an access token."""
        form = dict(parse_qsl(request.body.decode()))
        if request.method != "POST" or form.get("grant_type") != JWT_BEARER:
            return Answer(400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type."})
        try:
            header = jwt.get_unverified_header(form.get("assertion", ""))
            claims = jwt.decode(
                form.get("assertion", ""),
                self.public_key,
                algorithms=["RS256"],
                audience=GOOGLE_TOKEN_AUDIENCE,
                issuer=self.client_email,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            )
        except jwt.InvalidTokenError as exc:
            return Answer(400, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"})
        if header.get("kid") != "test-key-1" or claims["exp"] - claims["iat"] > 3600:
            return Answer(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        if claims["scope"] != FCM_SCOPE:
            return Answer(400, {"error": "invalid_scope", "error_description": "Invalid OAuth scope."})
        token = f"ya29.test-{len(self.issued) + 1}"
        self.issued.append(token)
        return Answer(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})


# --- APNs -------------------------------------------------------------------------------------


def apns_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A signing key as Apple issues it (.p8): PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def apns_error(status: int, reason: str) -> Answer:
    """An APNs refusal: its `reason`, and for 410 when Apple last knew the token valid (milliseconds)."""
    body: dict[str, Any] = {"reason": reason}
    if status == 410:
        body["timestamp"] = int(time.time() * 1000)
    return Answer(status, body)


# Largest payloads Apple accepts: 5 KB for VoIP pushes, 4 KB for the others.
VOIP_PAYLOAD_MAX = 5120
PAYLOAD_MAX = 4096
# How long Apple honours a provider token.
PROVIDER_TOKEN_LIFETIME = 3600


class ApnsStandIn(StandIn):
    """APNs' `POST /3/device/<token>`, for one signing key, team and bundle id."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey, key_id: str, team_id: str, topic: str) -> None:
        super().__init__()
        self.public_key = public_key
        self.key_id = key_id
        self.team_id = team_id
        self.topic = topic
        # Apple's clock, to judge a provider token's age.
        self.now: Callable[[], float] = time.time

    def answer(self, request: Received) -> Answer:
        if request.method != "POST":
            return apns_error(405, "MethodNotAllowed")
        if not request.path.startswith("/3/device/"):
            return apns_error(404, "BadPath")
        if not re.fullmatch(r"/3/device/[0-9a-f]{64,200}", request.path):
            return apns_error(400, "BadDeviceToken")
        problem = self.token_problem(request.headers.get("authorization", ""))
        if problem:
            return apns_error(403, problem)
        problem = self.headers_problem(request)
        if problem:
            return apns_error(400, problem)
        return super().answer(request)

    def token_problem(self, authorization: str) -> str:
        """Why Apple would refuse this provider token, or ""."""
        scheme, _, token = authorization.partition(" ")
        if scheme != "bearer" or not token:
            return "MissingProviderToken"
        try:
            header = jwt.get_unverified_header(token)
            # Its age is judged below, on this stand-in's clock.
            options = {"require": ["iss", "iat"], "verify_iat": False}
            claims = jwt.decode(token, self.public_key, algorithms=["ES256"], options=options)
        except jwt.InvalidTokenError:
            return "InvalidProviderToken"
        if header.get("kid") != self.key_id or claims["iss"] != self.team_id or claims["iat"] > self.now() + 60:
            return "InvalidProviderToken"
        if self.now() - claims["iat"] > PROVIDER_TOKEN_LIFETIME:
            return "ExpiredProviderToken"
        return ""

    def headers_problem(self, request: Received) -> str:
        """Why Apple would refuse this push's headers or payload, or ""."""
        headers = request.headers
        voip = headers.get("apns-topic") == f"{self.topic}.voip"
        if headers.get("apns-topic") not in (self.topic, f"{self.topic}.voip"):
            return "TopicDisallowed"
        if headers.get("apns-push-type") != ("voip" if voip else "alert"):
            return "InvalidPushType"
        if headers.get("apns-priority", "10") not in ("5", "10"):
            return "BadPriority"
        if not headers.get("apns-expiration", "0").isdigit():
            return "BadExpirationDate"
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return "BadCollapseId"
        if not request.body:
            return "PayloadEmpty"
        if len(request.body) > (VOIP_PAYLOAD_MAX if voip else PAYLOAD_MAX):
            return "PayloadTooLarge"
        try:
            payload = request.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return "PayloadEmpty"
        # Priority 10 alerts must show something (Apple: "must trigger an alert, sound, or badge").
        aps = payload.get("aps", {})
        if not voip and headers.get("apns-priority", "10") == "10" and not aps.get("alert"):
            return "BadPriority"
        return ""

    def success(self, request: Received) -> Answer:
        return Answer(200, headers={"apns-id": str(uuid.uuid4())})
