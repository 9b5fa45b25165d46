"""Covers calls.admin, calls.http.dashboard and calls.http.charts: the admin's pages through Django's test clients."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import AsyncClient, Client
from django.urls import reverse
from django.utils import timezone

from calls.callflow.board import Actor
from calls.callflow.states import EndReason
from calls.http import charts
from calls.models import Call, CallEvent, PushSubscription, SignalingUser
from calls.presence.base import StoreUnavailable
from calls.tests.wsclient import played_call, ring

CALLS = "/admin/calls/call/"
DASHBOARD = "/admin/calls/call/dashboard/"


def user(name: str) -> SignalingUser:
    now = timezone.now()
    return SignalingUser.objects.get_or_create(username=name, defaults={"user_id": f"id-{name}", "last_seen": now})[0]


def call(
    status: str,
    reason: str | None,
    ago: timedelta,
    answered_after: float | None = None,
    ended_after: float | None = None,
    caller: str = "alice",
    callee: str = "bob",
    **fields: Any,
) -> Call:
    """A call row started `ago` before now, answered and ended that many seconds after its start."""
    row = Call.objects.create(caller=user(caller), callee=user(callee), status=status, end_reason=reason, **fields)
    started = timezone.now() - ago
    Call.objects.filter(pk=row.pk).update(
        created_at=started,
        answered_at=None if answered_after is None else started + timedelta(seconds=answered_after),
        ended_at=None if ended_after is None else started + timedelta(seconds=ended_after),
    )
    row.refresh_from_db()
    return row


def a_whole_call() -> Call:
    """A call through the store, as sessions make it: alice's laptop calls, bob's phone answers, alice hangs up."""
    user("alice"), user("bob")
    alice = Actor("specific.a!laptop", "alice", "alice-laptop")
    bob = Actor("specific.b!phone", "bob", "bob-phone")
    return Call.objects.get(pk=played_call(alice, "bob", ("accept", bob), (EndReason.HANGUP, alice)))


def cells(html: str, column: str) -> list[str]:
    """The text of each cell of a column of the admin's result list (or a tabular inline), in order."""
    found = re.findall(rf'<t[dh] class="field-{column}[^"]*">(.*?)</t[dh]>', html, re.S)
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in found]


def text_of(response: Any) -> str:
    return response.content.decode()


def text_in(html: str, element_id: str, end: str) -> str:
    """The text of the element with this id up to the closing tag `end`, tags and runs of spaces removed."""
    body = html.split(f'id="{element_id}"', 1)[1].split(">", 1)[1].split(f"</{end}>", 1)[0]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)).replace(" ,", ",").strip()


def sorted_by(client: Client, column: str, descending: bool = False) -> list[str]:
    """The short ids of the call list sorted by a column, through the link its header offers."""
    header = text_of(client.get(CALLS)).split(f"column-{column}")[1].split("</th>")[0]
    index = re.search(r'href="\?o=(\d+)', header).group(1)
    return cells(text_of(client.get(CALLS, {"o": f"-{index}" if descending else index})), "short_id")


# --- Who may see what, and what nobody may do --------------------------------------------------


def admin_pages() -> list[str]:
    return ["/admin/", CALLS, DASHBOARD, "/admin/calls/signalinguser/"]


@pytest.mark.parametrize("page", admin_pages())
def test_an_anonymous_visitor_is_sent_to_the_login_page(db, page):
    response = Client().get(page)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=")


@pytest.mark.parametrize("page", admin_pages())
def test_a_signed_in_user_who_is_not_staff_gets_no_admin_page(db, django_user_model, page):
    client = Client()
    client.force_login(django_user_model.objects.create_user("joe", password="x" * 12))
    response = client.get(page)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=")


def test_staff_without_the_permission_to_view_calls_get_no_dashboard_and_no_link(db, django_user_model):
    client = Client()
    client.force_login(django_user_model.objects.create_user("helper", password="x" * 12, is_staff=True))
    assert client.get(DASHBOARD).status_code == 403
    assert "calls-dashboard-link" not in text_of(client.get("/admin/"))


