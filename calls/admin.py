"""Admin pages: users, calls with their timeline, and the calls dashboard; history is read-only.

Calls and their events are written by the server only and deleted only by the
retention job (SIGNALING_HISTORY_DAYS): staff can read, sort, filter and search
them, never add, change or delete them. The dashboard (calls/http/dashboard.py)
is a page of the call admin, at admin/calls/call/dashboard/, linked from the
admin's index and from the call list.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from asgiref.sync import sync_to_async
from django.contrib import admin
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.db.models import Count, F, OrderBy, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_GET

from calls.callflow.states import CallStatus
from calls.callflow.stats import devices_of, talk_time, time_to_answer
from calls.http import dashboard
from calls.models import Call, CallEvent, PushSubscription, SignalingUser

# The dashboard draws with inline SVG and a stylesheet of its own: nothing inline to allow.
DASHBOARD_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
STYLESHEET = "calls/admin.css"
# What the call list shows of a call id, and the least of one that search takes as an id.
SHORT_ID = 8
HEX_PREFIX = re.compile(r"[0-9a-f]{8,32}")


def _stamp(moment: datetime | None, milliseconds: bool = False) -> str:
    if moment is None:
        return "–"
    text = timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S.%f" if milliseconds else "%Y-%m-%d %H:%M:%S")
    return text[:-3] if milliseconds else text


def _seconds(value: timedelta | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value.total_seconds():.{digits}f} s"


def _clock(value: timedelta | None) -> str:
    """A duration as m:ss, or h:mm:ss from an hour up."""
    if value is None:
        return "–"
    seconds = int(value.total_seconds())
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class NullsLast(OrderBy):
    """An admin sort order that keeps empty values (unanswered calls) last in both directions."""

    def __init__(self, expression: Any, descending: bool = False) -> None:
        super().__init__(expression, descending=descending, nulls_last=True)

    def reverse_ordering(self) -> NullsLast:
        self.descending = not self.descending
        return self


def admin_page(site: admin.AdminSite, view: Callable[..., Awaitable[HttpResponse]]) -> Callable:
    """`AdminSite.admin_view` for an async view: the same staff check, login redirect and headers.

    `admin_view` itself calls an async view from sync code and reads `request.user`
    in the event loop; this reads it in a thread.
    """

    async def page(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not await sync_to_async(site.has_permission)(request):
            return redirect_to_login(request.get_full_path(), reverse("admin:login", current_app=site.name))
        return await view(request, *args, **kwargs)

    return csrf_protect(never_cache(require_GET(page)))


class ReadOnly:
    """History is written by the server only, and deleted by the retention job: staff can read it."""

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class ReadOnlyAdmin(ReadOnly, admin.ModelAdmin):
    pass


# --- Users --------------------------------------------------------------------------------


def _count_of(relation: str) -> Subquery:
    """Calls of each user on one side (made or received), counted by the foreign key's index."""
    return Subquery(
        Call.objects.filter(**{relation: OuterRef("pk")})
        .order_by()
        .values(relation)
        .annotate(n=Count("status"))
        .values("n")
    )


@admin.register(SignalingUser)
class SignalingUserAdmin(ReadOnlyAdmin):
    list_display = ["username", "last_seen_display", "calls_made", "calls_received", "calls_link"]
    list_filter = ["last_seen"]
    search_fields = ["username", "user_id"]
    fields = ["username", "user_id", "first_seen_display", "last_seen_display", "calls_overview", "devices"]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return (
            super()
            .get_queryset(request)
            .annotate(made=Coalesce(_count_of("caller"), 0), received=Coalesce(_count_of("callee"), 0))
        )

    @admin.display(description="First seen")
    def first_seen_display(self, user: SignalingUser) -> str:
        return _stamp(user.first_seen)

    @admin.display(description="Last seen", ordering="last_seen")
    def last_seen_display(self, user: SignalingUser) -> str:
        return _stamp(user.last_seen)

    def _calls_url(self, **query: Any) -> str:
        return reverse("admin:calls_call_changelist") + "?" + urlencode(query)

    @admin.display(description="Calls made", ordering="made")
    def calls_made(self, user: SignalingUser) -> str:
        return format_html('<a href="{}">{}</a>', self._calls_url(caller__id__exact=user.pk), user.made)

    @admin.display(description="Calls received", ordering="received")
    def calls_received(self, user: SignalingUser) -> str:
        return format_html('<a href="{}">{}</a>', self._calls_url(callee__id__exact=user.pk), user.received)

    @admin.display(description="Their calls")
    def calls_link(self, user: SignalingUser) -> str:
        return format_html('<a href="{}">all calls</a>', self._calls_url(party=user.pk))

    @admin.display(description="Calls")
    def calls_overview(self, user: SignalingUser) -> str:
        return format_html(
            "{} made, {} received: {}", self.calls_made(user), self.calls_received(user), self.calls_link(user)
        )

    @admin.display(description="Devices")
    def devices(self, user: SignalingUser) -> str:
        """Each device the user called from or answered on, and each one subscribed to pushes."""
        push: dict[str, list[str]] = {}
        for subscription in user.push_subscriptions.all():
            push.setdefault(subscription.device_id, []).append(subscription.get_platform_display())
        rows = [
            (d.device, d.calls, _stamp(d.last_call), ", ".join(push.pop(d.device, [])) or "–") for d in devices_of(user)
        ]
        rows += [(device or "(no device id)", 0, "–", ", ".join(platforms)) for device, platforms in push.items()]
        if not rows:
            return "None yet"
        return format_html(
            '<table class="devices"><thead><tr><th>Device</th><th>Calls</th><th>Last call</th><th>Push</th></tr>'
            "</thead><tbody>{}</tbody></table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", rows),
        )


