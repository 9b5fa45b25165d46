"""The measurements: each one drives load generators against a running server.

Server CPU is read from /proc at the instants the load generators start and
stop counting, so "messages per server CPU-second" is the server's own cost,
however busy the shared machine is.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import connect

from bench.loadgen import Workers
from bench.services import Process

# Seconds between the load generators' start and the measured window.
WARMUP = 2.0
# Seconds over which the CPU use of idle connections is measured.
IDLE_WINDOW = 15.0


def percentile(values: list[float], share: float) -> float:
    """Return the nearest-rank percentile (share in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def wait_idle(server: Process, threshold: float = 0.03, window: float = 0.5, timeout: float = 60.0) -> float:
    """Wait until the server uses less than `threshold` of a core; return seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        before = server.cpu_seconds()
        time.sleep(window)
        if (server.cpu_seconds() - before) / window < threshold:
            break
    return time.monotonic() - began


def generator_split(results: list[dict[str, Any]], seconds: float) -> list[float]:
    """Each load generator's CPU use over the window, as a share of one core."""
    return [round(r["cpu"] / seconds, 2) for r in results]


def relay(
    server: Process,
    kind: str,
    prefix: str,
    pairs: int,
    window: int,
    workers: int,
    seconds: float,
    during: Callable[[float], subprocess.Popen] | None = None,
    helper: Process | None = None,
    second: Process | None = None,
) -> dict[str, Any]:
    """Pairs ping-pong candidates flat out; messages relayed per second of server CPU.

    `helper` is a process the server relies on (redis-server): its CPU time over
    the same window is reported too, and a figure with both. With `second` (a
    server sharing the first one's Redis and database), each pair's second client
    connects there, every message crosses between the processes, and the server
    CPU is both processes'.
    """
    servers = [server] if second is None else [server, second]
    specs = [
        {
            "url": f"ws://127.0.0.1:{server.port}/",
            "url_b": f"ws://127.0.0.1:{second.port}/" if second else None,
            "kind": kind,
            "pairs": n,
            "window": window,
            "prefix": f"{prefix}{w}",
        }
        for w, n in enumerate(split(pairs, workers))
    ]
    with Workers("relay", specs) as gen:
        gen.ready()
        start_at = time.time() + WARMUP
        stop_at = start_at + seconds
        gen.start({"start_at": start_at, "stop_at": stop_at})
        sleep_until(start_at)
        cpu0 = sum(s.cpu_seconds() for s in servers)
        helper0 = helper.cpu_seconds() if helper else 0.0
        side = during(seconds) if during else None
        sleep_until(stop_at)
        cpu1 = sum(s.cpu_seconds() for s in servers)
        helper_cpu = helper.cpu_seconds() - helper0 if helper else 0.0
        results = gen.done(timeout=seconds + 60)
        if side is not None:
            side.wait(60)
    received = sum(r["received"] for r in results)
    server_cpu = cpu1 - cpu0
    with_helper = {}
    if helper is not None:
        with_helper = {
            f"{helper.name}_cpu_s": round(helper_cpu, 3),
            f"msgs_per_cpu_s_with_{helper.name}": round(received / (server_cpu + helper_cpu)),
        }
    return {
        "pairs": pairs,
        "window": window,
        "seconds": seconds,
        "messages": received,
        "server_cpu_s": round(server_cpu, 3),
        "msgs_per_cpu_s": round(received / server_cpu) if server_cpu else None,
        "msgs_per_s": round(received / seconds),
        "server_core_share": round(server_cpu / seconds, 2),
        "generator_core_share": generator_split(results, seconds),
        "unexpected_messages": sum(r["other"] for r in results),
        "errors": [e for r in results for e in r["errors"]][:5],
        **with_helper,
    }


def round_trip(
    server: Process, kind: str, prefix: str, pairs: int, rate_per_pair: float, seconds: float
) -> dict[str, Any]:
    """Round-trip time of a candidate relayed there and back, at a fixed moderate rate."""
    specs = [
        {
            "url": f"ws://127.0.0.1:{server.port}/",
            "kind": kind,
            "pairs": pairs,
            "prefix": prefix,
            "rate_per_pair": rate_per_pair,
        }
    ]
    with Workers("rtt", specs) as gen:
        gen.ready()
        start_at = time.time() + WARMUP
        gen.start({"start_at": start_at, "stop_at": start_at + seconds})
        sleep_until(start_at)
        cpu0 = server.cpu_seconds()
        results = gen.done(timeout=seconds + 120)
        cpu1 = server.cpu_seconds()
    samples = [s for r in results for s in r["samples"]]
    return {
        "pairs": pairs,
        "round_trips_per_s": round(pairs * rate_per_pair),
        "samples": len(samples),
        "p50_ms": round(percentile(samples, 0.5) * 1000, 2),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 2),
        "max_ms": round(max(samples) * 1000, 2),
        "server_core_share": round((cpu1 - cpu0) / seconds, 2),
        "generator_core_share": generator_split(results, seconds),
    }


