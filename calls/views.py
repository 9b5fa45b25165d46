"""HTTP views: thin wrappers that unpack the request and call one service."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Answer that the process is up, without touching the database."""
    return JsonResponse({"status": "ok"})
