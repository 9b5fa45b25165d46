"""Covers calls.push.apns: APNs against a stand-in served over HTTP/2 with TLS on loopback."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import jwt
import pytest
import trustme
from channels.db import database_sync_to_async
from cryptography.hazmat.primitives.asymmetric import ec
from django.utils import timezone

from calls.callflow.store import CallRecord
from calls.models import PushSubscription, SignalingUser
from calls.push import apns as apns_module
from calls.push.apns import PRODUCTION, SANDBOX, ApnsProvider, collapse_id
from calls.push.delivery import Delivery, Outcome, Result
from calls.push.sender import PushSender
from calls.push.subscriptions import Target, address_hash
from calls.tests.push.standins import ApnsStandIn, Received, apns_error, apns_key_pem, serving
from calls.wire.push import call_ended_payload, incoming_call_payload

KEY_ID = "ABC123DEFG"
TEAM_ID = "DEF123GHIJ"
TOPIC = "com.example.signaling"
DEVICE = "a1" * 32
VOIP_DEVICE = "b2" * 32


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    """The test team's APNs signing key (never a real one)."""
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def key_file(tmp_path, signing_key) -> str:
    path = tmp_path / f"AuthKey_{KEY_ID}.p8"
    path.write_bytes(apns_key_pem(signing_key))
    return str(path)


@pytest.fixture
def ca_file(tmp_path, ca) -> str:
    path = tmp_path / "test-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def apple(signing_key, ca) -> AsyncIterator[ApnsStandIn]:
    stand_in = ApnsStandIn(signing_key.public_key(), KEY_ID, TEAM_ID, TOPIC)
    async with serving(stand_in, ca.issue_cert("127.0.0.1")) as stand_in:
        yield stand_in


@pytest.fixture
def apns_settings(settings, apple, key_file, ca_file):
    settings.SIGNALING_APNS_KEY_FILE = key_file
    settings.SIGNALING_APNS_KEY_ID = KEY_ID
    settings.SIGNALING_APNS_TEAM_ID = TEAM_ID
    settings.SIGNALING_APNS_TOPIC = TOPIC
    settings.SIGNALING_APNS_BASE_URL = apple.url
    settings.SIGNALING_APNS_CA_FILE = ca_file
    return settings


@pytest.fixture
async def apns(apns_settings) -> AsyncIterator[ApnsProvider]:
    provider = ApnsProvider.from_settings()
    yield provider
    await provider.close()


class WallClock:
    """Stands in for the `time` module: a wall clock moved by hand."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def wall_clock(monkeypatch, apple) -> WallClock:
    """One hand-moved clock for the provider's tokens and the stand-in's judgement of their age."""
    clock = WallClock()
    monkeypatch.setattr(apns_module, "time", clock)
    apple.now = clock.time
    return clock


def ring(device: str = DEVICE, voip: bool = False) -> Delivery:
    call_id = str(uuid.uuid4())
    deadline = time.time() + 30
    payload = incoming_call_payload(call_id, "alice", "id-alice", "2030-01-01T00:00:30+00:00")
    return Delivery(Target("sub-1", "apns", device, "", "", voip), payload, deadline, call_id)


def ended(call_id: str, reason: str, voip: bool = False) -> Delivery:
    target = Target("sub-1", "apns", VOIP_DEVICE if voip else DEVICE, "", "", voip)
    return Delivery(target, call_ended_payload(call_id, reason), time.time() + 60, call_id)


def issued_at(request: Received) -> int:
    """When a request's provider token says it was made (the stand-in checked its signature)."""
    token = request.headers["authorization"].removeprefix("bearer ")
    return jwt.decode(token, options={"verify_signature": False})["iat"]


