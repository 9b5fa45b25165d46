"""SignalingClient: one registered connection to the signaling server, kept alive.

The client owns one background task that reads the socket, turns each message into
an event (see `events.py`), updates what it knows (online users, its calls) and then
hands the event to waiters, handlers and `events()` iterators, in that order. When
the socket drops it reconnects with exponential backoff and registers again, resuming
the old session when the server allows it. Messages for a call sent while the socket
is down are held and sent once the session is back.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar, overload

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from signaling_client import events as ev
from signaling_client.book import CallBook, CallInfo
from signaling_client.errors import (
    CallFailed,
    ClientClosedError,
    NotConnectedError,
    RegistrationError,
    SignalingError,
)
from signaling_client.hub import EventHub

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=ev.Event)
TokenSource = str | Callable[[], str | Awaitable[str]] | None

RESUME_FAILED = "resume_failed"
# Registration refusals that another attempt will not change.
FATAL_REGISTRATION_CODES = frozenset({"unauthorized", "username_taken", "already_registered", "invalid_message"})
# Error codes the server may answer a call_request with.
CALL_REQUEST_ERRORS = frozenset(
    {
        "user_offline",
        "already_in_call",
        "invalid_message",
        "rate_limited",
        "call_rate_limited",
        "internal_error",
        "not_registered",
    }
)
# Error codes the server may answer push_subscribe and push_unsubscribe with.
PUSH_REQUEST_ERRORS = frozenset(
    {
        "unauthorized",
        "push_unavailable",
        "too_many_subscriptions",
        "unknown_subscription",
        "invalid_message",
        "rate_limited",
        "internal_error",
        "not_registered",
    }
)


class SignalingClient:
    """A registered connection to the signaling server that reconnects by itself.

    Use it as `async with SignalingClient(url, username, user_id) as client:` and read
    `client.events()`, or register handlers with `client.on(EventType, handler)`.
    """

    def __init__(
        self,
        url: str,
        username: str,
        user_id: str,
        *,
        token: TokenSource = None,
        device_id: str | None = None,
        resume: bool = True,
        presence: str = "full",
        watch: tuple[str, ...] | list[str] | None = None,
        reconnect: bool = True,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        open_timeout: float = 10.0,
        request_timeout: float = 10.0,
        max_held_messages: int = 256,
        backlog_size: int = 1000,
        **connect_options: Any,
    ) -> None:
        if presence not in ("full", "delta"):
            raise ValueError("presence must be 'full' or 'delta'")
        self.url = url
        self.username = username
        self.user_id = user_id
        self.token = token
        self.device_id = device_id
        self.resume = resume
        self.presence = presence
        # Users to follow instead of everyone (a watch list), sent with every registration.
        self.watching: set[str] | None = set(watch) if watch is not None else None
        self.reconnect = reconnect
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self.max_held_messages = max_held_messages
        # Extra keyword arguments for websockets' connect(): ssl, additional_headers, proxy...
        self.connect_options = connect_options

        self._ws: ClientConnection | None = None
        self._ready = False
        self._registered: ev.Registered | None = None
        self._resume_token: str | None = None
        self._book = CallBook()
        self._hub = EventHub(username, backlog_size)
        self._held: deque[str] = deque()
        self._task: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._request_lock = asyncio.Lock()
        self._closing = False
        self._closed = False
        self._close_reason = "closed"

    # --- State -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the client is registered on a live socket right now."""
        return self._ready

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def registered(self) -> ev.Registered | None:
        """The latest `registered` message (None before the first)."""
        return self._registered

    @property
    def ice_servers(self) -> tuple[Mapping[str, Any], ...]:
        """The RTCIceServer list from the latest registration."""
        return self._registered.ice_servers if self._registered else ()

    @property
    def online_users(self) -> tuple[ev.User, ...]:
        return tuple(self._book.online.values())

    @property
    def calls(self) -> Mapping[str, CallInfo]:
        """This client's live calls by call id."""
        return dict(self._book.calls)

    # --- Connection ------------------------------------------------------

    async def __aenter__(self) -> SignalingClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> ev.Registered:
        """Open the socket and register; raise RegistrationError or OSError when that fails."""
        if self._task is not None or self._closed:
            raise RuntimeError("connect() was already called on this client")
        ws = await self._open_session(reconnecting=False)
        self._task = asyncio.create_task(self._run(ws), name=f"signaling-client {self.username}")
        assert self._registered is not None
        return self._registered

    async def close(self) -> None:
        """Close the socket (code 1000) and stop; iterators of `events()` end after a Closed event."""
        if self._closed or self._closing:
            return
        self._closing = True
        ws = self._ws
        if ws is not None:
            await ws.close()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._finish("closed")

    async def _open_session(self, reconnecting: bool) -> ClientConnection:
        ws = await ws_connect(
            self.url,
            open_timeout=self.open_timeout,
            close_timeout=2,
            # The client's own ping/pong (see _keep_alive) detects dead sockets.
            ping_interval=None,
            **self.connect_options,
        )
        try:
            registered = await self._register(ws, reconnecting)
            await self._start_session(ws, registered, reconnecting)
        except BaseException:
            ws.transport.abort()
            raise
        return ws

    async def _register(self, ws: ClientConnection, reconnecting: bool) -> ev.Registered:
        resume_token = self._resume_token if reconnecting and self.resume else None
        while True:
            await ws.send(_encode(await self._register_message(resume_token)))
            reply = await self._registration_reply(ws)
            if isinstance(reply, ev.Registered):
                return reply
            if reply.code == RESUME_FAILED and resume_token is not None:
                logger.info("%s: the server could not resume the session; registering afresh", self.username)
                resume_token = self._resume_token = None
                continue
            raise RegistrationError(reply.code, reply.message)

    async def _register_message(self, resume_token: str | None) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "register", "username": self.username, "user_id": self.user_id}
        token = self.token() if callable(self.token) else self.token
        if inspect.isawaitable(token):
            token = await token
        if token:
            message["token"] = token
        if self.device_id:
            message["device_id"] = self.device_id
        if self.presence != "full":
            message["presence"] = self.presence
        if self.watching is not None:
            message["watch"] = sorted(self.watching)
        if self.resume:
            message["resume"] = True
            if resume_token:
                message["resume_token"] = resume_token
        return message

    async def _registration_reply(self, ws: ClientConnection) -> ev.Registered | ev.Error:
        async with asyncio.timeout(self.request_timeout):
            while True:
                event = _decode(await ws.recv())
                if isinstance(event, ev.Registered | ev.Error):
                    return event
                if event is not None:
                    self._receive(event)

    async def _start_session(self, ws: ClientConnection, registered: ev.Registered, reconnecting: bool) -> None:
        """Adopt a fresh registration: reconcile calls, send held messages, start pinging."""
        self._registered = registered
        self._resume_token = registered.resume_token
        lost = self._book.adopt(registered)
        if not registered.resumed and self._held:
            logger.info("%s: dropping %d held messages of the previous session", self.username, len(self._held))
            self._held.clear()
        logger.info(
            "%s: registered%s on %s", self.username, " (session resumed)" if registered.resumed else "", self.url
        )
        self._hub.deliver(registered)
        for event in lost:
            self._hub.deliver(event)
        if reconnecting:
            self._hub.deliver(ev.Reconnected(resumed=registered.resumed))
        # Held messages go first; anything sent meanwhile joins the queue until it is empty.
        while self._held:
            await ws.send(self._held[0])
            self._held.popleft()
        self._ws = ws
        self._ready = True
        if self.ping_interval:
            self._keepalive = asyncio.create_task(self._keep_alive(ws))

    async def _run(self, ws: ClientConnection) -> None:
        try:
            while True:
                reason = await self._read(ws)
                self._lose_socket()
                if self._closing:
                    return
                if not self.reconnect:
                    self._close_reason = reason
                    return
                logger.info("%s: connection lost (%s); reconnecting", self.username, reason)
                next_ws = await self._reconnect(reason)
                if next_ws is None:
                    return
                ws = next_ws
        finally:
            self._lose_socket()
            if not self._closing:
                self._finish(self._close_reason)

    async def _read(self, ws: ClientConnection) -> str:
        try:
            async for frame in ws:
                event = _decode(frame)
                if event is not None:
                    self._receive(event)
        except ConnectionClosed:
            pass
        return f"closed with code {ws.close_code}" if ws.close_code is not None else "connection lost"

    async def _reconnect(self, reason: str) -> ClientConnection | None:
        attempt = 0
        while not self._closing:
            attempt += 1
            delay = self._backoff(attempt)
            self._hub.deliver(ev.Reconnecting(attempt=attempt, delay=delay, reason=reason))
            await asyncio.sleep(delay)
            try:
                return await self._open_session(reconnecting=True)
            except RegistrationError as exc:
                if exc.code in FATAL_REGISTRATION_CODES:
                    logger.warning("%s: registration refused (%s); giving up", self.username, exc.code)
                    self._close_reason = exc.code
                    return None
                reason = f"registration refused: {exc.code}"
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, InvalidURI) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            logger.info("%s: reconnect attempt %d failed (%s)", self.username, attempt, reason)
        return None

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: 50-100% of initial * 2^(attempt-1), capped."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(attempt - 1, 30))
        return random.uniform(ceiling / 2, ceiling)

    def _lose_socket(self) -> None:
        self._ready = False
        self._ws = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def _finish(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._lose_socket()
        logger.info("%s: client closed (%s)", self.username, reason)
        self._hub.deliver(ev.Closed(reason=reason))
        self._hub.close()

    async def _keep_alive(self, ws: ClientConnection) -> None:
        assert self.ping_interval is not None
        while True:
            await asyncio.sleep(self.ping_interval)
            try:
                await self.ping(timeout=self.ping_timeout)
            except TimeoutError:
                logger.warning("%s: no pong within %s s; dropping the connection", self.username, self.ping_timeout)
                ws.transport.abort()
                return
            except (NotConnectedError, ClientClosedError):
                return

    # --- Inbound ---------------------------------------------------------

    def _receive(self, event: ev.Event) -> None:
        if isinstance(event, ev.Registered):
            self._registered = event
        if self._book.track(event):
            self._hub.deliver(event)
            if isinstance(event, ev.Presence):  # one event per user too, for applications that want them
                for user in event.offline:
                    self._hub.deliver(ev.UserOffline(user.username, user.user_id, raw=event.raw))
                for user in event.online:
                    self._hub.deliver(ev.UserOnline(user.username, user.user_id, raw=event.raw))

    # --- Events for the application ---------------------------------------

    @overload
    def on(self, event_type: type[E], handler: None = None) -> Callable[[Callable[[E], Any]], Callable[[E], Any]]: ...

    @overload
    def on(self, event_type: type[E], handler: Callable[[E], Any]) -> Callable[[E], Any]: ...

    def on(self, event_type: type[E], handler: Callable[[E], Any] | None = None) -> Any:
        """Call `handler(event)` for every event of `event_type` (or a subclass); usable as a decorator.

        A coroutine handler runs as its own task, so it may await the client's methods.
        """
        if handler is None:

            def decorate(function: Callable[[E], Any]) -> Callable[[E], Any]:
                self.on(event_type, function)
                return function

            return decorate
        self._hub.add_handler(event_type, handler)
        return handler

    def off(self, event_type: type[ev.Event], handler: Callable[[Any], Any]) -> None:
        """Remove a handler added with `on`."""
        self._hub.remove_handler(event_type, handler)

    def events(self) -> AsyncIterator[ev.Event]:
        """Iterate over every event until the client closes.

        The first iterator also receives the events since connect() (up to
        `backlog_size`), so nothing is missed between connecting and iterating.
        """
        return self._hub.events()

    async def wait_for(
        self, event_type: type[E], predicate: Callable[[E], bool] | None = None, timeout: float | None = None
    ) -> E:
        """Wait for the next event of `event_type` for which `predicate` holds."""
        future = self._hub.expect(lambda e: isinstance(e, event_type) and (predicate is None or predicate(e)))
        try:
            async with asyncio.timeout(timeout):
                return await future  # type: ignore[return-value]
        finally:
            self._hub.unexpect(future)

    # --- Requests ----------------------------------------------------------

    async def call(self, username: str, timeout: float | None = None) -> str:
        """Call `username`; return the call id once it rings, or raise CallFailed (code "busy", "user_offline"...)."""

        def answers_request(event: ev.Event) -> bool:
            match event:
                case ev.CallRinging():
                    return event.target_username == username
                case ev.CallRejected():
                    return event.reason == "busy" and event.rejecter_username == username
                case ev.Error():
                    return event.code in CALL_REQUEST_ERRORS
            return False

        async with self._request_lock:
            reply = await self._request({"type": "call_request", "target_username": username}, answers_request, timeout)
        if isinstance(reply, ev.CallRinging):
            return reply.call_id
        if isinstance(reply, ev.CallRejected):
            raise CallFailed("busy", f"{username} is busy")
        assert isinstance(reply, ev.Error)
        raise CallFailed(reply.code, reply.message)

    async def accept(self, call_id: str) -> None:
        """Accept a ringing incoming call."""
        info = self._book.calls.get(call_id)
        message: dict[str, Any] = {"type": "call_accepted", "call_id": call_id}
        if info is not None:
            message["caller_username"] = info.peer_username
            self._book.answered(call_id)
        await self._send(message, hold=True)

    async def reject(self, call_id: str) -> None:
        """Refuse a ringing incoming call."""
        info = self._book.calls.get(call_id)
        message: dict[str, Any] = {"type": "call_rejected", "call_id": call_id}
        if info is not None:
            message["caller_username"] = info.peer_username
        self._book.forget(call_id)
        await self._send(message, hold=True)

    async def hang_up(self, call_id: str) -> None:
        """End a call: hang up an answered call, or cancel one still ringing."""
        info = self._book.calls.get(call_id)
        message: dict[str, Any] = {"type": "call_ended", "call_id": call_id}
        if info is not None:
            message["target_username"] = info.peer_username
        self._book.forget(call_id)
        await self._send(message, hold=True)

    async def send_offer(self, call_id: str, data: Mapping[str, Any]) -> None:
        """Send an SDP offer ({"type": "offer", "sdp": ...}) to the other party of a call."""
        await self._signal("offer", call_id, data)

    async def send_answer(self, call_id: str, data: Mapping[str, Any]) -> None:
        """Send an SDP answer ({"type": "answer", "sdp": ...}) to the other party of a call."""
        await self._signal("answer", call_id, data)

    async def send_ice_candidate(self, call_id: str, data: Mapping[str, Any]) -> None:
        """Send an ICE candidate ({"candidate": ..., "sdpMid": ..., "sdpMLineIndex": ...})."""
        await self._signal("ice_candidate", call_id, data)

    async def _signal(self, kind: str, call_id: str, data: Mapping[str, Any]) -> None:
        info = self._book.calls.get(call_id)
        if info is None:
            if self._book.ended(call_id):
                # A race with the other party hanging up: nothing to deliver it to.
                logger.debug("%s: %s for ended call %s not sent", self.username, kind, call_id)
                return
            raise ValueError(f"unknown call {call_id!r}")
        message = {"type": kind, "target_username": info.peer_username, "data": dict(data), "call_id": call_id}
        await self._send(message, hold=True)

    async def get_call_history(self, limit: int = 20, timeout: float | None = None) -> tuple[ev.HistoryEntry, ...]:
        """Return this user's recent calls, newest first."""

        def answers_request(event: ev.Event) -> bool:
            return isinstance(event, ev.CallHistory) or (
                isinstance(event, ev.Error) and event.code in ("invalid_message", "rate_limited", "internal_error")
            )

        async with self._request_lock:
            reply = await self._request({"type": "get_call_history", "limit": limit}, answers_request, timeout)
        if isinstance(reply, ev.Error):
            raise SignalingError(reply.code, reply.message)
        assert isinstance(reply, ev.CallHistory)
        return reply.calls

    async def subscribe_push(
        self,
        platform: str,
        *,
        subscription: Mapping[str, Any] | None = None,
        token: str | None = None,
        voip: bool = False,
        device_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Let the server wake this user's device by push; return the subscription id.

        `platform` is "webpush" (with `subscription`, a browser's `PushSubscription.toJSON()`),
        "fcm" (with the registration `token`) or "apns" (with the device `token` in hex, and
        `voip=True` for a PushKit token). Subscribing the same address again returns the same
        id. Raises SignalingError: "unauthorized" (the server is not in token mode),
        "push_unavailable" (it does not push to that platform), "invalid_message"...
        """
        message: dict[str, Any] = {"type": "push_subscribe", "platform": platform}
        if subscription is not None:
            message["subscription"] = dict(subscription)
        if token is not None:
            message["token"] = token
        if voip:
            message["voip"] = True
        if device_id is not None:
            message["device_id"] = device_id
        reply = await self._push_request(message, ev.PushSubscribed, timeout)
        return reply.subscription_id

    async def unsubscribe_push(self, subscription_id: str, timeout: float | None = None) -> None:
        """Remove one of this user's push subscriptions; SignalingError "unknown_subscription" if there is none."""
        await self._push_request(
            {"type": "push_unsubscribe", "subscription_id": subscription_id}, ev.PushUnsubscribed, timeout
        )

    async def _push_request(self, message: dict[str, Any], reply_type: type[E], timeout: float | None) -> E:
        def answers_request(event: ev.Event) -> bool:
            return isinstance(event, reply_type) or (isinstance(event, ev.Error) and event.code in PUSH_REQUEST_ERRORS)

        # One request at a time: an error names no request, so only one may be waiting for it.
        async with self._request_lock:
            reply = await self._request(message, answers_request, timeout)
        if isinstance(reply, ev.Error):
            raise SignalingError(reply.code, reply.message)
        assert isinstance(reply, reply_type)
        return reply

    async def watch(
        self, add: tuple[str, ...] | list[str] = (), remove: tuple[str, ...] | list[str] = ()
    ) -> ev.Presence:
        """Change the watch list (kept for reconnects); return the snapshot of the added users who are online."""
        self.watching = (set(self.watching or ()) - set(remove)) | set(add)
        message = {"type": "watch", "add": list(add), "remove": list(remove)}

        def answers(event: ev.Event) -> bool:
            return (isinstance(event, ev.Presence) and event.snapshot) or (
                isinstance(event, ev.Error) and event.code in ("watch_limit", "invalid_message")
            )

        async with self._request_lock:
            reply = await self._request(message, answers, None)
        if isinstance(reply, ev.Error):
            raise SignalingError(reply.code, reply.message)
        assert isinstance(reply, ev.Presence)
        return reply

    async def ping(self, timeout: float | None = None) -> ev.Pong:
        """Send a ping and return the server's pong; TimeoutError when none comes in time."""
        reply = await self._request({"type": "ping"}, lambda e: isinstance(e, ev.Pong), timeout)
        assert isinstance(reply, ev.Pong)
        return reply

    async def _request(
        self, message: dict[str, Any], answers: Callable[[ev.Event], bool], timeout: float | None
    ) -> ev.Event:
        future = self._hub.expect(answers)
        try:
            await self._send(message, hold=False)
            async with asyncio.timeout(timeout if timeout is not None else self.request_timeout):
                return await future
        finally:
            self._hub.unexpect(future)

    async def _send(self, message: dict[str, Any], *, hold: bool) -> None:
        if self._closed or self._closing:
            raise ClientClosedError("the client was closed")
        text = _encode(message)
        ws = self._ws
        if ws is not None and self._ready:
            try:
                await ws.send(text)
                return
            except ConnectionClosed:
                if not hold:
                    raise NotConnectedError("the connection dropped") from None
        elif not hold or self._task is None:
            raise NotConnectedError("not connected; the client is reconnecting" if self._task else "not connected")
        if len(self._held) >= self.max_held_messages:
            raise NotConnectedError(f"not connected and {len(self._held)} messages are already held")
        self._held.append(text)


def _encode(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def _decode(frame: str | bytes) -> ev.Event | None:
    """Parse one frame; None (and a warning) for anything that is not a JSON object."""
    if isinstance(frame, bytes):
        logger.warning("ignored a binary frame from the server")
        return None
    try:
        message = json.loads(frame)
    except ValueError:
        logger.warning("ignored a frame that is not JSON")
        return None
    if not isinstance(message, dict):
        logger.warning("ignored a frame that is not a JSON object")
        return None
    return ev.parse_event(message)
