"""Covers the whole server with the browser test page (static/calls/app.js) in real headless Chromium, on daphne.

The page speaks to the server only through the JavaScript client library
(clients/js/src, served at /static/signaling-client/), so these tests exercise the
library in a browser too: its registration (resume, delta presence, a device id), its
calls, its PeerConnection helper, its reconnect and resume, and its keepalive pings.

Two users open the page served by daphne, register, call, and see each other's
(fake) camera. Media flows between the two pages over host candidates only: the
server hands out no ICE servers, so nothing is relayed and no packet leaves this
machine. Chromium needs two switches for that (both documented Chromium
switches): `--allow-loopback-in-peer-connection` adds the loopback interface to
the networks WebRTC gathers on, and `--disable-features=WebRtcHideLocalIpsWithMdns`
keeps Chromium from replacing host addresses with `.local` mDNS names (which it
does for pages without camera permission, and which would need multicast DNS).
The tests check every candidate that went over the wire is an address of this host.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, WebSocket, expect

from calls.testing.servers import DaphneServer, daphne_server
from calls.tests.netclient import TIMEOUT, TcpProxy, http_request, server_rows

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    folder = tmp_path_factory.mktemp("browser")
    with daphne_server(folder, SIGNALING_ICE_SERVERS="[]", SIGNALING_PRESENCE_WINDOW_MS="20") as server:
        yield server


@dataclass
class Tab:
    """One page of the app, with every WebSocket frame it sent and received."""

    page: Page
    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sockets: list[WebSocket] = field(default_factory=list)

    def watch(self, ws: WebSocket) -> None:
        self.sockets.append(ws)
        ws.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    def sent_of(self, kind: str) -> list[dict[str, Any]]:
        return [message for message in self.sent if message["type"] == kind]

    def received_of(self, kind: str) -> list[dict[str, Any]]:
        return [message for message in self.received if message["type"] == kind]

    def user(self, username: str) -> Locator:
        return self.page.locator(f'#online-users li[data-username="{username}"]')


@pytest.fixture
def open_tab(browser: Browser, server: DaphneServer) -> Iterator[Any]:
    """Open the page in a browser profile of its own (or a given one) and register.

    `url`: where the page is, when not straight at the server (through a relay).
    """
    contexts: list[BrowserContext] = []
    tabs: list[Tab] = []

    def open_tab(username: str, context: BrowserContext | None = None, url: str | None = None) -> Tab:
        if context is None:
            context = browser.new_context(viewport={"width": 1200, "height": 760})
            contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        tab = Tab(page)
        page.on("websocket", tab.watch)
        page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
        page.goto((url or server.http_url) + "/")
        page.fill("#username", username)
        page.click("#register-btn")
        expect(page.locator("#status")).to_have_attribute("data-state", "online")
        tabs.append(tab)
        return tab

    yield open_tab
    for context in contexts:
        context.close()
    assert [error for tab in tabs for error in tab.errors] == []


def call_rows(server: DaphneServer, caller: str, callee: str) -> list[tuple[str, str | None]]:
    """Return (status, end_reason) of the calls from `caller` to `callee`, as the server stored them."""
    return server_rows(
        server,
        "SELECT c.status, c.end_reason FROM calls_call c "
        "JOIN calls_signalinguser a ON a.id = c.caller_id JOIN calls_signalinguser b ON b.id = c.callee_id "
        "WHERE a.username = ? AND b.username = ?",
        caller,
        callee,
    )


def is_address_of_this_host(address: str) -> bool:
    """Return whether `address` belongs to an interface of this machine (it can be bound)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def candidate_addresses(tab: Tab) -> list[str]:
    # candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ...
    return [message["data"]["candidate"].split()[4] for message in tab.sent_of("ice_candidate")]


