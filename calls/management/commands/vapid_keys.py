"""`python manage.py vapid_keys`: print a new VAPID key pair for Web Push."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from calls.push.webpush import new_key_pair


class Command(BaseCommand):
    help = "Print a new VAPID key pair: set SIGNALING_VAPID_PRIVATE_KEY to the PEM, browsers get the public key."

    def handle(self, *args: Any, **options: Any) -> None:
        private_pem, public_key = new_key_pair()
        self.stdout.write("# SIGNALING_VAPID_PRIVATE_KEY (keep it secret; \\n escapes are accepted in one line):")
        self.stdout.write(private_pem.strip())
        self.stdout.write("# The public key (registered carries it; GET /api/push/vapid-public-key serves it):")
        self.stdout.write(public_key)
        self.stdout.write("# One line, for an environment variable:")
        self.stdout.write(private_pem.strip().replace("\n", "\\n"))
