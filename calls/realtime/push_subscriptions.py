"""`push_subscribe` and `push_unsubscribe` from a session: where its user's devices can be woken.

Subscriptions belong to an authenticated user, so only token mode takes them:
in open mode nothing proves who owns a name, and a stranger could otherwise
have another user's calls pushed to their own device.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Protocol

from channels.db import database_sync_to_async
from django.conf import settings

from calls.presence.base import SessionInfo
from calls.push import subscriptions
from calls.realtime.sessions import Services
from calls.wire import errors
from calls.wire import push as wire_push
from calls.wire.errors import SignalingError

logger = logging.getLogger(__name__)


class Subscriber(Protocol):
    """What `subscribe` and `unsubscribe` need of the consumer."""

    services: Services
    session: SessionInfo | None
    device_id: str

    async def send_json(self, content: dict[str, Any]) -> None: ...


async def check_subscription(services: Services, subscription: wire_push.Subscription) -> None:
    """Refuse a subscription this server cannot push to, or must not (an endpoint inside its network)."""
    if subscription.platform not in services.push.platforms:
        raise SignalingError(errors.PUSH_UNAVAILABLE, f"This server does not push to {subscription.platform}")
    if subscription.platform == wire_push.WEBPUSH and not await subscriptions.endpoint_allowed(subscription.address):
        raise SignalingError(errors.INVALID_MESSAGE, "'subscription.endpoint' must be https on a public address")


def require_token_mode() -> None:
    if settings.SIGNALING_AUTH != "token":
        raise SignalingError(errors.UNAUTHORIZED, "Push subscriptions need token authentication (SIGNALING_AUTH=token)")


async def subscribe(subscriber: Subscriber, message: wire_push.PushSubscribe) -> None:
    require_token_mode()
    subscription = message.subscription
    if not subscription.device_id and subscriber.device_id:
        subscription = replace(subscription, device_id=subscriber.device_id)
    await check_subscription(subscriber.services, subscription)
    username = subscriber.session.username
    subscription_id = await database_sync_to_async(subscriptions.subscribe)(username, subscription)
    await subscriber.send_json(wire_push.subscribed(subscription_id))


async def unsubscribe(subscriber: Subscriber, message: wire_push.PushUnsubscribe) -> None:
    require_token_mode()
    removed = await database_sync_to_async(subscriptions.unsubscribe)(
        subscriber.session.username, message.subscription_id
    )
    if not removed:
        raise SignalingError(errors.UNKNOWN_SUBSCRIPTION, "You have no push subscription with that id")
    await subscriber.send_json(wire_push.unsubscribed(message.subscription_id))