def wait_for_remote_video(page: Page) -> None:
    """Wait until the remote video has frames and keeps playing new ones."""
    page.wait_for_function(
        "() => { const v = document.querySelector('#remote-video');"
        " return v.videoWidth > 0 && v.readyState >= 2 && v.currentTime > 0; }"
    )
    start = page.evaluate(
        "() => { const v = document.querySelector('#remote-video');"
        " return [v.currentTime, v.getVideoPlaybackQuality().totalVideoFrames]; }"
    )
    page.wait_for_function(
        "([time, frames]) => { const v = document.querySelector('#remote-video');"
        " return v.currentTime > time + 0.5 && v.getVideoPlaybackQuality().totalVideoFrames > frames + 5; }",
        arg=start,
    )


def wait_for_frames(tab: Tab, kind: str, count: int) -> list[dict[str, Any]]:
    """Wait until the page has received `count` frames of type `kind`; return them all."""
    for _ in range(TIMEOUT_MS // 50):
        if len(tab.received_of(kind)) >= count:
            return tab.received_of(kind)
        # Playwright hands over the frames it saw while it waits: let it.
        tab.page.wait_for_timeout(50)
    raise AssertionError(f"fewer than {count} {kind} frames: {tab.received_of(kind)}")


def names(users: list[dict[str, str]]) -> list[str]:
    return [user["username"] for user in users]


def answered_call(caller: Tab, callee: Tab, callee_name: str) -> str:
    """Call `callee_name` from `caller`, answer in `callee`, wait for live video both ways; return the call id."""
    caller.user(callee_name).locator(".call-btn").click()
    expect(callee.page.locator("#incoming-call")).to_be_visible()
    callee.page.click("#accept-btn")
    for tab in (caller, callee):
        expect(tab.page.locator("#status")).to_have_attribute("data-state", "in-call")
        wait_for_remote_video(tab.page)
    return callee.received_of("incoming_call")[0]["call_id"]


class Relay:
    """A TcpProxy (calls/tests/netclient.py) on an event loop in a thread of its own, for these sync tests.

    A page loaded through it opens its socket through it too, so the test can break that link.
    """

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._proxy: TcpProxy | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="relay", daemon=True)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with TcpProxy(self._target_port) as proxy:
            self._proxy = proxy
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Relay:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "the relay did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self._proxy.port}"

    def cut(self) -> None:
        """Reset every connection through the relay at both ends: the server drops the socket."""
        self._call(self._proxy.cut)

    def freeze(self) -> None:
        """Stop carrying bytes either way and leave the connections open: the link goes silent."""
        self._call(self._proxy.freeze)

    def thaw(self) -> None:
        """Carry bytes again."""
        self._call(self._proxy.flowing.set)

    def _call(self, action: Callable[[], None]) -> None:
        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(TIMEOUT)


def test_the_page_loads_its_code_and_the_client_library_as_modules_of_its_own_origin(server):
    status, headers, body = http_request(server.http_url + "/")
    assert status == 200
    assert '<script type="module" src="/static/calls/app.js"></script>' in body.decode()
    assert headers["Content-Security-Policy"].startswith("default-src 'self';")
    app = http_request(server.http_url + "/static/calls/app.js")[2].decode()
    assert 'from "../signaling-client/index.js";' in app

    library = sorted((ROOT / "clients" / "js" / "src").glob("*.js"))
    assert "index.js" in [path.name for path in library]
    for path in library:
        status, headers, body = http_request(f"{server.http_url}/static/signaling-client/{path.name}")
        assert (status, headers["Content-Type"].split(";")[0]) == (200, "text/javascript"), path.name
        assert body == path.read_bytes()