async def test_an_incoming_call_is_an_alert_push_over_http2(apns, apple):
    delivery = ring()

    assert await apns.send(delivery) == Result(Outcome.SENT)

    [request] = apple.received
    assert request.http_version == "2"
    assert request.method == "POST"
    assert request.path == f"/3/device/{DEVICE}"
    assert request.headers["apns-topic"] == TOPIC
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-expiration"] == str(int(delivery.deadline))
    assert request.headers["apns-collapse-id"] == delivery.call_id
    assert request.json() == {
        **delivery.payload,
        "aps": {"alert": {"title": "Incoming call", "body": "Incoming call from alice"}, "sound": "default"},
    }


async def test_the_provider_token_is_an_es256_jwt_naming_the_key_and_the_team(apns, apple, signing_key):
    before = int(time.time())
    await apns.send(ring())

    token = apple.received[0].headers["authorization"].removeprefix("bearer ")
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": KEY_ID, "typ": "JWT"}
    claims = jwt.decode(token, signing_key.public_key(), algorithms=["ES256"])
    assert set(claims) == {"iss", "iat"}
    assert claims["iss"] == TEAM_ID
    assert before <= claims["iat"] <= time.time()


async def test_a_voip_token_gets_a_voip_push_on_the_voip_topic(apns, apple):
    delivery = ring(VOIP_DEVICE, voip=True)

    assert await apns.send(delivery) == Result(Outcome.SENT)

    [request] = apple.received
    assert request.path == f"/3/device/{VOIP_DEVICE}"
    assert request.headers["apns-topic"] == f"{TOPIC}.voip"
    assert request.headers["apns-push-type"] == "voip"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-expiration"] == str(int(delivery.deadline))
    assert request.json() == delivery.payload


async def test_call_ended_replaces_the_ringing_alert_with_a_silent_one(apns, apple):
    rang = ring()
    await apns.send(rang)

    assert await apns.send(ended(rang.call_id, "timeout")) == Result(Outcome.SENT)

    ring_request, end_request = apple.received
    assert end_request.headers["apns-collapse-id"] == ring_request.headers["apns-collapse-id"] == rang.call_id
    assert end_request.headers["apns-push-type"] == "alert"
    assert end_request.headers["apns-priority"] == "10"
    assert end_request.json() == {
        "type": "call_ended",
        "call_id": rang.call_id,
        "reason": "timeout",
        "aps": {"alert": {"title": "Missed call"}},
    }


async def test_call_ended_reaches_a_voip_token_as_a_voip_push(apns, apple):
    call_id = str(uuid.uuid4())

    assert await apns.send(ended(call_id, "answered_elsewhere", voip=True)) == Result(Outcome.SENT)

    [request] = apple.received
    assert request.headers["apns-topic"] == f"{TOPIC}.voip"
    assert request.headers["apns-push-type"] == "voip"
    assert request.json() == {"type": "call_ended", "call_id": call_id, "reason": "answered_elsewhere"}


async def test_the_provider_token_is_reused_then_renewed_after_50_minutes(apns, apple, wall_clock):
    start = wall_clock.now
    await apns.send(ring())
    wall_clock.advance(49 * 60)
    await apns.send(ring())
    wall_clock.advance(60)
    await apns.send(ring())

    first, second, third = (request.headers["authorization"] for request in apple.received)
    assert first == second != third
    assert [issued_at(r) for r in apple.received] == [start, start, start + 50 * 60]


async def test_an_expired_provider_token_is_replaced_once_and_the_push_resent(apns, apple, wall_clock):
    start = wall_clock.now
    await apns.send(ring())
    wall_clock.advance(20 * 60)
    apple.answer_next(apns_error(403, "ExpiredProviderToken"))

    assert await apns.send(ring()) == Result(Outcome.SENT)

    assert [issued_at(r) for r in apple.received] == [start, start, start + 20 * 60]


async def test_a_token_apple_calls_unregistered_is_gone(apns, apple):
    apple.answer_next(apns_error(410, "Unregistered"))

    assert await apns.send(ring()) == Result(Outcome.GONE, "Unregistered")


@pytest.mark.parametrize("reason", ["BadDeviceToken", "DeviceTokenNotForTopic"])
async def test_a_token_apple_rejects_for_this_app_is_gone(apns, apple, reason):
    apple.answer_next(apns_error(400, reason))

    assert await apns.send(ring()) == Result(Outcome.GONE, reason)