def call_setup(server: Process, prefix: str, concurrency: int, rounds: int, plain: bool = False) -> dict[str, Any]:
    """Call set-up time with `concurrency` set-ups started at the same instant.

    The clients are the `signaling_client` library's, or with `plain`, plain
    `websockets` sockets speaking v1 messages (which the v1 design's server understands too).
    """
    spec = {
        "url": f"ws://127.0.0.1:{server.port}/",
        "prefix": prefix,
        "concurrency": concurrency,
        "rounds": rounds,
    }
    with Workers("plain_setup" if plain else "call_setup", [spec]) as gen:
        gen.ready()
        wait_idle(server)
        start_at = time.time() + 0.2
        gen.start({"start_at": start_at})
        sleep_until(start_at)
        cpu0 = server.cpu_seconds()
        (result,) = gen.done(timeout=300)
        cpu1 = server.cpu_seconds()
    totals, incoming = result["totals"], result["to_incoming"]
    return {
        "concurrency": concurrency,
        "set_ups": len(totals),
        "p50_ms": round(percentile(totals, 0.5) * 1000, 1),
        "p99_ms": round(percentile(totals, 0.99) * 1000, 1),
        "max_ms": round(max(totals) * 1000, 1),
        "to_incoming_p50_ms": round(percentile(incoming, 0.5) * 1000, 1),
        "server_cpu_ms_per_set_up": round((cpu1 - cpu0) / len(totals) * 1000, 2),
    }


def storm(
    server: Process,
    prefix: str,
    clients: int,
    batch: int,
    workers: int,
    timeout: float,
    hold: bool = False,
    wait_for_list: bool = True,
) -> tuple[dict[str, Any], Workers | None]:
    """Sign `clients` in, in batches of `batch`; time until every client has seen the complete list.

    Without `wait_for_list` a client is done when registered. With `hold`, the
    clients stay connected and the generators are returned (the caller releases them).
    """
    names = [f"{prefix}{i:05d}" for i in range(clients)]
    specs = [
        {
            "url": f"ws://127.0.0.1:{server.port}/",
            "names": names[w::workers],
            "batch": max(1, batch // workers),
            "total": clients if wait_for_list else 0,
            "timeout": timeout,
            "source_offset": w,
        }
        for w in range(workers)
    ]
    gen = Workers("storm", specs)
    try:
        gen.ready()
        start_at = time.time() + 0.5
        gen.start({"start_at": start_at})
        sleep_until(start_at)
        cpu0 = server.cpu_seconds()
        results = gen.done(timeout=timeout + 120)
        cpu1 = server.cpu_seconds()
    except BaseException:
        gen.release()
        raise
    completed = [t for r in results for t in r["completed"]]
    elapsed = time.time() - start_at
    figures = {
        "clients": clients,
        "batch": batch,
        "complete_clients": len(completed),
        "seconds": round(max(completed) - start_at, 2) if len(completed) == clients else None,
        "all_registered_s": round(max(r["registered_last"] for r in results) - start_at, 2),
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "generator_core_share": generator_split(results, elapsed),
    }
    if not hold:
        gen.release()
        return figures, None
    return figures, gen


def idle_memory(server: Process, prefix: str, clients: int, workers: int) -> dict[str, Any]:
    """Resident memory per idle registered connection: RSS delta of the server / clients.

    Run it on a server whose presence broadcasts are deferred past the
    measurement (a long SIGNALING_PRESENCE_WINDOW_MS): full online lists to
    thousands of v1 clients do not settle within the benchmark's budget (the
    sign-in storm measures them), and their transient buffers are not a
    per-connection cost.
    """
    # Warm up: a first sign-in loads every code path, so the baseline is not the import cost.
    storm(server, f"{prefix}warm", 20, 20, 1, timeout=60, wait_for_list=False)
    wait_idle(server)
    rss0 = server.rss_bytes()
    figures, gen = storm(server, prefix, clients, 100, workers, timeout=300, hold=True, wait_for_list=False)
    try:
        wait_idle(server, threshold=0.05, timeout=120)
        rss1 = server.rss_bytes()
        # Long enough to include two lease renewals and a few reaper sweeps.
        cpu0 = server.cpu_seconds()
        time.sleep(IDLE_WINDOW)
        idle_cpu = (server.cpu_seconds() - cpu0) / IDLE_WINDOW
    finally:
        gen.release()
    return {
        "clients": clients,
        "sign_in_s": figures["seconds"],
        "sign_in_server_cpu_s": figures["server_cpu_s"],
        "sign_in_generator_core_share": figures["generator_core_share"],
        "rss_before_mb": round(rss0 / 2**20, 1),
        "rss_after_mb": round(rss1 / 2**20, 1),
        "kb_per_connection": round((rss1 - rss0) / clients / 1024, 1),
        "idle_core_share": round(idle_cpu, 3),
    }


def negotiated_extensions(url: str) -> str:
    """Offer permessage-deflate (as browsers do) and return what the server accepted."""

    async def probe() -> str:
        async with connect(url, open_timeout=10) as ws:
            return ws.response.headers.get("Sec-WebSocket-Extensions", "") or "none"

    return asyncio.run(probe())