# --- Calls --------------------------------------------------------------------------------


class LiveNowFilter(admin.SimpleListFilter):
    title = "live now"
    parameter_name = "live"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("now", "Ringing or in progress")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.live() if self.value() == "now" else queryset


class PartyFilter(admin.SimpleListFilter):
    """The calls a user made or received (the users' page links here); listed only while applied."""

    title = "party"
    parameter_name = "party"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        value = self.value()
        self.user = SignalingUser.objects.filter(pk=value).first() if value and value.isdigit() else None
        return [(str(self.user.pk), self.user.username)] if self.user else []

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.involving(self.user) if self.user else queryset


class CallEventInline(ReadOnly, admin.TabularInline):
    """The call's timeline: each status change, when (to the millisecond), and who made it."""

    model = CallEvent
    verbose_name = "step"
    verbose_name_plural = "Timeline"
    fields = ["at_ms", "since_start", "step", "reason", "actor", "session_id"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).select_related("call")

    @admin.display(description="At")
    def at_ms(self, event: CallEvent) -> str:
        return _stamp(event.at, milliseconds=True)

    @admin.display(description="Since start")
    def since_start(self, event: CallEvent) -> str:
        return "+" + _seconds(event.at - event.call.created_at, digits=3)

    @admin.display(description="Step")
    def step(self, event: CallEvent) -> str:
        return f"{event.old_status or 'start'} → {event.new_status}"

    @admin.display(description="Actor")
    def actor(self, event: CallEvent) -> str:
        if not event.username:
            return "server"
        if not event.device:
            return event.username
        return format_html('{} <span class="quiet">on device</span> {}', event.username, event.device)

    @admin.display(description="Session")
    def session_id(self, event: CallEvent) -> str:
        return format_html('<span class="quiet session-id">{}</span>', event.session) if event.session else "–"


