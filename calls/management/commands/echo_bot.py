"""`python manage.py echo_bot`: a user that answers every call and sends the caller's media back."""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from signaling_client import RegistrationError

from calls.echo.bot import run_echo_bot, use_host_addresses


class Command(BaseCommand):
    help = "Register as a user that answers every call and echoes the caller's audio and video back."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", default="ws://127.0.0.1:8765/", help="signaling server WebSocket URL")
        parser.add_argument("--username", default="echo", help="username to register as (default: echo)")
        parser.add_argument(
            "--user-id",
            default=None,
            help="user id to register with (default: derived from the username, so a restarted bot gets its name back)",
        )
        parser.add_argument("--token", default=None, help="JWT for servers with SIGNALING_AUTH=token")
        parser.add_argument(
            "--ice-address",
            action="append",
            default=[],
            metavar="ADDRESS",
            help="offer ICE host candidates only on this local address (repeatable; e.g. 127.0.0.1)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["ice_address"]:
            use_host_addresses(options["ice_address"])
        user_id = options["user_id"] or str(uuid.uuid5(uuid.NAMESPACE_URL, f"echo-bot:{options['username']}"))
        try:
            asyncio.run(self._run(options["url"], options["username"], user_id, options["token"]))
        except RegistrationError as exc:
            raise CommandError(f"the server refused the registration: {exc.code}: {exc.message}") from None

    async def _run(self, url: str, username: str, user_id: str, token: str | None) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run_echo_bot(url, username, user_id, token=token, stop=stop)
