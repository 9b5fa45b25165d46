"""Which channel layer to run over Redis: pub/sub or core, measured under the same load.

For each layer: one redis-server, one PostgreSQL database, two daphne processes.
`pairs` calls run with the caller on process A and the callee on process B. Each
caller keeps `window` ice_candidate messages in flight; the callee sends each
one straight back, so every round trip is two relays across processes. Reported:
relayed messages per second, round-trip percentiles, and the CPU seconds the
two daphne processes and redis-server spent per 1000 relayed messages.

Then the same layer goes through a Redis restart under live sessions: how many
sockets stayed open, and how long until a new call between existing sessions
completes.

    python -m bench.layer_choice [--pairs 20] [--window 4] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

from calls.testing.servers import DaphneServer, server_env
from calls.testing.services import PostgresServer, RedisServer, stop_on_sigterm

# name -> (SIGNALING_CHANNEL_LAYER, socket timeout of the layer's Redis connections or None for redis-py's default).
# redis-py 8 times reads out after 5 s by default, exactly the core layer's blocking-pop
# timeout: "core+timeout" gives the layer's connections 15 s instead.
VARIANTS = {"pubsub": ("pubsub", None), "core": ("core", None), "core+timeout": ("core", 15.0)}
CANDIDATE = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMLineIndex": 0}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IDLE_SECONDS = 12.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class Client:
    def __init__(self, ws: websockets.ClientConnection, name: str) -> None:
        self.ws, self.name = ws, name

    @classmethod
    async def open(cls, server: DaphneServer, name: str) -> Client:
        ws = await websockets.connect(server.url, max_queue=None, open_timeout=30)
        client = cls(ws, name)
        await client.send({"type": "register", "username": name, "user_id": f"id-{name}"})
        await client.wait_for("registered")
        return client

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def wait_for(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                message = json.loads(await self.ws.recv())
                if message["type"] == kind:
                    return message


async def connect_call(caller: Client, callee: Client) -> str:
    await caller.send({"type": "call_request", "target_username": callee.name})
    call_id = (await callee.wait_for("incoming_call"))["call_id"]
    await callee.send({"type": "call_accepted", "call_id": call_id})
    await caller.wait_for("call_accepted")
    return call_id


async def relay_load(a: DaphneServer, b: DaphneServer, pairs: int, window: int, seconds: float) -> dict[str, Any]:
    callers = [await Client.open(a, f"caller{i}") for i in range(pairs)]
    callees = [await Client.open(b, f"callee{i}") for i in range(pairs)]
    for caller, callee in zip(callers, callees, strict=True):
        await connect_call(caller, callee)
    round_trips: list[float] = []
    lost = 0
    stop_at = 0.0

    async def echo(callee: Client, caller_name: str) -> None:
        while True:
            message = json.loads(await callee.ws.recv())
            if message["type"] == "ice_candidate":
                await callee.send({"type": "ice_candidate", "target_username": caller_name, "data": message["data"]})

    async def drive(caller: Client, callee_name: str) -> None:
        sent_at: dict[int, float] = {}
        seq = 0

        async def send_one() -> None:
            nonlocal seq
            seq += 1
            sent_at[seq] = time.perf_counter()
            await caller.send(
                {"type": "ice_candidate", "target_username": callee_name, "data": {**CANDIDATE, "seq": seq}}
            )

        nonlocal lost
        for _ in range(window):
            await send_one()
        while True:
            try:
                async with asyncio.timeout(10):
                    message = json.loads(await caller.ws.recv())
            except TimeoutError:
                # Nothing for 10 s: what is still in flight was lost on the way.
                lost += len(sent_at)
                return
            if message["type"] != "ice_candidate":
                continue
            round_trips.append(time.perf_counter() - sent_at.pop(message["data"]["seq"]))
            if time.perf_counter() < stop_at:
                await send_one()
            elif not sent_at:
                return

    pids = [a.proc.pid, b.proc.pid]
    echoes = [asyncio.ensure_future(echo(callee, caller.name)) for caller, callee in zip(callers, callees, strict=True)]
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(drive(caller, callee.name) for caller, callee in zip(callers, callees, strict=True)))
    elapsed = time.perf_counter() - started
    cpu_used = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    for task in echoes:
        task.cancel()
    await asyncio.gather(*echoes, return_exceptions=True)
    for client in callers + callees:
        await client.ws.close()
    relayed = 2 * len(round_trips)
    ordered = sorted(round_trips)
    return {
        "relayed_per_s": round(relayed / elapsed),
        "rtt_p50_ms": round(1000 * ordered[len(ordered) // 2], 2),
        "rtt_p99_ms": round(1000 * ordered[int(len(ordered) * 0.99)], 2),
        "daphne_cpu_s_per_1000": round(1000 * cpu_used / max(relayed, 1), 3),
        "lost": lost,
    }


async def restart_survival(a: DaphneServer, b: DaphneServer, redis: RedisServer, pairs: int) -> dict[str, Any]:
    callers = [await Client.open(a, f"r-caller{i}") for i in range(pairs)]
    callees = [await Client.open(b, f"r-callee{i}") for i in range(pairs)]
    # Idle sockets first: a layer whose blocking reads outlast the Redis client's
    # socket timeout loses its consumers while nothing happens.
    await asyncio.sleep(IDLE_SECONDS)
    idle_open = sum(client.ws.close_code is None for client in callers + callees)
    redis.restart()
    restarted = time.perf_counter()
    deadline = restarted + 30
    recovered_after = None
    while time.perf_counter() < deadline:
        caller, callee = callers[0], callees[0]
        if caller.ws.close_code is not None or callee.ws.close_code is not None:
            break
        try:
            async with asyncio.timeout(2):
                await connect_call(caller, callee)
                recovered_after = round(time.perf_counter() - restarted, 2)
                break
        except Exception:  # noqa: BLE001 - not yet: try again
            await asyncio.sleep(0.5)
    open_sockets = sum(client.ws.close_code is None for client in callers + callees)
    for client in callers + callees:
        await client.ws.close()
    return {
        f"sockets_open_after_{IDLE_SECONDS:g}s_idle": f"{idle_open}/{2 * pairs}",
        "sockets_open_after_restart": f"{open_sockets}/{2 * pairs}",
        "call_works_after_s": recovered_after if recovered_after is not None else "never (30 s)",
    }


def measure(variant: str, postgres: PostgresServer, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    layer, socket_timeout = VARIANTS[variant]
    redis = RedisServer()
    redis.start()
    env = server_env(
        work,
        REDIS_URL=redis.url,
        DATABASE_URL=postgres.new_database(),
        SIGNALING_CHANNEL_LAYER=layer,
        SIGNALING_RATE="1000000/1000000",
        SIGNALING_PRESENCE_TTL="3",
        LOG_LEVEL="warning",
    )
    if socket_timeout is not None:
        env |= {"DJANGO_SETTINGS_MODULE": "bench.layer_settings", "BENCH_REDIS_SOCKET_TIMEOUT": str(socket_timeout)}
    servers = [DaphneServer(env, work / f"{variant}-{name}.log") for name in "ab"]
    try:
        for server in servers:
            server.start()
        try:
            figures = asyncio.run(relay_load(*servers, args.pairs, args.window, args.seconds))
        except websockets.ConnectionClosed as exc:
            figures = {"relay": f"failed: the server closed a socket ({exc})"}
        figures |= asyncio.run(restart_survival(*servers, redis, pairs=5))
        return figures
    finally:
        for server in servers:
            server.stop()
        redis.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    stop_on_sigterm()
    postgres = PostgresServer()
    postgres.start()
    work = Path(tempfile.mkdtemp(prefix="layer-choice-"))
    try:
        results = {variant: measure(variant, postgres, args, work) for variant in args.variants}
    finally:
        postgres.close()
    print(f"{args.pairs} cross-process calls, {args.window} messages in flight each, {args.seconds:g} s per layer")
    for variant, figures in results.items():
        print(f"{variant:13} " + "  ".join(f"{key}={value}" for key, value in figures.items()))
    print(f"(daphne logs in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
