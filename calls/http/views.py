"""HTTP views: thin wrappers that unpack the request and call one service."""

from __future__ import annotations

import logging

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from calls.realtime.ice import ice_servers_for
from calls.realtime.security import TokenInvalid, verify_token

logger = logging.getLogger(__name__)

# Served from the site's root, not /static/: a worker controls only pages under its own path.
SERVICE_WORKER = settings.BASE_DIR / "static" / "calls" / "sw.js"
# The wire protocol's machine-readable spec, the one source of docs/protocol.md.
PROTOCOL_SPEC = settings.BASE_DIR / "protocol" / "asyncapi.yaml"


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Answer that the process is up, without touching the database."""
    return JsonResponse({"status": "ok"})


def _page_policy(request: HttpRequest) -> str:
    # The page loads only its own files and talks only to this host's socket;
    # ws: and wss: are named because older browsers do not count them as 'self'.
    host = request.get_host()
    return "; ".join(
        [
            "default-src 'self'",
            f"connect-src 'self' ws://{host} wss://{host}",
            "img-src 'self' data:",
            "media-src 'self' blob: mediastream:",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    """Serve the browser test page: register, see who is online, call."""
    response = render(request, "calls/index.html")
    response["Content-Security-Policy"] = _page_policy(request)
    response["Permissions-Policy"] = "camera=(self), microphone=(self)"
    return response


@require_GET
def service_worker(request: HttpRequest) -> HttpResponse:
    """Serve the page's service worker, which shows the pushes that ring this device."""
    response = HttpResponse(SERVICE_WORKER.read_bytes(), content_type="application/javascript")
    response["Service-Worker-Allowed"] = "/"
    # Browsers check for a new worker on every visit; `no-cache` makes them ask the server.
    response["Cache-Control"] = "no-cache"
    response["Content-Security-Policy"] = "default-src 'self'"
    return response


@require_GET
def protocol_spec(request: HttpRequest) -> HttpResponse:
    """Serve the wire protocol's AsyncAPI spec, for client generators and SDK authors."""
    response = HttpResponse(PROTOCOL_SPEC.read_bytes(), content_type="application/yaml; charset=utf-8")
    # A public document: tools in a browser (AsyncAPI Studio, generators) may fetch it from any site.
    response["Access-Control-Allow-Origin"] = "*"
    return response


def _no_store(response: JsonResponse) -> JsonResponse:
    response["Cache-Control"] = "no-store"
    return response


def _refused(status: int, code: str, message: str) -> JsonResponse:
    response = _no_store(JsonResponse({"error": code, "message": message}, status=status))
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="signaling"'
    return response


@require_GET
async def ice_servers(request: HttpRequest) -> JsonResponse:
    """Hand out the ICE servers (and fresh TURN credentials) to the holder of a token."""
    if settings.SIGNALING_AUTH != "token":
        # In open mode a username and user_id prove nothing: every client sees both
        # in online_users. Registered sessions get the ICE servers in `registered`.
        return _refused(
            403,
            "token_required",
            "In open mode ICE servers come in the registered message; this endpoint needs SIGNALING_AUTH=token",
        )
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _refused(401, "unauthorized", "Send Authorization: Bearer <token>")
    try:
        username = verify_token(token.strip())
    except TokenInvalid as exc:
        return _refused(401, "unauthorized", str(exc))
    logger.debug("ICE servers handed out", extra={"user": username})
    return _no_store(JsonResponse({"ice_servers": ice_servers_for(username)}))
