"""FCM HTTP v1: one data message per push, authorised by a service account's OAuth2 access token.

Each push is `POST {base}/v1/projects/{project_id}/messages:send` carrying a data
message (every value a string: the app decides how to ring) at Android priority
high, living until the ring deadline (`ttl`), with the call id as collapse key so
a `call_ended` replaces its `incoming_call` on a device that has not fetched it yet.
The access token comes from the key's `token_uri` through google-auth (a blocking
call, so in a thread), is kept until near its expiry, and is fetched once more when
FCM refuses it early (401). FCM targets are Android apps: iOS devices use APNs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import requests
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from google.auth import exceptions as auth_errors
from google.auth.credentials import TokenState
from google.auth.transport.requests import Request as AuthRequest
from google.oauth2 import service_account

from calls.push.delivery import Delivery, Outcome, Result, retry_after
from calls.wire.push import FCM

logger = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
# Seconds to wait for FCM or the token endpoint: google-auth's own default (120 s) outlasts any ring.
REQUEST_TIMEOUT = 10.0
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


def load_service_account(value: str) -> dict[str, Any]:
    """Read SIGNALING_FCM_CREDENTIALS: a service account's JSON key, or the path of its file."""
    try:
        info = json.loads(value if value.lstrip().startswith("{") else Path(value).read_text())
    except (OSError, ValueError) as exc:
        raise ImproperlyConfigured(f"SIGNALING_FCM_CREDENTIALS is not a service account key: {exc}") from None
    if not isinstance(info, dict) or not info.get("project_id"):
        raise ImproperlyConfigured("SIGNALING_FCM_CREDENTIALS needs a service account key with a project_id")
    return info


class AccessToken:
    """The service account's OAuth2 access token: fetched when missing or near expiry, one fetch at a time."""

    def __init__(self, credentials: service_account.Credentials) -> None:
        self.credentials = credentials
        self.session = requests.Session()
        self.request = functools.partial(AuthRequest(self.session), timeout=REQUEST_TIMEOUT)
        self.lock = asyncio.Lock()

    async def get(self, refused: str | None = None) -> str:
        """Return a fresh token; a new one when `refused` is still the one kept (FCM refused it)."""
        async with self.lock:
            token = self.credentials.token
            # Several pushes that met the same refusal wait here; only the first fetches a new token.
            if token is None or token == refused or self.credentials.token_state is not TokenState.FRESH:
                await asyncio.to_thread(self.credentials.refresh, self.request)
            return self.credentials.token

    def close(self) -> None:
        self.session.close()


class FcmProvider:
    """Sends data messages to Android apps through FCM."""

    platform = FCM

    def __init__(self, credentials: service_account.Credentials, project_id: str, base_url: str) -> None:
        self.access_token = AccessToken(credentials)
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT, follow_redirects=False)

    @classmethod
    def from_settings(cls) -> FcmProvider:
        info = load_service_account(settings.SIGNALING_FCM_CREDENTIALS)
        credentials = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
        return cls(credentials, info["project_id"], settings.SIGNALING_FCM_BASE_URL)

    async def send(self, delivery: Delivery) -> Result:
        message = message_of(delivery)

        async def post(token: str) -> httpx.Response:
            return await self.client.post(self.url, json=message, headers={"Authorization": f"Bearer {token}"})

        try:
            token = await self.access_token.get()
            response = await post(token)
            if response.status_code == 401:
                # The token expired or was revoked before the expiry it came with: a new one, one more try.
                response = await post(await self.access_token.get(refused=token))
        except (httpx.HTTPError, auth_errors.TransportError) as exc:
            return Result(Outcome.RETRY, type(exc).__name__)
        except auth_errors.RefreshError as exc:
            logger.warning("fcm access token refused", extra={"call": delivery.call_id, "error": str(exc)})
            return Result(Outcome.RETRY if exc.retryable else Outcome.FAILED, "access token refused")
        return result_of(response)

    async def close(self) -> None:
        await self.client.aclose()
        self.access_token.close()


def message_of(delivery: Delivery) -> dict[str, Any]:
    """The `messages:send` body: a high-priority Android data message living until the ring deadline."""
    data = {key: value if isinstance(value, str) else json.dumps(value) for key, value in delivery.payload.items()}
    android = {"priority": "high", "ttl": f"{delivery.ttl()}s", "collapse_key": delivery.call_id}
    return {"message": {"token": delivery.target.address, "data": data, "android": android}}


@dataclass(frozen=True, slots=True)
class FcmError:
    """What an FCM error answer says: its code, and the request fields a BadRequest detail names."""

    code: str = ""
    # The FcmError detail's errorCode (UNREGISTERED, INVALID_ARGUMENT, ...), if there was one.
    fcm_code: str = ""
    fields: tuple[str, ...] = ()

    @classmethod
    def of(cls, response: httpx.Response) -> FcmError:
        try:
            body = response.json()
        except ValueError:
            return cls()
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls()
        fcm_code, fields = "", []
        for detail in error.get("details") or []:
            if not isinstance(detail, dict):
                continue
            if detail.get("@type") == FCM_ERROR:
                fcm_code = str(detail.get("errorCode", ""))
            elif detail.get("@type") == BAD_REQUEST:
                fields += [str(v.get("field", "")) for v in detail.get("fieldViolations") or [] if isinstance(v, dict)]
        return cls(fcm_code or str(error.get("status", "")), fcm_code, tuple(fields))

    def token_is_dead(self, status: int) -> bool:
        """Whether FCM says the registration token will never work: unregistered, or no token at all.

        A 404 counts only in FCM's error format: a wrong SIGNALING_FCM_BASE_URL must not remove
        every token. FCM answers INVALID_ARGUMENT both for a token that is no registration token
        and for a bad message (its error codes page): a bad message comes with a BadRequest detail
        naming the field, a bad token with an FcmError detail alone (or a violation of `message.token`).
        """
        if self.fcm_code == "UNREGISTERED" or (status == 404 and self.code):
            return True
        if status != 400:
            return False
        return "message.token" in self.fields or (self.fcm_code == "INVALID_ARGUMENT" and not self.fields)


def result_of(response: httpx.Response) -> Result:
    """Read FCM's answer: 200 sent; an unregistered or invalid token gone; 429 and 5xx again later."""
    status = response.status_code
    if status == 200:
        return Result(Outcome.SENT)
    error = FcmError.of(response)
    reason = error.code or f"HTTP {status}"
    if error.token_is_dead(status):
        return Result(Outcome.GONE, reason)
    if status == 429 or status >= 500:
        return Result(Outcome.RETRY, reason, retry_after=retry_after(response))
    # SENDER_ID_MISMATCH (403) stays a failure: the key of another project would get it for every
    # token, and removing them all would outlast the fix of the configuration.
    return Result(Outcome.FAILED, reason)
