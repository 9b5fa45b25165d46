"""Graceful shutdown under daphne: SIGTERM drains the process instead of cutting sockets.

daphne stops on SIGTERM by cancelling every application at once and then
dropping every connection: clients see an abnormal close (1006) and calls end
as if the network had failed. `install()` (called from asgi.py, so plain
`daphne signaling_project.asgi:application` gets it too) makes daphne, before
that, do what a load-balanced deployment needs:

1. stop listening, so new connections go to the other processes;
2. drain each event loop's runtime (`Runtime.drain`): every socket is closed
   with 1012 (service restart: reconnect, elsewhere). With Redis, a session
   that asked for resume is parked in the shared store with its calls for the
   resume grace, and a socket on another process takes it over with its resume
   token: its calls go on. Without Redis no other process can carry a call,
   so sessions end as if their socket dropped (calls end `disconnected`);
3. then let daphne finish as before, for anything still running.

The drain is bounded by SHUTDOWN_TIMEOUT; platforms give a stopping process
about 30 s (Render, Kubernetes) before SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)

# Seconds for every client to be told and every session parked or ended.
SHUTDOWN_TIMEOUT = 15.0


async def drain_runtime(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Drain the runtime of the running event loop (daphne runs one)."""
    from calls.runtime import Runtime

    runtime = Runtime._instances.get(asyncio.get_running_loop())
    if runtime is not None:
        await runtime.drain(timeout)


def install() -> None:
    """Make daphne drain before it kills its applications (idempotent)."""
    try:
        from daphne.server import Server
        from twisted.internet import defer
    except ImportError:  # another ASGI server: it has its own shutdown
        return
    if getattr(Server, "drains", False):
        return
    kill_all_applications = Server.kill_all_applications
    listen_success = Server.listen_success

    def remember_port(server: Any, port: Any) -> None:
        server.__dict__.setdefault("ports", []).append(port)
        listen_success(server, port)

    def drain_then_kill(server: Any) -> defer.Deferred:
        async def drain() -> None:
            for port in server.__dict__.get("ports", []):
                port.stopListening()
            logger.info("SIGTERM: stopped listening; draining", extra={"ports": len(server.__dict__.get("ports", []))})
            try:
                await drain_runtime()
            except Exception:
                logger.exception("drain failed; closing what is left")

        drained = defer.Deferred.fromFuture(asyncio.ensure_future(drain()))
        drained.addBoth(lambda _: kill_all_applications(server))
        return drained

    Server.listen_success = remember_port
    Server.kill_all_applications = drain_then_kill
    Server.drains = True
