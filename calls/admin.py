"""Admin pages: users seen and calls with their timeline, read-only."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from calls.models import Call, CallEvent, PushSubscription, SignalingUser


class ReadOnlyAdmin(admin.ModelAdmin):
    """History is written by the server only; staff can read and search it."""

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(SignalingUser)
class SignalingUserAdmin(ReadOnlyAdmin):
    list_display = ["username", "user_id", "first_seen", "last_seen"]
    list_filter = ["last_seen"]
    search_fields = ["username", "user_id"]
    date_hierarchy = "last_seen"


class CallEventInline(admin.TabularInline):
    model = CallEvent
    fields = ["at", "old_status", "new_status", "reason", "username", "device", "session"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Call)
class CallAdmin(ReadOnlyAdmin):
    list_display = ["id", "caller", "callee", "status", "end_reason", "created_at", "answered_at", "duration_display"]
    list_filter = ["status", "end_reason", "created_at"]
    search_fields = ["caller__username", "callee__username", "caller_device", "callee_device", "id"]
    date_hierarchy = "created_at"
    list_select_related = ["caller", "callee"]
    inlines = [CallEventInline]

    @admin.display(description="Duration")
    def duration_display(self, call: Call) -> str:
        duration = call.duration
        if duration is None:
            return "-"
        seconds = int(duration.total_seconds())
        return f"{seconds // 60}:{seconds % 60:02d}"


@admin.register(PushSubscription)
class PushSubscriptionAdmin(admin.ModelAdmin):
    """Where each user's devices are woken; staff may revoke (delete) a subscription, nothing else."""

    list_display = [
        "user",
        "platform",
        "device_id",
        "voip",
        "created_at",
        "last_success_at",
        "last_failure_at",
        "last_failure",
    ]
    list_filter = ["platform", "voip"]
    search_fields = ["user__username", "device_id"]
    list_select_related = ["user"]
    readonly_fields = [
        "user",
        "platform",
        "device_id",
        "voip",
        "created_at",
        "last_success_at",
        "last_failure_at",
        "last_failure",
    ]
    exclude = ["address", "address_hash", "p256dh", "auth"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
