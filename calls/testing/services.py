"""Real external services for the tests: a throwaway redis-server and PostgreSQL cluster.

Each lives in its own temporary folder on a free loopback port, keeps nothing
on disk that matters, and is stopped afterwards. A missing binary skips the
tests that need it on a developer's machine, and fails them in CI (CI=true).

Also a small CLI for scripts/run-tests.sh, which needs PostgreSQL running before
pytest starts (Django reads DATABASE_URL when settings load):

    python -m calls.testing.services with-postgres -- python -m pytest -m database
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from calls.testing.servers import ROOT, free_port, wait_for_port

PG_USER = "signaling"
# Unprivileged system account that runs PostgreSQL when the tests run as root
# (initdb and postgres refuse to run as root).
PG_OS_USER = "sigtest"


class ServiceMissing(RuntimeError):
    """A binary a test needs is not installed."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise ServiceMissing("redis-server is not installed (make system-packages installs it)")
    return path


def find_postgres_bin() -> Path:
    """Return the bin folder of the newest installed PostgreSQL."""
    candidates = []
    for folder in Path("/usr/lib/postgresql").glob("*/bin"):
        version = folder.parent.name
        if (folder / "pg_ctl").exists() and re.fullmatch(r"\d+(\.\d+)?", version):
            candidates.append((tuple(int(part) for part in version.split(".")), folder))
    if candidates:
        return max(candidates)[1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None:
        return Path(pg_ctl).parent
    raise ServiceMissing("PostgreSQL is not installed (make system-packages installs it)")


def _private_dir(prefix: str) -> Path:
    # Directly under the system temp folder: pytest's tmp_path is private to root,
    # and PostgreSQL may run as another user.
    return Path(tempfile.mkdtemp(prefix=prefix))


class RedisServer:
    """One redis-server on 127.0.0.1 with no persistence; restartable on the same port."""

    def __init__(self) -> None:
        self.binary = find_redis_server()
        self.port = free_port()
        self.dir = _private_dir("sigtest-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(self.port, deadline_s=15, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: every key and subscription is gone."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1, trusted local superuser `signaling`.

    Durability is switched off (fsync, synchronous_commit): it is thrown away
    after the run, and the tests should not wait on the disk.
    """

    def __init__(self) -> None:
        self.bin = find_postgres_bin()
        self.port = free_port()
        self.dir = _private_dir("sigtest-pg-")
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self._as_user: list[str] = []
        self._template_ready = False
        self._databases = 0

    def url(self, database: str = "signaling") -> str:
        return f"postgres://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_OS_USER],
                check=True,
                capture_output=True,
            )
        shutil.chown(self.dir, PG_OS_USER, PG_OS_USER)
        self._as_user = ["runuser", "-u", PG_OS_USER, "--"]

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as_user, *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        self._prepare_user()
        self._run("mkdir", "-p", str(self.socket_dir))
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-k {self.socket_dir}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "postgres.log"),
            "-o",
            options,
            "-w",
            "start",
        )
        wait_for_port(self.port, deadline_s=30)
        self.execute("CREATE DATABASE signaling")

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Run one statement outside a transaction and return its rows."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def new_database(self) -> str:
        """Create a fresh, migrated database; return its URL.

        The first call migrates a template; later ones copy it, which takes a
        fraction of a second instead of a full migrate.
        """
        if not self._template_ready:
            self.execute("CREATE DATABASE signaling_template")
            env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALING_")}
            env["DATABASE_URL"] = self.url("signaling_template")
            subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
            self._template_ready = True
        self._databases += 1
        name = f"signaling_{self._databases}"
        self.execute(f"CREATE DATABASE {name} TEMPLATE signaling_template")
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(
                [*self._as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
            )

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `finally` blocks stop the services a CLI started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _with_postgres(command: list[str]) -> int:
    """Run `command` with DATABASE_URL pointing at a fresh PostgreSQL cluster."""
    stop_on_sigterm()
    server = PostgresServer()
    child: subprocess.Popen | None = None
    try:
        server.start()
        child = subprocess.Popen(command, env={**os.environ, "DATABASE_URL": server.url()})
        return child.wait()
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait()
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("with-postgres", help="run a command with DATABASE_URL set to a throwaway cluster")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    try:
        return _with_postgres(command)
    except ServiceMissing as exc:
        sys.stderr.write(f"{exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
