"""The history writer: call transitions reach the database behind the call, in batches.

The call board (board.py) decides every transition at memory speed; the
database only records them. `HistoryWriter.add` queues a transition and
returns at once; one writer task per process writes what is queued in one
transaction (calls/callflow/store.py `write_history`), starting at most
`delay` seconds after the first transition of a batch arrived. Transitions that
arrive while a write runs share the next one (group commit), so a burst of
calls costs a few transactions, not one per transition.

What this means for the history (README, "Call history"): a transition is in
the database within `delay` plus one write (well under a second on a healthy
database); `flush` waits for everything queued so far, which a graceful
shutdown and a `call_history` request do. A process killed with SIGKILL loses
at most what it had not flushed; its calls do not stay live: the reaper ends
call rows that are live in the database but on no board (store.py `end_orphans`).
While the database is down the queue is kept and retried, up to `limit`
transitions (then the oldest are dropped and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from channels.db import database_sync_to_async

from calls.callflow import store as call_store
from calls.callflow.board import Transition
from calls.observability import metrics

logger = logging.getLogger(__name__)

# Seconds between attempts while the database refuses a batch.
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0)
QUEUE_LIMIT = 100_000
# Seconds a graceful shutdown waits for the queued history (after up to 15 s of closing
# sockets: platforms send SIGKILL about 30 s after SIGTERM).
STOP_TIMEOUT = 10.0
# Seconds the reaper and a history request wait for this process's queue to be written.
FLUSH_TIMEOUT = 5.0


class HistoryWriter:
    """Queue transitions; write them in batches on the database thread."""

    def __init__(self, delay: float, limit: int = QUEUE_LIMIT) -> None:
        self.delay = delay
        self.limit = limit
        self._pending: list[Transition] = []
        self._task: asyncio.Task | None = None
        # Transitions queued and written since the start: `flush` waits for the one to reach the other.
        self._queued = 0
        self._written = 0
        self._progress: asyncio.Condition | None = None
        self._hurry: asyncio.Event | None = None

    def add(self, transition: Transition) -> None:
        """Queue a transition for the next batch (returns at once)."""
        self._pending.append(transition)
        self._queued += 1
        metrics.history_queued(1)
        if len(self._pending) > self.limit:
            dropped = len(self._pending) - self.limit
            del self._pending[:dropped]
            self._written += dropped
            metrics.history_written(dropped)
            logger.error("call history queue full; oldest transitions dropped", extra={"count": dropped})
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def backlog(self) -> int:
        """Transitions queued and not yet written."""
        return self._queued - self._written

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every transition queued so far is in the database; False if `timeout` ran out first.

        While the database is down that may take a while: callers that must go
        on whatever happens (the reaper, a history request) pass a timeout.
        """
        target = self._queued
        if self._written >= target:
            return True
        self._wake()
        progress = self._condition()
        try:
            async with asyncio.timeout(timeout):
                async with progress:
                    await progress.wait_for(lambda: self._written >= target)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Write what is queued (a graceful shutdown), then stop the writer."""
        if not await self.flush(timeout=STOP_TIMEOUT):
            logger.error("call history not written before shutdown", extra={"transitions": self.backlog})
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def _condition(self) -> asyncio.Condition:
        if self._progress is None:
            self._progress = asyncio.Condition()
        return self._progress

    def _wake(self) -> None:
        if self._hurry is None:
            self._hurry = asyncio.Event()
        self._hurry.set()

    async def _run(self) -> None:
        failures = 0
        while self._pending:
            if self._hurry is None:
                self._hurry = asyncio.Event()
            if not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), timeout=self.delay)
            # A flush asked after this point waits for the next batch.
            self._hurry.clear()
            batch, self._pending = self._pending, []
            try:
                await database_sync_to_async(call_store.write_history)(batch)
            except Exception as exc:  # noqa: BLE001 - kept and tried again: the database may come back
                self._pending = batch + self._pending
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                failures += 1
                logger.warning(
                    "call history not written; retrying",
                    extra={"transitions": len(batch), "error": repr(exc), "retry_s": delay},
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._written += len(batch)
            metrics.history_written(len(batch))
            progress = self._condition()
            async with progress:
                progress.notify_all()
