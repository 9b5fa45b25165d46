"""Graceful shutdown under daphne: SIGTERM drains the process instead of cutting sockets.

daphne stops on SIGTERM by cancelling every application at once and then
dropping every connection: clients see an abnormal close (1006) and calls end
as if the network had failed. The hook in calls/server/daphne.py (installed
from asgi.py, so plain `daphne signaling_project.asgi:application` gets it too)
makes daphne, before that, do what a load-balanced deployment needs:

1. stop listening, so new connections go to the other processes;
2. drain each event loop's runtime (`drain`): every socket is closed
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

from django.conf import settings

from calls.process.runtime import Runtime
from calls.wire import events

logger = logging.getLogger(__name__)

# Seconds for every client to be told and every session parked or ended.
SHUTDOWN_TIMEOUT = 15.0


async def drain(runtime: Runtime, timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Shut a runtime down gracefully: every socket is closed with 1012 (reconnect elsewhere).

    With a shared store, a session that can resume is parked for the resume
    grace, calls and all, for a socket on another process to take over;
    other sessions end as if their socket dropped.
    """
    sessions = runtime.sessions
    sessions.draining = True
    carry = runtime.store.shared and settings.SIGNALING_RESUME_GRACE > 0
    sockets = sessions.sockets()
    logger.info(
        "runtime draining", extra={"runtime": runtime.process_id, "connections": len(sockets), "carry_calls": carry}
    )
    for consumer in sockets:
        consumer.post(events.server_drain(carry))
    if sockets:
        # Whatever is still running after the timeout, daphne cancels next.
        _, late = await asyncio.wait(sockets.values(), timeout=timeout)
        if late:
            logger.warning(
                "connections did not close in time", extra={"runtime": runtime.process_id, "count": len(late)}
            )
    # Other processes must hear of the users who went offline.
    await runtime.announced(timeout=max(1.0, 4 * runtime.hub.window))
    await runtime.stop()
    logger.info("runtime drained", extra={"runtime": runtime.process_id})


async def drain_runtime(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Drain the runtime of the running event loop (daphne runs one), if it has one."""
    runtime = Runtime.of_loop(asyncio.get_running_loop())
    if runtime is not None:
        await drain(runtime, timeout)
