"""The processes a benchmark measures: daphne, redis-server, the PeerJS server and the v1 design's.

Every process listens on a free loopback port, logs into bench/.work/, and is
stopped when its block ends. CPU time and memory are read from /proc, so they
are the server process's own, whatever else the machine is doing. Our app can
also run under uvicorn or granian instead of daphne (bench/asgi_servers.py).
"""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from calls.testing.servers import free_port, wait_for_port
from calls.testing.services import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
PEERJS_DIR = ROOT / "bench" / ".peerjs"
# The PeerJS server (npm package `peer`) the relay figures are compared with.
PEERJS_VERSION = "1.0.2"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state is [0], ppid [1], utime [11], stime [12]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU time a process (all its threads) has used so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """Return the processes started by `pid`, their children, and so on."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError):
                continue  # exited meanwhile
    found, pending = [], list(children.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children.get(child, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """Return the CPU time of a process and of every process under it (exited children not counted)."""
    total = cpu_seconds(pid)
    for child in descendants(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue
    return total


def rss_bytes(pid: int) -> int:
    """Return the resident set size of a process."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_SIZE


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Process:
    """A started server process; `pid` is the server itself (sh execs daphne).

    With `whole_tree`, its CPU time includes the processes it starts (granian
    serves from a worker process under a supervising one).
    """

    def __init__(self, name: str, args: list[str], env: dict[str, str], port: int, whole_tree: bool = False) -> None:
        self.name = name
        self.port = port
        self.whole_tree = whole_tree
        # The SQLite file of an ASGI server's app, when the harness made it.
        self.database: Path | None = None
        self.log_path = WORK / f"{name}-{port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, deadline_s=60.0, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid) if self.whole_tree else cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


BENCH_UNLIMITED = (
    "SIGNALING_CONNECT_RATE_PER_ADDRESS",
    "SIGNALING_MAX_PENDING_PER_ADDRESS",
    "SIGNALING_MAX_CONNECTIONS",
    "SIGNALING_CALLS_PER_MINUTE",
    "SIGNALING_UNANSWERED_CALLS_PER_CALLEE",
)


