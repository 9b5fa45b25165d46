"""Whether what daphne guarantees through calls/server/daphne.py holds under another ASGI server.

Each check is a small client run against a real server process (daphne,
uvicorn or granian serving our app), and returns what it saw and `holds`:

- `shutdown`: SIGTERM with two clients in an answered call and one that never
  registered: every socket closed with 1012 (service restart), the process
  exits, the call ends in the database (the drain hook of daphne.py, patch 8);
- `send_buffer`: a client that never reads, sent large candidates by its peer:
  the server cuts it off before much piles up (patch 1);
- `message_size`: a frame a little over the app's limit gets `message_too_large`
  and the socket stays usable; a 1 MiB frame is refused by the server itself,
  before the app (bin/serve's cap at twice the app's, patch 3);
- `pings`: an idle client gets WebSocket pings, and one that never answers
  them is cut off after the ping interval and timeout (bin/serve's settings);
- `liveness_probe`: a v1 phone that switched networks registers again while its
  old socket is silent: the old session is pinged and gives way (patch 5).

The hand-written client (`RawClient`) can stop reading and leave pings
unanswered, which a `websockets` client would not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import time
from collections import Counter
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from bench.services import Process, descendants, rss_bytes

TIMEOUT = 10.0
SERVICE_RESTART = 1012
MESSAGE_TOO_BIG = 1009
# The app's default message limit (SIGNALING_MAX_MESSAGE_BYTES) and bin/serve's server cap, twice that.
APP_LIMIT = 65536
# Candidates sent to the client that never reads: each well under the app's limit.
FILLER = "x" * 30_000
# How long, and how many bytes at most, the peer of the client that never reads sends for.
FLOOD_SECONDS = 10.0
FLOOD_BYTES = 256 * 2**20
# The ping interval and timeout (s) of the server the `pings` check runs against.
PING_INTERVAL = PING_TIMEOUT = 1
PING_SETTINGS = {"SIGNALING_PING_INTERVAL": str(PING_INTERVAL), "SIGNALING_PING_TIMEOUT": str(PING_TIMEOUT)}
# A client that never answers pings must be cut off within interval + timeout and this margin.
PING_MARGIN = 3.0


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


class RawClient:
    """A WebSocket client by hand: it reads only when asked, and never answers a ping."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, receive_buffer: int | None = None) -> RawClient:
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        async with asyncio.timeout(TIMEOUT):
            response = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in response.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"handshake refused: {response[:100]!r}")
        return cls(reader, writer)

    def send(self, message: dict[str, Any]) -> None:
        payload = encode(message).encode()
        mask = os.urandom(4)
        if len(payload) < 126:
            header = struct.pack("!BB", 0x81, 0x80 | len(payload))
        elif len(payload) < 2**16:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, len(payload))
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, len(payload))
        self.writer.write(header + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload)))

    async def frame(self) -> tuple[int, bytes]:
        """Return the next frame's opcode and payload (a server's frames are not masked)."""
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.transport.abort()


