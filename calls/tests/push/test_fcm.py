"""Covers calls.push.fcm: FCM HTTP v1 against stand-ins for Google's token endpoint and FCM on loopback."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from urllib.parse import parse_qsl

import jwt
import pytest
from channels.db import database_sync_to_async
from cryptography.hazmat.primitives.asymmetric import rsa
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from calls.callflow.store import CallRecord
from calls.models import PushSubscription, SignalingUser
from calls.push.delivery import Delivery, Outcome, Result
from calls.push.fcm import FcmProvider
from calls.push.sender import PushSender
from calls.push.subscriptions import Target, address_hash
from calls.tests.push.standins import (
    FCM_SCOPE,
    GOOGLE_TOKEN_AUDIENCE,
    JWT_BEARER,
    Answer,
    GoogleStandIn,
    bad_request,
    fcm_error,
    google_error,
    service_account_key,
    serving,
)
from calls.wire.push import call_ended_payload, incoming_call_payload

PROJECT = "signaling-test"
CLIENT_EMAIL = "push@signaling-test.iam.gserviceaccount.com"
TOKEN = "fcm-registration-token-1"
UNREGISTERED = Answer(404, fcm_error(404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found."))
NOT_A_TOKEN = Answer(
    400,
    fcm_error(
        400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token"
    ),
)
UNAUTHENTICATED = Answer(401, google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."))


@pytest.fixture(scope="module")
def account_key() -> rsa.RSAPrivateKey:
    """The test service account's key (never a real one)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def google(account_key) -> AsyncIterator[GoogleStandIn]:
    async with serving(GoogleStandIn(PROJECT, CLIENT_EMAIL, account_key.public_key())) as stand_in:
        yield stand_in


@pytest.fixture
def key_json(account_key, google) -> str:
    return json.dumps(service_account_key(account_key, PROJECT, CLIENT_EMAIL, google.token_uri))


@pytest.fixture
async def fcm(settings, google, key_json) -> AsyncIterator[FcmProvider]:
    settings.SIGNALING_FCM_CREDENTIALS = key_json
    settings.SIGNALING_FCM_BASE_URL = google.url
    provider = FcmProvider.from_settings()
    yield provider
    await provider.close()


def ring(address: str = TOKEN, seconds: float = 30.0) -> Delivery:
    call_id = str(uuid.uuid4())
    deadline = time.time() + seconds
    expires_at = timezone.now() + timedelta(seconds=seconds)
    payload = incoming_call_payload(call_id, "alice", "id-alice", expires_at.isoformat())
    return Delivery(Target("sub-1", "fcm", address, "", "", False), payload, deadline, call_id)


async def test_it_sends_a_high_priority_data_message_living_until_the_ring_deadline(fcm, google):
    delivery = ring()
    before = time.time()
    result = await fcm.send(delivery)
    after = time.time()

    assert result == Result(Outcome.SENT)
    [request] = google.fcm_requests
    assert request.method == "POST"
    assert request.path == f"/v1/projects/{PROJECT}/messages:send"
    assert request.headers["authorization"] == f"Bearer {google.issued[0]}"
    message = request.json()["message"]
    ttl = message["android"].pop("ttl")
    assert message == {
        "token": TOKEN,
        "data": delivery.payload,
        "android": {"priority": "high", "collapse_key": delivery.call_id},
    }
    assert all(isinstance(value, str) for value in message["data"].values())
    assert int(delivery.deadline - after) <= int(ttl.removesuffix("s")) <= int(delivery.deadline - before)


async def test_it_gets_its_access_token_with_a_signed_jwt_bearer_grant(fcm, google, account_key):
    await fcm.send(ring())

    [request] = google.token_requests
    form = dict(parse_qsl(request.body.decode()))
    assert form["grant_type"] == JWT_BEARER
    claims = jwt.decode(
        form["assertion"], account_key.public_key(), algorithms=["RS256"], audience=GOOGLE_TOKEN_AUDIENCE
    )
    assert claims["iss"] == CLIENT_EMAIL
    assert claims["scope"] == FCM_SCOPE
    assert claims["exp"] - claims["iat"] <= 3600


async def test_pushes_at_once_share_one_access_token(fcm, google):
    results = await asyncio.gather(*(fcm.send(ring(f"token-{n}")) for n in range(3)))

    assert [result.outcome for result in results] == [Outcome.SENT] * 3
    assert len(google.token_requests) == 1
    assert {r.headers["authorization"] for r in google.fcm_requests} == {f"Bearer {google.issued[0]}"}


async def test_a_call_ended_push_carries_its_reason_and_collapses_onto_the_ring(fcm, google):
    call_id = str(uuid.uuid4())
    target = Target("sub-1", "fcm", TOKEN, "", "", False)
    delivery = Delivery(target, call_ended_payload(call_id, "cancelled"), time.time() + 60, call_id)

    assert await fcm.send(delivery) == Result(Outcome.SENT)
    message = google.fcm_requests[0].json()["message"]
    assert message["data"] == {"type": "call_ended", "call_id": call_id, "reason": "cancelled"}
    assert message["android"]["collapse_key"] == call_id


async def test_an_unregistered_token_is_gone(fcm, google):
    google.answer_next(UNREGISTERED)

    assert await fcm.send(ring()) == Result(Outcome.GONE, "UNREGISTERED")