def test_the_page_registers_for_resume_with_delta_presence_and_lists_who_comes_and_goes(open_tab):
    xena = open_tab("xena")
    (register,) = xena.sent_of("register")
    assert register == {
        "type": "register",
        "username": "xena",
        "user_id": register["user_id"],
        "device_id": register["device_id"],
        "presence": "delta",
        "resume": True,
    }
    uuid.UUID(register["user_id"])
    assert register["device_id"].startswith("browser-")
    assert xena.received_of("registered")[0]["resume_token"]

    yann = open_tab("yann")
    expect(xena.user("yann")).to_have_count(1)
    expect(yann.user("xena")).to_have_count(1)
    yann.page.close()
    expect(xena.user("yann")).to_have_count(0)

    assert xena.received_of("online_users") == []
    snapshot, *changes = xena.received_of("presence")
    assert snapshot["snapshot"] is True
    assert [("snapshot" in m, names(m["online"]), names(m["offline"])) for m in changes] == [
        (False, ["yann"], []),
        (False, [], ["yann"]),
    ]


def test_two_pages_call_with_live_video_and_hang_up_ends_both(open_tab, server, tmp_path):
    alice, bob = open_tab("alice"), open_tab("bob")
    alice.user("bob").locator(".call-btn").click()
    expect(bob.page.locator("#incoming-call")).to_be_visible()
    expect(bob.page.locator("#incoming-call")).to_contain_text("alice")
    bob.page.click("#accept-btn")

    for tab in (alice, bob):
        wait_for_remote_video(tab.page)
        assert tab.page.evaluate("() => document.querySelector('#remote-video').srcObject.getAudioTracks().length") == 1
        expect(tab.page.locator("#status")).to_have_attribute("data-state", "in-call")
        expect(tab.page.locator("#call-timer")).to_have_text(re.compile(r"^\d\d:\d\d$"))
    alice.page.screenshot(path=tmp_path / "alice-in-call.png")

    call_id = bob.received_of("incoming_call")[0]["call_id"]
    assert alice.sent_of("call_request") == [{"type": "call_request", "target_username": "bob"}]
    assert bob.sent_of("call_accepted") == [{"type": "call_accepted", "call_id": call_id, "caller_username": "alice"}]
    assert [m["data"]["type"] for m in alice.sent_of("offer")] == ["offer"]
    assert [m["data"]["type"] for m in bob.sent_of("answer")] == ["answer"]
    assert {m["call_id"] for m in alice.sent_of("ice_candidate") + bob.sent_of("ice_candidate")} == {call_id}
    for tab in (alice, bob):
        addresses = candidate_addresses(tab)
        assert {"127.0.0.1", "::1"} & set(addresses), addresses
        assert all(is_address_of_this_host(address) for address in addresses), addresses

    alice.page.click("#hangup-btn")
    expect(bob.page.locator("#status")).to_have_attribute("data-reason", "hangup")
    expect(bob.page.locator("#status")).to_contain_text("alice hung up")
    expect(alice.page.locator("#status")).to_have_attribute("data-reason", "hangup")
    expect(alice.page.locator("#status")).to_contain_text("you hung up")
    assert alice.sent_of("call_ended") == [{"type": "call_ended", "call_id": call_id, "target_username": "bob"}]
    ended = bob.received_of("call_ended")
    assert [(m["call_id"], m["reason"], m["from_username"]) for m in ended] == [(call_id, "hangup", "alice")]
    for tab in (alice, bob):
        assert tab.page.evaluate("() => document.querySelector('#remote-video').srcObject") is None
        expect(tab.page.locator("#call-history li").first).to_have_attribute("data-status", "completed")
    assert call_rows(server, "alice", "bob") == [("completed", "hangup")]


def test_a_rejected_call_tells_the_caller_and_is_recorded(open_tab, server):
    carol, dave = open_tab("carol"), open_tab("dave")
    carol.user("dave").locator(".call-btn").click()
    expect(carol.page.locator("#status")).to_have_attribute("data-state", "ringing")
    expect(dave.page.locator("#incoming-call")).to_be_visible()
    dave.page.click("#reject-btn")

    expect(carol.page.locator("#status")).to_have_attribute("data-reason", "rejected")
    expect(carol.page.locator("#status")).to_contain_text("dave declined")
    expect(dave.page.locator("#incoming-call")).to_be_hidden()
    expect(dave.page.locator("#status")).to_contain_text("You declined the call from carol")
    call_id = dave.received_of("incoming_call")[0]["call_id"]
    assert dave.sent_of("call_rejected") == [{"type": "call_rejected", "call_id": call_id, "caller_username": "carol"}]
    assert [(m["call_id"], m["reason"]) for m in carol.received_of("call_rejected")] == [(call_id, "rejected")]
    assert carol.sent_of("offer") == []
    expect(carol.page.locator("#call-history li").first).to_have_attribute("data-status", "rejected")
    assert call_rows(server, "carol", "dave") == [("rejected", "rejected")]


