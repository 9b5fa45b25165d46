"""The ASGI server's share: our app (in-memory layer + SQLite) under daphne, uvicorn and granian.

    python -m bench.asgi_servers [--quick] [--servers daphne,uvicorn,granian] [--no-profile]
    python -m bench --servers      # the same, after the other measurements, in latest.{json,md}

daphne runs through bin/serve, the one start command; uvicorn with its
`websockets` implementation and granian (`--interface asgi`) get bin/serve's
settings where they have one (bench/services.py `asgi_command`). For each
server, on fresh processes: the relay load of `make bench` (messages per server
CPU-second; granian's is the CPU of its supervisor and worker processes), the
call set-up, the 2,000-client sign-in storm (seconds and server CPU), a py-spy
profile of the relay (the share of samples in the server's own packages), and
the guarantees calls/server/daphne.py gives under daphne
(bench/server_guarantees.py). The issue's rule: another server is offered in
bin/serve only if it is at least 1.5x as efficient and every guarantee holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import profiling, scenarios, server_guarantees, services

# See bench/run.py: the relay load must not be capped by the per-socket rate limit.
UNLIMITED_RATE = "1000000/1000000"
# Another server is worth offering at this many times daphne's relay per CPU-second.
WORTH_OFFERING = 1.5
# Where each server's own code lives, by the top folder py-spy names (asyncio, the app and
# channels are shared by all three).
SERVER_PACKAGES = {
    "daphne": ("daphne", "autobahn", "twisted", "txaio", "zope"),
    "uvicorn": ("uvicorn", "websockets", "h11"),
    "uvicorn-sansio": ("uvicorn", "websockets", "h11"),
    "granian": ("granian",),
}
GUARANTEES = {
    "shutdown": "1012 to every socket on SIGTERM, exit, call ended",
    "send_buffer": "a client that stops reading is cut off",
    "message_size": "1 MiB frame refused by the server, 64 KB+ answered by the app",
    "pings": "pings sent; an unanswering client cut off after interval + timeout",
    "liveness_probe": "a silent name holder is pinged and gives way (v1 reconnect)",
}


@dataclass(frozen=True)
class Plan:
    relay_pairs: int = 20
    relay_window: int = 4
    relay_workers: int = 2
    relay_seconds: float = 12.0
    setup_concurrency: int = 50
    setup_rounds: int = 5
    storm_clients: int = 2000
    storm_batch: int = 100
    storm_workers: int = 2
    profile_seconds: float = 10.0


QUICK = Plan(relay_seconds=4.0, setup_rounds=2, storm_clients=400, profile_seconds=3.0)


def _step(results: dict[str, Any], name: str, server: services.Process, step: Callable[[], Any]) -> None:
    """Run one measurement or check; a failure is recorded with the server's last log lines, not raised."""
    began = time.monotonic()
    print(f"  {server.name} {name} ...", end="", flush=True)
    try:
        results[name] = step()
        print(f" {time.monotonic() - began:.0f} s", flush=True)
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "server_log": server.log_tail()}
        print(f" FAILED: {exc}", flush=True)


def _profile_relay(server: services.Process, plan: Plan) -> dict[str, Any]:
    """py-spy over a separate relay run; for granian, of its worker process (Rust frames are not seen)."""
    workers = services.descendants(server.pid) if server.whole_tree else []
    pid = workers[0] if workers else server.pid
    out = services.WORK / f"profile-relay-{server.name}.raw"
    scenarios.relay(
        server,
        "signaling",
        "p",
        plan.relay_pairs,
        plan.relay_window,
        plan.relay_workers,
        plan.profile_seconds,
        during=lambda seconds: profiling.record(pid, seconds, out),
    )
    summary = profiling.summarize(out)
    own = SERVER_PACKAGES.get(server.name, ())
    summary["server_share"] = round(sum(e["share"] for e in summary["by_package"] if e["frame"] in own), 3)
    return summary


