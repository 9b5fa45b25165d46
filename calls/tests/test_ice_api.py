"""GET /api/ice-servers: who may have the ICE servers and fresh TURN credentials.

Open mode: a user with a live session (username and user_id must match it).
Token mode: a valid bearer token; the TURN credentials are for its subject.
Most tests drive the real ASGI app in-process (the presence store then lives in
the test's event loop, as it lives in daphne's); one runs against daphne itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest
import websockets
from django.test import AsyncClient

from calls.security import mint_token
from calls.tests.servers import daphne_server

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


async def test_open_mode_hands_ice_servers_to_a_registered_user(connect, turn):
    await connect("alice", "id-alice")
    response = await AsyncClient().get("/api/ice-servers", {"username": "alice", "user_id": "id-alice"})
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    assert_turn_entry_for(response.json(), "alice")


async def test_open_mode_refuses_a_user_id_that_does_not_hold_the_username(connect, turn):
    await connect("alice", "id-alice")
    response = await AsyncClient().get("/api/ice-servers", {"username": "alice", "user_id": "id-mallory"})
    assert_refused(response, 403, "forbidden")


async def test_open_mode_refuses_users_that_are_not_online(connect, turn):
    client = AsyncClient()
    assert_refused(await client.get("/api/ice-servers", {"username": "bob", "user_id": "id-bob"}), 403, "forbidden")
    assert_refused(await client.get("/api/ice-servers"), 403, "forbidden")
    alice = await connect("alice", "id-alice")
    await alice.close()
    response = await client.get("/api/ice-servers", {"username": "alice", "user_id": "id-alice"})
    assert_refused(response, 403, "forbidden")


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


def http_get(url: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a loopback test server
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


async def test_daphne_serves_the_api_from_the_presence_of_its_own_sockets(tmp_path):
    env = {"SIGNALING_TURN_URLS": TURN_URL, "SIGNALING_TURN_SECRET": TURN_SECRET, "SIGNALING_TURN_TTL": "600"}
    with daphne_server(tmp_path, **env) as server:
        query = urllib.parse.urlencode({"username": "alice", "user_id": "id-alice"})
        url = f"{server.http_url}/api/ice-servers?{query}"
        status, _, body = await asyncio.to_thread(http_get, url)
        assert (status, body["error"]) == (403, "forbidden")
        async with websockets.connect(server.url) as ws:
            await ws.send(json.dumps({"type": "register", "username": "alice", "user_id": "id-alice"}))
            registered = json.loads(await ws.recv())
            assert registered["type"] == "registered"
            status, headers, body = await asyncio.to_thread(http_get, url)
            assert status == 200
            assert headers["Cache-Control"] == "no-store"
            (turn,) = body["ice_servers"]
            assert turn["urls"] == [TURN_URL] and turn["username"].endswith(":alice")
            assert registered["ice_servers"][0]["urls"] == [TURN_URL]
            wrong = url.replace("id-alice", "id-mallory")
            assert (await asyncio.to_thread(http_get, wrong))[0] == 403
