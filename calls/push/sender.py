"""Wake a callee's devices: one push per subscription per event, never in signaling's way.

The call service (calls/callflow/service.py) tells the sender when a call rings
a user who has no socket open (`ring`) and when that ringing ends (`ring_ended`).
Each event happens once, in the one process that made the call's transition,
so each subscription gets exactly one push for it, however many processes run.
Pushes go out in background tasks: a slow or failing push service delays no
message. Throttling and server errors are retried with backoff until the ring
deadline; a subscription the service calls dead is removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from channels.db import database_sync_to_async
from django.conf import settings

from calls.callflow.board import CallRecord
from calls.observability import metrics
from calls.push import subscriptions
from calls.push.delivery import Delivery, Outcome, Provider, Result
from calls.wire.push import call_ended_payload, incoming_call_payload

logger = logging.getLogger(__name__)

# Seconds between attempts after a throttled or failed push (doubling), and the most.
RETRY_FIRST = 0.5
RETRY_MAX = 8.0
# Seconds a "stop ringing" push stays worth delivering.
END_PUSH_TTL = 60


def configured_platforms() -> tuple[str, ...]:
    """The platforms this server's settings configure (each is off until configured)."""
    configured = {
        "webpush": settings.SIGNALING_VAPID_PRIVATE_KEY,
        "fcm": settings.SIGNALING_FCM_CREDENTIALS,
        "apns": settings.SIGNALING_APNS_KEY_FILE,
    }
    return tuple(platform for platform, value in configured.items() if value)


def providers_from_settings() -> dict[str, Provider]:
    """The push services this server is configured for (none by default)."""
    providers: dict[str, Provider] = {}
    if settings.SIGNALING_VAPID_PRIVATE_KEY:
        from calls.push.webpush import WebPushProvider, load_vapid

        providers["webpush"] = WebPushProvider(load_vapid(), settings.SIGNALING_VAPID_SUBJECT)
    if settings.SIGNALING_FCM_CREDENTIALS:
        from calls.push.fcm import FcmProvider

        providers["fcm"] = FcmProvider.from_settings()
    if settings.SIGNALING_APNS_KEY_FILE:
        from calls.push.apns import ApnsProvider

        providers["apns"] = ApnsProvider.from_settings()
    return providers


class PushSender:
    """The push side of the call service: one per process."""

    def __init__(self, providers: dict[str, Provider], track: Callable[[asyncio.Task], None]) -> None:
        self.providers = providers
        self.track = track

    @property
    def platforms(self) -> tuple[str, ...]:
        return tuple(self.providers)

    @property
    def vapid_public_key(self) -> str | None:
        webpush = self.providers.get("webpush")
        return getattr(webpush, "public_key", None)

    async def has_subscriptions(self, username: str) -> bool:
        """Whether a call to this user can wake one of its devices."""
        if not self.providers:
            return False
        return bool(await database_sync_to_async(subscriptions.targets_of)(username, self.platforms))

    def ring(self, record: CallRecord) -> None:
        """The call rings a user with no socket: push `incoming_call` to every subscription."""
        deadline = record.ring_deadline.timestamp() if record.ring_deadline else time.time() + 30
        payload = incoming_call_payload(
            record.call_id, record.caller_username, record.caller_id, record.ring_deadline.isoformat()
        )
        self._start(record.callee_username, payload, deadline, record.call_id)

    def ring_ended(self, record: CallRecord, reason: str) -> None:
        """The pushed call stopped ringing (answered, refused, cancelled, timed out): push `call_ended`."""
        self._start(
            record.callee_username,
            call_ended_payload(record.call_id, reason),
            time.time() + END_PUSH_TTL,
            record.call_id,
        )

    def _start(self, username: str, payload: dict, deadline: float, call_id: str) -> None:
        if self.providers:
            task = asyncio.get_running_loop().create_task(self._push_all(username, payload, deadline, call_id))
            self.track(task)

    async def _push_all(self, username: str, payload: dict, deadline: float, call_id: str) -> None:
        targets = await database_sync_to_async(subscriptions.targets_of)(username, self.platforms)
        logger.info(
            "push", extra={"call": call_id, "user": username, "kind": payload["type"], "subscriptions": len(targets)}
        )
        await asyncio.gather(
            *(self._deliver(Delivery(target, payload, deadline, call_id)) for target in targets),
            return_exceptions=True,
        )

    async def _deliver(self, delivery: Delivery) -> None:
        provider = self.providers[delivery.target.platform]
        delay = RETRY_FIRST
        while True:
            try:
                result = await provider.send(delivery)
            except Exception as exc:  # noqa: BLE001 - one subscription's failure is not the others'
                logger.warning("push failed", extra={"subscription": delivery.target.id, "error": repr(exc)})
                result = Result(Outcome.FAILED, "error")
            metrics.push_sent(provider.platform, result.outcome.value)
            subscription_id = delivery.target.id
            if result.outcome is Outcome.SENT:
                await database_sync_to_async(subscriptions.record_success)(subscription_id)
                return
            if result.outcome is Outcome.GONE:
                await database_sync_to_async(subscriptions.remove)(subscription_id, result.reason)
                return
            wait = max(delay, result.retry_after or 0.0)
            if result.outcome is Outcome.FAILED or time.time() + wait >= delivery.deadline:
                await database_sync_to_async(subscriptions.record_failure)(subscription_id, result.reason)
                logger.info("push not delivered", extra={"subscription": subscription_id, "reason": result.reason})
                return
            await asyncio.sleep(wait)
            delay = min(delay * 2, RETRY_MAX)

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()