@pytest.mark.parametrize(
    ("status", "reason"), [(429, "TooManyRequests"), (500, "InternalServerError"), (503, "ServiceUnavailable")]
)
async def test_throttling_and_server_errors_are_retried(apns, apple, status, reason):
    apple.answer_next(apns_error(status, reason))

    assert await apns.send(ring()) == Result(Outcome.RETRY, reason)


async def test_a_provider_token_apple_cannot_verify_is_a_failure_sent_once(apns_settings, apple):
    apns_settings.SIGNALING_APNS_KEY_ID = "WRONGKEYID"
    provider = ApnsProvider.from_settings()

    result = await provider.send(ring())
    await provider.close()

    assert result == Result(Outcome.FAILED, "InvalidProviderToken")
    assert len(apple.received) == 1


async def test_a_host_the_configured_ca_did_not_certify_is_never_sent_to(apns_settings, apple, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    apns_settings.SIGNALING_APNS_CA_FILE = str(other_ca)
    provider = ApnsProvider.from_settings()

    result = await provider.send(ring())
    await provider.close()

    assert result == Result(Outcome.RETRY, "ConnectError")
    assert apple.received == []


def test_the_host_is_apples_production_or_sandbox_one_unless_overridden(settings, key_file):
    settings.SIGNALING_APNS_KEY_FILE = key_file
    settings.SIGNALING_APNS_KEY_ID, settings.SIGNALING_APNS_TEAM_ID = KEY_ID, TEAM_ID
    settings.SIGNALING_APNS_TOPIC = TOPIC
    settings.SIGNALING_APNS_BASE_URL = ""

    settings.SIGNALING_APNS_USE_SANDBOX = False
    assert ApnsProvider.from_settings().base_url == PRODUCTION == "https://api.push.apple.com"
    settings.SIGNALING_APNS_USE_SANDBOX = True
    assert ApnsProvider.from_settings().base_url == SANDBOX == "https://api.sandbox.push.apple.com"


def test_a_call_id_longer_than_64_bytes_collapses_by_its_hash():
    assert collapse_id("c" * 64) == "c" * 64
    assert len(collapse_id("c" * 65)) == 64
    assert collapse_id("c" * 65) != collapse_id("c" * 66)


# --- Through the sender -----------------------------------------------------------------------


def subscribe_device(username: str, token: str, voip: bool) -> str:
    user = SignalingUser.objects.create(username=username, user_id=f"id-{username}", last_seen=timezone.now())
    row = PushSubscription.objects.create(
        user=user, platform="apns", address=token, address_hash=address_hash(token), voip=voip
    )
    return str(row.id)


@pytest.mark.django_db(transaction=True)
async def test_the_sender_removes_a_subscription_apple_calls_unregistered(apns, apple):
    subscription_id = await database_sync_to_async(subscribe_device)("bob", VOIP_DEVICE, True)
    apple.answer_next(apns_error(410, "Unregistered"))
    record = CallRecord(
        call_id=str(uuid.uuid4()),
        caller_username="alice",
        caller_id="id-alice",
        callee_username="bob",
        status="ringing",
        end_reason=None,
        caller_channel="",
        callee_channel="",
        pushed=True,
        ring_deadline=timezone.now() + timedelta(seconds=30),
    )
    tasks: list[asyncio.Task] = []

    PushSender({"apns": apns}, tasks.append).ring(record)
    await asyncio.gather(*tasks)

    [request] = apple.received
    assert request.path == f"/3/device/{VOIP_DEVICE}"
    assert request.headers["apns-push-type"] == "voip"
    assert request.headers["apns-expiration"] == str(int(record.ring_deadline.timestamp()))
    assert request.json() == incoming_call_payload(
        record.call_id, "alice", "id-alice", record.ring_deadline.isoformat()
    )
    assert not await database_sync_to_async(PushSubscription.objects.filter(pk=subscription_id).exists)()