async def expect(ws: ClientConnection, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Return the next message of type `kind`, passing over others."""
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return message


async def signed_in(url: str, username: str, **options: Any) -> ClientConnection:
    ws = await websockets.connect(url, compression=None, open_timeout=TIMEOUT, **options)
    await ws.send(encode({"type": "register", "username": username, "user_id": f"id-{username}"}))
    await expect(ws, "registered")
    return ws


async def close_code(ws: ClientConnection, timeout: float) -> int | None:
    """The close code the server sent, 1006 for a connection dropped without one, None if still open."""
    try:
        async with asyncio.timeout(timeout):
            async for _ in ws:
                pass
    except TimeoutError:
        return None
    except websockets.ConnectionClosed:
        pass
    return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else 1006


def tree_rss(server: Process) -> int:
    total = server.rss_bytes()
    for child in descendants(server.pid):
        try:
            total += rss_bytes(child)
        except OSError:
            continue
    return total


# --- The checks ---------------------------------------------------------------------------


async def shutdown(server: Process) -> dict[str, Any]:
    """SIGTERM: 1012 to every socket (in a call, registered, unregistered), exit, the call ended."""
    url = f"ws://127.0.0.1:{server.port}/"
    alice, bob = await signed_in(url, "alice"), await signed_in(url, "bob")
    idle = await websockets.connect(url, compression=None)
    await alice.send(encode({"type": "call_request", "target_username": "bob"}))
    call_id = (await expect(bob, "incoming_call"))["call_id"]
    await bob.send(encode({"type": "call_accepted", "call_id": call_id}))
    await expect(alice, "call_accepted")
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*(close_code(ws, 30) for ws in (alice, bob, idle)))
    closed_s = round(time.monotonic() - began, 2)
    try:
        exit_code: int | None = await asyncio.to_thread(server.proc.wait, 30)
    except subprocess.TimeoutExpired:
        exit_code = None
    row = None
    if server.database is not None:
        with sqlite3.connect(server.database) as db:
            row = db.execute("SELECT status, end_reason FROM calls_call").fetchall()
    log = server.log_path.read_text(errors="replace")
    return {
        "close_codes": codes,
        "closed_within_s": closed_s,
        "exit_code": exit_code,
        "exited_within_s": round(time.monotonic() - began, 2) if exit_code is not None else None,
        "call_rows": row,
        "drain_hook_ran": "runtime drained" in log,
        # uvicorn exits by raising the SIGTERM it caught again once it has shut down: -15.
        "holds": codes == [SERVICE_RESTART] * 3
        and exit_code in (0, -signal.SIGTERM)
        and row == [("completed", "disconnected")],
    }


async def send_buffer(server: Process) -> dict[str, Any]:
    """A client that stops reading, sent candidates by its peer: is it cut off, and what piles up meanwhile."""
    url = f"ws://127.0.0.1:{server.port}/"
    stuck = await RawClient.open(server.port, receive_buffer=4096)
    stuck.send({"type": "register", "username": "stuck", "user_id": "id-stuck"})
    peer = await signed_in(url, "peer", max_queue=None)
    stuck.send({"type": "call_request", "target_username": "peer"})
    call_id = (await expect(peer, "incoming_call"))["call_id"]
    await peer.send(encode({"type": "call_accepted", "call_id": call_id}))
    seen: list[str] = []
    ended = asyncio.Event()

    async def watch() -> None:
        try:
            async for text in peer:
                message = json.loads(text)
                kind = message["type"]
                if kind not in ("online_users", "call_ringing"):
                    seen.append(
                        ":".join(str(part) for part in (kind, message.get("code") or message.get("reason")) if part)
                    )
                if kind == "call_ended":
                    ended.set()
        except websockets.ConnectionClosed:
            seen.append("peer's socket closed")
            ended.set()

    watcher = asyncio.create_task(watch())
    frame = encode({"type": "ice_candidate", "target_username": "stuck", "call_id": call_id, "data": {"c": FILLER}})
    rss0 = peak = tree_rss(server)
    began = time.monotonic()
    sent = 0
    while not ended.is_set() and sent < FLOOD_BYTES and time.monotonic() - began < FLOOD_SECONDS:
        try:
            async with asyncio.timeout(2):
                await peer.send(frame)
        except (TimeoutError, websockets.ConnectionClosed):
            break  # the server stopped reading the peer too, or dropped it
        sent += len(frame)
        if sent % (100 * len(frame)) == 0:
            peak = max(peak, tree_rss(server))
            await asyncio.sleep(0)
    elapsed = time.monotonic() - began
    await asyncio.sleep(1)
    peak = max(peak, tree_rss(server))
    watcher.cancel()
    stuck.close()
    await peer.close()
    cut_off = any(event.startswith("call_ended") for event in seen)
    return {
        "cut_off": cut_off,
        "seconds": round(elapsed, 2),
        "sent_mb": round(sent / 2**20, 1),
        "rss_growth_mb": round((peak - rss0) / 2**20, 1),
        "peer_saw": dict(Counter(seen)),
        "log_says_dropped": "send buffer full" in server.log_path.read_text(errors="replace"),
        "holds": cut_off and sent < 32 * 2**20,
    }


async def message_size(server: Process) -> dict[str, Any]:
    """Over the app's limit: an error and the socket stays; 1 MiB: refused by the server itself."""
    url = f"ws://127.0.0.1:{server.port}/"
    ws = await signed_in(url, "sizer", max_size=None)
    results: dict[str, Any] = {}
    await ws.send(encode({"type": "ping", "padding": "x" * (APP_LIMIT + 1000)}))
    results["over_app_limit"] = (await expect(ws, "error")).get("code")
    await ws.send(encode({"type": "ping"}))
    results["socket_usable_after"] = (await expect(ws, "pong"))["type"] == "pong"
    for size in (2**20, 16 * 2**20):
        outcome = await _big_frame(ws, size)
        results[f"frame_{size // 2**20}_mib"] = outcome
        if outcome != "message_too_large (reached the app)":
            break
        await ws.send(encode({"type": "ping"}))
        await expect(ws, "pong")
    ws.transport.abort()
    results["holds"] = (
        results["over_app_limit"] == "message_too_large"
        and results["socket_usable_after"]
        and results["frame_1_mib"] in (f"closed {MESSAGE_TOO_BIG}", "dropped")
    )
    return results


async def _big_frame(ws: ClientConnection, size: int) -> str:
    try:
        await ws.send(encode({"type": "ping", "padding": "x" * size}))
        message = await expect(ws, "error")
        return f"{message.get('code')} (reached the app)"
    except websockets.ConnectionClosed:
        received = ws.protocol.close_rcvd
        return f"closed {received.code}" if received else "dropped"
    except TimeoutError:
        return "no answer"


async def pings(server: Process) -> dict[str, Any]:
    """Pings to a registered client that reads but never answers them; when is it cut off.

    The server runs with PING_SETTINGS (granian has no such option: it gets none).
    """
    silent = await RawClient.open(server.port)
    silent.send({"type": "register", "username": "silent", "user_id": "id-silent"})
    answering = await signed_in(f"ws://127.0.0.1:{server.port}/", "answering")
    began = time.monotonic()
    limit = PING_INTERVAL + PING_TIMEOUT + PING_MARGIN
    ping_times: list[float] = []
    cut_after = None
    try:
        async with asyncio.timeout(limit + 2):
            while True:
                opcode, _ = await silent.frame()
                if opcode == 0x9:
                    ping_times.append(round(time.monotonic() - began, 2))
                elif opcode == 0x8:
                    cut_after = round(time.monotonic() - began, 2)
                    break
    except (asyncio.IncompleteReadError, ConnectionError):
        cut_after = round(time.monotonic() - began, 2)
    except TimeoutError:
        pass
    silent.close()
    # A client that answers (websockets does, by itself) stays connected meanwhile.
    await answering.send(encode({"type": "ping"}))
    try:
        answering_kept = (await expect(answering, "pong", timeout=2))["type"] == "pong"
    except (websockets.ConnectionClosed, TimeoutError):
        answering_kept = False
    await answering.close()
    return {
        "pings_at_s": ping_times[:5],
        "unanswered_cut_after_s": cut_after,
        "answering_client_kept": answering_kept,
        "holds": bool(ping_times) and cut_after is not None and cut_after <= limit and answering_kept,
    }


async def liveness_probe(server: Process) -> dict[str, Any]:
    """A second register of a name with the holder's user_id while the holder's socket is silent."""
    holder = await RawClient.open(server.port)
    holder.send({"type": "register", "username": "phone", "user_id": "id-phone"})
    await asyncio.sleep(0.5)
    began = time.monotonic()
    ws = await websockets.connect(f"ws://127.0.0.1:{server.port}/", compression=None)
    await ws.send(encode({"type": "register", "username": "phone", "user_id": "id-phone"}))
    try:
        async with asyncio.timeout(TIMEOUT):
            while (message := json.loads(await ws.recv()))["type"] not in ("registered", "error"):
                pass
        answer = message.get("code") or message["type"]
    except TimeoutError:
        answer = "no answer"
    seconds = round(time.monotonic() - began, 2)
    holder.close()
    await ws.close()
    return {"newcomer_got": answer, "after_s": seconds, "holds": answer == "registered"}