async def test_a_token_that_is_no_registration_token_is_gone(fcm, google):
    google.answer_next(NOT_A_TOKEN)

    assert await fcm.send(ring()) == Result(Outcome.GONE, "INVALID_ARGUMENT")


async def test_an_invalid_message_is_a_failure_that_keeps_the_token(fcm, google):
    google.answer_next(Answer(400, bad_request("message.data[0].value", "Invalid value at 'message.data[0].value'")))

    assert await fcm.send(ring()) == Result(Outcome.FAILED, "INVALID_ARGUMENT")


async def test_a_not_found_outside_fcms_error_format_keeps_the_token(fcm, google):
    google.answer_next(Answer(404))

    assert await fcm.send(ring()) == Result(Outcome.FAILED, "HTTP 404")


async def test_a_throttled_push_is_retried_after_the_time_fcm_asks(fcm, google):
    google.answer_next(
        Answer(429, fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), headers={"Retry-After": "7"})
    )

    assert await fcm.send(ring()) == Result(Outcome.RETRY, "QUOTA_EXCEEDED", retry_after=7.0)


@pytest.mark.parametrize(("status", "code"), [(500, "INTERNAL"), (503, "UNAVAILABLE")])
async def test_a_server_error_is_retried(fcm, google, status, code):
    google.answer_next(Answer(status, fcm_error(status, code, code)))

    assert await fcm.send(ring()) == Result(Outcome.RETRY, code)


async def test_an_access_token_refused_early_is_replaced_once_and_the_push_sent(fcm, google):
    google.answer_next(UNAUTHENTICATED)

    assert await fcm.send(ring()) == Result(Outcome.SENT)
    assert len(google.token_requests) == 2
    assert [r.headers["authorization"] for r in google.fcm_requests] == [f"Bearer {token}" for token in google.issued]


async def test_a_new_access_token_refused_too_is_a_failure(fcm, google):
    google.answer_next(UNAUTHENTICATED, UNAUTHENTICATED)

    assert await fcm.send(ring()) == Result(Outcome.FAILED, "UNAUTHENTICATED")
    assert len(google.fcm_requests) == 2


async def test_a_key_the_token_endpoint_refuses_is_a_failure_and_nothing_is_sent(settings, google):
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    settings.SIGNALING_FCM_CREDENTIALS = json.dumps(
        service_account_key(stranger, PROJECT, CLIENT_EMAIL, google.token_uri)
    )
    settings.SIGNALING_FCM_BASE_URL = google.url
    provider = FcmProvider.from_settings()

    result = await provider.send(ring())
    await provider.close()

    assert result == Result(Outcome.FAILED, "access token refused")
    assert len(google.token_requests) == 1
    assert google.fcm_requests == []


async def test_an_unreachable_fcm_is_retried(settings, google, key_json):
    async with serving(GoogleStandIn(PROJECT, CLIENT_EMAIL, google.public_key)) as gone:
        closed_url = gone.url
    settings.SIGNALING_FCM_CREDENTIALS = key_json
    settings.SIGNALING_FCM_BASE_URL = closed_url
    provider = FcmProvider.from_settings()

    result = await provider.send(ring())
    await provider.close()

    assert result == Result(Outcome.RETRY, "ConnectError")


@pytest.fixture
def key_file(tmp_path, key_json) -> str:
    path = tmp_path / "service-account.json"
    path.write_text(key_json)
    return str(path)


async def test_the_key_may_be_given_as_the_path_of_its_file(settings, google, key_file):
    settings.SIGNALING_FCM_CREDENTIALS = key_file
    settings.SIGNALING_FCM_BASE_URL = google.url
    provider = FcmProvider.from_settings()

    result = await provider.send(ring())
    await provider.close()

    assert result == Result(Outcome.SENT)
    assert len(google.fcm_requests) == 1


def test_a_key_that_cannot_be_read_stops_the_server_at_start(settings, tmp_path):
    settings.SIGNALING_FCM_CREDENTIALS = str(tmp_path / "missing.json")

    with pytest.raises(ImproperlyConfigured):
        FcmProvider.from_settings()


# --- Through the sender -----------------------------------------------------------------------


def subscribe_device(username: str, token: str) -> str:
    user = SignalingUser.objects.create(username=username, user_id=f"id-{username}", last_seen=timezone.now())
    row = PushSubscription.objects.create(user=user, platform="fcm", address=token, address_hash=address_hash(token))
    return str(row.id)


@pytest.mark.django_db(transaction=True)
async def test_the_sender_removes_a_subscription_fcm_calls_unregistered(fcm, google):
    subscription_id = await database_sync_to_async(subscribe_device)("bob", TOKEN)
    google.answer_next(UNREGISTERED)
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

    PushSender({"fcm": fcm}, tasks.append).ring(record)
    await asyncio.gather(*tasks)

    [request] = google.fcm_requests
    assert request.json()["message"]["token"] == TOKEN
    assert request.json()["message"]["data"] == incoming_call_payload(
        record.call_id, "alice", "id-alice", record.ring_deadline.isoformat()
    )
    assert not await database_sync_to_async(PushSubscription.objects.filter(pk=subscription_id).exists)()