def test_in_open_mode_a_second_tab_of_an_online_name_is_refused(open_tab, browser, server):
    open_tab("olga")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.http_url + "/")
        page.fill("#username", "olga")
        page.click("#register-btn")
        expect(page.locator("#status")).to_have_attribute("data-reason", "username_taken")
    finally:
        context.close()


def test_a_call_survives_a_dropped_server_socket_and_the_page_resumes_its_session(open_tab, server):
    with Relay(server.port) as relay:
        uma = open_tab("uma")
        vic = open_tab("vic", url=relay.http_url)
        call_id = answered_call(uma, vic, "vic")
        first = vic.received_of("registered")[0]

        relay.cut()

        resumed = wait_for_frames(vic, "registered", 2)[1]
        assert resumed["resumed"] is True
        assert [(c["call_id"], c["peer_username"]) for c in resumed["calls"]] == [(call_id, "uma")]
        assert vic.sent_of("register")[1]["resume_token"] == first["resume_token"]
        assert len(vic.sockets) == 2
        expect(uma.page.locator("#status")).to_have_text("vic is back")
        peer_news = [(m["type"], m["call_id"]) for m in uma.received if m["type"].startswith("peer_")]
        assert peer_news == [("peer_reconnecting", call_id), ("peer_reconnected", call_id)]
        expect(vic.page.locator("#status")).to_have_text("In a call with uma")
        expect(vic.page.locator("#status")).to_have_attribute("data-state", "in-call")
        for tab in (uma, vic):
            wait_for_remote_video(tab.page)

        vic.page.click("#hangup-btn")
        expect(uma.page.locator("#status")).to_contain_text("vic hung up")
        assert vic.sent_of("call_ended") == [{"type": "call_ended", "call_id": call_id, "target_username": "uma"}]
    assert call_rows(server, "uma", "vic") == [("completed", "hangup")]


def test_a_link_gone_silent_is_caught_by_the_keepalive_and_the_session_resumes(open_tab, browser, server):
    context = browser.new_context()
    # The page's timers run on a clock the test moves on: 20 s pings and 10 s pong deadlines at once.
    context.clock.install()
    try:
        with Relay(server.port) as relay:
            wren = open_tab("wren", context=context, url=relay.http_url)
            clock = wren.page.clock
            with wren.sockets[0].expect_event("framereceived", lambda payload: json.loads(payload)["type"] == "pong"):
                clock.run_for(20_000)
            assert wren.sent_of("ping") == [{"type": "ping"}]

            relay.freeze()
            clock.run_for(30_000)  # the next ping, then its pong deadline
            expect(wren.page.locator("#status")).to_have_attribute("data-state", "offline")
            expect(wren.page.locator("#status")).to_have_text("Connection to the server lost; reconnecting…")
            relay.cut()
            relay.thaw()

            registrations = wait_for_frames(wren, "registered", 2)
            assert registrations[1]["resumed"] is True
            assert wren.sent_of("register")[-1]["resume_token"] == registrations[0]["resume_token"]
            assert len(wren.sent_of("ping")) == 2
            assert len(wren.received_of("pong")) == 1
            expect(wren.page.locator("#status")).to_have_attribute("data-state", "online")
    finally:
        context.close()


