"""What a provider is given (`Delivery`) and what it reports (`Result`)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx

from calls.push.subscriptions import Target


class Outcome(enum.Enum):
    SENT = "sent"
    # The push service says the subscription is dead (expired, unregistered): remove it.
    GONE = "gone"
    # Throttled or a server error: try again within the ring window.
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    reason: str = ""
    # Seconds the push service asked to wait (Retry-After), if it said.
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One push to one subscription."""

    target: Target
    payload: dict[str, Any]
    # When the push stops mattering (the ring deadline): its TTL and expiration.
    deadline: float
    # The call it is about: a later push for the same call replaces this one where the service can.
    call_id: str

    def ttl(self) -> int:
        """Seconds left until the deadline, at least 1 (a push service refuses 0 as "deliver now or never")."""
        return max(1, int(self.deadline - time.time()))


class Provider(Protocol):
    """A push service: Web Push, FCM or APNs."""

    platform: str

    async def send(self, delivery: Delivery) -> Result:
        """Send one push; never raise for what the service answers."""

    async def close(self) -> None:
        """Release connections."""


def retry_after(response: httpx.Response) -> float | None:
    """Seconds a push service asked to wait (`Retry-After`: seconds, or an HTTP date), if it said."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())
