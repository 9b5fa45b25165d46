"""The v1 design as a plain `websockets` server: the floor the relay and set-up figures are compared with.

One process, everything in memory, no database and no call state: each message
is forwarded by username, as the v1 protocol has it (README, Protocol
reference, without the fields marked *added*). `register` answers `registered`
and sends every client the full `online_users` list, as does a client leaving;
`call_request`, `call_accepted`, `call_rejected` and `call_ended` become
`incoming_call`, `call_accepted`, `call_rejected` and `call_ended` for the user
they name; `offer`, `answer` and `ice_candidate` reach `target_username` with
`from_username` set by the server. Fields it does not know (`call_id`) are
ignored. Benchmark use only, on loopback:

    python -m bench.v1_server --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

logger = logging.getLogger(__name__)

SIGNALS = frozenset({"offer", "answer", "ice_candidate"})
# Inbound type -> (field naming the recipient, outbound type, field naming the sender).
ROUTES = {
    "call_request": ("target_username", "incoming_call", "caller_username"),
    "call_accepted": ("caller_username", "call_accepted", "accepter_username"),
    "call_rejected": ("caller_username", "call_rejected", "rejecter_username"),
    "call_ended": ("target_username", "call_ended", "from_username"),
    **{kind: ("target_username", kind, "from_username") for kind in SIGNALS},
}


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def error(text: str) -> str:
    return encode({"type": "error", "message": text})


class Directory:
    """The users online: username -> (socket, user_id); the last to register a name holds it."""

    def __init__(self) -> None:
        self.users: dict[str, tuple[ServerConnection, str]] = {}

    def join(self, username: str, user_id: str, ws: ServerConnection) -> None:
        self.users[username] = (ws, user_id)
        self.announce()

    def leave(self, username: str, ws: ServerConnection) -> None:
        if self.users.get(username, (None, ""))[0] is ws:
            del self.users[username]
            self.announce()

    def announce(self) -> None:
        """Send every client the full list of who is online."""
        users = [{"username": name, "user_id": user_id} for name, (_, user_id) in self.users.items()]
        now = datetime.now(UTC).isoformat(timespec="seconds")
        broadcast(
            [ws for ws, _ in self.users.values()], encode({"type": "online_users", "users": users, "timestamp": now})
        )


async def forward(directory: Directory, sender: str, sender_id: str, ws: ServerConnection, message: dict) -> None:
    """Pass a call or signaling message to the user it names, or tell the sender that user is offline."""
    kind = message["type"]
    recipient_field, out_type, sender_field = ROUTES[kind]
    name = message.get(recipient_field)
    recipient = directory.users.get(name) if isinstance(name, str) else None
    if recipient is None:
        await ws.send(error(f"User {name} is not online"))
        return
    out: dict[str, Any] = {"type": out_type, sender_field: sender}
    if kind == "call_request":
        out["caller_id"] = sender_id
    elif kind in SIGNALS:
        out["data"] = message.get("data")
    try:
        await recipient[0].send(encode(out))
    except ConnectionClosed:
        pass  # the recipient is leaving; its departure is announced


async def session(ws: ServerConnection, directory: Directory) -> None:
    """Serve one client until it disconnects."""
    username, user_id = "", ""
    try:
        async for text in ws:
            try:
                message = json.loads(text)
                kind = message["type"]
            except (ValueError, TypeError, KeyError):
                await ws.send(error("Invalid message"))
                continue
            if kind == "register":
                if username:
                    directory.leave(username, ws)
                username, user_id = str(message.get("username", "")), str(message.get("user_id", ""))
                if not username:
                    await ws.send(error("username is required"))
                    continue
                await ws.send(encode({"type": "registered", "username": username, "user_id": user_id}))
                directory.join(username, user_id, ws)
            elif not username:
                await ws.send(error("Register first"))
            elif kind in ROUTES:
                await forward(directory, username, user_id, ws, message)
            else:
                await ws.send(error(f"Unknown message type: {kind}"))
    except ConnectionClosed:
        pass
    finally:
        if username:
            directory.leave(username, ws)


async def run(host: str, port: int) -> None:
    directory = Directory()
    async with serve(lambda ws: session(ws, directory), host, port, backlog=1024) as server:
        logger.info("v1 server listening on %s:%s", host, port)
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.v1_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # No line per connection: daphne, which it is compared with, writes none either.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    asyncio.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
