"""Push subscriptions over HTTP, for apps that subscribe from a background task.

`POST /api/push-subscriptions` (the same subscription object as `push_subscribe`),
`GET /api/push-subscriptions`, `DELETE /api/push-subscriptions/<id>`, each with
`Authorization: Bearer <the registration JWT>`; `GET /api/push/vapid-public-key`.
"""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

from calls.push import subscriptions
from calls.push.sender import configured_platforms
from calls.push.webpush import load_vapid, public_key_of
from calls.realtime.security import TokenInvalid, token_identity
from calls.wire import errors
from calls.wire.errors import SignalingError
from calls.wire.push import WEBPUSH, parse_subscription, subscription_id
from calls.wire.text import check_values

MAX_BODY_BYTES = 8192


def _answer(body: dict[str, Any] | list, status: int = 200) -> JsonResponse:
    response = JsonResponse(body, status=status, safe=False)
    response["Cache-Control"] = "no-store"
    return response


def _refused(status: int, code: str, message: str) -> JsonResponse:
    response = _answer({"error": code, "message": message}, status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="signaling"'
    return response


def _bearer(request: HttpRequest) -> tuple[str, str]:
    """Return the (username, user_id) a bearer token proves; raise SignalingError otherwise."""
    if settings.SIGNALING_AUTH != "token":
        raise SignalingError(errors.UNAUTHORIZED, "Push subscriptions need token authentication (SIGNALING_AUTH=token)")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SignalingError(errors.UNAUTHORIZED, "Send Authorization: Bearer <token>")
    try:
        identity = token_identity(token.strip())
    except TokenInvalid as exc:
        raise SignalingError(errors.UNAUTHORIZED, str(exc)) from None
    return identity.username, identity.user_id


def _status_of(exc: SignalingError) -> int:
    return {
        errors.UNAUTHORIZED: 401,
        errors.UNKNOWN_SUBSCRIPTION: 404,
        errors.PUSH_UNAVAILABLE: 404,
        errors.TOO_MANY_SUBSCRIPTIONS: 409,
    }.get(exc.code, 400)


def _body(request: HttpRequest) -> dict[str, Any]:
    if len(request.body) > MAX_BODY_BYTES:
        raise SignalingError(errors.INVALID_MESSAGE, "Request body too large")
    try:
        body = json.loads(request.body or b"null")
    except ValueError:
        raise SignalingError(errors.INVALID_JSON, "Body must be JSON") from None
    if not isinstance(body, dict):
        raise SignalingError(errors.INVALID_MESSAGE, "Body must be a JSON object")
    check_values(body)
    return body


@csrf_exempt  # bearer tokens, no cookies: nothing for a cross-site form to ride on
@require_http_methods(["GET", "POST"])
async def push_subscriptions(request: HttpRequest) -> JsonResponse:
    """List the caller's push subscriptions (GET), or add one (POST)."""
    try:
        username, user_id = _bearer(request)
        if request.method == "GET":
            return _answer({"subscriptions": await database_sync_to_async(subscriptions.listing)(username)})
        subscription = parse_subscription(_body(request))
        if subscription.platform not in configured_platforms():
            raise SignalingError(errors.PUSH_UNAVAILABLE, f"This server does not push to {subscription.platform}")
        if subscription.platform == WEBPUSH and not await subscriptions.endpoint_allowed(subscription.address):
            raise SignalingError(errors.INVALID_MESSAGE, "'subscription.endpoint' must be https on a public address")
        created = await database_sync_to_async(subscriptions.subscribe)(username, subscription, user_id)
    except SignalingError as exc:
        return _refused(_status_of(exc), exc.code, exc.message)
    return _answer({"subscription_id": created}, 201)


@csrf_exempt  # see push_subscriptions()
@require_http_methods(["DELETE"])
async def push_subscription(request: HttpRequest, subscription: str) -> HttpResponse:
    """Remove one of the caller's push subscriptions."""
    try:
        username, _ = _bearer(request)
        removed = await database_sync_to_async(subscriptions.unsubscribe)(username, subscription_id(subscription))
        if not removed:
            raise SignalingError(errors.UNKNOWN_SUBSCRIPTION, "You have no push subscription with that id")
    except SignalingError as exc:
        return _refused(_status_of(exc), exc.code, exc.message)
    return HttpResponse(status=204)


@require_GET
def vapid_public_key(request: HttpRequest) -> JsonResponse:
    """The application server key browsers subscribe with (base64url, an uncompressed P-256 point)."""
    vapid = load_vapid()
    if vapid is None:
        return _refused(404, errors.PUSH_UNAVAILABLE, "Web Push is not configured on this server")
    return _answer({"vapid_public_key": public_key_of(vapid)})
