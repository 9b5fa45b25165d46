"""In-process test clients: the real ASGI application through WebsocketCommunicator.

Its counterpart over real sockets, against daphne processes, is calls/tests/netclient.py. Here:

- `Client`: one socket; `expect` returns the next message of a type and fails on any other
  (presence and ringing notices aside); `nothing` proves, with a ping as a barrier, that
  nothing else was sent. Every message it receives must conform to protocol/asyncapi.yaml
  (calls/tests/conformance.py).
- `ring`, `answer`, `answered_call`, `end_call`, `complete_call`: a call between clients.
- `call_row`, `calls_in_db`, `timeline`, `users_in_db`: what the database holds afterwards;
  `write_call`: a call from the past, written straight to the database.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from calls.callflow import store as call_store
from calls.callflow.board import Actor, Transition, new_call
from calls.callflow.board_memory import MemoryCallBoard
from calls.callflow.history import HistoryWriter
from calls.callflow.states import CallStatus, EndReason
from calls.models import Call, CallEvent, SignalingUser
from calls.process.runtime import Runtime
from calls.tests import conformance
from signaling_project.asgi import application

PRESENCE_TYPES = {"online_users", "presence"}
# Informational messages `expect` passes over unless asked for them by name.
SKIPPED_TYPES = PRESENCE_TYPES | {"call_ringing"}
TIMEOUT = 5


class Client:
    """One socket; `expect` passes over presence and ringing notices unless asked for one."""

    def __init__(self, path: str = "/", headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.comm = WebsocketCommunicator(application, path, headers=headers)
        self.connected = False
        self.closed_code: int | None = None
        self.skipped: list[dict[str, Any]] = []
        # The name the server registered this socket under (None until it registers through `register`).
        self.username: str | None = None

    async def connect(self) -> bool:
        self.connected, _ = await self.comm.connect(timeout=TIMEOUT)
        return self.connected

    async def send(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        await self.comm.send_to(text_data=text)

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        output = await self.comm.receive_output(timeout)
        if output["type"] == "websocket.close":
            self.closed_code = output.get("code")
            raise ConnectionClosed(self.closed_code)
        message = json.loads(output["text"])
        conformance.check(message, conformance.SERVER)
        return message

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Return the next message of type `kind`; fail on any other non-presence message."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            message = await self.receive(max(deadline - loop.time(), 0.01))
            if message["type"] == kind:
                return message
            if message["type"] in SKIPPED_TYPES:
                self.skipped.append(message)
                continue
            raise AssertionError(f"expected {kind!r}, got {message!r}")

    async def expect_error(self, code: str) -> dict[str, Any]:
        message = await self.expect("error")
        assert message["code"] == code, message
        return message

    async def expect_online(self, usernames: set[str], timeout: float = TIMEOUT) -> dict[str, Any]:
        """Wait for an online_users list naming exactly these users."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            message = await self.expect("online_users", max(deadline - loop.time(), 0.01))
            if {user["username"] for user in message["users"]} == usernames:
                return message

    async def expect_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait until the server closes the socket; return the close code."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                await self.receive(max(deadline - loop.time(), 0.01))
        except ConnectionClosed as closed:
            return closed.code

    async def heard(self) -> list[dict[str, Any]]:
        """Return what the server sent this socket before it answered a ping, presence and ringing aside.

        A barrier, where a timed wait would pass whenever the message is merely late:
        the server handles a socket's events in order, so an event sent to this socket
        before the ping arrives comes before the pong. Call it once the action under
        test showed its effect on another client: by then, whatever that action sent
        this socket is queued ahead of the ping.
        """
        await self.send({"type": "ping"})
        heard = []
        while (message := await self.receive())["type"] != "pong":
            if message["type"] in SKIPPED_TYPES:
                self.skipped.append(message)
            else:
                heard.append(message)
        return heard

    async def nothing(self) -> None:
        """Assert that the server sent this socket nothing but presence and ringing notices (see `heard`)."""
        heard = await self.heard()
        assert heard == [], f"unexpected {heard!r}"

    async def register(self, username: str, user_id: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "register", "username": username, "user_id": user_id, **extra})
        registered = await self.expect("registered")
        self.username = registered["username"]
        return registered

    async def close(self) -> None:
        if self.connected:
            self.connected = False
            try:
                await self.comm.disconnect()
            except Exception:  # noqa: BLE001 - the application may already have stopped
                pass


class ConnectionClosed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with code {code}")
        self.code = code


# --- A call between clients ---------------------------------------------------------------


async def ring(caller: Client, *callees: Client, target: str | None = None) -> str:
    """Have `caller` call `target` (by default the callees' name); return the call id.

    Returns once every one of the callee's sessions rang and the caller heard ringing.
    """
    await caller.send({"type": "call_request", "target_username": target or callees[0].username})
    ids = {(await callee.expect("incoming_call"))["call_id"] for callee in callees}
    ringing = await caller.expect("call_ringing")
    assert ids == {ringing["call_id"]} and ringing["target_username"] == callees[0].username, (ids, ringing)
    return ringing["call_id"]


async def answer(caller: Client, callee: Client, call_id: str) -> None:
    """`callee` accepts the call; return once `caller` heard it."""
    await callee.send({"type": "call_accepted", "call_id": call_id})
    accepted = await caller.expect("call_accepted")
    assert (accepted["call_id"], accepted["accepter_username"]) == (call_id, callee.username)