@admin.register(Call)
class CallAdmin(ReadOnlyAdmin):
    list_display = ["short_id", "caller", "callee", "outcome", "started", "time_to_answer", "duration"]
    list_display_links = ["short_id"]
    list_filter = [LiveNowFilter, "status", "end_reason", "created_at", PartyFilter]
    # What get_search_results reads (the admin shows its search box for a non-empty list).
    search_fields = ["caller__username", "callee__username", "caller_device", "callee_device"]
    search_help_text = "A username (or part of one), a device id, or a call id (its first 8 characters will do)."
    list_select_related = ["caller", "callee"]
    list_per_page = 50
    inlines = [CallEventInline]
    fieldsets = [
        (None, {"fields": ["call_id", ("caller_link", "callee_link"), "outcome", "pushed"]}),
        ("Times", {"fields": [("started_ms", "answered_ms", "ended_ms"), "rang_for", "duration"]}),
        (
            "Devices and sessions",
            {"fields": [("caller_device", "caller_channel"), ("callee_device", "callee_channel")]},
        ),
    ]
    readonly_fields = [
        name for _, part in fieldsets for row in part["fields"] for name in ([row] if isinstance(row, str) else row)
    ]

    class Media:
        css = {"all": [STYLESHEET]}

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(answer_seconds=time_to_answer(), talk_seconds=talk_time())

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        """A call id by the primary key's index; else each word a username (or part of one) or a device id.

        Usernames are matched in the users' table first, then calls by the foreign keys:
        matching each call's joined usernames would read a million rows twice over.
        """
        compact = search_term.strip().lower().replace("-", "")
        if HEX_PREFIX.fullmatch(compact):
            low, high = uuid.UUID(compact.ljust(32, "0")), uuid.UUID(compact.ljust(32, "f"))
            return queryset.filter(pk__gte=low, pk__lte=high), False
        for word in search_term.split():
            users = SignalingUser.objects.filter(username__icontains=word).values("pk")
            matches = Q(caller__in=users) | Q(callee__in=users) | Q(caller_device=word) | Q(callee_device=word)
            queryset = queryset.filter(matches)
        return queryset, False

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        # The users' page links to the calls one user made or received.
        return lookup in ("caller__id__exact", "callee__id__exact") or super().lookup_allowed(lookup, value, request)

    @admin.display(description="Call", ordering="pk")
    def short_id(self, call: Call) -> str:
        return call.pk.hex[:SHORT_ID]

    @admin.display(description="Call id")
    def call_id(self, call: Call) -> str:
        return str(call.pk)

    def _user_link(self, user: SignalingUser) -> str:
        return format_html('<a href="{}">{}</a>', reverse("admin:calls_signalinguser_change", args=[user.pk]), user)

    @admin.display(description="Caller")
    def caller_link(self, call: Call) -> str:
        return self._user_link(call.caller)

    @admin.display(description="Callee")
    def callee_link(self, call: Call) -> str:
        return self._user_link(call.callee)

    @admin.display(description="Status", ordering="status")
    def outcome(self, call: Call) -> str:
        label = call.status if call.end_reason in (None, call.status) else f"{call.status} · {call.end_reason}"
        return format_html('<span class="call-status call-{}">{}</span>', call.status, label)

    @admin.display(description="Started", ordering="created_at")
    def started(self, call: Call) -> str:
        return _stamp(call.created_at)

    @admin.display(description="Time to answer", ordering=NullsLast(F("answer_seconds")))
    def time_to_answer(self, call: Call) -> str:
        if call.answered_at is not None:
            return _seconds(call.answered_at - call.created_at)
        if call.status in (CallStatus.RINGING, CallStatus.BUSY):
            # A busy call never rang: it ended as it was made.
            return format_html('<span class="quiet">{}</span>', "ringing" if call.status == CallStatus.RINGING else "–")
        return format_html('<span class="quiet">rang {}</span>', _seconds(call.ended_at - call.created_at))

    @admin.display(description="Duration", ordering=NullsLast(F("talk_seconds")))
    def duration(self, call: Call) -> str:
        if call.answered_at is not None and call.ended_at is None:
            return format_html('<span class="quiet">{} so far</span>', _clock(call.duration))
        return _clock(call.duration)

    @admin.display(description="Started")
    def started_ms(self, call: Call) -> str:
        return _stamp(call.created_at, milliseconds=True)

    @admin.display(description="Answered")
    def answered_ms(self, call: Call) -> str:
        return _stamp(call.answered_at, milliseconds=True)

    @admin.display(description="Ended")
    def ended_ms(self, call: Call) -> str:
        return _stamp(call.ended_at, milliseconds=True)

    @admin.display(description="Rang for")
    def rang_for(self, call: Call) -> str:
        """How long it rang: until answered, until it ended unanswered, or so far."""
        if call.answered_at is not None:
            return f"{_seconds(call.answered_at - call.created_at, 3)}, then answered"
        if call.status == CallStatus.BUSY:
            return "did not ring: the callee was busy"
        if call.ended_at is None:
            return f"{_seconds(timezone.now() - call.created_at, 3)} so far"
        return f"{_seconds(call.ended_at - call.created_at, 3)}, not answered ({call.get_status_display()})"

    # --- The dashboard ------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        page = admin_page(self.admin_site, self.dashboard_view)
        # Ahead of the default ones: "<path:object_id>/" would take "dashboard/" for a call id.
        return [path("dashboard/", page, name="calls_call_dashboard"), *super().get_urls()]

    async def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """The calls dashboard: what is live from this process's runtime, then the figures from the database."""
        if not await sync_to_async(self.has_view_permission)(request):
            raise PermissionDenied
        live = await dashboard.read_live_state()
        return await sync_to_async(self._dashboard_page)(request, live)

    def _dashboard_page(self, request: HttpRequest, live: dashboard.LiveState) -> HttpResponse:
        context = {
            **self.admin_site.each_context(request),
            **dashboard.dashboard_context(live),
            "title": "Calls dashboard",
            "opts": self.opts,
            "stylesheet": STYLESHEET,
        }
        response = TemplateResponse(request, "admin/calls/dashboard.html", context).render()
        response["Content-Security-Policy"] = DASHBOARD_POLICY
        return response


PUSH_FIELDS = ["user", "platform", "device_id", "voip", "created_at"]
PUSH_FIELDS += ["last_success_at", "last_failure_at", "last_failure"]


@admin.register(PushSubscription)
class PushSubscriptionAdmin(admin.ModelAdmin):
    """Where each user's devices are woken; staff may revoke (delete) a subscription, nothing else."""

    list_display = PUSH_FIELDS
    list_filter = ["platform", "voip"]
    search_fields = ["user__username", "device_id"]
    list_select_related = ["user"]
    readonly_fields = PUSH_FIELDS
    exclude = ["address", "address_hash", "p256dh", "auth"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