TOKEN_ENV = {"SIGNALING_AUTH": "token", "SIGNALING_JWT_SECRET": "j" * 40, "SIGNALING_ALLOW_SIGNUP": "true"}
PASSWORD = "a long and unusual passphrase"


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    folder = tmp_path_factory.mktemp("browser-token")
    with daphne_server(folder, SIGNALING_PRESENCE_WINDOW_MS="20", **TOKEN_ENV) as server:
        yield server


def signed_in_tab(browser: Browser, server: DaphneServer, username: str, context: BrowserContext) -> Tab:
    """Open the page in `context` and sign in with the account's password (token mode)."""
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    tab = Tab(page)
    page.on("websocket", tab.watch)
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    page.goto(server.http_url + "/")
    page.fill("#username", username)
    page.click(".advanced summary")
    page.fill("#password", PASSWORD)
    page.click("#register-btn")
    expect(page.locator("#status")).to_have_attribute("data-state", "online")
    return tab


def test_in_token_mode_a_user_in_two_tabs_answers_in_one_and_the_other_stops_ringing(browser, token_server):
    for name in ("erin", "frank"):
        assert http_request(f"{token_server.http_url}/api/users", {"username": name, "password": PASSWORD})[0] == 201
    erin_context, frank_context = browser.new_context(), browser.new_context()
    try:
        erin = signed_in_tab(browser, token_server, "erin", erin_context)
        frank_first = signed_in_tab(browser, token_server, "frank", frank_context)
        frank_second = signed_in_tab(browser, token_server, "frank", frank_context)
        # Both tabs are the one account: the server gives them its user_id.
        first_id = frank_first.received_of("registered")[0]["user_id"]
        assert frank_second.received_of("registered")[0]["user_id"] == first_id

        expect(erin.user("frank")).to_have_count(1)
        erin.user("frank").locator(".call-btn").click()
        for tab in (frank_first, frank_second):
            expect(tab.page.locator("#incoming-call")).to_be_visible()
        frank_second.page.click("#accept-btn")

        expect(frank_first.page.locator("#incoming-call")).to_be_hidden()
        expect(frank_first.page.locator("#status")).to_have_attribute("data-reason", "answered_elsewhere")
        for tab in (erin, frank_second):
            expect(tab.page.locator("#status")).to_have_attribute("data-state", "in-call")
        assert frank_first.sent_of("offer") + frank_first.sent_of("answer") == []

        erin.page.click("#hangup-btn")
        expect(frank_second.page.locator("#status")).to_have_attribute("data-reason", "hangup")
        assert call_rows(token_server, "erin", "frank") == [("completed", "hangup")]
    finally:
        erin_context.close()
        frank_context.close()


def test_in_token_mode_the_page_signs_in_with_a_password(browser, tmp_path):
    env = {"SIGNALING_AUTH": "token", "SIGNALING_JWT_SECRET": "j" * 40, "SIGNALING_ALLOW_SIGNUP": "true"}
    with daphne_server(tmp_path, **env) as server:
        password = "a long and unusual passphrase"
        assert http_request(f"{server.http_url}/api/users", {"username": "grace", "password": password})[0] == 201
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            tab = Tab(page)
            page.on("websocket", tab.watch)
            page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
            page.goto(server.http_url + "/")
            page.fill("#username", "grace")
            page.click(".advanced summary")
            page.fill("#password", "not the password")
            page.click("#register-btn")
            expect(page.locator("#status")).to_have_attribute("data-state", "error")
            expect(page.locator("#status")).to_contain_text("Could not sign in")
            assert tab.sent == []

            page.fill("#password", password)
            page.click("#register-btn")
            expect(page.locator("#status")).to_have_attribute("data-state", "online")
            (register,) = tab.sent_of("register")
            assert verify_token_with(register["token"], env["SIGNALING_JWT_SECRET"]) == "grace"
            assert tab.received_of("registered")[0]["username"] == "grace"
            assert tab.errors == []
        finally:
            context.close()


def verify_token_with(token: str, secret: str) -> str:
    return jwt.decode(token, secret, algorithms=["HS256"])["sub"]
