"""Covers the test page's push notifications (static/calls/app.js, sw.js) in headless Chromium against daphne.

The server runs in token mode with Web Push (a VAPID key). The page subscribes and
unsubscribes through the JavaScript client library (clients/js: `subscribePush`,
`unsubscribePush`), signed in with the token its password sign-in fetched.

Headless Chromium has no push service: `PushManager.subscribe` needs Google's, and
Playwright's contexts are incognito, where Chromium refuses push subscriptions
outright. So:

- pushes reach the service worker through the DevTools protocol
  (`ServiceWorker.deliverPushMessage`, what DevTools' "Push" button does), with the
  payload a push service would hand over once decrypted;
- past `PushManager.subscribe`, the page's switch is tested with a stand-in push
  manager (an init script) whose subscription is the test's own
  (calls/tests/push/push_service.py): the server then pushes to the stand-in push
  service on loopback, the test decrypts each push and hands it to the worker.

Nothing leaves the machine: the browser runs with the flags of the `browser`
fixture (calls/tests/conftest.py) and every endpoint is on 127.0.0.1.
"""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from playwright.sync_api import Browser, BrowserContext, CDPSession, Page, WebSocket, expect
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from calls.push.webpush import b64url_decode, new_key_pair
from calls.testing.servers import DaphneServer, daphne_server
from calls.tests.netclient import TIMEOUT, http_request, server_rows, token_for
from calls.tests.push.push_service import BrowserSubscription, PushService

ROOT = Path(__file__).resolve().parents[3]
SECRET = "browser-push-secret-" + "x" * 32
PASSWORD = "a long and unusual passphrase"
VAPID_PRIVATE, VAPID_PUBLIC = new_key_pair()
PUSH_ENV = {
    "SIGNALING_AUTH": "token",
    "SIGNALING_JWT_SECRET": SECRET,
    "SIGNALING_ALLOW_SIGNUP": "true",
    "SIGNALING_VAPID_PRIVATE_KEY": VAPID_PRIVATE,
    "SIGNALING_VAPID_SUBJECT": "mailto:ops@example.com",
    # The stand-in push service listens on plain http on loopback.
    "SIGNALING_PUSH_ALLOW_PRIVATE_ENDPOINTS": "true",
    "SIGNALING_PRESENCE_WINDOW_MS": "20",
}
TIMEOUT_MS = 20_000

# Stands in for PushManager in the page: `subscribe` returns the test's subscription
# (kept across navigations, as a browser keeps it), and records what it was given.
STAND_IN_PUSH_MANAGER = """
(subscriptionJson) => {
  const stored = () => localStorage.getItem("test.pushKey");
  const record = (name, value) => {
    const calls = JSON.parse(localStorage.getItem("test.pushCalls") || "[]");
    calls.push([name, value]);
    localStorage.setItem("test.pushCalls", JSON.stringify(calls));
  };
  const subscription = (key) => ({
    endpoint: subscriptionJson.endpoint,
    expirationTime: null,
    options: { userVisibleOnly: true, applicationServerKey: Uint8Array.from(key).buffer },
    toJSON: () => subscriptionJson,
    unsubscribe: async () => {
      localStorage.removeItem("test.pushKey");
      record("unsubscribe", null);
      return true;
    },
  });
  PushManager.prototype.subscribe = async function (options) {
    const key = Array.from(new Uint8Array(options.applicationServerKey));
    localStorage.setItem("test.pushKey", JSON.stringify(key));
    record("subscribe", { userVisibleOnly: options.userVisibleOnly, applicationServerKey: key });
    return subscription(key);
  };
  PushManager.prototype.getSubscription = async function () {
    return stored() ? subscription(JSON.parse(stored())) : null;
  };
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    with daphne_server(tmp_path_factory.mktemp("browser-push"), **PUSH_ENV) as server:
        yield server


@pytest.fixture(scope="module")
def service() -> Iterator[PushService]:
    service = PushService()
    yield service
    service.close()


@pytest.fixture
def context(browser: Browser, server: DaphneServer) -> Iterator[BrowserContext]:
    """A browser profile of its own that has allowed the server's notifications."""
    context = browser.new_context()
    context.grant_permissions(["notifications"], origin=server.http_url)
    yield context
    context.close()


