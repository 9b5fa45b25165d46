"""Users seen by the server, calls, and the timeline of each call."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.db import models
from django.utils import timezone

from calls.callflow.states import LIVE_STATUSES, CallStatus, EndReason


class SignalingUser(models.Model):
    """A username that has registered at least once."""

    username = models.CharField(max_length=64, unique=True)
    user_id = models.CharField(max_length=128)
    first_seen = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField()

    class Meta:
        ordering = ["username"]

    def __str__(self) -> str:
        return self.username


class CallQuerySet(models.QuerySet):
    def live(self) -> CallQuerySet:
        return self.filter(status__in=LIVE_STATUSES)

    def involving(self, user: SignalingUser) -> CallQuerySet:
        return self.filter(models.Q(caller=user) | models.Q(callee=user))


class Call(models.Model):
    """One call attempt, from the request to its final status."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    caller = models.ForeignKey(SignalingUser, models.PROTECT, related_name="calls_made")
    callee = models.ForeignKey(SignalingUser, models.PROTECT, related_name="calls_received")
    status = models.CharField(max_length=16, choices=CallStatus.choices, db_index=True)
    # Null while the call is live, as `end_reason` is on the wire.
    end_reason = models.CharField(max_length=16, choices=EndReason.choices, null=True, blank=True)  # noqa: DJ001
    # Indexed by the first column of the figures index below.
    # Set by the call board when the call started (the row is written behind it).
    created_at = models.DateTimeField(default=timezone.now)
    answered_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    ring_deadline = models.DateTimeField(null=True, blank=True)
    # Channel names of the caller's session and of the callee session that answered:
    # signaling for the call goes to these sessions only.
    caller_channel = models.CharField(max_length=200, blank=True)
    callee_channel = models.CharField(max_length=200, blank=True)
    # The `device_id`s the caller's session and the answering session registered with.
    caller_device = models.CharField(max_length=128, blank=True)
    callee_device = models.CharField(max_length=128, blank=True)
    # The callee had no live socket: its devices were woken by push, and get a second
    # push when the ringing ends.
    pushed = models.BooleanField(default=False)

    objects = CallQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "ring_deadline"]),
            # Every figure of the admin's dashboard (calls/callflow/stats.py) is read from
            # this index alone, by a range of created_at; the call list's default order too.
            models.Index(fields=["created_at", "status", "end_reason", "answered_at"], name="call_started_figures_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.caller} -> {self.callee} ({self.status})"

    @property
    def duration(self) -> timedelta | None:
        """Time from answer to end (or to now while in progress); None if never answered."""
        if self.answered_at is None:
            return None
        if self.ended_at is None:
            return timezone.now() - self.answered_at
        return self.ended_at - self.answered_at


class CallEvent(models.Model):
    """One status change of a call: one transition of the call board, written by the history writer."""

    call = models.ForeignKey(Call, models.CASCADE, related_name="events")
    old_status = models.CharField(max_length=16, choices=CallStatus.choices, blank=True)
    new_status = models.CharField(max_length=16, choices=CallStatus.choices)
    reason = models.CharField(max_length=16, choices=EndReason.choices, null=True, blank=True)  # noqa: DJ001
    session = models.CharField(max_length=200, blank=True, help_text="Channel name of the acting session")
    username = models.CharField(max_length=64, blank=True, help_text="Who acted (empty: the server)")
    device = models.CharField(max_length=128, blank=True, help_text="The acting session's device_id")
    # When the transition happened (the row is written behind it, calls/callflow/history.py).
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.old_status or '-'} -> {self.new_status}"


class PushSubscription(models.Model):
    """Where to wake a user's device when a call rings and it has no socket open."""

    class Platform(models.TextChoices):
        WEBPUSH = "webpush", "Web Push"
        FCM = "fcm", "Firebase Cloud Messaging"
        APNS = "apns", "Apple Push Notification service"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(SignalingUser, models.CASCADE, related_name="push_subscriptions")
    platform = models.CharField(max_length=8, choices=Platform.choices)
    # The Web Push endpoint, or the FCM or APNs token; subscribing it again replaces the
    # row. Unique by its SHA-256: an index entry of a long endpoint could pass PostgreSQL's limit.
    address = models.TextField()
    address_hash = models.CharField(max_length=64, editable=False)
    p256dh = models.CharField(max_length=200, blank=True)
    auth = models.CharField(max_length=100, blank=True)
    voip = models.BooleanField(default=False, help_text="An APNs PushKit VoIP token (CallKit)")
    device_id = models.CharField(max_length=128, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    last_failure = models.CharField(max_length=200, blank=True, help_text="Why the last push failed")

    class Meta:
        ordering = ["user", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["platform", "address_hash"], name="one_subscription_per_address")
        ]

    def __str__(self) -> str:
        return f"{self.user} {self.platform} {self.device_id or str(self.id)[:8]}"
