"""Covers the admin's call pages and calls dashboard as an operator sees them: headless Chromium on daphne.

Calls are made through the real server by plain WebSocket peers (which stay connected on
an event loop of their own while the browser looks), on top of a month of older history
written straight into the server's database. An operator signs in, opens the call list,
a call and the dashboard; every figure the pages show is checked against those calls.
A screenshot of each page is written to the test's folder (with UPDATE_DOCS_SCREENSHOTS=1,
the dashboard's also to docs/images/admin-dashboard.png, which the README shows).
"""

from __future__ import annotations

import asyncio
import http.client
import math
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from calls.testing.servers import ROOT, DaphneServer, daphne_server
from calls.tests.netclient import TIMEOUT, Peer, answered_call, connect_registered, ring, start_cluster

TIMEOUT_MS = 20_000
OPERATOR, PASSWORD = "operator", "an-operators-long-passphrase"
RING_TIMEOUT = "1.5"
DOCS_SCREENSHOT = ROOT / "docs" / "images" / "admin-dashboard.png"
WIDTH = 1280


class Background:
    """An event loop on a thread of its own: the peers stay connected while the (sync) browser looks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="peers", daemon=True)
        self.thread.start()
        self.peers: list[Peer] = []

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def connect(self, url: str, username: str, device: str) -> Peer:
        peer, _ = self.run(connect_registered(url, username, device_id=device))
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        async def close_all() -> None:
            for peer in self.peers:
                await peer.ws.close()

        self.run(close_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


def create_operator(env: dict[str, str]) -> None:
    """A superuser in the server's database, made as an operator would: createsuperuser --noinput."""
    credentials = {
        "DJANGO_SUPERUSER_USERNAME": OPERATOR,
        "DJANGO_SUPERUSER_PASSWORD": PASSWORD,
        "DJANGO_SUPERUSER_EMAIL": "ops@example.com",
    }
    subprocess.run(
        [sys.executable, "manage.py", "createsuperuser", "--noinput"],
        cwd=ROOT,
        env={**env, **credentials},
        check=True,
        capture_output=True,
    )


def sign_in(page: Page, server: DaphneServer) -> None:
    page.goto(f"{server.http_url}/admin/login/?next=/admin/")
    page.fill("#id_username", OPERATOR)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page).to_have_url(f"{server.http_url}/admin/")


def db_time(moment: datetime) -> str:
    """A time as Django stores it in SQLite: naive UTC."""
    return str(moment.astimezone(UTC).replace(tzinfo=None))


