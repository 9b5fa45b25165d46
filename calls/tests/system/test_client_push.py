"""Covers the push side of the signaling_client library (./clients/python) against daphne.

`subscribe_push` and `unsubscribe_push`, `Registered.vapid_public_key` and
`CallRinging.push`, on a real server in token mode with a VAPID key. The browser's
side of a Web Push subscription (its key pair and auth secret) and its push service
are the stand-ins of calls/tests/push/push_service.py, on loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from uuid import UUID

import pytest
import signaling_client as sc

from calls.push.webpush import new_key_pair
from calls.testing.servers import DaphneServer, daphne_server
from calls.tests.netclient import server_rows
from calls.tests.push.push_service import PushService

SECRET = "client-push-secret-" + "x" * 32
VAPID_PRIVATE, VAPID_PUBLIC = new_key_pair()
PUSH_ENV = {
    "SIGNALING_AUTH": "token",
    "SIGNALING_JWT_SECRET": SECRET,
    "SIGNALING_VAPID_PRIVATE_KEY": VAPID_PRIVATE,
    "SIGNALING_VAPID_SUBJECT": "mailto:ops@example.com",
    # The stand-in push service listens on plain http on loopback.
    "SIGNALING_PUSH_ALLOW_PRIVATE_ENDPOINTS": "true",
    "SIGNALING_PRESENCE_WINDOW_MS": "20",
}
# The same server in open mode: it sends Web Push, but nothing proves who owns a name.
OPEN_ENV = {k: v for k, v in PUSH_ENV.items() if k not in ("SIGNALING_AUTH", "SIGNALING_JWT_SECRET")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    """One daphne process in token mode with Web Push; each test uses its own usernames."""
    with daphne_server(tmp_path_factory.mktemp("client-push"), **PUSH_ENV) as server:
        yield server


@pytest.fixture(scope="module")
def service() -> Iterator[PushService]:
    service = PushService()
    yield service
    service.close()


def subscription_rows(server: DaphneServer, username: str) -> list[tuple[str, str, str, str, str]]:
    """(id, platform, address, device_id, p256dh) of the user's push subscriptions, as the server stored them."""
    rows = server_rows(
        server,
        "SELECT s.id, s.platform, s.address, s.device_id, s.p256dh FROM calls_pushsubscription s "
        "JOIN calls_signalinguser u ON u.id = s.user_id WHERE u.username = ?",
        username,
    )
    # SQLite holds UUIDs without dashes.
    return [(str(UUID(row[0])), *row[1:]) for row in rows]


async def test_registered_carries_the_servers_vapid_key(server, open_client):
    client, _ = await open_client(server, "vera")
    assert client.registered.vapid_public_key == VAPID_PUBLIC


async def test_subscribing_a_web_push_endpoint_returns_its_id_and_stores_it(server, service, open_client):
    client, events = await open_client(server, "wanda", device_id="wanda-laptop")
    browser = service.subscription("wanda")
    subscription_id = await client.subscribe_push("webpush", subscription=browser.to_json())

    assert events.of(sc.PushSubscribed)[-1].subscription_id == subscription_id
    assert subscription_rows(server, "wanda") == [
        (subscription_id, "webpush", browser.endpoint, "wanda-laptop", browser.to_json()["keys"]["p256dh"])
    ]


async def test_subscribing_the_same_endpoint_again_keeps_its_id_and_one_row(server, service, open_client):
    client, _ = await open_client(server, "xena")
    browser = service.subscription("xena")
    first = await client.subscribe_push("webpush", subscription=browser.to_json())
    second = await client.subscribe_push("webpush", subscription=browser.to_json(), device_id="xena-phone")

    assert second == first
    assert [(row[0], row[3]) for row in subscription_rows(server, "xena")] == [(first, "xena-phone")]


async def test_unsubscribing_removes_the_subscription(server, service, open_client):
    client, events = await open_client(server, "yuri")
    subscription_id = await client.subscribe_push("webpush", subscription=service.subscription("yuri").to_json())

    assert await client.unsubscribe_push(subscription_id) is None
    assert events.of(sc.PushUnsubscribed)[-1].subscription_id == subscription_id
    assert subscription_rows(server, "yuri") == []
    with pytest.raises(sc.SignalingError) as refusal:
        await client.unsubscribe_push(subscription_id)
    assert refusal.value.code == "unknown_subscription"


async def test_subscribing_a_platform_the_server_does_not_push_to_raises_push_unavailable(server, open_client):
    client, _ = await open_client(server, "zora")
    with pytest.raises(sc.SignalingError) as refusal:
        await client.subscribe_push("fcm", token="an-fcm-registration-token")
    assert refusal.value.code == "push_unavailable"
    assert subscription_rows(server, "zora") == []
    assert client.connected  # a refusal, not a broken connection


async def test_an_invalid_subscription_raises_invalid_message(server, open_client):
    client, _ = await open_client(server, "abel", malformed=True)
    with pytest.raises(sc.SignalingError) as refusal:
        await client.subscribe_push("webpush", subscription={"endpoint": "http://127.0.0.1:9/push/abel", "keys": {}})
    assert refusal.value.code == "invalid_message"
    assert subscription_rows(server, "abel") == []


async def test_a_call_to_a_subscribed_user_with_no_socket_rings_by_push(server, service, open_client):
    callee, _ = await open_client(server, "bea")
    browser = service.subscription("bea")
    await callee.subscribe_push("webpush", subscription=browser.to_json())
    await callee.close()  # the app went to the background: no socket
    caller, caller_events = await open_client(server, "cid")

    call_id = await caller.call("bea")
    ringing = caller_events.of(sc.CallRinging)[-1]
    assert (ringing.call_id, ringing.target_username, ringing.push) == (call_id, "bea", True)
    payload = browser.decrypt((await service.next_push()).body)
    assert (payload["type"], payload["call_id"], payload["caller_username"]) == ("incoming_call", call_id, "cid")

    # The push woke the device: it registers and rings at once.
    _, woken_events = await open_client(server, "bea")
    incoming = await woken_events.expect(sc.IncomingCall, call_id=call_id)
    assert incoming.caller_username == "cid"
    await caller.hang_up(call_id)
    stop = browser.decrypt((await service.next_push()).body)
    assert stop == {"type": "call_ended", "call_id": call_id, "reason": "cancelled"}


async def test_a_call_to_a_user_with_a_socket_does_not_say_push(server, open_client):
    _, callee_events = await open_client(server, "dov")
    caller, caller_events = await open_client(server, "eli")
    call_id = await caller.call("dov")
    await callee_events.expect(sc.IncomingCall, call_id=call_id)
    assert caller_events.of(sc.CallRinging)[-1].push is False
    await caller.hang_up(call_id)


async def test_in_open_mode_subscribing_raises_unauthorized(tmp_path, service, open_client):
    with daphne_server(tmp_path, **OPEN_ENV) as server:
        client, _ = await open_client(server, "fay")
        assert client.registered.vapid_public_key == VAPID_PUBLIC
        with pytest.raises(sc.SignalingError) as refusal:
            await client.subscribe_push("webpush", subscription=service.subscription("fay").to_json())
        assert refusal.value.code == "unauthorized"
        assert server_rows(server, "SELECT count(*) FROM calls_pushsubscription") == [(0,)]