def _log_problems(server: services.Process) -> dict[str, int]:
    """Each distinct error in the server's log (a traceback's exception, an error the app logged) and its count."""
    found: Counter[str] = Counter()
    lines = server.log_path.read_text(errors="replace").splitlines()
    for index, line in enumerate(lines):
        if line.startswith("Traceback"):
            # The exception is the first line after the traceback's indented frames.
            exception = next((later for later in lines[index + 1 :] if later and not later[0].isspace()), "?")
            found[f"traceback: {exception[:160]}"] += 1
        elif "level=error" in line:
            message = re.search(r'msg="([^"]*)"', line)
            # An exception the app logged is in its exc field, its last line after the last escaped newline.
            exception = re.findall(r"\\n(\w[\w.]*(?:Error|Exception|Full)\b[^\\\"]*)", line)
            found[f"app error: {message[1] if message else line[:80]}: {exception[-1][:120] if exception else ''}"] += 1
    return dict(found.most_common(8))


def _on_fresh_server(
    results: dict[str, Any], kind: str, settings: dict[str, str], steps: dict[str, Callable[[services.Process], Any]]
) -> Counter[str]:
    """Run `steps` in order against one new process of `kind`; return the errors its log shows.

    A server that does not start fails its steps (recorded), not the whole comparison.
    """
    try:
        with services.asgi_server(kind, **settings) as server:
            for name, step in steps.items():
                _step(results, name, server, lambda step=step: step(server))
            return Counter(_log_problems(server))
    except Exception as exc:
        for name in steps:
            results.setdefault(name, {"error": f"the server did not start or stop: {type(exc).__name__}: {exc}"})
        return Counter()


def measure(kind: str, plan: Plan, profile: bool) -> dict[str, Any]:
    """Every figure and check of our app under one ASGI server."""

    def relay(server: services.Process) -> dict[str, Any]:
        return scenarios.relay(
            server, "signaling", "r", plan.relay_pairs, plan.relay_window, plan.relay_workers, plan.relay_seconds
        )

    def call_setup(server: services.Process) -> dict[str, Any]:
        scenarios.wait_idle(server)
        return scenarios.call_setup(server, "c", plan.setup_concurrency, plan.setup_rounds)

    def profile_relay(server: services.Process) -> dict[str, Any]:
        scenarios.wait_idle(server)
        return _profile_relay(server, plan)

    def storm(server: services.Process) -> dict[str, Any]:
        figures, _ = scenarios.storm(server, "s", plan.storm_clients, plan.storm_batch, plan.storm_workers, timeout=180)
        return figures

    results: dict[str, Any] = {}
    steps = {"relay": relay, "call_setup": call_setup} | ({"profile_relay": profile_relay} if profile else {})
    problems = _on_fresh_server(results, kind, {"SIGNALING_RATE": UNLIMITED_RATE}, steps)
    problems += _on_fresh_server(results, kind, {}, {"storm": storm})
    results["guarantees"] = guarantees(kind)
    results["log_problems"] = dict(problems)
    return results


def guarantees(kind: str) -> dict[str, Any]:
    """Each check of bench/server_guarantees.py against fresh processes of one server."""
    checks = server_guarantees
    found: dict[str, Any] = {}

    def check(name: str) -> Callable[[services.Process], Any]:
        return lambda server: asyncio.run(getattr(checks, name)(server))

    unlimited = {"SIGNALING_RATE": UNLIMITED_RATE}
    _on_fresh_server(found, kind, unlimited, {n: check(n) for n in ("message_size", "liveness_probe", "send_buffer")})
    _on_fresh_server(found, kind, checks.PING_SETTINGS, {"pings": check("pings")})
    _on_fresh_server(found, kind, {"SIGNALING_PRESENCE_WINDOW_MS": "20"}, {"shutdown": check("shutdown")})
    return found


