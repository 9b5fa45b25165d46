"""Push subscriptions: stored per user, one per platform and address, checked before any push.

Plain synchronous ORM code, called through `database_sync_to_async`. A Web Push
endpoint is a URL a client chose: the server would post to it, so it must be
https on a public address (`endpoint_allowed`), checked when subscribing and
again before each push (its name may resolve elsewhere by then).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from calls.models import PushSubscription, SignalingUser
from calls.wire import errors
from calls.wire.errors import SignalingError
from calls.wire.push import Subscription

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    """One stored subscription, as a provider needs it."""

    id: str
    platform: str
    address: str
    p256dh: str
    auth: str
    voip: bool


def address_hash(address: str) -> str:
    return hashlib.sha256(address.encode()).hexdigest()


async def endpoint_allowed(endpoint: str) -> bool:
    """Whether the server may post to this Web Push endpoint: https, every address public.

    SIGNALING_PUSH_ALLOW_PRIVATE_ENDPOINTS lifts both rules (tests, private deployments).
    """
    if settings.SIGNALING_PUSH_ALLOW_PRIVATE_ENDPOINTS:
        return True
    parts = urlsplit(endpoint)
    if parts.scheme != "https" or not parts.hostname:
        return False
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    return bool(addresses) and all(address.is_global for address in addresses)


def subscribe(username: str, subscription: Subscription, user_id: str = "") -> str:
    """Store a subscription for a user (replacing one with the same address); return its id."""
    limit = settings.SIGNALING_PUSH_MAX_SUBSCRIPTIONS
    digest = address_hash(subscription.address)
    with transaction.atomic():
        # A user subscribing over HTTP (from an app's background task) may never have
        # registered a socket: its token proved who it is.
        user, _ = SignalingUser.objects.get_or_create(
            username=username, defaults={"user_id": user_id or username, "last_seen": timezone.now()}
        )
        user = SignalingUser.objects.select_for_update().get(pk=user.pk)
        existing = PushSubscription.objects.filter(platform=subscription.platform, address_hash=digest).first()
        if existing is None and PushSubscription.objects.filter(user=user).count() >= limit:
            raise SignalingError(errors.TOO_MANY_SUBSCRIPTIONS, f"At most {limit} push subscriptions per user")
        row = existing or PushSubscription(platform=subscription.platform, address_hash=digest)
        row.user = user
        row.address = subscription.address
        row.p256dh, row.auth, row.voip = subscription.p256dh, subscription.auth, subscription.voip
        row.device_id = subscription.device_id
        row.save()
    logger.info(
        "push subscription stored",
        extra={
            "user": username,
            "platform": subscription.platform,
            "subscription": str(row.id),
            "replaced": bool(existing),
        },
    )
    return str(row.id)


def unsubscribe(username: str, subscription_id: str) -> bool:
    """Remove one of the user's subscriptions; False when it has none by that id."""
    deleted, _ = PushSubscription.objects.filter(pk=subscription_id, user__username=username).delete()
    return bool(deleted)


def listing(username: str) -> list[dict]:
    """The user's subscriptions as the HTTP API lists them (no keys, no full address)."""
    return [
        {
            "subscription_id": str(row.id),
            "platform": row.platform,
            "device_id": row.device_id or None,
            "voip": row.voip,
            "created_at": row.created_at.isoformat(),
            "last_success_at": row.last_success_at.isoformat() if row.last_success_at else None,
            "last_failure_at": row.last_failure_at.isoformat() if row.last_failure_at else None,
        }
        for row in PushSubscription.objects.filter(user__username=username).order_by("created_at")
    ]


def targets_of(username: str, platforms: tuple[str, ...]) -> list[Target]:
    """The user's subscriptions on the platforms this server can push to."""
    rows = PushSubscription.objects.filter(user__username=username, platform__in=platforms).order_by("created_at")
    return [Target(str(r.id), r.platform, r.address, r.p256dh, r.auth, r.voip) for r in rows]


def record_success(subscription_id: str) -> None:
    PushSubscription.objects.filter(pk=subscription_id).update(last_success_at=timezone.now())


def record_failure(subscription_id: str, reason: str) -> None:
    PushSubscription.objects.filter(pk=subscription_id).update(
        last_failure_at=timezone.now(), last_failure=reason[:200]
    )


def remove(subscription_id: str, reason: str) -> None:
    """Drop a subscription the push service says is dead (expired, unregistered)."""
    deleted, _ = PushSubscription.objects.filter(pk=subscription_id).delete()
    if deleted:
        logger.info("push subscription removed", extra={"subscription": subscription_id, "reason": reason})
