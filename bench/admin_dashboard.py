"""The admin's calls dashboard and call list on a million calls: how long each query and page takes.

    python -m bench.admin_dashboard [--calls 1000000] [--repeat 5] [--backends sqlite postgres]

For each database (a throwaway SQLite file in bench/.work, and a throwaway PostgreSQL
cluster when PostgreSQL is installed) a child process migrates a fresh database, writes
`--calls` calls in bulk, spread over 30 days as a service sees them (more by day than by
night; 60 % answered, with lognormal answer times and exponential talk times; busy,
missed, rejected, cancelled and failed calls for the rest; a few live now) between
10,000 users, then times, each the median of `--repeat` runs after one warm-up:

- each figure of the dashboard (calls/callflow/stats.py), one query each;
- the dashboard page itself, through Django's async test client (the view, its
  presence read and its template included; no network);
- the call list as an operator uses it: its first page, sorted by time to answer and
  by duration, searched by call id and by username, filtered to live calls and to today;
  a call's page; the users' list.

PostgreSQL gets a VACUUM ANALYZE after the load, as autovacuum would give it; SQLite gets
no ANALYZE, as most deployments never run one. On PostgreSQL the median and 90th
percentile are also checked against its own percentile_disc (to the millisecond). Not part of `make test`: `make bench-admin`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
USERS = 10_000
DAYS = 30
BATCH = 20_000
# (status, end reason, share of calls): what a calling service's month looks like.
OUTCOMES = [
    ("completed", "hangup", 0.55),
    ("completed", "disconnected", 0.05),
    ("missed", "timeout", 0.12),
    ("rejected", "rejected", 0.08),
    ("busy", "busy", 0.07),
    ("cancelled", "cancelled", 0.10),
    ("failed", "disconnected", 0.03),
]
LIVE_CALLS = 40
COLUMNS = [
    "id",
    "caller_id",
    "callee_id",
    "status",
    "end_reason",
    "created_at",
    "answered_at",
    "ended_at",
    "ring_deadline",
    "caller_channel",
    "callee_channel",
    "caller_device",
    "callee_device",
    "pushed",
]


# --- The parent: one child per database ---------------------------------------------------------


def child_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNALING_", "DJANGO_SETTINGS"))}
    env.update(
        {
            "DATABASE_URL": database_url,
            "DEBUG": "false",
            "SECRET_KEY": "benchmark-only-secret-key-not-for-production-0123456789",
            "ALLOWED_HOSTS": "testserver",
            "LOG_LEVEL": "warning",
        }
    )
    return env


def run_child(backend: str, database_url: str, args: argparse.Namespace) -> dict[str, Any]:
    result = WORK / f"admin-dashboard-{backend}.json"
    command = [sys.executable, "-m", "bench.admin_dashboard", "--child", backend, "--result", str(result)]
    command += ["--calls", str(args.calls), "--repeat", str(args.repeat)]
    subprocess.run(command, cwd=ROOT, env=child_env(database_url), check=True)
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--child", choices=["sqlite", "postgres"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    from calls.testing.services import PostgresServer, ServiceMissing

    WORK.mkdir(parents=True, exist_ok=True)
    results = {}
    with ExitStack() as stack:
        for backend in args.backends:
            if backend == "sqlite":
                database = WORK / "admin-dashboard.sqlite3"
                for path in WORK.glob("admin-dashboard.sqlite3*"):
                    path.unlink()
                stack.callback(lambda: [path.unlink() for path in WORK.glob("admin-dashboard.sqlite3*")])
                results[backend] = run_child(backend, f"sqlite:///{database}", args)
            else:
                try:
                    cluster = PostgresServer()
                except ServiceMissing as exc:
                    print(f"PostgreSQL skipped: {exc}")
                    continue
                stack.callback(cluster.close)
                cluster.start()
                results[backend] = run_child(backend, cluster.new_database(), args)
    report(results, args)
    return 0


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    backends = list(results)
    print(f"\nAdmin dashboard on {args.calls:,} calls over {DAYS} days; ms, median of {args.repeat} runs")
    print(f"{'':46}" + "".join(f"{b + ' ' + results[b]['version']:>22}" for b in backends))
    print(f"{'seeding (s)':46}" + "".join(f"{results[b]['seed_seconds']:>22.1f}" for b in backends))
    for name in results[backends[0]]["timings"]:
        print(f"{name:46}" + "".join(f"{results[b]['timings'][name]:>22.1f}" for b in backends))
    for backend in backends:
        for line in results[backend]["notes"]:
            print(f"{backend}: {line}")


# --- The child: one database ------------------------------------------------------------------------


def seed_rows(count: int, user_ids: list[int], now: datetime, rng: random.Random) -> Any:
    """Yield `count` call rows as Python values, in COLUMNS order, in no order of time (as ids are random)."""
    weights = [share for *_, share in OUTCOMES]
    for index in range(count):
        while True:
            started = now - timedelta(seconds=60 + rng.random() * (DAYS * 86400 - 60))
            # Busiest in the afternoon, quietest before dawn.
            if rng.random() < 0.15 + 0.85 * math.sin(math.pi * ((started.hour - 5) % 24) / 24) ** 2:
                break
        status, reason, _ = rng.choices(OUTCOMES, weights)[0]
        answered = ended = None
        if status == "completed":
            answered = started + timedelta(seconds=min(44.0, rng.lognormvariate(math.log(5), 0.7)))
            ended = answered + timedelta(seconds=rng.expovariate(1 / 180))
        elif status == "missed":
            ended = started + timedelta(seconds=45)
        elif status != "busy":
            ended = started + timedelta(seconds=rng.uniform(1, 40))
        else:
            ended = started
        if index < LIVE_CALLS:  # a few live now: ringing, or answered and talking
            started = now - timedelta(seconds=rng.uniform(1, 300))
            status, reason, ended = ("ringing", None, None) if index % 2 else ("answered", None, None)
            answered = started + timedelta(seconds=2) if status == "answered" else None
        caller, callee = rng.sample(user_ids, 2)
        yield (
            uuid.uuid4(),
            caller,
            callee,
            status,
            reason,
            started,
            answered,
            ended,
            started + timedelta(seconds=45) if status == "ringing" else None,
            "",
            "",
            f"device-{caller % 3}",
            f"device-{callee % 3}" if answered else "",
            False,
        )


def seed(count: int) -> float:
    """Write USERS users and `count` calls in bulk; return the seconds it took."""
    from django.db import connection, transaction
    from django.utils import timezone

    from calls.models import Call

    started = time.perf_counter()
    now = timezone.now()
    rng = random.Random(20260101)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO calls_signalinguser (username, user_id, first_seen, last_seen) VALUES (%s, %s, %s, %s)",
            [
                (f"user{i:05d}", f"id-{i}", *map(connection.ops.adapt_datetimefield_value, (now, now)))
                for i in range(USERS)
            ],
        )
        cursor.execute("SELECT id FROM calls_signalinguser")
        user_ids = [row[0] for row in cursor.fetchall()]
    rows = seed_rows(count, user_ids, now, rng)
    if connection.vendor == "postgresql":
        connection.ensure_connection()
        with connection.connection.cursor() as cursor:
            with cursor.copy(f"COPY calls_call ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        connection.connection.commit()
        # What autovacuum does after a load: statistics, and the visibility map that lets
        # PostgreSQL answer from the index alone.
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
    else:
        # A load, not a service: no fsync per batch.
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA synchronous = OFF")
        adapt_time = connection.ops.adapt_datetimefield_value
        adapt_id = Call._meta.pk.get_db_prep_value
        placeholders = ", ".join(["%s"] * len(COLUMNS))
        sql = f"INSERT INTO calls_call ({', '.join(COLUMNS)}) VALUES ({placeholders})"
        while batch := [
            (adapt_id(row[0], connection), *row[1:5], *map(adapt_time, row[5:9]), *row[9:])
            for _, row in zip(range(BATCH), rows, strict=False)
        ]:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.executemany(sql, batch)
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA synchronous = NORMAL")
    return time.perf_counter() - started


def timed(repeat: int, run: Callable[[], Any]) -> float:
    """The median milliseconds of `repeat` runs, after one to warm the caches."""
    run()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def figure_timings(repeat: int) -> dict[str, float]:
    from django.utils import timezone

    from calls.callflow import stats

    now = timezone.localtime()
    hours = stats.hour_bounds(now)
    days = stats.day_bounds(now)
    return {
        "query: calls per hour, 24 h": timed(repeat, lambda: stats.calls_by_bucket(hours)),
        "query: calls per day, 30 days": timed(repeat, lambda: stats.calls_by_bucket(days)),
        "query: outcomes, 24 h": timed(repeat, lambda: stats.outcomes(hours[0], hours[-1])),
        "query: median and p90 time to answer, 24 h": timed(repeat, lambda: stats.answer_times(hours[0], hours[-1])),
        "query: live calls (count, and the first 100)": timed(
            repeat, lambda: (stats.live_call_count(), stats.live_calls(100))
        ),
    }


def page_timings(repeat: int) -> dict[str, float]:
    """The pages through Django's async test client, signed in as a superuser (one event loop, as under daphne)."""
    from asgiref.sync import sync_to_async
    from django.contrib.auth import get_user_model
    from django.test import AsyncClient
    from django.utils import timezone

    from calls.callflow import store
    from calls.callflow.states import EndReason
    from calls.models import Call

    def a_call_with_a_timeline() -> str:
        alice = store.Actor("specific.a!1", "user00001", "device-1")
        record = store.start_call(alice, "user00002", ring_timeout=30)
        store.accept_call(record.call_id, store.Actor("specific.b!2", "user00002", "device-2"))
        store.end_call(record.call_id, EndReason.HANGUP, alice, party=True)
        return record.call_id

    async def measure() -> dict[str, float]:
        admin = await get_user_model().objects.acreate(username="bench", is_staff=True, is_superuser=True)
        client = AsyncClient()
        await client.aforce_login(admin)
        call_id = await sync_to_async(a_call_with_a_timeline)()
        some_call = await Call.objects.order_by("created_at").afirst()
        user_pk = some_call.caller_id
        # As the list's own "Today" filter puts it.
        today = urlencode(
            {"created_at__gte": str(timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0))}
        )
        pages = {
            "page: dashboard (total)": "/admin/calls/call/dashboard/",
            "page: call list, newest first": "/admin/calls/call/",
            "page: call list by time to answer": "/admin/calls/call/?o=-5",
            "page: call list by duration": "/admin/calls/call/?o=-6",
            "page: call list by time to answer, today": f"/admin/calls/call/?o=-5&{today}",
            "page: call list, search a short call id": f"/admin/calls/call/?q={some_call.pk.hex[:8]}",
            "page: call list, search a username": "/admin/calls/call/?q=user00042",
            "page: call list, live now": "/admin/calls/call/?live=now",
            "page: call list, one user's calls": f"/admin/calls/call/?party={user_pk}",
            "page: a call with its timeline": f"/admin/calls/call/{call_id}/change/",
            "page: users": "/admin/calls/signalinguser/",
        }
        timings = {}
        for name, url in pages.items():
            samples = []
            for attempt in range(repeat + 1):
                started = time.perf_counter()
                response = await client.get(url, secure=True)
                if attempt:
                    samples.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, (url, response.status_code)
            timings[name] = statistics.median(samples)
        return timings

    return asyncio.run(measure())