def parse_stamp(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- History: a month written straight into the database, then calls through the server ---------


@dataclass(frozen=True)
class Row:
    """One call as the database holds it: what every figure is computed from here, independently."""

    status: str
    reason: str | None
    created: datetime
    answered: datetime | None


OLD_OUTCOMES = [("completed", "hangup", 12), ("missed", "timeout", 3), ("busy", "busy", 2), ("rejected", "rejected", 2)]
OLD_OUTCOMES += [("cancelled", "cancelled", 2), ("failed", "disconnected", 1), ("completed", "disconnected", 1)]


def write_history(database: Path, now: datetime, days: int = 30, per_day: int = 40) -> None:
    """About `per_day` calls a day, more by day than by night, between six users; none in the last hour."""
    rng = random.Random(7)
    people = ["ana", "ben", "chloe", "dev", "emma", "femi"]
    with sqlite3.connect(database) as db:
        for name in people:
            db.execute(
                "INSERT INTO calls_signalinguser (username, user_id, first_seen, last_seen) VALUES (?, ?, ?, ?)",
                (name, f"id-{name}", db_time(now - timedelta(days=days + 5)), db_time(now - timedelta(days=1))),
            )
        ids = [row[0] for row in db.execute("SELECT id FROM calls_signalinguser ORDER BY id")]
        rows = []
        for _ in range(days * per_day):
            while True:
                started = now - timedelta(hours=1, seconds=rng.uniform(0, days * 86400 - 3600))
                if rng.random() < 0.15 + 0.85 * math.sin(math.pi * ((started.hour - 5) % 24) / 24) ** 2:
                    break
            status, reason, _ = rng.choices(OLD_OUTCOMES, weights=[w for *_, w in OLD_OUTCOMES])[0]
            answered = (
                started + timedelta(seconds=rng.lognormvariate(math.log(4), 0.6)) if status == "completed" else None
            )
            ended = (answered or started) + timedelta(seconds=rng.expovariate(1 / 120) if answered else 30)
            caller, callee = rng.sample(ids, 2)
            rows.append(
                (uuid.uuid4().hex, caller, callee, status, reason, db_time(started), answered and db_time(answered))
                + (db_time(ended), "", "", "", "", 0)
            )
        db.executemany(
            "INSERT INTO calls_call (id, caller_id, callee_id, status, end_reason, created_at, answered_at, ended_at,"
            " caller_channel, callee_channel, caller_device, callee_device, pushed)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def all_rows(server: DaphneServer) -> list[Row]:
    with sqlite3.connect(server.env["DATABASE_URL"].removeprefix("sqlite:///")) as db:
        found = db.execute("SELECT status, end_reason, created_at, answered_at FROM calls_call").fetchall()
    return [
        Row(status, reason, parse_stamp(created), parse_stamp(answered)) for status, reason, created, answered in found
    ]


@dataclass
class Made:
    """The calls this module made through the server, by what became of them."""

    ids: dict[str, str] = field(default_factory=dict)


async def make_calls(peers: dict[str, Peer]) -> Made:
    """One call of each outcome, and one left in progress."""
    alice, bob, carol, dave, erin, frank = (peers[name] for name in ("alice", "bob", "carol", "dave", "erin", "frank"))
    made = Made()
    made.ids["completed"] = await answered_call(alice, bob)
    await alice.send({"type": "call_ended", "call_id": made.ids["completed"]})
    assert (await bob.expect("call_ended"))["reason"] == "hangup"

    made.ids["rejected"] = await ring(alice, [carol], "carol")
    await carol.send({"type": "call_rejected", "call_id": made.ids["rejected"]})
    assert (await alice.expect("call_rejected"))["reason"] == "rejected"

    made.ids["cancelled"] = await ring(dave, [carol], "carol")
    await dave.send({"type": "call_ended", "call_id": made.ids["cancelled"]})
    assert (await carol.expect("call_ended"))["reason"] == "cancelled"

    made.ids["missed"] = await ring(bob, [dave], "dave")
    ended = await bob.expect("call_ended", timeout=float(RING_TIMEOUT) + TIMEOUT)
    assert ended["reason"] == "timeout"
    await dave.expect("call_ended")

    made.ids["in progress"] = await answered_call(erin, frank)
    await carol.send({"type": "call_request", "target_username": "frank"})
    busy = await carol.expect("call_rejected")
    assert busy["reason"] == "busy"
    made.ids["busy"] = busy["call_id"]
    return made


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaphneServer, Made, Background]]:
    folder = tmp_path_factory.mktemp("admin")
    with daphne_server(folder, SIGNALING_RING_TIMEOUT=RING_TIMEOUT, SIGNALING_PRESENCE_WINDOW_MS="20") as server:
        create_operator(server.env)
        write_history(Path(server.env["DATABASE_URL"].removeprefix("sqlite:///")), datetime.now(UTC))
        background = Background()
        try:
            devices = {"alice": "alice-laptop", "bob": "bob-phone", "carol": "carol-tablet"}
            peers = {
                name: background.connect(server.url, name, devices.get(name, f"{name}-phone"))
                for name in ("alice", "bob", "carol", "dave", "erin", "frank")
            }
            made = background.run(make_calls(peers))
            yield server, made, background
        finally:
            background.close()


