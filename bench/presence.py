"""Presence benchmarks: sign-in storms of clients that follow presence as deltas or through watch lists.

In the load-generator processes, each client registers with `"presence": "delta"`
(or with a `watch` list, or as a v1 client) and builds its view of who is online
as an application would: the snapshot after `registered`, then each frame's
`online` and `offline` (v1: each `online_users` list). A client is complete
when its view holds every user it waits for: everyone, or its watch list
(client i watches clients i+1 .. i+W, modulo the number of clients). Clients
count the presence frames and bytes they receive and keep reading until they
are released, so the server's memory can be read after the storm with every
socket drained. Identical frames are parsed once per generator process (`Frames`).

In the parent, `follow_everyone` and `follow_watch_lists` drive those generators
against one or two daphne processes and read the servers' CPU time and RSS from
/proc; `sign_in` runs a storm alone, for a profiler.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from bench import loadgen, scenarios
from bench.loadgen import BenchError, Tally, Workers
from bench.services import Process

# How the clients follow presence (the `register` they send).
FULL, DELTA, WATCH = "full", "delta", "watch"
PRESENCE_PREFIX = '{"type":"presence"'
# Clients signed in and out before the baseline RSS is read, so that the
# baseline holds the code paths' first-use cost and the growth is the sessions'.
WARM_UP_CLIENTS = 20
# Usernames are the storm's prefix and the client's index in this many digits.
NAME_DIGITS = 5


def username(prefix: str, index: int) -> str:
    return f"{prefix}{index:0{NAME_DIGITS}d}"


def watched_by(index: int, clients: int, watch: int) -> list[int]:
    """Return the clients client `index` watches: the next `watch` ones, wrapping around."""
    return [(index + step) % clients for step in range(1, watch + 1)]


def register_message(prefix: str, index: int, clients: int, mode: str, watch: int) -> str:
    name = username(prefix, index)
    message: dict[str, Any] = {"type": "register", "username": name, "user_id": f"id-{name}"}
    if mode == DELTA:
        message["presence"] = "delta"
    elif mode == WATCH:
        message["watch"] = [username(prefix, other) for other in watched_by(index, clients, watch)]
    return loadgen.encode(message)


class Frames:
    """Presence frames parsed once per load-generator process.

    A broadcast encodes one frame for every client that gets the same thing
    (the delta, the snapshot, a v1 list), so each generator process parses
    each distinct text once and keeps the result as bit masks of user indices;
    every client still builds its own view from the frames it received. Parsing
    2,000 copies of each frame would cost the generators more CPU than the
    server spends (they share its two cores).
    """

    # Distinct frames kept: a broadcast sends a handful; watch-list frames are all different.
    KEPT = 64

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._parsed: dict[str, tuple[bool, int, int]] = {}

    def parse(self, text: str) -> tuple[bool, int, int]:
        """Return (snapshot, users online, users offline), the users as bit masks of their indices."""
        parsed = self._parsed.get(text)
        if parsed is None:
            message = json.loads(text)
            if message["type"] == "online_users":  # a v1 list states everyone online
                parsed = (True, self._mask(message["users"]), 0)
            else:
                parsed = (bool(message.get("snapshot")), self._mask(message["online"]), self._mask(message["offline"]))
            if len(self._parsed) >= self.KEPT:
                del self._parsed[next(iter(self._parsed))]
            self._parsed[text] = parsed
        return parsed

    def _mask(self, entries: list[dict[str, str]]) -> int:
        mask = 0
        for entry in entries:
            rest = entry["username"].removeprefix(self.prefix)
            # Other users (a warm-up's, named prefix + "w...") are not this storm's.
            if len(rest) == NAME_DIGITS and rest.isdigit():
                mask |= 1 << int(rest)
        return mask


class View:
    """Who one client knows to be online, among the users it waits for; what it received."""

    def __init__(self, clients: int, watched: list[int] | None) -> None:
        # The awaited users as a bit mask of their indices: everyone, or the watch list.
        self.awaited = (1 << clients) - 1 if watched is None else sum(1 << index for index in set(watched))
        self.online = 0
        self.frames = 0
        self.bytes = 0
        # Entries naming a user this client does not watch (a watch list the server did not honour).
        self.unwatched = 0
        self.completed_at: float | None = None

    def receive(self, text: str, frames: Frames, tally: Tally) -> bool:
        """Take one frame in; return True when it completes the view."""
        self.bytes += len(text)
        if not text.startswith((PRESENCE_PREFIX, loadgen.ONLINE_PREFIX)):
            tally.note_other(text)
            return False
        self.frames += 1
        snapshot, online, offline = frames.parse(text)
        if snapshot:
            self.online = 0
        self.unwatched += ((online | offline) & ~self.awaited).bit_count()
        self.online = (self.online | online) & ~offline & self.awaited
        if self.online == self.awaited and self.completed_at is None:
            self.completed_at = time.time()
            return True
        return False


async def presence_clients(conn: Connection, spec: dict[str, Any]) -> None:
    """Sign this worker's clients in, in batches; each builds its view until it holds everyone it waits for.

    A batch starts when the previous one's clients are all registered. Client i
    connects to `urls[i % len(urls)]`. After "done", the worker answers
    "counts" requests (frames and bytes per client) until it is released.
    """
    prefix, clients, mode, watch = spec["prefix"], spec["clients"], spec["mode"], spec["watch"]
    indices, urls, batch = spec["indices"], spec["urls"], spec["batch"]
    views = {index: View(clients, watched_by(index, clients, watch) if mode == WATCH else None) for index in indices}
    frames = Frames(prefix)
    tally = Tally()
    sockets: list[ClientConnection] = []
    readers: list[asyncio.Task] = []
    registered_at: list[float] = []
    incomplete = len(indices)
    all_complete = asyncio.Event()

    async def read(ws: ClientConnection, view: View) -> None:
        nonlocal incomplete
        try:
            async for text in ws:
                if view.receive(text, frames, tally):
                    incomplete -= 1
                    if incomplete == 0:
                        all_complete.set()
        except ConnectionClosed:
            pass

    async def sign_in(index: int) -> None:
        ws = await loadgen.open_socket(urls[index % len(urls)], index)
        sockets.append(ws)
        await ws.send(register_message(prefix, index, clients, mode, watch))
        async with asyncio.timeout(loadgen.SETUP_TIMEOUT):
            first = json.loads(await ws.recv())
        if first["type"] != "registered":
            raise BenchError(f"{username(prefix, index)}: expected registered, got {first}")
        registered_at.append(time.time())
        readers.append(asyncio.create_task(read(ws, views[index])))

    plan = await loadgen.handshake(conn, {"clients": len(indices)})
    await loadgen.sleep_until(plan["start_at"])
    cpu0 = loadgen.cpu_now()
    async with asyncio.timeout(spec["timeout"]):
        for start in range(0, len(indices), batch):
            await asyncio.gather(*(sign_in(index) for index in indices[start : start + batch]))
    try:
        async with asyncio.timeout(max(0.0, plan["start_at"] + spec["timeout"] - time.time())):
            await all_complete.wait()
    except TimeoutError:
        pass  # reported: the clients without a completion time
    cpu1 = loadgen.cpu_now()
    completed = [view.completed_at for view in views.values() if view.completed_at is not None]
    conn.send(("done", {"completed": completed, "registered_last": max(registered_at), "cpu": cpu1 - cpu0}))
    while (request := await asyncio.to_thread(conn.recv)) != "release":
        conn.send((request, _counts(views.values(), tally)))
    for task in readers:
        task.cancel()
    await loadgen.close_all(sockets)


def _counts(views: Collection[View], tally: Tally) -> dict[str, Any]:
    return {
        "frames": [view.frames for view in views],
        "bytes": [view.bytes for view in views],
        "unwatched": sum(view.unwatched for view in views),
        "other": tally.other,
        "errors": tally.errors,
    }


# --- The measurements (parent process) ---------------------------------------------


@dataclass(frozen=True)
class Storm:
    """Who signs in: `clients` users following presence as `mode`, from `workers` processes."""

    prefix: str
    clients: int
    mode: str
    batch: int = 100
    workers: int = 2
    watch: int = 0
    timeout: float = 120.0

    def specs(self, servers: list[Process]) -> list[dict[str, Any]]:
        urls = [f"ws://127.0.0.1:{server.port}/" for server in servers]
        return [
            {
                "urls": urls,
                "prefix": self.prefix,
                "clients": self.clients,
                "mode": self.mode,
                "watch": self.watch,
                "indices": list(range(worker, self.clients, self.workers)),
                "batch": max(1, self.batch // self.workers),
                "timeout": self.timeout,
            }
            for worker in range(self.workers)
        ]


def _warm_up(servers: list[Process], storm: Storm) -> None:
    """Sign a few clients of the same kind in and out on every server, then wait for quiet."""
    clients = WARM_UP_CLIENTS * len(servers)
    warm = Storm(
        f"{storm.prefix}w",
        clients,
        storm.mode,
        batch=clients,
        workers=1,
        watch=min(storm.watch, clients - 1),
        timeout=60,
    )
    with Workers(presence_clients, warm.specs(servers)) as gen:
        gen.ready()
        gen.start({"start_at": time.time()})
        gen.done(timeout=120)
    for server in servers:
        scenarios.wait_idle(server)


def _sign_in(gen: Workers, servers: list[Process], storm: Storm) -> dict[str, Any]:
    """Run the storm; the clients stay connected and reading."""
    gen.ready()
    start_at = time.time() + 0.5
    gen.start({"start_at": start_at})
    scenarios.sleep_until(start_at)
    cpu0 = sum(server.cpu_seconds() for server in servers)
    # Wall-clock figures depend on what else the shared machine runs: this says how busy it was.
    load = os.getloadavg()[0]
    results = gen.done(timeout=storm.timeout + 120)
    cpu1 = sum(server.cpu_seconds() for server in servers)
    completed = [t for r in results for t in r["completed"]]
    return {
        "clients": storm.clients,
        "batch": storm.batch,
        "complete_clients": len(completed),
        "seconds": round(max(completed) - start_at, 2) if len(completed) == storm.clients else None,
        "all_registered_s": round(max(r["registered_last"] for r in results) - start_at, 2),
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "load_average_1m": round(load, 2),
        "generator_core_share": scenarios.generator_split(results, time.time() - start_at),
        "last_complete_at": max(completed, default=time.time()),
    }


def sign_in(servers: list[Process], storm: Storm, before_release: Callable[[], object]) -> dict[str, Any]:
    """Run the storm alone (no warm-up, no memory reading), for a profiler that ends in `before_release`.

    The clients stay connected until then, so their disconnections are not profiled.
    """
    with Workers(presence_clients, storm.specs(servers)) as gen:
        figures = _sign_in(gen, servers, storm)
        before_release()
    figures.pop("last_complete_at")
    return figures


def _frame_figures(counts: list[dict[str, Any]]) -> dict[str, Any]:
    frames = [n for c in counts for n in c["frames"]]
    sizes = [n for c in counts for n in c["bytes"]]
    return {
        "frames_per_client_mean": round(sum(frames) / len(frames), 1),
        "frames_per_client_p50": scenarios.percentile(frames, 0.5),
        "frames_per_client_p99": scenarios.percentile(frames, 0.99),
        "frames_per_client_max": max(frames),
        "kb_received_per_client_mean": round(sum(sizes) / len(sizes) / 1024, 1),
        "unwatched_entries": sum(c["unwatched"] for c in counts),
        "unexpected_messages": sum(c["other"] for c in counts),
        "errors": [e for c in counts for e in c["errors"]][:5],
    }


def follow_everyone(server: Process, storm: Storm, settle: float) -> dict[str, Any]:
    """Time until every client's view holds everyone; frames per client; RSS growth `settle` s after the storm."""
    _warm_up([server], storm)
    rss0 = server.rss_bytes()
    with Workers(presence_clients, storm.specs([server])) as gen:
        figures = _sign_in(gen, [server], storm)
        # The clients keep reading: what is left is what their sessions hold once the storm is over.
        scenarios.sleep_until(figures.pop("last_complete_at") + settle)
        rss1 = server.rss_bytes()
        counts = gen.request("counts")
    return {
        "mode": storm.mode,
        **figures,
        **_frame_figures(counts),
        "settle_s": settle,
        "rss_before_mb": round(rss0 / 2**20, 1),
        "rss_after_mb": round(rss1 / 2**20, 1),
        "kb_per_connection": round((rss1 - rss0) / storm.clients / 1024, 1),
    }


def follow_watch_lists(servers: list[Process], storm: Storm) -> dict[str, Any]:
    """Time until every client has seen its watched users online; frames per client; RSS per idle connection.

    With two servers (sharing Redis), client i connects to server i % 2, so half
    of each client's watched users are on the other process.
    """
    _warm_up(servers, storm)
    rss0 = sum(server.rss_bytes() for server in servers)
    with Workers(presence_clients, storm.specs(servers)) as gen:
        figures = _sign_in(gen, servers, storm)
        figures.pop("last_complete_at")
        for server in servers:
            scenarios.wait_idle(server, threshold=0.05, timeout=120)
        rss1 = sum(server.rss_bytes() for server in servers)
        counts = gen.request("counts")
    return {
        "mode": storm.mode,
        "processes": len(servers),
        "watch": storm.watch,
        **figures,
        **_frame_figures(counts),
        "rss_before_mb": round(rss0 / 2**20, 1),
        "rss_after_mb": round(rss1 / 2**20, 1),
        "kb_per_connection": round((rss1 - rss0) / storm.clients / 1024, 1),
    }
