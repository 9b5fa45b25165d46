"""A test client: the real ASGI application through WebsocketCommunicator."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from channels.testing import WebsocketCommunicator

from signaling_project.asgi import application

PRESENCE_TYPES = {"online_users", "user_online", "user_offline"}
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
        return json.loads(output["text"])

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

    async def nothing(self, timeout: float = 0.3) -> None:
        """Assert that no message other than presence arrives within `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            if await self.comm.receive_nothing(remaining):
                return
            message = await self.receive()
            assert message["type"] in SKIPPED_TYPES, f"unexpected {message!r}"

    async def drain(self, quiet: float = 0.3) -> list[dict[str, Any]]:
        """Return every non-presence message that arrives until `quiet` seconds pass in silence."""
        heard = []
        while not await self.comm.receive_nothing(quiet):
            message = await self.receive()
            if message["type"] not in SKIPPED_TYPES:
                heard.append(message)
        return heard

    async def register(self, username: str, user_id: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "register", "username": username, "user_id": user_id, **extra})
        return await self.expect("registered")

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
