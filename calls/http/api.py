"""The account API: POST /api/token and POST /api/users. JSON in, JSON out.

Async views: the password work runs in a slot on a pool thread (accounts.aissue_token),
so a flood of logins neither queues up nor holds the thread of the WebSocket side's
database work.
"""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from calls.http import accounts
from calls.http.accounts import AccountError
from calls.realtime.security import request_client_address

MAX_BODY_BYTES = 4096


def _credentials(request: HttpRequest) -> tuple[str, str]:
    if len(request.body) > MAX_BODY_BYTES:
        raise AccountError("invalid_request", "Request body too large", 413)
    try:
        body: Any = json.loads(request.body or b"null")
    except ValueError:
        raise AccountError("invalid_json", "Body must be JSON", 400) from None
    if not isinstance(body, dict):
        raise AccountError("invalid_request", "Body must be a JSON object", 400)
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
        raise AccountError("invalid_request", "'username' and 'password' are required strings", 400)
    try:
        # JSON may carry lone surrogates ("\ud800"), which no database or hasher takes.
        username.encode(), password.encode()
    except UnicodeEncodeError:
        raise AccountError("invalid_request", "'username' and 'password' must be valid Unicode text", 400) from None
    return username, password


def _error(exc: AccountError) -> JsonResponse:
    response = JsonResponse({"error": exc.code, "message": exc.message}, status=exc.status)
    if exc.retry_after is not None:
        response["Retry-After"] = str(exc.retry_after)
    response["Cache-Control"] = "no-store"
    return response


@csrf_exempt  # token API for apps: no cookies, no session, so no CSRF exposure
@require_POST
async def token(request: HttpRequest) -> JsonResponse:
    """Exchange a username and password for a registration token."""
    try:
        username, password = _credentials(request)
        issued = await accounts.aissue_token(username, password, request_client_address(request))
    except AccountError as exc:
        return _error(exc)
    response = JsonResponse({"token": issued.token, "expires_at": issued.expires_at.isoformat()})
    response["Cache-Control"] = "no-store"
    return response


@csrf_exempt  # see token()
@require_POST
async def users(request: HttpRequest) -> JsonResponse:
    """Create an account, when SIGNALING_ALLOW_SIGNUP is on."""
    try:
        username, password = _credentials(request)
        created = await accounts.acreate_account(username, password, request_client_address(request))
    except AccountError as exc:
        return _error(exc)
    return JsonResponse({"username": created}, status=201)