def test_staff_with_the_permission_to_view_calls_get_the_dashboard(db, django_user_model):
    staff = django_user_model.objects.create_user("viewer", password="x" * 12, is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_call"))
    client = Client()
    client.force_login(staff)
    assert client.get(DASHBOARD).status_code == 200
    assert 'id="calls-dashboard-link"' in text_of(client.get("/admin/"))


def test_a_call_cannot_be_deleted_from_the_admin(admin_client):
    whole = a_whole_call()
    assert admin_client.post(f"{CALLS}{whole.pk}/delete/", {"post": "yes"}).status_code == 403
    listed = admin_client.get(CALLS)
    assert 'name="action"' not in text_of(listed) and "delete_selected" not in text_of(listed)
    admin_client.post(CALLS, {"action": "delete_selected", "_selected_action": [str(whole.pk)], "post": "yes"})
    assert Call.objects.filter(pk=whole.pk).exists()
    assert CallEvent.objects.filter(call=whole).count() == 3


def test_a_call_and_its_timeline_cannot_be_added_or_changed(admin_client):
    whole = a_whole_call()
    assert admin_client.get(f"{CALLS}add/").status_code == 403
    response = admin_client.post(f"{CALLS}{whole.pk}/change/", {"status": "missed", "events-TOTAL_FORMS": "0"})
    assert response.status_code == 403
    page = text_of(admin_client.get(f"{CALLS}{whole.pk}/change/"))
    assert 'name="_save"' not in page and 'name="_continue"' not in page
    assert Call.objects.get(pk=whole.pk).status == "completed"


def test_call_events_have_no_admin_page_of_their_own(admin_client):
    assert admin_client.get("/admin/calls/callevent/").status_code == 404


def test_users_cannot_be_deleted_or_changed_from_the_admin(admin_client):
    alice = user("alice")
    assert admin_client.post(f"/admin/calls/signalinguser/{alice.pk}/delete/", {"post": "yes"}).status_code == 403
    assert SignalingUser.objects.filter(pk=alice.pk).exists()


# --- The call list ---------------------------------------------------------------------------------


def test_the_call_list_shows_parties_outcome_start_time_to_answer_duration_and_short_id(admin_client):
    answered = call("completed", "hangup", timedelta(minutes=10), 4.25, 4.25 + 125)
    call("missed", "timeout", timedelta(minutes=5), None, 45)
    call("ringing", None, timedelta(seconds=2), caller="carol")
    call("busy", "busy", timedelta(seconds=1), None, 0, caller="dave")
    html = text_of(admin_client.get(CALLS))
    headers = re.findall(r'<th scope="col" class="[^"]*column-(\w+)', html)
    assert headers == ["short_id", "caller", "callee", "outcome", "started", "time_to_answer", "duration"]
    assert cells(html, "short_id")[3] == answered.pk.hex[:8]
    assert cells(html, "caller") == ["dave", "carol", "alice", "alice"]
    assert cells(html, "outcome") == ["busy", "ringing", "missed · timeout", "completed · hangup"]
    assert cells(html, "started")[3] == timezone.localtime(answered.created_at).strftime("%Y-%m-%d %H:%M:%S")
    assert cells(html, "time_to_answer") == ["–", "ringing", "rang 45.0 s", "4.2 s"]
    assert cells(html, "duration") == ["–", "–", "–", "2:05"]


def test_the_call_list_sorts_by_time_to_answer_with_unanswered_calls_last_both_ways(admin_client):
    slow = call("completed", "hangup", timedelta(minutes=3), 20, 30)
    fast = call("completed", "hangup", timedelta(minutes=2), 1, 30)
    call("missed", "timeout", timedelta(minutes=1), None, 45)
    ascending = sorted_by(admin_client, "time_to_answer")
    descending = sorted_by(admin_client, "time_to_answer", descending=True)
    assert ascending[:2] == [fast.pk.hex[:8], slow.pk.hex[:8]] and len(ascending) == 3
    assert descending[:2] == [slow.pk.hex[:8], fast.pk.hex[:8]] and len(descending) == 3


def test_the_call_list_sorts_by_duration(admin_client):
    long = call("completed", "hangup", timedelta(minutes=30), 2, 1000)
    short = call("completed", "hangup", timedelta(minutes=3), 2, 12)
    call("busy", "busy", timedelta(minutes=1), None, 0)
    listed = sorted_by(admin_client, "duration", descending=True)
    assert listed[:2] == [long.pk.hex[:8], short.pk.hex[:8]]


def test_the_live_now_filter_lists_only_ringing_and_answered_calls(admin_client):
    ringing = call("ringing", None, timedelta(seconds=4))
    talking = call("answered", None, timedelta(minutes=1), 3, caller="carol", callee="dave")
    call("completed", "hangup", timedelta(minutes=9), 2, 60)
    html = text_of(admin_client.get(CALLS, {"live": "now"}))
    assert set(cells(html, "short_id")) == {ringing.pk.hex[:8], talking.pk.hex[:8]}
    assert "so far" in cells(html, "duration")[0] + cells(html, "duration")[1]


@pytest.mark.parametrize("term", ["short", "whole", "whole-without-dashes"])
def test_search_finds_a_call_by_its_id(admin_client, term):
    wanted = call("completed", "hangup", timedelta(minutes=3), 2, 30)
    call("completed", "hangup", timedelta(minutes=2), 2, 30)
    query = {"short": wanted.pk.hex[:8], "whole": str(wanted.pk), "whole-without-dashes": wanted.pk.hex}[term]
    assert cells(text_of(admin_client.get(CALLS, {"q": query})), "short_id") == [wanted.pk.hex[:8]]


def test_search_finds_calls_by_username_or_device(admin_client):
    by_carol = call("completed", "hangup", timedelta(minutes=3), 2, 30, caller="carol")
    on_pixel = call("completed", "hangup", timedelta(minutes=2), 2, 30, callee_device="pixel-7")
    call("missed", "timeout", timedelta(minutes=1), None, 45)
    assert cells(text_of(admin_client.get(CALLS, {"q": "carol"})), "short_id") == [by_carol.pk.hex[:8]]
    assert cells(text_of(admin_client.get(CALLS, {"q": "aro"})), "short_id") == [by_carol.pk.hex[:8]]
    assert cells(text_of(admin_client.get(CALLS, {"q": "pixel-7"})), "short_id") == [on_pixel.pk.hex[:8]]


# --- A call's page -------------------------------------------------------------------------------


def test_a_calls_timeline_names_each_actor_by_username_and_device_to_the_millisecond(admin_client):
    whole = a_whole_call()
    html = text_of(admin_client.get(f"{CALLS}{whole.pk}/change/"))
    assert cells(html, "step") == ["start → ringing", "ringing → answered", "answered → completed"]
    assert cells(html, "actor") == [
        "alice on device alice-laptop",
        "bob on device bob-phone",
        "alice on device alice-laptop",
    ]
    assert cells(html, "session_id") == ["specific.a!laptop", "specific.b!phone", "specific.a!laptop"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", at) for at in cells(html, "at_ms"))
    events = list(whole.events.all())
    assert cells(html, "since_start") == [f"+{(e.at - whole.created_at).total_seconds():.3f} s" for e in events]
    assert cells(html, "at_ms")[0] == timezone.localtime(events[0].at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def test_a_calls_page_says_how_long_it_rang_and_lasted(admin_client):
    answered = call("completed", "hangup", timedelta(minutes=5), 3.5, 63.5)
    missed = call("missed", "timeout", timedelta(minutes=4), None, 45)
    busy = call("busy", "busy", timedelta(minutes=3), None, 0)
    answered_page = text_of(admin_client.get(f"{CALLS}{answered.pk}/change/"))
    assert "3.500 s, then answered" in answered_page and "1:00" in answered_page
    assert "45.000 s, not answered (Missed (ring timeout))" in text_of(admin_client.get(f"{CALLS}{missed.pk}/change/"))
    assert "did not ring: the callee was busy" in text_of(admin_client.get(f"{CALLS}{busy.pk}/change/"))


# --- Users ---------------------------------------------------------------------------------------


def test_the_users_list_counts_the_calls_each_user_made_and_received_and_links_to_them(admin_client):
    for _ in range(2):
        call("completed", "hangup", timedelta(minutes=3), 2, 30)
    call("missed", "timeout", timedelta(minutes=2), None, 45, caller="bob", callee="alice")
    call("busy", "busy", timedelta(minutes=1), None, 0, caller="carol", callee="dave")
    html = text_of(admin_client.get("/admin/calls/signalinguser/"))
    assert cells(html, "username")[:2] == ["alice", "bob"]
    assert cells(html, "calls_made")[:2] == ["2", "1"] and cells(html, "calls_received")[:2] == ["1", "2"]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells(html, "last_seen_display")[0])
    alice = user("alice")
    theirs = cells(text_of(admin_client.get(CALLS, {"party": alice.pk})), "short_id")
    made = cells(text_of(admin_client.get(CALLS, {"caller__id__exact": alice.pk})), "short_id")
    assert len(theirs) == 3 and len(made) == 2
    assert f'href="{CALLS}?party={alice.pk}"' in html


def test_a_users_page_lists_its_devices_with_their_calls_and_push_subscriptions(admin_client):
    call("completed", "hangup", timedelta(minutes=3), 2, 30, caller_device="laptop")
    call("completed", "hangup", timedelta(minutes=2), 2, 30, caller="bob", callee="alice", callee_device="laptop")
    PushSubscription.objects.create(
        user=user("alice"), platform="fcm", address="tok", address_hash="h", device_id="phone"
    )
    html = text_of(admin_client.get(f"/admin/calls/signalinguser/{user('alice').pk}/change/"))
    rows = [re.sub(r"<[^>]+>", "|", row) for row in re.findall(r"<tr><td>(.*?)</td></tr>", html)]
    assert rows[0].startswith("laptop|") and "|2|" in rows[0]
    assert rows[1] == "phone||0||–||Firebase Cloud Messaging"


# --- The dashboard -------------------------------------------------------------------------------


def test_the_dashboard_is_linked_from_the_admin_index_and_the_call_list(admin_client):
    for page in ("/admin/", CALLS):
        assert f'href="{DASHBOARD}"' in text_of(admin_client.get(page))
    assert reverse("admin:calls_call_dashboard") == DASHBOARD


def outcome_counts(html: str) -> dict[str, int]:
    rows = re.findall(
        r'<tr class="outcome-\w+"><th scope="row"><a href="[^"]*">([^<]+)</a></th><td class="number">(\d+)', html
    )
    return {label: int(count) for label, count in rows}


def test_the_dashboard_shows_the_last_24_hours_figures(admin_client):
    for seconds in (2, 4, 6, 8):
        call("completed", "hangup", timedelta(hours=1), seconds, 60)
    call("busy", "busy", timedelta(minutes=30), None, 0)
    call("missed", "timeout", timedelta(minutes=20), None, 45)
    call("ringing", None, timedelta(seconds=3))
    call("completed", "hangup", timedelta(days=3), 30, 60)  # in the 30 days only
    response = admin_client.get(DASHBOARD)
    html = text_of(response)
    counts = outcome_counts(html)
    assert counts["Completed, hung up"] == 4 and counts["Busy"] == 1 and counts["Missed (ring timeout)"] == 1
    assert counts["Ringing now"] == 1 and sum(counts.values()) == 7
    assert text_in(html, "tile-calls", "a") == "7 calls 1 ringing still"
    # 4 answered of the 6 that stopped ringing.
    assert text_in(html, "tile-answer-rate", "div") == "66.7 % answered 4 answered, 2 not"
    assert text_in(html, "tile-median", "div") == "4.0 s median time to answer over 4 answered calls"
    assert text_in(html, "tile-p90", "div").startswith("8.0 s 90th percentile")
    # What is live comes from the call board, where no call lives: the ringing row is history only.
    assert text_in(html, "tile-live-calls", "a") == "0 live calls 0 ringing, 0 in progress"
    totals = [int(n) for n in re.findall(r'<g class="chart-column" data-label="\d+" data-total="(\d+)"', html)]
    assert len(totals) == 24 + 30
    assert sum(totals[:24]) == 7 and sum(totals[24:]) == 8


def test_the_dashboard_links_each_outcome_to_its_calls(admin_client):
    busy = call("busy", "busy", timedelta(minutes=30), None, 0)
    call("busy", "busy", timedelta(days=2), None, 0)  # before the window
    call("missed", "timeout", timedelta(minutes=20), None, 45)
    html = text_of(admin_client.get(DASHBOARD))
    link = re.search(r'<a href="([^"]+)">Busy</a>', html).group(1).replace("&amp;", "&")
    assert cells(text_of(admin_client.get(link)), "short_id") == [busy.pk.hex[:8]]


def test_the_dashboard_runs_under_a_strict_csp_with_nothing_inline(admin_client):
    call("completed", "hangup", timedelta(hours=1), 2, 60)
    response = admin_client.get(DASHBOARD)
    policy = response["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    html = text_of(response)
    assert " style=" not in html and "<style" not in html
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []
    assert 'role="img"' in html and "<title" in html and "<desc" in html


def test_the_dashboard_runs_one_query_per_figure(admin_client, django_assert_max_num_queries):
    call("completed", "hangup", timedelta(hours=1), 2, 60)
    # Session and user, then: per hour, per day, outcomes, answer times, live count, live calls,
    # online users' ids; and the admin's own (permissions, the app list).
    with django_assert_max_num_queries(12):
        assert admin_client.get(DASHBOARD).status_code == 200


async def test_the_dashboard_lists_the_users_online_and_the_live_calls_of_this_process(connect, admin_user):
    alice, bob = await connect("alice"), await connect("bob")
    await connect("carol")
    call_id = await ring(alice, bob)
    client = AsyncClient()
    await client.aforce_login(admin_user)
    html = text_of(await client.get(DASHBOARD))
    assert text_in(html, "online-users", "p") == "Online: alice, bob, carol"
    assert text_in(html, "tile-online", "div") == "3 users online 3 sessions, 3 on this process"
    row = html.split('id="live-calls"')[1].split("</table>")[0]
    assert call_id.replace("-", "")[:8] in row
    assert "<td>alice</td><td>bob</td><td>ringing</td>" in row
    assert "<td>on this process</td><td>–</td>" in row


async def test_the_dashboard_says_so_when_the_presence_store_does_not_answer(connect, admin_user, runtime, monkeypatch):
    await connect("alice")

    async def unavailable() -> list[dict[str, str]]:
        raise StoreUnavailable("Redis is unavailable")

    monkeypatch.setattr(runtime.store, "online_users", unavailable)
    client = AsyncClient()
    await client.aforce_login(admin_user)
    response = await client.get(DASHBOARD)
    assert response.status_code == 200
    assert "the presence store did not answer; 1 session on this process" in text_of(response)


# --- Charts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("largest", "step"), [(0, 1), (3, 1), (9, 5), (40, 10), (123, 50), (2000, 500)])
def test_gridline_steps_are_one_two_or_five_times_a_power_of_ten(largest, step):
    assert charts.nice_step(largest) == step


def test_a_column_chart_names_itself_and_escapes_every_label():
    svg = charts.column_chart("c", "Calls <per> hour", "D & D", [charts.Column("<b>", 3, 1, "x<y")])
    assert 'role="img" aria-labelledby="c-title c-desc"' in svg
    assert '<title id="c-title">Calls &lt;per&gt; hour</title><desc id="c-desc">D &amp; D</desc>' in svg
    assert "<b>" not in svg and "&lt;b&gt;" in svg and "<title>x&lt;y</title>" in svg


def test_a_column_chart_stacks_answered_calls_under_the_others():
    svg = charts.column_chart("c", "t", "d", [charts.Column("a", 4, 1, "")], height=132)
    # Plot height 100 px (132 - 10 - 22) and a top of 4: one answered call is 25 px, three others 75 px.
    assert 'class="chart-answered" x="' in svg and 'height="25.0"' in svg and 'height="75.0"' in svg
