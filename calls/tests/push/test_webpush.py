"""Covers calls.push.webpush and calls.push.sender end to end: a callee with no socket is woken by Web Push.

A real daphne process in token mode with a VAPID key; the push service is a
stand-in on loopback (calls/tests/push/push_service.py) that checks the VAPID
token and decrypts every payload with the subscription's private key.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from calls.push.webpush import new_key_pair
from calls.testing.servers import DaphneServer, daphne_server
from calls.tests.netclient import TIMEOUT, Peer, http_request, server_rows, start_cluster, token_for
from calls.tests.push.push_service import Push, PushService

SECRET = "push-test-secret-" + "x" * 32
SUBJECT = "mailto:ops@example.com"
VAPID_PRIVATE, VAPID_PUBLIC = new_key_pair()


def push_env(**overrides: str) -> dict[str, str]:
    return {
        "SIGNALING_AUTH": "token",
        "SIGNALING_JWT_SECRET": SECRET,
        "SIGNALING_VAPID_PRIVATE_KEY": VAPID_PRIVATE,
        "SIGNALING_VAPID_SUBJECT": SUBJECT,
        # The stand-in push service listens on plain http on loopback.
        "SIGNALING_PUSH_ALLOW_PRIVATE_ENDPOINTS": "true",
        "SIGNALING_PRESENCE_WINDOW_MS": "20",
        **overrides,
    }


@pytest.fixture
def service() -> Iterator[PushService]:
    service = PushService()
    yield service
    service.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DaphneServer]:
    with daphne_server(tmp_path, **push_env()) as server:
        yield server


async def connect(server: DaphneServer, username: str, **extra) -> Peer:
    peer = Peer(await websockets.connect(server.url, open_timeout=TIMEOUT), username)
    registered = await peer.register(username, f"id-{username}", token=token_for(username, SECRET), **extra)
    assert registered["vapid_public_key"] == VAPID_PUBLIC
    return peer


async def subscribe(peer: Peer, service: PushService) -> tuple[str, object]:
    """Subscribe `peer`'s user to pushes at the stand-in; return the subscription id and the browser's side."""
    browser = service.subscription(peer.name)
    await peer.send(
        {"type": "push_subscribe", "platform": "webpush", "subscription": browser.to_json(), "device_id": "phone"}
    )
    return (await peer.expect("push_subscribed"))["subscription_id"], browser


def check_push(push: Push, service: PushService, name: str, call_id: str, max_ttl: int = 45) -> None:
    """The request the push service got is a Web Push as RFC 8030, 8291 and 8292 describe it."""
    assert push.path == f"/push/{name}"
    claims = push.vapid(VAPID_PUBLIC, SUBJECT, audience=service.origin)
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600
    assert push.headers["content-encoding"] == "aes128gcm"
    assert push.headers["urgency"] == "high"
    # A ring lasts as long as the ring timeout (45 s); the push that stops it, a minute.
    assert 1 <= int(push.headers["ttl"]) <= max_ttl
    topic = push.headers["topic"]
    assert len(topic) <= 32 and topic.replace("-", "").replace("_", "").isalnum()


def delete(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers, method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310 - a loopback test server
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


async def test_a_callee_without_a_socket_is_woken_by_push_then_registers_and_answers(server, service):
    bob = await connect(server, "bob")
    subscription_id, browser = await subscribe(bob, service)
    await bob.ws.close()  # the app went to the background: no socket
    alice = await connect(server, "alice")

    await alice.send({"type": "call_request", "target_username": "bob"})
    ringing = await alice.expect("call_ringing")
    assert ringing["push"] is True
    call_id = ringing["call_id"]
    ring = await service.next_push()
    check_push(ring, service, "bob", call_id)
    payload = browser.decrypt(ring.body)
    assert payload["type"] == "incoming_call" and payload["call_id"] == call_id
    assert (payload["caller_username"], payload["caller_id"]) == ("alice", "id-alice")
    assert payload["expires_at"]

    # The push woke the phone: it connects, registers, and rings at once.
    bob = await connect(server, "bob")
    incoming = await bob.expect("incoming_call")
    assert (incoming["call_id"], incoming["caller_username"]) == (call_id, "alice")
    await bob.send({"type": "call_accepted", "call_id": call_id})
    assert (await alice.expect("call_accepted"))["call_id"] == call_id
    # Its other devices stop ringing: a second push for the same call replaces the first.
    stop = await service.next_push()
    check_push(stop, service, "bob", call_id, max_ttl=60)
    assert stop.headers["topic"] == ring.headers["topic"]
    assert browser.decrypt(stop.body) == {"type": "call_ended", "call_id": call_id, "reason": "answered_elsewhere"}

    [(status, pushed)] = server_rows(server, "SELECT status, pushed FROM calls_call")
    assert (status, pushed) == ("answered", 1)
    [(last_success,)] = server_rows(
        server, "SELECT last_success_at FROM calls_pushsubscription WHERE id = ?", subscription_id.replace("-", "")
    )
    assert last_success is not None
    for peer in (alice, bob):
        await peer.ws.close()


async def test_a_cancelled_pushed_call_tells_the_phone_to_stop_ringing(server, service):
    bob = await connect(server, "bob")
    _, browser = await subscribe(bob, service)
    await bob.ws.close()
    alice = await connect(server, "alice")
    await alice.send({"type": "call_request", "target_username": "bob"})
    call_id = (await alice.expect("call_ringing"))["call_id"]
    assert browser.decrypt((await service.next_push()).body)["type"] == "incoming_call"
    await alice.send({"type": "call_ended", "call_id": call_id})
    assert browser.decrypt((await service.next_push()).body) == {
        "type": "call_ended",
        "call_id": call_id,
        "reason": "cancelled",
    }
    assert server_rows(server, "SELECT status FROM calls_call") == [("cancelled",)]
    await alice.ws.close()


async def test_a_pushed_call_nobody_answers_ends_with_a_timeout_push(tmp_path, service):
    with daphne_server(tmp_path, **push_env(SIGNALING_RING_TIMEOUT="1.5")) as server:
        bob = await connect(server, "bob")
        _, browser = await subscribe(bob, service)
        await bob.ws.close()
        alice = await connect(server, "alice")
        await alice.send({"type": "call_request", "target_username": "bob"})
        call_id = (await alice.expect("call_ringing"))["call_id"]
        ring = await service.next_push()
        assert int(ring.headers["ttl"]) <= 2
        assert (await alice.expect("call_ended"))["reason"] == "timeout"
        stop = browser.decrypt((await service.next_push()).body)
        assert stop == {"type": "call_ended", "call_id": call_id, "reason": "timeout"}
        assert server_rows(server, "SELECT status, end_reason FROM calls_call") == [("missed", "timeout")]
        await alice.ws.close()


async def test_a_session_held_for_a_resume_does_not_keep_the_phone_from_being_woken(server, service):
    bob = await connect(server, "bob", resume=True)
    _, browser = await subscribe(bob, service)
    bob.ws.transport.abort()  # the OS cut the app's socket: the session is held, with no device behind it
    alice = await connect(server, "alice")
    await alice.send({"type": "call_request", "target_username": "bob"})
    assert (await alice.expect("call_ringing"))["push"] is True
    assert browser.decrypt((await service.next_push()).body)["type"] == "incoming_call"
    await alice.ws.close()


async def test_a_subscription_the_push_service_calls_gone_is_removed(server, service):
    bob = await connect(server, "bob")
    subscription_id, _ = await subscribe(bob, service)
    service.statuses["/push/bob"] = 410
    await bob.ws.close()
    alice = await connect(server, "alice")
    await alice.send({"type": "call_request", "target_username": "bob"})
    assert (await alice.expect("call_ringing"))["push"] is True
    await service.next_push()
    deadline = time.monotonic() + TIMEOUT
    while server_rows(server, "SELECT count(*) FROM calls_pushsubscription") != [(0,)]:
        assert time.monotonic() < deadline, "the dead subscription was not removed"
        await alice.still_answers()  # a round trip to the server while it removes the row
    # With no subscription left, bob is offline to callers.
    await alice.send({"type": "call_ended", "target_username": "bob"})  # cancel the first call
    await alice.send({"type": "call_request", "target_username": "bob"})
    await alice.expect_error("user_offline")
    assert server_rows(server, "SELECT status FROM calls_call") == [("cancelled",)]
    assert subscription_id
    await alice.ws.close()


async def test_a_callee_with_no_socket_and_no_subscription_is_still_offline(server, service):
    alice = await connect(server, "alice")
    await alice.send({"type": "call_request", "target_username": "bob"})
    await alice.expect_error("user_offline")
    assert server_rows(server, "SELECT count(*) FROM calls_call") == [(0,)]
    assert service.received() == 0
    await alice.ws.close()


async def test_subscribing_the_same_endpoint_again_replaces_it(server, service):
    bob = await connect(server, "bob")
    first, browser = await subscribe(bob, service)
    await bob.send({"type": "push_subscribe", "platform": "webpush", "subscription": browser.to_json()})
    assert (await bob.expect("push_subscribed"))["subscription_id"] == first
    assert server_rows(server, "SELECT count(*) FROM calls_pushsubscription") == [(1,)]
    await bob.send({"type": "push_unsubscribe", "subscription_id": first})
    assert (await bob.expect("push_unsubscribed"))["subscription_id"] == first
    await bob.send({"type": "push_unsubscribe", "subscription_id": first})
    await bob.expect_error("unknown_subscription")
    assert server_rows(server, "SELECT count(*) FROM calls_pushsubscription") == [(0,)]
    await bob.ws.close()


async def test_an_endpoint_inside_the_servers_network_is_refused(tmp_path, service):
    with daphne_server(tmp_path, **push_env(SIGNALING_PUSH_ALLOW_PRIVATE_ENDPOINTS="false")) as server:
        bob = await connect(server, "bob")
        for endpoint in (
            f"{service.origin}/push/x",
            "https://127.0.0.1/push",
            "https://10.1.2.3/push",
            "https://[::1]/x",
        ):
            subscription = {**service.subscription("x").to_json(), "endpoint": endpoint}
            await bob.send({"type": "push_subscribe", "platform": "webpush", "subscription": subscription})
            error = await bob.expect_error("invalid_message")
            assert "public address" in error["message"]
        assert server_rows(server, "SELECT count(*) FROM calls_pushsubscription") == [(0,)]
        await bob.ws.close()


async def test_open_mode_takes_no_push_subscriptions(tmp_path, service):
    env = {**push_env(), "SIGNALING_AUTH": "open"}
    with daphne_server(tmp_path, **env) as server:
        bob = Peer(await websockets.connect(server.url), "bob")
        await bob.register("bob", "id-bob")
        await bob.send(
            {"type": "push_subscribe", "platform": "webpush", "subscription": service.subscription("b").to_json()}
        )
        await bob.expect_error("unauthorized")
        await bob.still_answers()
        await bob.ws.close()


async def test_the_http_api_adds_lists_and_removes_subscriptions(tmp_path, service):
    with daphne_server(tmp_path, **push_env(SIGNALING_PUSH_MAX_SUBSCRIPTIONS="2")) as server:
        bearer = {"Authorization": f"Bearer {token_for('carol', SECRET)}"}
        url = f"{server.http_url}/api/push-subscriptions"
        status, _, body = http_request(f"{server.http_url}/api/push/vapid-public-key")
        assert (status, body) == (200, b'{"vapid_public_key": "%s"}' % VAPID_PUBLIC.encode())
        created = []
        for name in ("c1", "c2"):
            body = {"platform": "webpush", "subscription": service.subscription(name).to_json(), "device_id": name}
            status, _, answer = http_request(url, body, **bearer)
            assert status == 201, answer
            created.append(json.loads(answer)["subscription_id"])
        third = {"platform": "webpush", "subscription": service.subscription("c3").to_json()}
        status, _, answer = http_request(url, third, **bearer)
        assert status == 409 and b"too_many_subscriptions" in answer
        status, _, answer = http_request(url, **bearer)
        listed = json.loads(answer)["subscriptions"]
        assert status == 200 and [s["subscription_id"] for s in listed] == created
        assert [s["device_id"] for s in listed] == ["c1", "c2"] and "endpoint" not in listed[0]
        assert delete(f"{url}/{created[0]}", bearer) == 204
        assert delete(f"{url}/{created[0]}", bearer) == 404
        status, _, _ = http_request(url, third)  # no token
        assert status == 401
        fcm = {"platform": "fcm", "token": "x" * 100}
        status, _, answer = http_request(url, fcm, **bearer)
        assert status == 404 and b"push_unavailable" in answer
        assert server_rows(server, "SELECT device_id FROM calls_pushsubscription") == [("c2",)]


@pytest.mark.services
async def test_two_processes_send_one_push_per_subscription_per_event(tmp_path, postgres, service):
    env = push_env(SIGNALING_RING_TIMEOUT="2", SIGNALING_REAPER_INTERVAL="0.2")
    env.pop("SIGNALING_PRESENCE_WINDOW_MS")  # the cluster sets its own
    cluster = start_cluster(tmp_path, postgres, **env)
    try:
        bob = await connect(cluster.a, "bob")
        _, browser = await subscribe(bob, service)
        await bob.ws.close()
        alice = await connect(cluster.b, "alice")
        # A call nobody answers: its ring timer (on alice's process) and both reapers may all try to end it.
        await alice.send({"type": "call_request", "target_username": "bob"})
        first = (await alice.expect("call_ringing"))["call_id"]
        assert (await alice.expect("call_ended"))["reason"] == "timeout"
        # A second call, cancelled: its pushes come after any duplicate of the first call's.
        await alice.send({"type": "call_request", "target_username": "bob"})
        second = (await alice.expect("call_ringing"))["call_id"]
        await alice.send({"type": "call_ended", "call_id": second})
        seen = []
        while (second, "call_ended") not in seen:
            payload = browser.decrypt((await service.next_push()).body)
            seen.append((payload["call_id"], payload["type"]))
        assert seen == [
            (first, "incoming_call"),
            (first, "call_ended"),
            (second, "incoming_call"),
            (second, "call_ended"),
        ]
        assert service.received() == 0
        await alice.ws.close()
    finally:
        cluster.stop()
