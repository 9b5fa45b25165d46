"""Operations endpoints: readiness (/readyz) and Prometheus metrics (/metrics).

/healthz (calls/views.py) only says the process answers. /readyz says it can
do its work: the database answers a query and a message sent through the
channel layer comes back. Each check has a deadline, so a hung dependency
gives a quick 503 naming the check, not a hung probe. Failure details go to
the log, not to the (public) response.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily

from calls.callflow.states import CallStatus
from calls.models import Call
from calls.observability.metrics import REGISTRY

logger = logging.getLogger(__name__)

# Seconds each readiness check may take before it counts as failed.
CHECK_TIMEOUT = 2.0


def _query_database() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        # This runs on a pool thread, not the thread the consumers' queries use:
        # leave no connection behind on it.
        connection.close()


async def check_database() -> None:
    """Run one query on a connection of its own (a stuck database must not hold the shared thread)."""
    await sync_to_async(_query_database, thread_sensitive=False)()


@dataclass
class _Probe:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    channel: str = ""


# One probe channel per event loop, reused: on the Redis pub/sub layer every new
# channel is a subscription, which a check per channel would leave behind.
_probes: dict[asyncio.AbstractEventLoop, _Probe] = {}


async def check_channel_layer() -> None:
    """Send a message to a channel of this process and receive it back through the layer."""
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer is configured")
    loop = asyncio.get_running_loop()
    probe = _probes.setdefault(loop, _Probe())
    async with probe.lock:
        try:
            if not probe.channel:
                probe.channel = await layer.new_channel(prefix="readyz.")
            token = secrets.token_hex(8)
            await layer.send(probe.channel, {"type": "readyz.probe", "token": token})
            # A probe that timed out earlier may have left its message behind.
            while (await layer.receive(probe.channel)).get("token") != token:
                pass
        except BaseException:
            # A cancelled receive unsubscribes the channel (pub/sub layer): start afresh next time.
            probe.channel = ""
            raise


CHECKS: dict[str, Callable[[], Awaitable[None]]] = {
    "database": check_database,
    "channel_layer": check_channel_layer,
}


async def _run_check(name: str, check: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await check()
    except TimeoutError:
        logger.warning("readiness check timed out", extra={"check": name, "timeout_s": CHECK_TIMEOUT})
        return {"ok": False, "error": "timeout"}
    except Exception as exc:  # noqa: BLE001 - any failure of a dependency means not ready
        logger.warning("readiness check failed", extra={"check": name, "error": type(exc).__name__, "detail": str(exc)})
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1)}


@require_GET
async def readyz(request: HttpRequest) -> JsonResponse:
    """200 when the database and the channel layer both answer in time, else 503 naming the failed check."""
    results = await asyncio.gather(*(_run_check(name, check) for name, check in CHECKS.items()))
    checks = dict(zip(CHECKS, results, strict=True))
    ready = all(result["ok"] for result in results)
    return JsonResponse({"status": "ready" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


def _authorized(request: HttpRequest, token: str) -> bool:
    supplied = request.headers.get("Authorization", "")
    return hmac.compare_digest(supplied.encode(), f"Bearer {token}".encode())


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics: with SIGNALING_METRICS_TOKEN set, for its bearer only; without, only in DEBUG."""
    token = settings.SIGNALING_METRICS_TOKEN
    if token:
        if not _authorized(request, token):
            response = HttpResponse("Unauthorized\n", status=401, content_type="text/plain")
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    elif not settings.DEBUG:
        raise Http404("Not found")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


class CallStatusCollector:
    """`signaling_calls{status}`: calls in the database by status, counted at scrape time.

    One aggregate query per scrape (status is indexed). If the database cannot
    answer, the family is left out and `signaling_calls_scrape_error` is 1.
    """

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("signaling_calls", "Calls in the database by status.", labels=["status"])
        yield GaugeMetricFamily("signaling_calls_scrape_error", "1 if counting calls failed at this scrape.")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        error = GaugeMetricFamily("signaling_calls_scrape_error", "1 if counting calls failed at this scrape.")
        try:
            counts = dict(Call.objects.order_by().values_list("status").annotate(n=Count("pk")))
        except DatabaseError as exc:
            logger.warning("counting calls by status failed", extra={"error": type(exc).__name__, "detail": str(exc)})
            error.add_metric([], 1)
            yield error
            return
        calls = GaugeMetricFamily("signaling_calls", "Calls in the database by status.", labels=["status"])
        for status in CallStatus.values:
            calls.add_metric([status], counts.get(status, 0))
        error.add_metric([], 0)
        yield calls
        yield error


REGISTRY.register(CallStatusCollector())