@pytest.fixture
def page(browser: Browser, tmp_path: Path) -> Iterator[Page]:
    """A 1280 px wide page; every console error (a CSP violation among them) fails the test."""
    context = browser.new_context(viewport={"width": WIDTH, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    # Chromium asks for /favicon.ico, which the server does not have: not an error of the pages.
    page.on(
        "response",
        lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 and "favicon" not in r.url else None,
    )
    page.on(
        "console",
        lambda message: errors.append(message.text) if message.type == "error" and "404" not in message.text else None,
    )
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == []


def fits_the_window(page: Page) -> bool:
    """Nothing scrolls sideways: neither the page nor any box on it (the call list's results, a table)."""
    return page.evaluate(
        "() => document.documentElement.scrollWidth <= window.innerWidth &&"
        " [...document.querySelectorAll('#content *')].every(e => e.scrollWidth <= e.clientWidth + 1"
        " || getComputedStyle(e).overflowX === 'visible')"
    )


def seconds(value: timedelta) -> str:
    return f"{value.total_seconds():.1f} s"


# --- The pages ----------------------------------------------------------------------------------------


def test_an_anonymous_visitor_gets_no_admin_page_from_daphne(history):
    server, made, _ = history
    pages = ["/admin/", "/admin/calls/call/", "/admin/calls/call/dashboard/"]
    for path in [*pages, f"/admin/calls/call/{made.ids['completed']}/change/"]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 302, path
            assert response.getheader("Location").startswith("/admin/login/?next="), path
        finally:
            connection.close()


def test_the_call_list_fits_1280_px_and_shows_each_calls_figures(history, page, tmp_path):
    server, made, _ = history
    sign_in(page, server)
    page.goto(f"{server.http_url}/admin/calls/call/?q=alice")
    headers = page.locator("#result_list thead th").all_text_contents()
    assert [h.strip() for h in headers] == [
        "Call",
        "Caller",
        "Callee",
        "Status",
        "Started",
        "Time to answer",
        "Duration",
    ]
    assert fits_the_window(page)
    duration, filters = page.locator("#result_list th.column-duration"), page.locator("#changelist-filter")
    assert duration.bounding_box()["x"] + duration.bounding_box()["width"] <= filters.bounding_box()["x"]
    completed = made.ids["completed"]
    row = page.locator("#result_list tbody tr", has=page.locator(f"text={completed.replace('-', '')[:8]}"))
    with sqlite3.connect(server.env["DATABASE_URL"].removeprefix("sqlite:///")) as db:
        created, answered, ended = db.execute(
            "SELECT created_at, answered_at, ended_at FROM calls_call WHERE id = ?", (completed.replace("-", ""),)
        ).fetchone()
    created, answered, ended = map(parse_stamp, (created, answered, ended))
    assert row.locator("td.field-caller").inner_text() == "alice"
    assert row.locator("td.field-callee").inner_text() == "bob"
    assert row.locator("td.field-outcome").inner_text() == "completed · hangup"
    assert row.locator("td.field-started").inner_text() == created.strftime("%Y-%m-%d %H:%M:%S")
    assert row.locator("td.field-time_to_answer").inner_text() == seconds(answered - created)
    assert row.locator("td.field-duration").inner_text() == "0:00"
    page.goto(f"{server.http_url}/admin/calls/call/")
    assert fits_the_window(page)
    page.screenshot(path=str(tmp_path / "call-list.png"), full_page=True)


def test_a_call_is_one_click_from_the_list_with_its_ring_time_and_its_timeline_actors(history, page, tmp_path):
    server, made, _ = history
    sign_in(page, server)
    page.goto(f"{server.http_url}/admin/calls/call/?q=bob")
    page.click(f"text={made.ids['completed'].replace('-', '')[:8]}")
    expect(page.locator("h1")).to_have_text("View call")
    assert page.locator(".field-call_id .readonly").inner_text() == made.ids["completed"]
    assert re.fullmatch(r"\d+\.\d{3} s, then answered", page.locator(".field-rang_for .readonly").inner_text())
    actors = page.locator("td.field-actor").all_inner_texts()
    assert actors == ["alice on device alice-laptop", "bob on device bob-phone", "alice on device alice-laptop"]
    steps = page.locator("td.field-step").all_inner_texts()
    assert steps == ["start → ringing", "ringing → answered", "answered → completed"]
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", at)
        for at in page.locator("td.field-at_ms").all_inner_texts()
    )
    assert all(s.startswith("specific.") for s in page.locator("td.field-session_id").all_inner_texts())
    assert fits_the_window(page)
    page.screenshot(path=str(tmp_path / "call.png"), full_page=True)


def nearest_rank(values: list[timedelta], share: float) -> timedelta:
    ordered = sorted(values)
    return ordered[math.ceil(share * len(ordered)) - 1]


def test_the_dashboard_is_one_click_from_the_index_and_shows_the_calls_figures(history, page, tmp_path):
    server, made, _ = history
    sign_in(page, server)
    page.click("#calls-dashboard-link a")
    expect(page.locator("h1")).to_have_text("Calls dashboard")
    since = datetime.strptime(page.locator("#day-heading .quiet").inner_text(), "since %Y-%m-%d %H:%M UTC").replace(
        tzinfo=UTC
    )
    rows = all_rows(server)
    window = [row for row in rows if since <= row.created]

    outcomes = {
        label: int(count)
        for label, count in zip(
            page.locator("#outcomes tbody th").all_inner_texts(),
            page.locator("#outcomes tbody td").all_inner_texts(),
            strict=True,
        )
    }
    expected = Counter((row.status, row.reason) for row in window)
    labels = {
        ("completed", "hangup"): "Completed, hung up",
        ("completed", "disconnected"): "Completed, connection lost",
        ("answered", None): "In progress",
        ("busy", "busy"): "Busy",
        ("missed", "timeout"): "Missed (ring timeout)",
        ("rejected", "rejected"): "Rejected",
        ("cancelled", "cancelled"): "Cancelled by caller",
        ("failed", "disconnected"): "Failed, a party disconnected",
    }
    assert outcomes == {label: expected[key] for key, label in labels.items()} | {"Ringing now": 0}
    for key in [
        ("busy", "busy"),
        ("missed", "timeout"),
        ("rejected", "rejected"),
        ("cancelled", "cancelled"),
        ("answered", None),
    ]:
        assert expected[key] >= 1  # the calls made above are in the window
    bars = {
        bar.get_attribute("data-label"): int(bar.get_attribute("data-value"))
        for bar in page.locator("#call-outcomes g.chart-row").all()
    }
    assert bars == outcomes

    hourly = [int(c.get_attribute("data-total")) for c in page.locator("#calls-per-hour g.chart-column").all()]
    expected_hours = Counter(int((row.created - since).total_seconds() // 3600) for row in window)
    assert hourly == [expected_hours[hour] for hour in range(24)]
    daily = [int(c.get_attribute("data-total")) for c in page.locator("#calls-per-day g.chart-column").all()]
    now = datetime.strptime(page.locator("#now-heading .quiet").inner_text(), "%Y-%m-%d %H:%M:%S UTC").replace(
        tzinfo=UTC
    )
    first_day = now.date() - timedelta(days=29)
    expected_days = Counter((row.created.date() - first_day).days for row in rows if row.created.date() >= first_day)
    assert daily == [expected_days[day] for day in range(30)]

    answered = [row.answered - row.created for row in window if row.answered is not None]
    decided = [row for row in window if row.status != "ringing"]
    rate = 100 * sum(row.status in ("answered", "completed") for row in decided) / len(decided)
    assert page.locator("#tile-answer-rate .tile-value").inner_text() == f"{rate:.1f} %"
    assert page.locator("#tile-median .tile-value").inner_text() == seconds(nearest_rank(answered, 0.5))
    assert page.locator("#tile-p90 .tile-value").inner_text() == seconds(nearest_rank(answered, 0.9))
    assert page.locator("#tile-calls .tile-value").inner_text() == f"{len(window):,}"

    assert page.locator("#tile-online .tile-value").inner_text() == "6"
    assert page.locator("#online-users a").all_inner_texts() == ["alice", "bob", "carol", "dave", "erin", "frank"]
    live = page.locator("#live-calls tbody tr")
    assert live.count() == 1
    cells = live.locator("td").all_inner_texts()
    assert cells[1:4] == ["erin", "frank", "answered"] and cells[5:] == ["on this process", "on this process"]
    assert fits_the_window(page)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS_SCREENSHOT), full_page=True)


def test_how_many_calls_failed_and_why_is_one_click_from_the_dashboard(history, page):
    server, made, _ = history
    sign_in(page, server)
    page.goto(f"{server.http_url}/admin/calls/call/dashboard/")
    expected = page.locator("#outcomes tbody tr", has_text="Busy").locator("td").inner_text()
    page.click("#outcomes >> text=Busy")
    expect(page.locator("#result_list tbody tr")).to_have_count(int(expected))
    assert set(page.locator("td.field-outcome").all_inner_texts()) == {"busy"}
    assert made.ids["busy"].replace("-", "")[:8] in page.locator("#result_list .field-short_id").all_inner_texts()


# --- Presence from Redis: two processes ----------------------------------------------------------------


def test_the_dashboard_of_one_process_lists_the_users_and_sessions_of_every_process(tmp_path, postgres, browser):
    cluster = start_cluster(tmp_path, postgres)
    background = Background()
    try:
        create_operator({**cluster.a.env, "DATABASE_URL": cluster.database_url})
        alice = background.connect(cluster.a.url, "alice", "alice-laptop")
        bob = background.connect(cluster.b.url, "bob", "bob-phone")
        background.run(answered_call(alice, bob))
        context = browser.new_context(viewport={"width": WIDTH, "height": 900})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        sign_in(page, cluster.a)
        page.goto(f"{cluster.a.http_url}/admin/calls/call/dashboard/")
        assert page.locator("#tile-online .tile-detail").inner_text() == "2 sessions, 1 on this process"
        assert page.locator("#online-users a").all_inner_texts() == ["alice", "bob"]
        cells = page.locator("#live-calls tbody tr td").all_inner_texts()
        assert cells[1:4] == ["alice", "bob", "answered"] and cells[5:] == ["on this process", "on another process"]
        context.close()
    finally:
        background.close()
        cluster.stop()