def run(plan: Plan, profile: bool, kinds: tuple[str, ...] = services.ASGI_SERVERS) -> dict[str, Any]:
    """Measure every server in `kinds`; daphne first, as every ratio is to it."""
    results: dict[str, Any] = {"plan": plan.__dict__, "servers": {}}
    for kind in kinds:
        print(f"{kind}: our app, in-memory layer + SQLite", flush=True)
        results["servers"][kind] = measure(kind, plan, profile)
    results["summary"] = summary(results)
    return results


# --- Report -------------------------------------------------------------------------------


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
        if isinstance(data, dict) and "error" in data:
            return None
    return data


def _versus(value: float | None, daphne: float | None, kind: str, higher_is_better: bool = True) -> str | None:
    """A figure with its ratio to daphne's (how many times as good)."""
    if value is None:
        return None
    if kind == "daphne" or not daphne:
        return f"{value:,}" if isinstance(value, int) else str(value)
    ratio = value / daphne if higher_is_better else daphne / value
    shown = f"{value:,}" if isinstance(value, int) else str(value)
    return f"{shown} ({ratio:.2f}x)"


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """One row per figure and guarantee, and per server whether it is worth offering in bin/serve."""
    servers = results["servers"]
    base = servers.get("daphne", {})
    rows: list[dict[str, Any]] = []

    def row(metric: str, values: dict[str, Any]) -> None:
        rows.append({"metric": metric, "values": values})

    def figure(*path: str, higher_is_better: bool = True) -> dict[str, Any]:
        return {k: _versus(_get(r, *path), _get(base, *path), k, higher_is_better) for k, r in servers.items()}

    row("Relay: messages per server CPU-second (x daphne's)", figure("relay", "msgs_per_cpu_s"))
    row("Relay: messages per second, wall clock", figure("relay", "msgs_per_s"))
    row("Relay: server CPU, share of one core", {k: _get(r, "relay", "server_core_share") for k, r in servers.items()})
    shares = {k: _get(r, "profile_relay", "server_share") for k, r in servers.items()}
    if shares.get("granian") is not None:
        shares["granian"] = f"{shares['granian']} (its Rust threads are not sampled)"
    row("Relay profile: share of samples in the server's own packages (py-spy, Python frames)", shares)
    setup = {k: _get(r, "call_setup") for k, r in servers.items()}
    row(
        "Call set-up p50 / p99 (ms), library clients",
        {k: f"{s['p50_ms']} / {s['p99_ms']}" if s else None for k, s in setup.items()},
    )
    row(
        "Call set-up: server CPU per set-up and hang-up (ms, x daphne's)",
        figure("call_setup", "server_cpu_ms_per_set_up", higher_is_better=False),
    )
    clients = results["plan"]["storm_clients"]
    row(
        f"Sign-in storm, {clients:,} clients: s until all see the full list (x daphne's speed)",
        figure("storm", "seconds", higher_is_better=False),
    )
    row(
        "Sign-in storm: server CPU seconds (x daphne's efficiency)",
        figure("storm", "server_cpu_s", higher_is_better=False),
    )
    row(
        "Errors in the server's log during the relay, set-up and storm",
        {k: sum(r.get("log_problems", {}).values()) for k, r in servers.items()},
    )
    for name, text in GUARANTEES.items():
        row(f"Guarantee: {text}", {k: _verdict(_get(r, "guarantees", name)) for k, r in servers.items()})
    verdicts = {}
    daphne_relay = _get(base, "relay", "msgs_per_cpu_s")
    for kind, data in servers.items():
        if kind == "daphne":
            continue
        relay = _get(data, "relay", "msgs_per_cpu_s")
        ratio = round(relay / daphne_relay, 2) if relay and daphne_relay else None
        held = [name for name in GUARANTEES if _get(data, "guarantees", name, "holds")]
        verdicts[kind] = {
            "relay_vs_daphne": ratio,
            "efficient_enough": ratio is not None and ratio >= WORTH_OFFERING,
            "guarantees_failing": [name for name in GUARANTEES if name not in held],
        }
        verdicts[kind]["offer_in_bin_serve"] = verdicts[kind]["efficient_enough"] and len(held) == len(GUARANTEES)
    return {"rows": rows, "verdicts": verdicts}


