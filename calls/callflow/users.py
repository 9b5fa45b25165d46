"""User rows of registrations, written in batches."""

from __future__ import annotations

import asyncio

from channels.db import database_sync_to_async

from calls.callflow import store as call_store


class UserRows:
    """Write the user rows of registrations, many in one statement when they come at once.

    Each registration waits for its row (push subscriptions and the history
    refer to it). Registrations that arrive
    while a write is under way share the next one: a sign-in storm costs two
    statements per batch, not per user, while a lone registration is written at once.
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple[str, list[asyncio.Future[None]]]] = {}
        self._writer: asyncio.Task | None = None

    async def touch(self, username: str, user_id: str) -> None:
        """Write the user's row."""
        loop = asyncio.get_running_loop()
        written = loop.create_future()
        _, waiting = self._pending.get(username, ("", []))
        self._pending[username] = (user_id, [*waiting, written])
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write())
        return await written

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                await database_sync_to_async(call_store.touch_users)({name: uid for name, (uid, _) in batch.items()})
            except Exception as exc:  # noqa: BLE001 - handed to every registration in the batch
                outcome: BaseException | None = exc
            else:
                outcome = None
            for _, waiting in batch.values():
                for written in waiting:
                    if written.done():
                        continue
                    if outcome is None:
                        written.set_result(None)
                    else:
                        written.set_exception(outcome)
