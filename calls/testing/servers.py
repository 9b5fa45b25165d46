"""Real server processes for integration tests: daphne started with bin/serve.

Each server gets a free loopback port and, unless told otherwise, its own
SQLite file, migrated before start. Readiness is awaited by polling the port
with a deadline, and the process is always terminated afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, deadline_s: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {deadline_s} s")


METRICS_TOKEN = "test-metrics-token"  # noqa: S105 - loopback test servers only


def server_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The environment of a test server: the test's own settings, no inherited SIGNALING_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNALING_", "DJANGO_SETTINGS"))}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{tmp_path / 'server.sqlite3'}",
            "PYTHONUNBUFFERED": "1",
            # Tests read /metrics, e.g. to wait until the call history is written (history_written).
            "SIGNALING_METRICS_TOKEN": METRICS_TOKEN,
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        }
    )
    env.update(overrides)
    return env


def migrate(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)


class DaphneServer:
    """One daphne process; `url` is its WebSocket address."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.env = env
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**self.env, "PORT": str(self.port), "BIND": "127.0.0.1"}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["sh", str(ROOT / "bin" / "serve")], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
        self.proc = None

    def history_written(self, timeout: float = 30.0) -> None:
        """Wait until the call history the server has decided is in the database.

        The server writes it behind the calls (calls/callflow/history.py); a
        test that waited for a message of a transition finds the transition
        queued, and here waits for its write, read from the server's backlog metric.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        token = self.env.get("SIGNALING_METRICS_TOKEN", "")
        request = urllib.request.Request(f"{self.http_url}/metrics", headers={"Authorization": f"Bearer {token}"})
        deadline = time.monotonic() + timeout
        while True:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - a loopback URL
                text = response.read().decode()
            backlog = re.search(r"^signaling_history_backlog (\S+)$", text, re.MULTILINE)
            if backlog is not None and float(backlog.group(1)) <= 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"call history still has {backlog and backlog.group(1)} transitions to write")
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill -9: the process gets no chance to clean up."""
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def daphne_server(tmp_path: Path, migrate_db: bool = True, **env_overrides: str) -> Iterator[DaphneServer]:
    """Run one daphne process for the duration of the block."""
    env = server_env(tmp_path, **env_overrides)
    if migrate_db:
        migrate(env)
    server = DaphneServer(env, tmp_path / f"daphne-{free_port()}.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