async def answered_call(caller: Client, callee: Client) -> str:
    """Ring `callee` from `caller` and answer; return the call id."""
    call_id = await ring(caller, callee)
    await answer(caller, callee, call_id)
    return call_id


async def end_call(by: Client, other: Client, call_id: str, reason: str) -> None:
    """`by` ends the call (a hang-up, or a cancel while it rings); return once `other` heard why."""
    await by.send({"type": "call_ended", "call_id": call_id})
    ended = await other.expect("call_ended")
    assert (ended["call_id"], ended["reason"], ended["from_username"]) == (call_id, reason, by.username)


async def complete_call(caller: Client, callee: Client) -> str:
    """A whole call: ring, answer, an offer and an answer relayed, hang up; return the call id."""
    call_id = await answered_call(caller, callee)
    await caller.send({"type": "offer", "target_username": callee.username, "data": {"sdp": "o"}})
    assert (await callee.expect("offer"))["data"] == {"sdp": "o"}
    await callee.send({"type": "answer", "target_username": caller.username, "data": {"sdp": "a"}})
    assert (await caller.expect("answer"))["data"] == {"sdp": "a"}
    await end_call(caller, callee, call_id, "hangup")
    return call_id


# --- Calls played on a board, their history written ------------------------------------------


def played_call(
    caller: Actor, callee: str, *moves: tuple[str, Actor], board: MemoryCallBoard | None = None, caller_id: str = ""
) -> str:
    """Play a call on a memory board as the call service does and write its history; return its id.

    Each move is ("accept", actor) or (an end reason, actor); a party's move is
    made as that party, the server's (an empty actor) as the server. Sync code
    (the database), for tests that seed calls: it runs the board on its own loop.
    """

    async def play() -> list[Transition]:
        played = board or MemoryCallBoard()
        now = timezone.now()
        record = new_call(caller, caller_id, callee, now, 45)
        record = await played.start(record, caller_multi=False, callee_multi=False)
        transitions = [Transition(record, "", caller, now)]
        for move, actor in moves:
            now, old = timezone.now(), record.status
            if move == "accept":
                record = await played.accept(record.call_id, actor, now)
            else:
                record = await played.end(record.call_id, EndReason(move), actor, bool(actor.username), now)
            transitions.append(Transition(record, old, actor, now))
        return transitions

    transitions = asyncio.run(play())
    call_store.write_history(transitions)
    return transitions[0].record.call_id


# --- What the database holds ----------------------------------------------------------------


# History writers besides the runtime's (conftest's process parts add theirs).
WRITERS: list[HistoryWriter] = []


async def history_written() -> None:
    """Wait until every call transition decided in this process is in the database.

    The history is written behind the calls (calls/callflow/history.py); a
    test that waited for a message of a transition finds the transition queued.
    """
    runtime = Runtime.of_loop(asyncio.get_running_loop())
    for writer in [*([runtime.history] if runtime else []), *WRITERS]:
        await writer.flush()


async def call_row(call_id: str) -> Call:
    await history_written()
    return await database_sync_to_async(Call.objects.select_related("caller", "callee").get)(pk=call_id)


async def calls_in_db() -> list[Call]:
    """Every call, oldest first."""
    await history_written()
    return await database_sync_to_async(
        lambda: list(Call.objects.select_related("caller", "callee").order_by("created_at"))
    )()


async def timeline(call_id: str) -> list[tuple[str, str, str | None]]:
    """Each recorded change of a call: (old status, new status, reason)."""
    await history_written()
    return await database_sync_to_async(
        lambda: list(CallEvent.objects.filter(call_id=call_id).values_list("old_status", "new_status", "reason"))
    )()


@database_sync_to_async
def users_in_db() -> dict[str, str]:
    """Every user row: username -> user_id."""
    return dict(SignalingUser.objects.values_list("username", "user_id"))


# Each status a call can end in, or still be in, with the timeline that leads there.
CALL_TIMELINES: dict[str, list[tuple[str, str, str | None]]] = {
    CallStatus.COMPLETED: [("", "ringing", None), ("ringing", "answered", None), ("answered", "completed", "hangup")],
    CallStatus.MISSED: [("", "ringing", None), ("ringing", "missed", "timeout")],
    CallStatus.BUSY: [("", "busy", "busy")],
    CallStatus.RINGING: [("", "ringing", None)],
    CallStatus.ANSWERED: [("", "ringing", None), ("ringing", "answered", None)],
}


@database_sync_to_async
def write_call(status: str, days_ago: float, caller: str = "alice", callee: str = "bob") -> str:
    """Write a call in `status` with its events, started `days_ago` days ago; return its id."""
    now = timezone.now()
    users = [
        SignalingUser.objects.get_or_create(username=name, defaults={"user_id": f"u-{name}", "last_seen": now})[0]
        for name in (caller, callee)
    ]
    timeline = CALL_TIMELINES[status]
    call = Call.objects.create(caller=users[0], callee=users[1], status=status, end_reason=timeline[-1][2])
    for old, new, reason in timeline:
        CallEvent.objects.create(call=call, old_status=old, new_status=new, reason=reason, username=caller)
    Call.objects.filter(pk=call.pk).update(created_at=now - timedelta(days=days_ago))
    return str(call.pk)
