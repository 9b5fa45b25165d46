"""The whole benchmark run: every configuration, the PeerJS comparison, the report.

Configurations:
- memory: one daphne process, in-memory channel layer, SQLite (a fresh clone's setup);
- redis: one daphne process, Redis channel layer and presence, PostgreSQL (the
  production shape of render.yaml), with a throwaway redis-server and cluster.
Each measurement that needs a clean server gets a new daphne process. For
comparison: the v1 design on plain `websockets` (bench/v1_server.py), the
PeerJS server, and with --servers our app under uvicorn and granian
(bench/asgi_servers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import AbstractContextManager as ContextManager
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import asgi_servers, presence, profiling, report, scenarios, services

RESULTS = Path(__file__).resolve().parent / "results"
# Relay load: every client may send far more than SIGNALING_RATE's default
# 50 a second, which would otherwise cap the relay at 50 messages per socket.
UNLIMITED_RATE = "1000000/1000000"
# Presence broadcasts deferred past the idle-memory measurement (see scenarios.idle_memory).
DEFERRED_PRESENCE_MS = "600000"
# Seconds the watch-list storm may take: four times its 60 s target, then it is reported incomplete.
WATCH_TIMEOUT = 240.0


@dataclass(frozen=True)
class Plan:
    relay_pairs: int = 20
    relay_window: int = 4
    relay_workers: int = 2
    relay_seconds: float = 12.0
    rtt_pairs: int = 25
    rtt_rate: float = 20.0
    rtt_seconds: float = 8.0
    setup_concurrency: int = 50
    setup_rounds: int = 5
    storm_sizes: tuple[int, int] = (500, 2000)
    storm_batch: int = 100
    # Two generator processes, as for the relay: one Python process reading 2,000 lists
    # of ~90 KB saturates its core and its delay would be counted as the server's.
    storm_workers: int = 2
    idle_clients: int = 5000
    idle_workers: int = 2
    profile_seconds: float = 10.0
    # Presence: a sign-in storm of "delta" clients (and, in memory, of v1 clients for
    # comparison), its RSS read `presence_settle` s after the last client's view was complete.
    presence_clients: int = 2000
    presence_workers: int = 2
    presence_settle: float = 8.0
    # Watch lists: every client watches the next `watch_size` clients.
    watch_clients: int = 10000
    watch_size: int = 20
    watch_workers: int = 4


QUICK = Plan(
    relay_seconds=4.0,
    rtt_seconds=3.0,
    setup_rounds=2,
    storm_sizes=(100, 400),
    idle_clients=500,
    profile_seconds=3.0,
    presence_clients=400,
    watch_clients=1000,
    watch_workers=2,
)


def _measure(results: dict[str, Any], name: str, server: services.Process | None, step: Any) -> None:
    """Run one measurement; a failure is recorded (with the server's last log lines), not raised."""
    began = time.monotonic()
    print(f"  {name} ...", end="", flush=True)
    try:
        results[name] = step()
        print(f" {time.monotonic() - began:.0f} s", flush=True)
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        if server is not None:
            results[name]["server_log"] = server.log_tail()
        print(f" FAILED: {exc}", flush=True)


def _profile_relay(server: services.Process, kind: str, plan: Plan, out: Path) -> dict[str, Any]:
    """Profile the server with py-spy under the relay load (a separate, unmeasured run)."""
    scenarios.relay(
        server,
        kind,
        f"p{out.stem}",
        plan.relay_pairs,
        plan.relay_window,
        plan.relay_workers,
        plan.profile_seconds,
        during=lambda seconds: profiling.record(server.pid, seconds, out),
    )
    return profiling.summarize(out)


def _profile_setup(server: services.Process, plan: Plan, out: Path) -> dict[str, Any]:
    """Profile the server with py-spy over call set-up rounds (a separate, unmeasured run)."""
    spy = profiling.record(server.pid, plan.profile_seconds, out)
    try:
        deadline = time.monotonic() + plan.profile_seconds
        round_number = 0
        while time.monotonic() < deadline:
            scenarios.call_setup(server, f"ps{round_number}", plan.setup_concurrency, 2)
            round_number += 1
    finally:
        spy.wait(60)
    return profiling.summarize(out)


def _profile_storm(server: services.Process, plan: Plan, out: Path) -> dict[str, Any]:
    clients = plan.storm_sizes[-1]
    spy = profiling.record(server.pid, plan.profile_seconds, out)
    try:
        scenarios.storm(server, "pstorm", clients, plan.storm_batch, plan.storm_workers, timeout=120)
    finally:
        spy.wait(120)
    return profiling.summarize(out)


def _profile_presence(server: services.Process, storm: presence.Storm, plan: Plan, out: Path) -> dict[str, Any]:
    """Profile the server with py-spy over a presence sign-in storm (a separate, unmeasured run)."""
    spy = profiling.record(server.pid, plan.profile_seconds, out)
    try:
        presence.sign_in([server], storm, before_release=lambda: spy.wait(120))
    finally:
        spy.wait(120)
    return profiling.summarize(out)


class Servers:
    """Fresh daphne processes for one configuration: a new database each, and Redis flushed first."""

    def __init__(self, redis: services.Process | None = None, postgres: services.PostgresServer | None = None) -> None:
        self.redis, self.postgres = redis, postgres
        self._shared: dict[str, str] = {}

    def fresh(self, **settings: str) -> ContextManager[services.Process]:
        """A new process, with a new database and (with Redis) no presence left from the last one."""
        if self.redis is not None:
            services.flush_redis(self.redis.port)
        self._shared = {
            "redis_url": f"redis://127.0.0.1:{self.redis.port}/0" if self.redis else "",
            "database_url": self.postgres.new_database() if self.postgres else "",
        }
        return services.daphne(**self._shared, **settings)

    def another(self, **settings: str) -> ContextManager[services.Process]:
        """A second process sharing the last fresh one's Redis and database."""
        return services.daphne(**self._shared, **settings)


def run_configuration(
    name: str,
    plan: Plan,
    profile: bool,
    redis: services.Process | None = None,
    postgres: services.PostgresServer | None = None,
    only: str | None = None,
) -> dict[str, Any]:
    """Every measurement of our server in one configuration (or only one group of them)."""
    results: dict[str, Any] = {}
    servers = Servers(redis, postgres)
    if only is None:
        _core_measurements(results, name, plan, profile, servers)
    _presence_measurements(results, name, plan, profile, servers)
    return results


def _core_measurements(results: dict[str, Any], name: str, plan: Plan, profile: bool, servers: Servers) -> None:
    """Relay, round trip, call set-up, the v1 sign-in storm and idle memory."""
    with servers.fresh(SIGNALING_RATE=UNLIMITED_RATE) as daphne:
        url = f"ws://127.0.0.1:{daphne.port}/"
        _measure(results, "extensions", daphne, lambda: scenarios.negotiated_extensions(url))

        _measure(
            results,
            "relay",
            daphne,
            lambda: scenarios.relay(
                daphne,
                "signaling",
                "r",
                plan.relay_pairs,
                plan.relay_window,
                plan.relay_workers,
                plan.relay_seconds,
                helper=servers.redis,
            ),
        )
        if servers.redis is not None:
            # The relay above keeps both parties on one process, where they skip Redis;
            # here each pair spans two processes, so every message goes through Redis.
            scenarios.wait_idle(daphne)
            with servers.another(SIGNALING_RATE=UNLIMITED_RATE) as second:
                _measure(
                    results,
                    "relay_two_processes",
                    daphne,
                    lambda: scenarios.relay(
                        daphne,
                        "signaling",
                        "x",
                        plan.relay_pairs,
                        plan.relay_window,
                        plan.relay_workers,
                        plan.relay_seconds,
                        helper=servers.redis,
                        second=second,
                    ),
                )
        scenarios.wait_idle(daphne)
        _measure(
            results,
            "rtt",
            daphne,
            lambda: scenarios.round_trip(daphne, "signaling", "t", plan.rtt_pairs, plan.rtt_rate, plan.rtt_seconds),
        )
        scenarios.wait_idle(daphne)
        _measure(
            results,
            "call_setup",
            daphne,
            lambda: scenarios.call_setup(daphne, "c", plan.setup_concurrency, plan.setup_rounds),
        )
        scenarios.wait_idle(daphne)
        # The same set-ups from plain sockets, as they are measured against the v1 design's server.
        _measure(
            results,
            "call_setup_plain",
            daphne,
            lambda: scenarios.call_setup(daphne, "cp", plan.setup_concurrency, plan.setup_rounds, plain=True),
        )
        if profile:
            scenarios.wait_idle(daphne)
            raw = services.WORK / f"profile-relay-{name}.raw"
            _measure(results, "profile_relay", daphne, lambda: _profile_relay(daphne, "signaling", plan, raw))
            raw = services.WORK / f"profile-setup-{name}.raw"
            _measure(results, "profile_call_setup", daphne, lambda: _profile_setup(daphne, plan, raw))
    for clients in plan.storm_sizes:
        with servers.fresh() as daphne:
            _measure(
                results,
                f"storm_{clients}",
                daphne,
                lambda n=clients: scenarios.storm(daphne, "s", n, plan.storm_batch, plan.storm_workers, timeout=180)[0],
            )
    if profile and name == "memory":
        with servers.fresh() as daphne:
            raw = services.WORK / f"profile-storm-{name}.raw"
            _measure(results, "profile_storm", daphne, lambda: _profile_storm(daphne, plan, raw))
    with servers.fresh(SIGNALING_PRESENCE_WINDOW_MS=DEFERRED_PRESENCE_MS) as daphne:
        _measure(
            results,
            "idle_memory",
            daphne,
            lambda: scenarios.idle_memory(daphne, "m", plan.idle_clients, plan.idle_workers),
        )


def _presence_measurements(results: dict[str, Any], name: str, plan: Plan, profile: bool, servers: Servers) -> None:
    """Sign-in storms of clients following presence as deltas and through watch lists (bench/presence.py)."""
    delta = presence.Storm(
        "d", plan.presence_clients, presence.DELTA, batch=plan.storm_batch, workers=plan.presence_workers
    )
    with servers.fresh() as daphne:
        _measure(
            results, "presence_delta", daphne, lambda: presence.follow_everyone(daphne, delta, plan.presence_settle)
        )
    if profile:
        with servers.fresh() as daphne:
            raw = services.WORK / f"profile-presence-delta-{name}.raw"
            _measure(
                results,
                "profile_presence_delta",
                daphne,
                lambda: _profile_presence(daphne, replace(delta, prefix="pd"), plan, raw),
            )
    if name == "memory":
        # The same storm as v1 clients (full lists), for the memory it leaves behind.
        full = replace(delta, prefix="f", mode=presence.FULL)
        with servers.fresh() as daphne:
            _measure(
                results, "presence_full", daphne, lambda: presence.follow_everyone(daphne, full, plan.presence_settle)
            )
    watch = presence.Storm(
        "w",
        plan.watch_clients,
        presence.WATCH,
        batch=plan.storm_batch,
        workers=plan.watch_workers,
        watch=plan.watch_size,
        timeout=WATCH_TIMEOUT,
    )
    with ExitStack() as stack:
        # In memory, one process; with Redis, two, each with half of the clients.
        processes = [stack.enter_context(servers.fresh())]
        if servers.redis is not None:
            processes.append(stack.enter_context(servers.another()))
        _measure(results, "presence_watch", processes[0], lambda: presence.follow_watch_lists(processes, watch))
    if name == "memory":
        # The same storm with empty watch lists: what the lists themselves cost per connection.
        with servers.fresh() as daphne:
            unwatched = replace(watch, prefix="e", watch=0)
            _measure(results, "presence_watch_empty", daphne, lambda: presence.follow_watch_lists([daphne], unwatched))


def run_v1(plan: Plan) -> dict[str, Any]:
    """The v1 design's server (bench/v1_server.py) under the relay load and the plain-socket call set-up."""
    results: dict[str, Any] = {}
    with services.v1_server() as server:
        _measure(
            results,
            "relay",
            server,
            lambda: scenarios.relay(
                server, "v1", "r", plan.relay_pairs, plan.relay_window, plan.relay_workers, plan.relay_seconds
            ),
        )
        scenarios.wait_idle(server)
        _measure(
            results,
            "call_setup_plain",
            server,
            lambda: scenarios.call_setup(server, "cp", plan.setup_concurrency, plan.setup_rounds, plain=True),
        )
    return results


def run_peerjs(plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {"version": services.PEERJS_VERSION}
    with services.peerjs_server() as server:
        base = f"ws://127.0.0.1:{server.port}/"
        _measure(
            results,
            "extensions",
            server,
            lambda: scenarios.negotiated_extensions(f"{base}peerjs?key=peerjs&id=probe&token=probe"),
        )
        _measure(
            results,
            "relay",
            server,
            lambda: scenarios.relay(
                server, "peerjs", "r", plan.relay_pairs, plan.relay_window, plan.relay_workers, plan.relay_seconds
            ),
        )
        _measure(
            results,
            "rtt",
            server,
            lambda: scenarios.round_trip(server, "peerjs", "t", plan.rtt_pairs, plan.rtt_rate, plan.rtt_seconds),
        )
    return results


def _tool_version(*command: str) -> str:
    if shutil.which(command[0]) is None:
        return "missing"
    result = subprocess.run(command, capture_output=True, text=True)
    return (result.stdout or result.stderr).strip().splitlines()[0] if result.returncode == 0 else "unknown"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "node": _tool_version("node", "--version"),
        "redis": _tool_version("redis-server", "--version"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmark the signaling server.")
    parser.add_argument("--quick", action="store_true", help="short smoke run (small loads, not for the README)")
    parser.add_argument("--skip-redis", action="store_true", help="only the in-memory configuration")
    parser.add_argument("--skip-peerjs", action="store_true", help="no PeerJS comparison")
    parser.add_argument("--skip-v1", action="store_true", help="no comparison with the v1 design's server")
    parser.add_argument(
        "--servers",
        action="store_true",
        help="also run our app under uvicorn and granian (bench/asgi_servers.py): relay, storm, guarantees",
    )
    parser.add_argument("--no-profile", action="store_true", help="no py-spy profiles")
    parser.add_argument(
        "--only",
        choices=["presence"],
        help="only this group of measurements (no PeerJS, no micro-costs; written to bench/.work/results/)",
    )
    parser.add_argument("--output", type=Path, help="folder for latest.json and latest.md (default bench/results/)")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = services.WORK / "results" if args.only else RESULTS
    plan = QUICK if args.quick else Plan()
    services.WORK.mkdir(parents=True, exist_ok=True)
    fd_limit = services.raise_fd_limit()
    began = time.monotonic()
    results: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "only": args.only,
        "machine": {**machine(), "open_file_limit": fd_limit},
        "plan": plan.__dict__ | {"storm_sizes": list(plan.storm_sizes)},
        "configurations": {},
    }
    profile = not args.no_profile
    print("memory: in-memory channel layer, SQLite", flush=True)
    results["configurations"]["memory"] = run_configuration("memory", plan, profile, only=args.only)
    if not args.skip_redis:
        print("redis: Redis channel layer and presence, PostgreSQL", flush=True)
        with ExitStack() as stack:
            redis = stack.enter_context(services.redis_server())
            postgres = stack.enter_context(services.postgres_cluster())
            results["configurations"]["redis"] = run_configuration("redis", plan, profile, redis, postgres, args.only)
    if not (args.skip_v1 or args.only):
        print("v1: the v1 design on plain websockets (bench/v1_server.py)", flush=True)
        results["v1"] = run_v1(plan)
    if not (args.skip_peerjs or args.only):
        print(f"peerjs: PeerJS server {services.PEERJS_VERSION} (node)", flush=True)
        results["peerjs"] = run_peerjs(plan)
    if args.servers and not args.only:
        print("ASGI servers: our app (in-memory + SQLite) under " + ", ".join(services.ASGI_SERVERS), flush=True)
        try:
            results["asgi_servers"] = asgi_servers.run(
                asgi_servers.QUICK if args.quick else asgi_servers.Plan(), profile
            )
        except Exception as exc:  # the figures measured so far are still written
            print(f"ASGI servers FAILED: {type(exc).__name__}: {exc}", flush=True)
    if not args.only:
        print("micro-costs ...", flush=True)
        results["micro_costs_us"] = profiling.micro_costs()
    results["duration_s"] = round(time.monotonic() - began)
    results["summary"] = report.summary(results)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = report.markdown(results)
    if "asgi_servers" in results:
        markdown += "\n" + asgi_servers.markdown(results["asgi_servers"])
    (args.output / "latest.md").write_text(markdown)
    print()
    print(report.table(results))
    if "asgi_servers" in results:
        print()
        print(asgi_servers.table(results["asgi_servers"]))
    print(f"\nWrote {args.output / 'latest.json'} and {args.output / 'latest.md'} ({results['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
