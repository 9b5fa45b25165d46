"""EventHub: hands each event to waiters, then handlers, then `events()` iterators."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from signaling_client import events as ev
from signaling_client.errors import ClientClosedError

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=ev.Event)
Handler = Callable[[Any], Any]
_END = object()


class EventHub:
    """Delivery of events to everyone listening, in the order they happened.

    Until the first `events()` iterator starts, events are kept (up to `backlog_size`)
    so that the iterator sees everything since connect().
    """

    def __init__(self, name: str, backlog_size: int) -> None:
        self.name = name
        self.closed = False
        self._handlers: dict[type, list[Handler]] = {}
        self._subscribers: list[asyncio.Queue[Any]] = []
        self._backlog: deque[ev.Event] | None = deque(maxlen=backlog_size)
        self._waiters: list[tuple[Callable[[ev.Event], bool], asyncio.Future[ev.Event]]] = []
        self._handler_tasks: set[asyncio.Future[Any]] = set()

    def deliver(self, event: ev.Event) -> None:
        for predicate, future in self._waiters:
            if not future.done() and predicate(event):
                future.set_result(event)
        for kind in type(event).__mro__:
            for handler in list(self._handlers.get(kind, ())):
                self._call_handler(handler, event)
        if self._backlog is not None:
            self._backlog.append(event)
        for queue in self._subscribers:
            queue.put_nowait(event)

    def close(self) -> None:
        """Fail every waiter and end every iterator (after the events already queued)."""
        self.closed = True
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(ClientClosedError("the client was closed"))
        self._waiters.clear()
        for queue in self._subscribers:
            queue.put_nowait(_END)

    # --- Handlers ----------------------------------------------------------

    def add_handler(self, event_type: type[ev.Event], handler: Handler) -> None:
        self._handlers.setdefault(event_type, []).append(handler)

    def remove_handler(self, event_type: type[ev.Event], handler: Handler) -> None:
        handlers = self._handlers.get(event_type, [])
        if handler in handlers:
            handlers.remove(handler)

    def _call_handler(self, handler: Handler, event: ev.Event) -> None:
        try:
            result = handler(event)
        except Exception:
            logger.exception("%s: handler %r failed on %s", self.name, handler, type(event).__name__)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Future[Any]) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: async handler failed", self.name, exc_info=task.exception())

    # --- Iterators and waiters ---------------------------------------------

    async def events(self) -> AsyncIterator[ev.Event]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        if self._backlog is not None:
            for event in self._backlog:
                queue.put_nowait(event)
            self._backlog = None
        if self.closed:
            queue.put_nowait(_END)
        self._subscribers.append(queue)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                yield item
        finally:
            self._subscribers.remove(queue)

    def expect(self, predicate: Callable[[ev.Event], bool]) -> asyncio.Future[ev.Event]:
        """A future for the next event that satisfies `predicate`; pair with `unexpect`."""
        if self.closed:
            raise ClientClosedError("the client was closed")
        future: asyncio.Future[ev.Event] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        return future

    def unexpect(self, future: asyncio.Future[ev.Event]) -> None:
        self._waiters = [(p, f) for p, f in self._waiters if f is not future]