def _verdict(check: dict[str, Any] | None) -> str | None:
    if check is None:
        return None
    details = {k: v for k, v in check.items() if k != "holds"}
    return ("holds" if check["holds"] else "FAILS") + ": " + json.dumps(details, separators=(", ", ": "))


def _lines(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    kinds = list(results["servers"])
    header = ["Figure", *kinds]
    body = [
        [r["metric"], *("-" if r["values"].get(k) is None else str(r["values"][k]) for k in kinds)]
        for r in results["summary"]["rows"]
    ]
    return header, body


def _verdict_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for kind, verdict in results["summary"]["verdicts"].items():
        failing = ", ".join(verdict["guarantees_failing"]) or "none"
        lines.append(
            f"{kind}: relay per server CPU-second {verdict['relay_vs_daphne']}x daphne's (offered at"
            f" >= {WORTH_OFFERING}x: {'met' if verdict['efficient_enough'] else 'MISSED'}); guarantees failing:"
            f" {failing}; offer in bin/serve: {'yes' if verdict['offer_in_bin_serve'] else 'no'}"
        )
    return lines


def table(results: dict[str, Any]) -> str:
    """The comparison for the terminal: figures first, then one line per guarantee and server."""
    header, body = _lines(results)
    figures = [line for line in body if not line[0].startswith("Guarantee")]
    widths = [max(len(line[i]) for line in [header, *figures]) for i in range(len(header))]
    out = ["ASGI servers: our app, in-memory layer + SQLite (ratios to daphne; > 1 is better)"]
    out += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in [header, *figures]]
    out.insert(2, "  ".join("-" * w for w in widths))
    for line in body:
        if line[0].startswith("Guarantee"):
            out.append(line[0])
            out += [f"  {kind}: {cell}" for kind, cell in zip(header[1:], line[1:], strict=True)]
    out += _problem_lines(results)
    out += _verdict_lines(results)
    return "\n".join(out)


def markdown(results: dict[str, Any]) -> str:
    header, body = _lines(results)
    lines = [
        "## ASGI servers",
        "",
        "Our app (in-memory layer + SQLite) under each server, measured in the same run"
        " (`python -m bench.asgi_servers`; ratios to daphne, > 1 is better). Each guarantee is a small client"
        " against a fresh process (bench/server_guarantees.py); its cell is what that client saw.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * len(header)) + " |",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in body]
    lines += ["", *[f"- {line}" for line in _verdict_lines(results)], ""]
    lines += _problem_lines(results)
    return "\n".join(lines)


def _problem_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for kind, data in results["servers"].items():
        for problem, count in data.get("log_problems", {}).items():
            lines.append(f"{kind} log, {count} x {problem}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.asgi_servers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (small loads)")
    parser.add_argument("--no-profile", action="store_true", help="no py-spy profile of the relay")
    parser.add_argument(
        "--servers",
        default=",".join(services.ASGI_SERVERS),
        help=f"comma-separated, daphne first (default {','.join(services.ASGI_SERVERS)}; also uvicorn-sansio)",
    )
    parser.add_argument("--output", default=str(services.WORK / "results"), help="folder for asgi_servers.{json,md}")
    args = parser.parse_args(argv)
    services.WORK.mkdir(parents=True, exist_ok=True)
    services.raise_fd_limit()
    began = time.monotonic()
    results = run(QUICK if args.quick else Plan(), not args.no_profile, tuple(args.servers.split(",")))
    results["generated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["duration_s"] = round(time.monotonic() - began)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "asgi_servers.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "asgi_servers.md").write_text(markdown(results))
    print()
    print(table(results))
    print(f"\nWrote {out / 'asgi_servers.json'} and {out / 'asgi_servers.md'} ({results['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
