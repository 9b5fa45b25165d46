"""`signaling-client`: try a signaling server by hand.

signaling-client --url ws://127.0.0.1:8765/ online
signaling-client --username alice call bob --hang-up-after 10
signaling-client --username bob listen --accept
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import uuid
from collections.abc import Mapping, Sequence

from signaling_client import events as ev
from signaling_client.client import SignalingClient
from signaling_client.errors import CallFailed, RegistrationError

DEFAULT_URL = "ws://127.0.0.1:8765/"


def describe(event: ev.Event) -> str:
    """One line for an event; relayed SDP and candidates are summarised, not printed."""
    parts = []
    for field in dataclasses.fields(event):
        if field.name == "raw":
            continue
        value = getattr(event, field.name)
        if field.name == "data" and isinstance(value, Mapping):
            value = f"<{value.get('type') or 'candidate'}: {len(str(value))} chars>"
        elif field.name == "users":
            value = ",".join(user.username for user in value)
        elif field.name == "ice_servers":
            value = f"<{len(value)} servers>"
        elif field.name == "resume_token":
            value = "<set>" if value else None
        parts.append(f"{field.name}={value}")
    if isinstance(event, ev.UnknownEvent):
        parts.append(f"raw={dict(event.raw)}")
    return f"{type(event).__name__} " + " ".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="signaling-client", description="Try a WebRTC signaling server by hand.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server WebSocket URL (default {DEFAULT_URL})")
    parser.add_argument("--username", help="username to register (default: cli-<random>)")
    parser.add_argument("--user-id", help="user id to register (default: a random UUID)")
    parser.add_argument("--token", help="JWT for servers with token auth")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the client's own activity")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("online", help="print the users online and exit")
    call = commands.add_parser("call", help="call USER, print what happens, hang up on Ctrl-C")
    call.add_argument("user")
    call.add_argument("--hang-up-after", type=float, metavar="SECONDS", help="hang up this long after the answer")
    listen = commands.add_parser("listen", help="print every event until Ctrl-C")
    answer = listen.add_mutually_exclusive_group()
    answer.add_argument("--accept", action="store_true", help="accept every incoming call")
    answer.add_argument("--reject", action="store_true", help="reject every incoming call")
    return parser.parse_args(argv)


async def show_online(client: SignalingClient) -> int:
    event = await client.wait_for(ev.OnlineUsers, timeout=10)
    for user in event.users:
        print(f"{user.username}\t{user.user_id}")
    return 0


async def place_call(client: SignalingClient, user: str, hang_up_after: float | None) -> int:
    try:
        call_id = await client.call(user)
    except CallFailed as exc:
        print(f"call failed: {exc.code}: {exc.message}")
        return 1
    print(f"ringing {user} (call {call_id})")
    answered = False
    try:
        async with asyncio.timeout(None) as deadline:
            async for event in client.events():
                print(describe(event), flush=True)
                if getattr(event, "call_id", None) != call_id:
                    continue
                if isinstance(event, ev.CallAccepted):
                    answered = True
                    if hang_up_after is not None:
                        deadline.reschedule(asyncio.get_running_loop().time() + hang_up_after)
                elif isinstance(event, ev.CallRejected | ev.CallEnded):
                    return 0 if answered else 1
    except TimeoutError:
        print(f"hanging up call {call_id}")
    finally:
        if call_id in client.calls:
            await client.hang_up(call_id)
    return 0


async def listen(client: SignalingClient, accept: bool, reject: bool) -> int:
    async for event in client.events():
        print(describe(event), flush=True)
        if isinstance(event, ev.IncomingCall) and event.call_id:
            if accept:
                await client.accept(event.call_id)
            elif reject:
                await client.reject(event.call_id)
    return 0


async def run(args: argparse.Namespace) -> int:
    username = args.username or f"cli-{uuid.uuid4().hex[:8]}"
    client = SignalingClient(args.url, username, args.user_id or str(uuid.uuid4()), token=args.token)
    try:
        registered = await client.connect()
    except RegistrationError as exc:
        print(f"registration refused: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 2
    print(f"registered as {registered.username} on {args.url}", file=sys.stderr)
    try:
        if args.command == "online":
            return await show_online(client)
        if args.command == "call":
            return await place_call(client, args.user, args.hang_up_after)
        return await listen(client, args.accept, args.reject)
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
