"""The channel layer used without Redis: channels' in-memory layer, cheaper per message.

`InMemoryChannelLayer` sweeps every queued channel and every group member for
expired messages on each `receive()` and `group_send()`, so its cost grows with
the number of connections (17% of a 5,000-client sign-in's CPU, measured in
docs/benchmarks.md). Here the sweep runs at most once per `sweep_interval`:
an undelivered message may outlive its expiry by that much. `group_send`
delivers in a loop instead of creating a task per member.

Group membership does not expire here: a session stays in its user's group for
as long as it is connected, however long that is (channels' default drops it
after a day, and the user would stop receiving calls on that socket).
"""

from __future__ import annotations

import time

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer


class SignalingInMemoryLayer(InMemoryChannelLayer):
    def __init__(self, *, sweep_interval: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sweep_interval = sweep_interval
        self._next_sweep = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_interval
        for channel, queue in list(self.channels.items()):
            expired = False
            while not queue.empty() and queue._queue[0][0] < time.time():
                queue.get_nowait()
                expired = True
            if expired:
                # As channels does: a channel that let a message expire is gone from its groups.
                self._remove_from_groups(channel)
                if queue.empty():
                    self.channels.pop(channel, None)

    async def group_send(self, group: str, message: dict) -> None:
        assert isinstance(message, dict), "Message is not a dict"
        self.require_valid_group_name(group)
        self._clean_expired()
        for channel in list(self.groups.get(group, ())):
            try:
                await self.send(channel, message)
            except ChannelFull:
                continue