@dataclass
class Tab:
    """One page of the app, with every WebSocket frame it sent and received."""

    page: Page
    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def watch(self, ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    def sent_of(self, kind: str) -> list[dict[str, Any]]:
        return [message for message in self.sent if message["type"] == kind]

    def received_of(self, kind: str) -> list[dict[str, Any]]:
        return [message for message in self.received if message["type"] == kind]

    def sign_in(self, username: str, until: str = "online") -> None:
        """Go online with the account's password (token mode); wait for the status `until`."""
        self.page.fill("#username", username)
        self.page.click(".advanced summary")
        self.page.fill("#password", PASSWORD)
        self.page.click("#register-btn")
        expect(self.page.locator("#status")).to_have_attribute("data-state", until)

    def go_online(self, username: str) -> None:
        """Go online with a name only (open mode)."""
        self.page.fill("#username", username)
        self.page.click("#register-btn")
        expect(self.page.locator("#status")).to_have_attribute("data-state", "online")


def verify_token(token: str) -> str:
    """The username a registration token was issued for."""
    return jwt.decode(token, SECRET, algorithms=["HS256"])["sub"]


def open_tab(context: BrowserContext, url: str) -> Tab:
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    tab = Tab(page)
    page.on("websocket", tab.watch)
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    page.goto(url)
    return tab


def sign_up(server: DaphneServer, username: str) -> None:
    status, _, body = http_request(f"{server.http_url}/api/users", {"username": username, "password": PASSWORD})
    assert status == 201, body


def stand_in_push_manager(context: BrowserContext, subscription: BrowserSubscription) -> None:
    context.add_init_script(f"({STAND_IN_PUSH_MANAGER})({json.dumps(subscription.to_json())})")


def turn_notifications_on(tab: Tab) -> str:
    """Turn the switch on (with the stand-in push manager); return the subscription id the server gave."""
    tab.page.click("#push-switch")
    expect(tab.page.locator("#push-switch")).to_be_checked()
    expect(tab.page.locator("#push-switch")).to_be_enabled()
    return tab.received_of("push_subscribed")[-1]["subscription_id"]


def stored_subscription_ids(page: Page) -> dict[str, str]:
    return page.evaluate("() => JSON.parse(localStorage.getItem('calls.pushSubscriptions') || '{}')")


def subscription_rows(server: DaphneServer) -> list[tuple[str, str, str, str, str]]:
    """(id, username, platform, address, device_id) of every push subscription the server holds."""
    rows = server_rows(
        server,
        "SELECT s.id, u.username, s.platform, s.address, s.device_id FROM calls_pushsubscription s "
        "JOIN calls_signalinguser u ON u.id = s.user_id ORDER BY s.created_at",
    )
    return [(str(uuid.UUID(row[0])), *row[1:]) for row in rows]


def notifications(page: Page) -> list[dict[str, Any]]:
    """The notifications the page's service worker shows now."""
    return page.evaluate(
        """() => navigator.serviceWorker.ready
          .then((registration) => registration.getNotifications())
          .then((shown) => shown.map((n) => ({
            title: n.title, tag: n.tag, body: n.body, requireInteraction: n.requireInteraction, data: n.data,
          })))"""
    )


def wait_for_notification_count(page: Page, count: int) -> None:
    page.wait_for_function(
        """(count) => navigator.serviceWorker.ready
          .then((registration) => registration.getNotifications())
          .then((shown) => shown.length === count)""",
        arg=count,
    )


class PushChannel:
    """Delivers pushes to the service worker of a server's origin through the DevTools protocol."""

    def __init__(self, context: BrowserContext, page: Page, origin: str) -> None:
        self.page = page
        self.origin = origin
        self.registrations: dict[str, dict[str, Any]] = {}
        self.cdp: CDPSession = context.new_cdp_session(page)
        self.cdp.on("ServiceWorker.workerRegistrationUpdated", self._updated)
        self.cdp.send("ServiceWorker.enable")

    def _updated(self, event: dict[str, Any]) -> None:
        for registration in event["registrations"]:
            self.registrations[registration["registrationId"]] = registration

    def registration_id(self) -> str:
        """The id of the live registration whose scope is the site's root."""
        scope = self.origin + "/"
        for _ in range(TIMEOUT_MS // 50):
            for registration_id, registration in self.registrations.items():
                if registration["scopeURL"] == scope and not registration["isDeleted"]:
                    return registration_id
            # Playwright hands over DevTools events while it waits: let it.
            self.page.wait_for_timeout(50)
        raise AssertionError(f"no service worker registration for {scope}: {self.registrations}")

    def deliver(self, payload: dict[str, Any]) -> None:
        self.cdp.send(
            "ServiceWorker.deliverPushMessage",
            {"origin": self.origin, "registrationId": self.registration_id(), "data": json.dumps(payload)},
        )


@dataclass
class Caller:
    """A plain WebSocket client of the server: the other party of a call."""

    ws: ClientConnection

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def expect(self, kind: str) -> dict[str, Any]:
        """Return the next message of type `kind`, passing over presence and history."""
        while True:
            message = json.loads(self.ws.recv(timeout=TIMEOUT))
            if message["type"] == kind:
                return message
            assert message["type"] in ("online_users", "user_online", "user_offline"), message


@contextmanager
def registered_caller(server: DaphneServer, username: str) -> Iterator[Caller]:
    """A caller registered with a token minted for `username`, closed afterwards."""
    with ws_connect(server.url, open_timeout=TIMEOUT) as ws:
        caller = Caller(ws)
        token = token_for(username, SECRET)
        caller.send({"type": "register", "username": username, "user_id": f"id-{username}", "token": token})
        caller.expect("registered")
        yield caller


def next_push(service: PushService, subscription: BrowserSubscription) -> dict[str, Any]:
    """Decrypt the next push the stand-in push service received, as the browser would."""
    try:
        push = service.pushes.get(timeout=TIMEOUT)
    except queue.Empty:
        raise AssertionError("the server sent no push") from None
    assert push.path == subscription.endpoint.removeprefix(service.origin)
    return subscription.decrypt(push.body)


# --- The worker's script -------------------------------------------------------------------------


def test_the_worker_is_served_from_the_root_with_the_headers_a_worker_needs(server):
    status, headers, body = http_request(f"{server.http_url}/sw.js")

    assert status == 200
    assert headers["Content-Type"] == "application/javascript"
    assert headers["Service-Worker-Allowed"] == "/"
    assert headers["Cache-Control"] == "no-cache"
    assert body == (ROOT / "static" / "calls" / "sw.js").read_bytes()


# --- The switch --------------------------------------------------------------------------------


def test_the_switch_registers_the_worker_and_subscribes_through_the_server(context, server, service):
    sign_up(server, "hana")
    subscription = service.subscription("hana")
    stand_in_push_manager(context, subscription)
    tab = open_tab(context, server.http_url + "/")
    tab.sign_in("hana")
    switch = tab.page.locator("#push-switch")
    expect(switch).to_be_visible()
    expect(switch).to_be_enabled()
    expect(switch).not_to_be_checked()
    assert tab.received_of("registered")[0]["vapid_public_key"] == VAPID_PUBLIC

    (register,) = tab.sent_of("register")
    assert verify_token(register["token"]) == "hana"
    assert (register["presence"], register["resume"]) == ("delta", True)

    subscription_id = turn_notifications_on(tab)

    worker = tab.page.evaluate(
        "() => navigator.serviceWorker.getRegistration().then((r) => [r.scope, r.active.scriptURL])"
    )
    assert worker == [server.http_url + "/", server.http_url + "/sw.js"]
    calls = tab.page.evaluate("() => JSON.parse(localStorage.getItem('test.pushCalls'))")
    assert calls == [
        ["subscribe", {"userVisibleOnly": True, "applicationServerKey": list(b64url_decode(VAPID_PUBLIC))}]
    ]
    device_id = tab.sent_of("register")[0]["device_id"]
    assert device_id.startswith("browser-")
    assert tab.sent_of("push_subscribe") == [
        {
            "type": "push_subscribe",
            "platform": "webpush",
            "subscription": subscription.to_json(),
            "device_id": device_id,
        }
    ]
    assert stored_subscription_ids(tab.page) == {"hana": subscription_id}
    assert subscription_rows(server) == [(subscription_id, "hana", "webpush", subscription.endpoint, device_id)]
    expect(tab.page.locator("#push-note")).to_contain_text("even when the page is closed")

    tab.page.click("#push-switch")
    expect(switch).not_to_be_checked()
    expect(switch).to_be_enabled()
    assert tab.sent_of("push_unsubscribe") == [{"type": "push_unsubscribe", "subscription_id": subscription_id}]
    assert tab.received_of("push_unsubscribed") == [{"type": "push_unsubscribed", "subscription_id": subscription_id}]
    assert tab.page.evaluate("() => JSON.parse(localStorage.getItem('test.pushCalls'))")[-1] == ["unsubscribe", None]
    assert stored_subscription_ids(tab.page) == {}
    assert subscription_rows(server) == []
    expect(tab.page.locator("#status")).to_have_attribute("data-state", "online")
    assert tab.errors == []


def test_offline_the_browsers_push_manager_refuses_and_the_page_says_so(context, server):
    sign_up(server, "ines")
    tab = open_tab(context, server.http_url + "/")
    tab.sign_in("ines")

    tab.page.click("#push-switch")

    expect(tab.page.locator("#status")).to_have_attribute("data-state", "error")
    expect(tab.page.locator("#status")).to_contain_text("Notifications: ")
    switch = tab.page.locator("#push-switch")
    expect(switch).not_to_be_checked()
    expect(switch).to_be_enabled()
    # The worker was registered before the push manager refused.
    scope = tab.page.evaluate("() => navigator.serviceWorker.getRegistration().then((r) => r && r.scope)")
    assert scope == server.http_url + "/"
    assert tab.sent_of("push_subscribe") == []
    assert stored_subscription_ids(tab.page) == {}
    assert [row for row in subscription_rows(server) if row[1] == "ines"] == []
    assert tab.errors == []


def test_signing_in_again_subscribes_again_and_keeps_the_switch_on(context, server, service):
    sign_up(server, "jana")
    subscription = service.subscription("jana")
    stand_in_push_manager(context, subscription)
    tab = open_tab(context, server.http_url + "/")
    tab.sign_in("jana")
    subscription_id = turn_notifications_on(tab)

    again = open_tab(context, server.http_url + "/")
    again.sign_in("jana")

    expect(again.page.locator("#push-switch")).to_be_checked()
    assert [m["subscription"] for m in again.sent_of("push_subscribe")] == [subscription.to_json()]
    assert again.received_of("push_subscribed")[0]["subscription_id"] == subscription_id
    assert [row[:2] for row in subscription_rows(server) if row[1] == "jana"] == [(subscription_id, "jana")]


def test_in_open_mode_the_switch_is_disabled_and_says_push_needs_sign_in(browser, tmp_path):
    token_mode = ("SIGNALING_AUTH", "SIGNALING_JWT_SECRET", "SIGNALING_ALLOW_SIGNUP")
    env = {k: v for k, v in PUSH_ENV.items() if k not in token_mode}
    with daphne_server(tmp_path, **env) as server:
        context = browser.new_context()
        try:
            tab = open_tab(context, server.http_url + "/")
            tab.go_online("kim")

            assert tab.received_of("registered")[0]["vapid_public_key"] == VAPID_PUBLIC
            expect(tab.page.locator("#push-switch")).to_be_visible()
            expect(tab.page.locator("#push-switch")).to_be_disabled()
            expect(tab.page.locator("#push-note")).to_have_text(
                "Notifications need sign-in: go online with a password or a token."
            )
            assert [m for m in tab.sent if m["type"].startswith("push_")] == []
        finally:
            context.close()


# --- The worker ----------------------------------------------------------------------------------


def test_a_pushed_incoming_call_shows_a_notification_and_its_call_ended_closes_it(context, server, service):
    sign_up(server, "lena")
    stand_in_push_manager(context, service.subscription("lena"))
    tab = open_tab(context, server.http_url + "/")
    tab.sign_in("lena")
    turn_notifications_on(tab)
    pushes = PushChannel(context, tab.page, server.http_url)
    call_id = str(uuid.uuid4())
    ring = {
        "type": "incoming_call",
        "call_id": call_id,
        "caller_username": "mona",
        "caller_id": "id-mona",
        "expires_at": "2999-01-01T00:00:00+00:00",
    }

    pushes.deliver(ring)
    wait_for_notification_count(tab.page, 1)
    assert notifications(tab.page) == [
        {
            "title": "Incoming call from mona",
            "tag": call_id,
            "body": "Open the page and sign in to answer.",
            "requireInteraction": True,
            "data": ring,
        }
    ]

    pushes.deliver({"type": "call_ended", "call_id": call_id, "reason": "cancelled"})
    wait_for_notification_count(tab.page, 0)


def test_a_push_for_a_call_that_stopped_ringing_shows_a_missed_call(context, server, service):
    sign_up(server, "nina")
    stand_in_push_manager(context, service.subscription("nina"))
    tab = open_tab(context, server.http_url + "/")
    tab.sign_in("nina")
    turn_notifications_on(tab)
    pushes = PushChannel(context, tab.page, server.http_url)
    call_id = str(uuid.uuid4())

    pushes.deliver(
        {
            "type": "incoming_call",
            "call_id": call_id,
            "caller_username": "otto",
            "caller_id": "id-otto",
            "expires_at": "2000-01-01T00:00:00+00:00",
        }
    )

    wait_for_notification_count(tab.page, 1)
    [shown] = notifications(tab.page)
    assert (shown["title"], shown["tag"], shown["requireInteraction"]) == ("Missed call from otto", call_id, False)


def test_a_call_to_a_user_with_no_page_open_is_pushed_to_the_worker_and_rings_the_page_it_opens(
    context, server, service
):
    sign_up(server, "pia")
    subscription = service.subscription("pia")
    stand_in_push_manager(context, subscription)
    tab = open_tab(context, server.http_url + "/")
    tab.sign_in("pia")
    subscription_id = turn_notifications_on(tab)
    tab.page.goto(server.http_url + "/healthz")  # the page is closed: pia has no socket
    pushes = PushChannel(context, tab.page, server.http_url)
    with registered_caller(server, "quinn") as caller:
        caller.send({"type": "call_request", "target_username": "pia"})
        ringing = caller.expect("call_ringing")
        assert ringing["push"] is True
        call_id = ringing["call_id"]

        ring = next_push(service, subscription)
        assert (ring["type"], ring["call_id"], ring["caller_username"]) == ("incoming_call", call_id, "quinn")
        pushes.deliver(ring)
        wait_for_notification_count(tab.page, 1)
        assert [(n["title"], n["tag"]) for n in notifications(tab.page)] == [("Incoming call from quinn", call_id)]

        # What a click on the notification opens (sw.js: openPage).
        woken = open_tab(context, f"{server.http_url}/?call={call_id}")
        expect(woken.page.locator("#status")).to_have_text("Sign in to answer the call")
        assert woken.page.url == server.http_url + "/"
        woken.sign_in("pia", until="incoming")
        expect(woken.page.locator("#incoming-call")).to_be_visible()
        expect(woken.page.locator("#incoming-text")).to_have_text("quinn is calling you")
        assert [m["call_id"] for m in woken.received_of("incoming_call")] == [call_id]
        assert woken.received_of("push_subscribed")[0]["subscription_id"] == subscription_id

        woken.page.click("#reject-btn")
        assert caller.expect("call_rejected")["call_id"] == call_id
        stop = next_push(service, subscription)
        assert (stop["type"], stop["call_id"]) == ("call_ended", call_id)
        pushes.deliver(stop)
        wait_for_notification_count(tab.page, 0)
        assert server_rows(server, "SELECT status, pushed FROM calls_call WHERE id = ?", call_id.replace("-", "")) == [
            ("rejected", 1)
        ]
        assert woken.errors == []


def test_a_click_on_the_notification_brings_an_open_page_forward(context, server, service):
    sign_up(server, "rhea")
    stand_in_push_manager(context, service.subscription("rhea"))
    tab = open_tab(context, server.http_url + "/")
    tab.sign_in("rhea")
    turn_notifications_on(tab)
    pushes = PushChannel(context, tab.page, server.http_url)
    call_id = str(uuid.uuid4())
    pushes.deliver(
        {
            "type": "incoming_call",
            "call_id": call_id,
            "caller_username": "sami",
            "caller_id": "id-sami",
            "expires_at": "2999-01-01T00:00:00+00:00",
        }
    )
    wait_for_notification_count(tab.page, 1)
    tab.page.goto(server.http_url + "/healthz")
    signed_out = open_tab(context, server.http_url + "/")
    [worker] = context.service_workers

    # No DevTools command clicks a notification: the worker gets the event a click would fire.
    worker.evaluate(
        """() => self.registration.getNotifications().then(([notification]) =>
          self.dispatchEvent(new NotificationEvent("notificationclick", { notification })))"""
    )

    expect(signed_out.page.locator("#status")).to_have_text("Sign in to answer the call")
    wait_for_notification_count(tab.page, 0)
    assert signed_out.page.url == server.http_url + "/"
    assert signed_out.errors == []