def _server_env(**overrides: str) -> dict[str, str]:
    """The environment of a benchmark server: production mode, nothing inherited that changes behaviour."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIGNALING_", "DJANGO_SETTINGS")) and k not in ("DATABASE_URL", "REDIS_URL", "DEBUG")
    }
    env.update(
        {
            "DEBUG": "false",
            "SECRET_KEY": "benchmark-only-secret-key-not-for-production-0123456789",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
            # The load generators are thousands of clients on one loopback address
            # calling each other as fast as they can: the abuse limits would refuse them.
            **dict.fromkeys(BENCH_UNLIMITED, "0"),
        }
    )
    env.update(overrides)
    return env


_template_db: Path | None = None


def migrated_sqlite() -> Path:
    """Return a fresh copy of a migrated SQLite database (migrated once per run)."""
    global _template_db
    if _template_db is None:
        # One per run: two runs at once (engineers sharing a machine) must not delete each other's.
        template = WORK / f"template-{os.getpid()}.sqlite3"
        template.unlink(missing_ok=True)
        env = _server_env(DATABASE_URL=f"sqlite:///{template}")
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
        atexit.register(template.unlink, missing_ok=True)
        _template_db = template
    copy = WORK / f"server-{free_port()}.sqlite3"
    shutil.copyfile(_template_db, copy)
    return copy


APPLICATION = "signaling_project.asgi:application"
# The ASGI servers our app is measured under: daphne is the one start command (bin/serve).
ASGI_SERVERS = ("daphne", "uvicorn", "granian")


def asgi_command(kind: str, port: int, env: dict[str, str]) -> list[str]:
    """The command that serves our app with one ASGI server, with bin/serve's settings where it has them."""
    if kind == "daphne":
        return ["sh", str(ROOT / "bin" / "serve")]
    if kind in ("uvicorn", "uvicorn-sansio"):
        # bin/serve's message cap (twice the app's), pings and backlog; no compression,
        # which daphne does not negotiate either; no lifespan (channels' router has none).
        # "uvicorn" is its `websockets` implementation, which it deprecates for `websockets-sansio`.
        max_bytes = 2 * int(env.get("SIGNALING_MAX_MESSAGE_BYTES", "65536"))
        implementation = "websockets-sansio" if kind == "uvicorn-sansio" else "websockets"
        return [
            sys.executable,
            "-m",
            "uvicorn",
            *("--host", "127.0.0.1", "--port", str(port), "--ws", implementation),
            *("--ws-max-size", str(max_bytes), "--ws-per-message-deflate", "false"),
            *("--ws-ping-interval", env.get("SIGNALING_PING_INTERVAL", "20")),
            *("--ws-ping-timeout", env.get("SIGNALING_PING_TIMEOUT", "20")),
            *("--backlog", "1024", "--lifespan", "off", "--no-access-log", "--log-level", "warning"),
            APPLICATION,
        ]
    if kind == "granian":
        # granian has no WebSocket message cap, ping or close-timeout option to carry over.
        return [
            sys.executable,
            "-m",
            "granian",
            *("--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *("--backlog", "1024", "--log-level", "warning"),
            APPLICATION,
        ]
    raise ValueError(f"unknown ASGI server {kind!r}: one of {', '.join(ASGI_SERVERS)}")


@contextmanager
def daphne(redis_url: str = "", database_url: str = "", **settings: str) -> Iterator[Process]:
    """Run one daphne process through bin/serve; a fresh migrated SQLite database unless given one."""
    with asgi_server("daphne", redis_url, database_url, **settings) as server:
        yield server


@contextmanager
def asgi_server(kind: str, redis_url: str = "", database_url: str = "", **settings: str) -> Iterator[Process]:
    """Run our app under one ASGI server (`ASGI_SERVERS`); a fresh migrated SQLite database unless given one."""
    port = free_port()
    db = None if database_url else migrated_sqlite()
    env = _server_env(DATABASE_URL=database_url or f"sqlite:///{db}", PORT=str(port), BIND="127.0.0.1", **settings)
    if redis_url:
        env["REDIS_URL"] = redis_url
    server = Process(kind, asgi_command(kind, port, env), env, port, whole_tree=kind == "granian")
    server.database = db
    try:
        yield server
    finally:
        server.stop()
        if db is not None:
            for path in WORK.glob(f"{db.name}*"):
                path.unlink(missing_ok=True)


@contextmanager
def postgres_cluster() -> Iterator[PostgresServer]:
    """Run a throwaway PostgreSQL cluster (the test suite's: fsync off, trusted local user)."""
    cluster = PostgresServer()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@contextmanager
def redis_server() -> Iterator[Process]:
    """Run a throwaway redis-server on a free loopback port, without persistence."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed: run `make system-packages`")
    port = free_port()
    args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = Process("redis", args, os.environ.copy(), port)
    try:
        yield server
    finally:
        server.stop()


def flush_redis(port: int) -> None:
    """Forget every key and subscription of a previous server (presence leases expire only after their TTL)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        client.flushall()
    finally:
        client.close()


def install_peerjs() -> Path:
    """Install the pinned PeerJS server into bench/.peerjs (once) and return its start script."""
    package = PEERJS_DIR / "node_modules" / "peer"
    script = package / "dist" / "bin" / "peerjs.js"
    installed = package / "package.json"
    if not (installed.exists() and f'"version": "{PEERJS_VERSION}"' in installed.read_text()):
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed: `apt-get install nodejs npm`")
        PEERJS_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--prefix", str(PEERJS_DIR), "--no-audit", "--no-fund", "--loglevel=error"]
            + [f"peer@{PEERJS_VERSION}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return script


@contextmanager
def v1_server() -> Iterator[Process]:
    """Run the v1 design (bench/v1_server.py, plain `websockets`) on a free loopback port."""
    port = free_port()
    args = [sys.executable, "-m", "bench.v1_server", "--host", "127.0.0.1", "--port", str(port)]
    server = Process("v1", args, os.environ.copy(), port)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def peerjs_server() -> Iterator[Process]:
    """Run the PeerJS server (its own CLI, under node) on a free loopback port."""
    script = install_peerjs()
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed: `apt-get install nodejs`")
    port = free_port()
    args = [node, str(script), "--port", str(port), "--host", "127.0.0.1"]
    server = Process("peerjs", args, os.environ.copy(), port)
    try:
        yield server
    finally:
        server.stop()
