"""Load generators, run in worker processes.

Call set-up uses the `signaling_client` library, as an application would. The
relay, round-trip and sign-in storm loads use plain `websockets` sockets: the
library parses every frame into typed events (about 1.5 ms for an online list
of 2,000 users, against 0.05 ms to count its entries), and on a two-core
machine shared with the server that cost would be measured as server delay.

Each scenario runs in one or more forked worker processes, each with its own
event loop, and talks to the parent over a pipe in three steps:

1. the worker sets up (connects, registers, starts calls) and sends
   ("ready", info);
2. the parent answers with a plan (wall-clock `start_at` / `stop_at`, so the
   parent can read the server's CPU time at the same instants); the worker
   runs and sends ("done", result), which includes the worker's own CPU time
   over the window so the report can show how the CPU was split;
3. the worker keeps its sockets open until the parent sends "release".

The relay hot path avoids per-message JSON parsing: a relayed message is
recognised by its prefix and answered with a pre-encoded frame.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from signaling_client import CallAccepted, CallEnded, IncomingCall, SignalingClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

# Client sockets are spread over this many loopback source addresses
# (127.0.0.1 ...), so a run never runs short of ephemeral ports.
SOURCE_ADDRESSES = 8
SETUP_TIMEOUT = 60.0

CANDIDATE = {
    "candidate": "candidate:842163049 1 udp 1677729535 127.0.0.1 54321 typ srflx raddr 0.0.0.0 rport 0 "
    "generation 0 ufrag 4ZcD network-cost 999",
    "sdpMid": "0",
    "sdpMLineIndex": 0,
    "usernameFragment": "4ZcD",
}


class BenchError(Exception):
    """A scenario that could not run as planned (server error, timeout)."""


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def open_socket(url: str, index: int) -> ClientConnection:
    """Open a client socket from one of the loopback source addresses, without compression."""
    return await connect(
        url,
        compression=None,
        max_size=None,
        max_queue=None,
        ping_interval=None,
        open_timeout=SETUP_TIMEOUT,
        close_timeout=2,
        local_addr=(f"127.0.0.{1 + index % SOURCE_ADDRESSES}", 0),
    )


async def expect(ws: ClientConnection, kind: str, timeout: float = SETUP_TIMEOUT) -> dict[str, Any]:
    """Return the next message of type `kind`, passing over others; raise on an error message."""
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return message
            if message["type"] in ("error", "ERROR", "ID-TAKEN"):
                raise BenchError(f"server sent {message} while the client waited for {kind}")


async def register(ws: ClientConnection, username: str) -> None:
    await ws.send(encode({"type": "register", "username": username, "user_id": f"id-{username}"}))
    await expect(ws, "registered")


async def close_all(sockets: list[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


# --- Pairs exchanging ICE candidates ------------------------------------------


@dataclass
class Pair:
    """Two sockets whose relayed messages are recognised by `prefix`; `a_to_b` goes through the server to b."""

    a: ClientConnection
    b: ClientConnection
    a_to_b: str
    b_to_a: str
    prefix: str


async def signaling_pair(url: str, a: str, b: str, index: int, url_b: str | None = None) -> Pair:
    """Register two users and put them in an answered call (this server's protocol).

    With `url_b`, b connects to that server: the pair's messages cross between processes.
    """
    wa, wb = await open_socket(url, index), await open_socket(url_b or url, index + 1)
    await register(wa, a)
    await register(wb, b)
    await wa.send(encode({"type": "call_request", "target_username": b}))
    call_id = (await expect(wb, "incoming_call"))["call_id"]
    await wb.send(encode({"type": "call_accepted", "call_id": call_id}))
    await expect(wa, "call_accepted")

    def candidate_to(target: str) -> str:
        return encode({"type": "ice_candidate", "target_username": target, "call_id": call_id, "data": CANDIDATE})

    return Pair(wa, wb, candidate_to(b), candidate_to(a), '{"type":"ice_candidate"')


async def v1_pair(url: str, a: str, b: str, index: int, url_b: str | None = None) -> Pair:
    """Register two users and put them in an answered call (the v1 protocol: no call_id, calls named by user)."""
    wa, wb = await open_socket(url, index), await open_socket(url_b or url, index + 1)
    await register(wa, a)
    await register(wb, b)
    await wa.send(encode({"type": "call_request", "target_username": b}))
    await expect(wb, "incoming_call")
    await wb.send(encode({"type": "call_accepted", "caller_username": a}))
    await expect(wa, "call_accepted")

    def candidate_to(target: str) -> str:
        return encode({"type": "ice_candidate", "target_username": target, "data": CANDIDATE})

    return Pair(wa, wb, candidate_to(b), candidate_to(a), '{"type":"ice_candidate"')


async def peerjs_pair(url: str, a: str, b: str, index: int, url_b: str | None = None) -> Pair:
    """Connect two PeerJS peers (ids a and b); messages go {type: CANDIDATE, dst, payload}."""
    sockets = []
    for offset, peer in enumerate((a, b)):
        ws = await open_socket(f"{url}peerjs?key=peerjs&id={peer}&token=t-{peer}", index + offset)
        await expect(ws, "OPEN")
        sockets.append(ws)

    def candidate_to(target: str) -> str:
        payload = {"candidate": CANDIDATE, "type": "media", "connectionId": "mc_bench"}
        return encode({"type": "CANDIDATE", "dst": target, "payload": payload})

    return Pair(sockets[0], sockets[1], candidate_to(b), candidate_to(a), '{"type":"CANDIDATE"')


PAIR_MAKERS: dict[str, Callable[[str, str, str, int, str | None], Awaitable[Pair]]] = {
    "signaling": signaling_pair,
    "v1": v1_pair,
    "peerjs": peerjs_pair,
}


async def make_pairs(spec: dict[str, Any]) -> list[Pair]:
    maker = PAIR_MAKERS[spec["kind"]]
    prefix = spec["prefix"]
    return await asyncio.gather(
        *(maker(spec["url"], f"{prefix}a{i}", f"{prefix}b{i}", 2 * i, spec.get("url_b")) for i in range(spec["pairs"]))
    )


@dataclass
class Tally:
    received: int = 0
    other: int = 0
    errors: list[str] = field(default_factory=list)

    def note_other(self, text: str) -> None:
        self.other += 1
        if '"error"' in text[:30] or '"ERROR"' in text[:30]:
            if len(self.errors) < 5:
                self.errors.append(text[:300])


async def bounce(ws: ClientConnection, reply: str, prefix: str, plan: dict[str, float], tally: Tally | None) -> None:
    """Answer every relayed message with one to the peer until stop_at, counting those in the window."""
    start_at, stop_at = plan["start_at"], plan["stop_at"]
    try:
        async for text in ws:
            if text.startswith(prefix):
                now = time.time()
                if now >= stop_at:
                    continue
                if tally is not None and now >= start_at:
                    tally.received += 1
                await ws.send(reply)
            elif tally is not None:
                tally.note_other(text)
    except ConnectionClosed:
        pass


async def handshake(conn: Connection, info: dict[str, Any]) -> dict[str, Any]:
    """Tell the parent this worker is ready and return its plan."""
    conn.send(("ready", info))
    return await asyncio.to_thread(conn.recv)


async def finish(conn: Connection, result: dict[str, Any], sockets: list[ClientConnection]) -> None:
    conn.send(("done", result))
    await asyncio.to_thread(conn.recv)
    await close_all(sockets)


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.time()))


async def relay_scenario(conn: Connection, spec: dict[str, Any]) -> None:
    """Pairs ping-pong candidates with `window` messages in flight per pair, as fast as the server relays."""
    pairs = await make_pairs(spec)
    plan = await handshake(conn, {"pairs": len(pairs)})
    tally = Tally()
    tasks = []
    for pair in pairs:
        tasks.append(asyncio.create_task(bounce(pair.a, pair.a_to_b, pair.prefix, plan, tally)))
        tasks.append(asyncio.create_task(bounce(pair.b, pair.b_to_a, pair.prefix, plan, tally)))
    for pair in pairs:
        for _ in range(spec["window"]):
            await pair.a.send(pair.a_to_b)
    await sleep_until(plan["start_at"])
    cpu0 = cpu_now()
    await sleep_until(plan["stop_at"])
    cpu1 = cpu_now()
    await asyncio.sleep(0.5)
    for task in tasks:
        task.cancel()
    result = {"received": tally.received, "other": tally.other, "errors": tally.errors, "cpu": cpu1 - cpu0}
    await finish(conn, result, [ws for pair in pairs for ws in (pair.a, pair.b)])


async def rtt_scenario(conn: Connection, spec: dict[str, Any]) -> None:
    """Each pair sends one candidate at a fixed rate and times the answer relayed back."""
    pairs = await make_pairs(spec)
    plan = await handshake(conn, {"pairs": len(pairs)})
    period = 1.0 / spec["rate_per_pair"]
    samples: list[float] = []
    # The answering side keeps answering past stop_at, so the last ping is always answered.
    echo_plan = {"start_at": plan["start_at"], "stop_at": plan["stop_at"] + SETUP_TIMEOUT}
    echoes = [asyncio.create_task(bounce(p.b, p.b_to_a, p.prefix, echo_plan, None)) for p in pairs]

    async def ping(pair: Pair) -> None:
        tick = plan["start_at"] + random.random() * period
        while tick < plan["stop_at"]:
            await sleep_until(tick)
            sent = time.perf_counter()
            await pair.a.send(pair.a_to_b)
            async with asyncio.timeout(SETUP_TIMEOUT):
                while not (await pair.a.recv()).startswith(pair.prefix):
                    pass
            samples.append(time.perf_counter() - sent)
            tick += period

    await sleep_until(plan["start_at"])
    cpu0 = cpu_now()
    await asyncio.gather(*(ping(pair) for pair in pairs))
    cpu1 = cpu_now()
    for task in echoes:
        task.cancel()
    await finish(conn, {"samples": samples, "cpu": cpu1 - cpu0}, [ws for p in pairs for ws in (p.a, p.b)])


# --- Call set-up -----------------------------------------------------------------


def library_client(url: str, username: str, index: int) -> SignalingClient:
    """A `signaling_client` client without reconnection, keepalive or compression."""
    return SignalingClient(
        url,
        username,
        f"id-{username}",
        resume=False,
        reconnect=False,
        ping_interval=None,
        open_timeout=SETUP_TIMEOUT,
        request_timeout=SETUP_TIMEOUT,
        compression=None,
        max_size=None,
        local_addr=(f"127.0.0.{1 + index % SOURCE_ADDRESSES}", 0),
    )


async def call_setup_scenario(conn: Connection, spec: dict[str, Any]) -> None:
    """`concurrency` callers each call their own callee at the same instant, `rounds` times.

    One set-up is call_request -> incoming_call (callee) -> call_accepted (sent
    by the callee at once) -> call_accepted at the caller, database writes
    included. Clients are the `signaling_client` library's.
    """
    url, prefix, n = spec["url"], spec["prefix"], spec["concurrency"]
    callers = [library_client(url, f"{prefix}caller{i}", i) for i in range(n)]
    callees = [library_client(url, f"{prefix}callee{i}", n + i) for i in range(n)]
    incoming_at: dict[str, float] = {}

    def answering(callee: SignalingClient) -> Callable[[IncomingCall], Awaitable[None]]:
        async def answer(event: IncomingCall) -> None:
            incoming_at[event.call_id] = time.perf_counter()
            await callee.accept(event.call_id)

        return answer

    for callee in callees:
        callee.on(IncomingCall, answering(callee))
    await asyncio.gather(*(client.connect() for client in callers + callees))
    plan = await handshake(conn, {"clients": 2 * n})
    await sleep_until(plan["start_at"])
    totals: list[float] = []
    to_incoming: list[float] = []
    cpu0 = cpu_now()

    async def one_call(caller: SignalingClient, callee: SignalingClient) -> None:
        accepted = asyncio.ensure_future(
            caller.wait_for(CallAccepted, lambda e: e.accepter_username == callee.username, SETUP_TIMEOUT)
        )
        await asyncio.sleep(0)  # the expectation is in place before the request goes out
        sent = time.perf_counter()
        call_id = await caller.call(callee.username, timeout=SETUP_TIMEOUT)
        await accepted
        totals.append(time.perf_counter() - sent)
        to_incoming.append(incoming_at.pop(call_id) - sent)
        ended = asyncio.ensure_future(callee.wait_for(CallEnded, lambda e: e.call_id == call_id, SETUP_TIMEOUT))
        await asyncio.sleep(0)
        await caller.hang_up(call_id)
        await ended

    for _ in range(spec["rounds"]):
        await asyncio.gather(*(one_call(caller, callee) for caller, callee in zip(callers, callees, strict=True)))
    cpu1 = cpu_now()
    conn.send(("done", {"totals": totals, "to_incoming": to_incoming, "cpu": cpu1 - cpu0}))
    await asyncio.to_thread(conn.recv)
    await asyncio.gather(*(client.close() for client in callers + callees), return_exceptions=True)


async def plain_setup_scenario(conn: Connection, spec: dict[str, Any]) -> None:
    """The call set-up of `call_setup_scenario` from plain `websockets` clients speaking v1 messages.

    Runs unchanged against this server and the v1 design's (bench/v1_server.py,
    which the library cannot drive: it sends no `call_ringing`). Accept and
    hang-up name the peer as v1 clients do, and carry the call_id when the
    server gave one.
    """
    url, prefix, n = spec["url"], spec["prefix"], spec["concurrency"]
    callers = [f"{prefix}caller{i}" for i in range(n)]
    callees = [f"{prefix}callee{i}" for i in range(n)]
    sockets = await asyncio.gather(*(open_socket(url, i) for i in range(2 * n)))
    for ws, name in zip(sockets, callers + callees, strict=True):
        await register(ws, name)

    async def everyone_listed(ws: ClientConnection) -> None:
        # The lists sent while the others registered are read now, not in the measured rounds.
        while not ((text := await ws.recv()).startswith(ONLINE_PREFIX) and text.count('"username"') >= 2 * n):
            pass

    async with asyncio.timeout(SETUP_TIMEOUT):
        await asyncio.gather(*(everyone_listed(ws) for ws in sockets))
    plan = await handshake(conn, {"clients": 2 * n})
    await sleep_until(plan["start_at"])
    totals: list[float] = []
    to_incoming: list[float] = []
    cpu0 = cpu_now()

    async def one_call(caller_ws: ClientConnection, caller: str, callee_ws: ClientConnection, callee: str) -> None:
        sent = time.perf_counter()
        await caller_ws.send(encode({"type": "call_request", "target_username": callee}))
        incoming = await expect(callee_ws, "incoming_call")
        to_incoming.append(time.perf_counter() - sent)
        call_id = {"call_id": incoming["call_id"]} if "call_id" in incoming else {}
        await callee_ws.send(encode({"type": "call_accepted", "caller_username": caller, **call_id}))
        await expect(caller_ws, "call_accepted")
        totals.append(time.perf_counter() - sent)
        await caller_ws.send(encode({"type": "call_ended", "target_username": callee, **call_id}))
        await expect(callee_ws, "call_ended")

    pairs = list(zip(sockets[:n], callers, sockets[n:], callees, strict=True))
    for _ in range(spec["rounds"]):
        await asyncio.gather(*(one_call(*pair) for pair in pairs))
    cpu1 = cpu_now()
    await finish(conn, {"totals": totals, "to_incoming": to_incoming, "cpu": cpu1 - cpu0}, sockets)


# --- Sign-in storm and idle connections ---------------------------------------------

ONLINE_PREFIX = '{"type":"online_users"'


async def sign_in_and_wait_for_everyone(ws: ClientConnection, username: str, total: int) -> float:
    """Return when this client has seen an online list with all `total` users (time.time())."""
    while True:
        text = await ws.recv()
        # Count before parsing: a list of thousands is parsed once, when complete.
        if text.startswith(ONLINE_PREFIX) and text.count('"username"') >= total:
            users = json.loads(text)["users"]
            if len(users) == total and any(u["username"] == username for u in users):
                return time.time()


async def drain(ws: ClientConnection) -> None:
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass


async def storm_scenario(conn: Connection, spec: dict[str, Any]) -> None:
    """Open and register this worker's clients in batches; time until each has seen the full list.

    The clock starts at the plan's `start_at` in every worker; a batch starts
    when the previous one's clients are all registered. With `total` 0 a
    client is done once registered (presence is not waited for).
    """
    url, names, batch, total = spec["url"], spec["names"], spec["batch"], spec["total"]
    plan = await handshake(conn, {"clients": len(names)})
    await sleep_until(plan["start_at"])
    cpu0 = cpu_now()
    sockets: list[ClientConnection] = []
    waits: list[asyncio.Task] = []
    registered_at: list[float] = []

    async def sign_in(index: int, name: str) -> None:
        ws = await open_socket(url, spec["source_offset"] + index)
        sockets.append(ws)
        await ws.send(encode({"type": "register", "username": name, "user_id": f"id-{name}"}))
        first = json.loads(await ws.recv())
        if first["type"] != "registered":
            raise BenchError(f"{name}: expected registered, got {first}")
        registered_at.append(time.time())
        if total:
            waits.append(asyncio.create_task(sign_in_and_wait_for_everyone(ws, name, total)))

    for start in range(0, len(names), batch):
        await asyncio.gather(*(sign_in(start + i, name) for i, name in enumerate(names[start : start + batch])))
    try:
        async with asyncio.timeout(spec["timeout"]):
            completed = await asyncio.gather(*waits)
    except TimeoutError:
        completed = [task.result() for task in waits if task.done() and not task.cancelled()]
        for task in waits:
            task.cancel()
    if not total:
        completed = registered_at
    cpu1 = cpu_now()
    drains = [asyncio.create_task(drain(ws)) for ws in sockets]
    result = {
        "completed": completed,
        "registered_last": max(registered_at, default=0.0),
        "clients": len(names),
        "cpu": cpu1 - cpu0,
    }
    await finish(conn, result, sockets)
    for task in drains:
        task.cancel()


# What a load-generator process runs: it talks to the parent over `conn`.
Scenario = Callable[[Connection, dict[str, Any]], Awaitable[None]]

SCENARIOS: dict[str, Scenario] = {
    "relay": relay_scenario,
    "rtt": rtt_scenario,
    "call_setup": call_setup_scenario,
    "plain_setup": plain_setup_scenario,
    "storm": storm_scenario,
}


def _worker_main(conn: Connection, scenario: str | Scenario, spec: dict[str, Any]) -> None:
    run = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    try:
        asyncio.run(run(conn, spec))
    except BaseException as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise


class Workers:
    """Forked load-generator processes running one scenario, driven step by step.

    `scenario` names one of SCENARIOS, or is the coroutine function itself (the
    processes are forked, so it need not be importable by name).
    """

    def __init__(self, scenario: str | Scenario, specs: list[dict[str, Any]]) -> None:
        context = multiprocessing.get_context("fork")
        self.conns: list[Connection] = []
        self.procs = []
        for spec in specs:
            parent, child = context.Pipe()
            proc = context.Process(target=_worker_main, args=(child, scenario, spec), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def _collect(self, step: str, timeout: float) -> list[Any]:
        values = []
        deadline = time.monotonic() + timeout
        for conn in self.conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise BenchError(f"a load generator did not report '{step}' within {timeout:.0f} s")
            kind, value = conn.recv()
            if kind != step:
                raise BenchError(f"a load generator failed: {value}")
            values.append(value)
        return values

    def ready(self, timeout: float = 180.0) -> list[Any]:
        return self._collect("ready", timeout)

    def start(self, plan: dict[str, Any]) -> None:
        for conn in self.conns:
            conn.send(plan)

    def done(self, timeout: float) -> list[Any]:
        return self._collect("done", timeout)

    def request(self, step: str, timeout: float = 60.0) -> list[Any]:
        """Ask every worker for `step` (a scenario that answers requests until released)."""
        for conn in self.conns:
            conn.send(step)
        return self._collect(step, timeout)

    def release(self) -> None:
        for conn in self.conns:
            try:
                conn.send("release")
            except OSError:
                pass
        for proc in self.procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