def check_percentiles() -> str:
    """Compare the dashboard's median and p90 with PostgreSQL's own percentile_disc over the same window."""
    from django.db import connection
    from django.utils import timezone

    from calls.callflow import stats

    hours = stats.hour_bounds(timezone.localtime())
    ours = stats.answer_times(hours[0], hours[-1])
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT percentile_disc(ARRAY[0.5, 0.9]) WITHIN GROUP (ORDER BY answered_at - created_at)"
            " FROM calls_call WHERE created_at >= %s AND created_at < %s AND answered_at IS NOT NULL",
            [hours[0], hours[-1]],
        )
        median, p90 = cursor.fetchone()[0]
    same = [round(t.total_seconds(), 3) for t in (median, p90)] == [t.total_seconds() for t in (ours.median, ours.p90)]
    return f"median {ours.median} and p90 {ours.p90} {'equal' if same else 'DIFFER FROM'} percentile_disc's"


def child(args: argparse.Namespace) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signaling_project.settings")
    # No collectstatic here: WhiteNoise serves from the finders, and says so for every client.
    warnings.filterwarnings("ignore", message="No directory at")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    seconds = seed(args.calls)
    timings = {**figure_timings(args.repeat), **page_timings(args.repeat)}
    notes = []
    if connection.vendor == "postgresql":
        notes.append(check_percentiles())
        version = connection.cursor().connection.info.server_version
        version = f"{version // 10000}.{version % 10000}"
    else:
        version = connection.Database.sqlite_version
        size = Path(connection.settings_dict["NAME"]).stat().st_size
        notes.append(f"database file {size / 2**20:.0f} MiB")
    args.result.write_text(
        json.dumps({"version": version, "seed_seconds": seconds, "timings": timings, "notes": notes})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
