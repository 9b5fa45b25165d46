"""Covers calls.http.views: the test page, GET /api/ice-servers (who may have the ICE servers and TURN credentials), and the protocol spec.

Token mode: a valid bearer token; the TURN credentials are for its subject.
Open mode: nobody, since a username and user_id prove nothing there (every client
sees both in online_users); registered sessions get the servers in `registered`.
Most tests drive the ASGI app in-process; one runs against daphne itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
import yaml
from django.test import AsyncClient

from calls.realtime.security import mint_token
from calls.testing.servers import daphne_server
from calls.tests.netclient import http_request

TURN_URL = "turn:127.0.0.1:3478?transport=udp"
TURN_SECRET = "turn-secret-for-tests"
JWT_SECRET = "a-jwt-secret-of-at-least-32-characters!"


@pytest.fixture
def turn(settings):
    settings.SIGNALING_ICE_SERVERS = [{"urls": "stun:127.0.0.1:3478"}]
    settings.SIGNALING_TURN_URLS = [TURN_URL]
    settings.SIGNALING_TURN_SECRET = TURN_SECRET
    settings.SIGNALING_TURN_TTL = 600


@pytest.fixture
def token_mode(settings, turn):
    settings.SIGNALING_AUTH = "token"
    settings.SIGNALING_JWT_SECRET = JWT_SECRET


def assert_turn_entry_for(body: dict[str, Any], username: str) -> None:
    """Check the TURN entry is a valid TURN REST credential for `username`, expiring in the future."""
    stun, turn = body["ice_servers"]
    assert stun == {"urls": "stun:127.0.0.1:3478"}
    assert turn["urls"] == [TURN_URL]
    expiry, _, name = turn["username"].partition(":")
    assert name == username
    assert time.time() < int(expiry) <= time.time() + 600
    expected = hmac.new(TURN_SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert base64.b64decode(turn["credential"]) == expected


def assert_refused(response: Any, status: int, code: str) -> None:
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert body["error"] == code and body["message"]
    assert "ice_servers" not in body


async def test_open_mode_refuses_even_a_registered_users_name_and_user_id(connect, turn):
    registered = await (await connect()).register("alice", "id-alice")
    response = await AsyncClient().get("/api/ice-servers", {"username": "alice", "user_id": "id-alice"})
    assert_refused(response, 403, "token_required")
    assert response.json()["message"] == (
        "In open mode ICE servers come in the registered message; this endpoint needs SIGNALING_AUTH=token"
    )
    # What a registered session gets instead, on its own socket.
    assert registered["ice_servers"][1]["urls"] == [TURN_URL]


async def test_open_mode_refuses_a_bearer_token_too(turn, settings):
    settings.SIGNALING_JWT_SECRET = JWT_SECRET
    token, _ = mint_token("carol")
    response = await AsyncClient().get("/api/ice-servers", headers={"Authorization": f"Bearer {token}"})
    assert_refused(response, 403, "token_required")


async def test_token_mode_hands_ice_servers_for_the_tokens_subject(token_mode):
    token, _ = mint_token("carol")
    response = await AsyncClient().get(
        "/api/ice-servers", {"username": "someone-else"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    assert_turn_entry_for(response.json(), "carol")


async def test_token_mode_refuses_missing_forged_and_expired_tokens(token_mode, settings):
    client = AsyncClient()
    response = await client.get("/api/ice-servers")
    assert_refused(response, 401, "unauthorized")
    assert response["WWW-Authenticate"].startswith("Bearer")
    token, _ = mint_token("carol")
    assert_refused(await client.get("/api/ice-servers", headers={"Authorization": token}), 401, "unauthorized")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    response = await client.get("/api/ice-servers", headers={"Authorization": f"Bearer {forged}"})
    assert_refused(response, 401, "unauthorized")
    expired, _ = mint_token("carol", ttl=-10)
    response = await client.get("/api/ice-servers", headers={"Authorization": f"Bearer {expired}"})
    assert_refused(response, 401, "unauthorized")
    assert "expired" in response.json()["message"]
    settings.SIGNALING_JWT_SECRET = "another-secret-that-is-also-32-characters-long"
    response = await client.get("/api/ice-servers", headers={"Authorization": f"Bearer {token}"})
    assert_refused(response, 401, "unauthorized")


async def test_token_mode_ignores_the_open_mode_query(connect, token_mode, settings):
    # A live session's username and user_id are no credential in token mode.
    settings.SIGNALING_AUTH = "open"
    await connect("alice", "id-alice")
    settings.SIGNALING_AUTH = "token"
    response = await AsyncClient().get("/api/ice-servers", {"username": "alice", "user_id": "id-alice"})
    assert_refused(response, 401, "unauthorized")


async def test_the_api_answers_get_only(turn):
    response = await AsyncClient().post("/api/ice-servers", {"username": "alice", "user_id": "id-alice"})
    assert response.status_code == 405


def json_request(url: str, body: dict[str, Any] | None = None, **headers: str) -> tuple[int, dict[str, Any]]:
    status, _, answer = http_request(url, body, **headers)
    return status, json.loads(answer)


async def test_daphne_hands_ice_servers_to_the_holder_of_a_token_from_the_api(tmp_path):
    env = {
        "SIGNALING_AUTH": "token",
        "SIGNALING_JWT_SECRET": JWT_SECRET,
        "SIGNALING_ALLOW_SIGNUP": "true",
        "SIGNALING_TURN_URLS": TURN_URL,
        "SIGNALING_TURN_SECRET": TURN_SECRET,
        "SIGNALING_TURN_TTL": "600",
    }
    with daphne_server(tmp_path, **env) as server:
        ice_url = f"{server.http_url}/api/ice-servers"
        status, body = await asyncio.to_thread(json_request, ice_url)
        assert (status, body["error"]) == (401, "unauthorized")
        account = {"username": "grace", "password": "a long and unusual passphrase"}
        assert (await asyncio.to_thread(json_request, f"{server.http_url}/api/users", account))[0] == 201
        status, issued = await asyncio.to_thread(json_request, f"{server.http_url}/api/token", account)
        assert status == 200
        status, body = await asyncio.to_thread(json_request, ice_url, Authorization=f"Bearer {issued['token']}")
        assert status == 200
        (turn,) = body["ice_servers"]
        assert turn["urls"] == [TURN_URL] and turn["username"].endswith(":grace")


async def test_the_page_is_served_with_a_policy_that_lets_it_reach_only_its_own_socket():
    response = await AsyncClient().get("/")
    assert response.status_code == 200
    assert b"<title>Video calls" in response.content
    policy = response["Content-Security-Policy"]
    assert "connect-src 'self' ws://testserver wss://testserver" in policy
    assert "frame-ancestors 'none'" in policy


async def test_the_protocol_spec_is_served_as_it_is_checked_in(settings):
    response = await AsyncClient().get("/api/protocol/asyncapi.yaml")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/yaml; charset=utf-8"
    assert response["Access-Control-Allow-Origin"] == "*"
    spec = settings.BASE_DIR / "protocol" / "asyncapi.yaml"
    assert response.content == spec.read_bytes()
    assert yaml.safe_load(response.content)["asyncapi"] == "3.0.0"
