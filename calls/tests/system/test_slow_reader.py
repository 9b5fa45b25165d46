"""Covers the whole server with a client that stops reading: it is cut off, everybody else carries on (real daphne).

The cut itself is the send-buffer cap in calls/server/daphne.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct

import websockets

from calls.testing.servers import daphne_server
from calls.tests.netclient import register

LONG_ID = "i" * 128


def stuck_client(port: int) -> socket.socket:
    """Open a raw WebSocket, register as "stuck", and return the socket, never to be read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    payload = json.dumps({"type": "register", "username": "stuck", "user_id": LONG_ID}).encode()
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    sock.sendall(struct.pack("!BBH", 0x81, 0x80 | 126, len(payload)) + mask + masked)
    return sock


async def signed_in(url: str, username: str) -> websockets.ClientConnection:
    """A socket registered as `username`, with a long user_id: every list it is in is large."""
    ws = await websockets.connect(url)
    await register(ws, username, LONG_ID)
    return ws


async def online_names(ws) -> set[str]:
    while True:
        message = json.loads(await ws.recv())
        if message["type"] == "online_users":
            return {user["username"] for user in message["users"]}


async def test_a_client_that_stops_reading_is_disconnected_while_hundreds_sign_in_and_out(tmp_path):
    # Hundreds of clients from one loopback address: no per-address connection limits.
    unlimited = {"SIGNALING_CONNECT_RATE_PER_ADDRESS": "0", "SIGNALING_MAX_PENDING_PER_ADDRESS": "0"}
    with daphne_server(
        tmp_path, SIGNALING_SEND_BUFFER_BYTES="65536", SIGNALING_PRESENCE_WINDOW_MS="5", **unlimited
    ) as server:
        # The stuck client speaks just enough WebSocket to register, then never reads
        # again; its kernel buffer is tiny, so what the server sends piles up there.
        stuck = stuck_client(server.port)
        observer = await signed_in(server.url, "observer")
        stuck_listed = asyncio.Event()
        stuck_gone = asyncio.Event()

        async def watch() -> None:
            while True:
                names = await online_names(observer)
                if "stuck" in names:
                    stuck_listed.set()
                elif stuck_listed.is_set():
                    stuck_gone.set()

        watcher = asyncio.create_task(watch())
        async with asyncio.timeout(180):
            # 150 users stay online, so every list is large; then others churn in and
            # out, and each change is another large list for the stuck client.
            resident = [await signed_in(server.url, f"resident-{i}-" + "n" * 48) for i in range(150)]
            batch = 0
            while "dropping client" not in server.logs():  # bounded by the timeout above
                batch += 1
                churn = [await signed_in(server.url, f"churn-{batch}-{i}") for i in range(10)]
                for client in churn:
                    await client.close()
            await stuck_gone.wait()
        watcher.cancel()
        for ws in resident:
            ws.transport.abort()

        # The server still serves everyone else.
        late = await signed_in(server.url, "late")
        async with asyncio.timeout(10):
            while await online_names(late) != {"observer", "late"}:
                pass
        for ws in (late, observer):
            await ws.close()
        stuck.close()
