"""Plain WebSocket clients for tests against a real daphne process, as clients in the field are."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets

# Informational messages `recv_type` passes over unless asked for one by name.
PASSED_OVER = {"online_users", "call_ringing"}


async def recv_type(ws: websockets.ClientConnection, kind: str, timeout: float = 5) -> dict[str, Any]:
    """Return the next message of type `kind`, passing over presence and ringing notices."""
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return message
            assert message["type"] in PASSED_OVER, message


async def send(ws: websockets.ClientConnection, message: dict[str, Any] | str) -> None:
    """Send a message; a str goes as it is (hand-built JSON, escapes and all)."""
    await ws.send(message if isinstance(message, str) else json.dumps(message))


async def register(ws: websockets.ClientConnection, username: str, user_id: str, **extra: Any) -> dict[str, Any]:
    await send(ws, {"type": "register", "username": username, "user_id": user_id, **extra})
    return await recv_type(ws, "registered")


async def expect_error(ws: websockets.ClientConnection, code: str, timeout: float = 5) -> dict[str, Any]:
    error = await recv_type(ws, "error", timeout)
    assert error["code"] == code, error
    return error


async def still_answers(ws: websockets.ClientConnection) -> None:
    """Assert the socket is open and served: a ping gets its pong."""
    await send(ws, {"type": "ping"})
    await recv_type(ws, "pong")


async def close_code(ws: websockets.ClientConnection, timeout: float = 10) -> int | None:
    """Read until the server closes the socket; return the close code it sent (None: no close frame)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


class RawClient:
    """A WebSocket client written by hand, for frames a well-behaved library will not send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """Write one masked frame (opcode 1 text, 8 close) with any payload, valid or not."""
        mask = b"\x01\x02\x03\x04"
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        if len(payload) < 126:
            header = bytes([0x80 | opcode, 0x80 | len(payload)])
        else:
            header = bytes([0x80 | opcode, 0x80 | 126]) + len(payload).to_bytes(2, "big")
        self.writer.write(header + mask + masked)

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def send_close(self, code: int = 1000) -> None:
        self.send_frame(0x8, code.to_bytes(2, "big"))

    async def read_close_code(self, timeout: float = 5) -> int:
        """Read frames until a close frame; return its code."""
        async with asyncio.timeout(timeout):
            while True:
                first, second = await self.reader.readexactly(2)
                length = second & 0x7F
                if length == 126:
                    length = int.from_bytes(await self.reader.readexactly(2), "big")
                elif length == 127:
                    length = int.from_bytes(await self.reader.readexactly(8), "big")
                payload = await self.reader.readexactly(length)
                if first & 0x0F == 0x8:
                    return int.from_bytes(payload[:2], "big")

    def close(self) -> None:
        self.writer.close()


class FreezableProxy:
    """A TCP relay on loopback between a client and the server that can go silent, like a blackholed link."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def freeze(self) -> None:
        """Stop carrying bytes either way; the TCP connections stay open."""
        self.flowing.clear()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.get_running_loop().create_task(self._pump(reader, writer))
            self._tasks.add(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
