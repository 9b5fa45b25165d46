"""Operations: /healthz, /readyz and /metrics on real daphne processes, and the Render Blueprint."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets
import yaml
from prometheus_client.parser import text_string_to_metric_families

from calls.callflow import store as call_store
from calls.observability import metrics
from calls.testing.servers import ROOT, DaphneServer, daphne_server, free_port
from calls.wire import protocol

TIMEOUT = 10.0
BLUEPRINT = ROOT / "render.yaml"


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET a URL; return status, headers and body (error statuses included)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse Prometheus text into {(sample name, labels): value}."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(parsed: dict, name: str, **labels: str) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    """One daphne process (SQLite, in-memory layer, DEBUG on) shared by this module's tests."""
    with daphne_server(tmp_path_factory.mktemp("ops")) as server:
        yield server


async def recv_type(ws: websockets.ClientConnection, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return message


async def a_call_with_a_candidate_and_a_bad_frame(url: str) -> None:
    """alice calls bob, bob answers, bob sends a candidate and a broken frame, alice hangs up."""
    async with websockets.connect(url) as alice, websockets.connect(url) as bob:
        await alice.send(json.dumps({"type": "register", "username": "alice", "user_id": "u-a"}))
        await recv_type(alice, "registered")
        await bob.send(json.dumps({"type": "register", "username": "bob", "user_id": "u-b"}))
        await recv_type(bob, "registered")
        await alice.send(json.dumps({"type": "call_request", "target_username": "bob"}))
        call_id = (await recv_type(bob, "incoming_call"))["call_id"]
        await bob.send(json.dumps({"type": "call_accepted", "call_id": call_id}))
        await recv_type(alice, "call_accepted")
        candidate = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMLineIndex": 0}
        await bob.send(json.dumps({"type": "ice_candidate", "target_username": "alice", "data": candidate}))
        await recv_type(alice, "ice_candidate")
        await bob.send("{broken")
        assert (await recv_type(bob, "error"))["code"] == protocol.INVALID_JSON
        await alice.send(json.dumps({"type": "call_ended", "call_id": call_id}))
        await recv_type(bob, "call_ended")


# --- /healthz and /readyz ----------------------------------------------------------


def test_healthz_and_readyz_answer_ok_on_a_working_server(server):
    status, _, body = http_get(f"{server.http_url}/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})

    status, _, body = http_get(f"{server.http_url}/readyz")
    report = json.loads(body)
    assert status == 200
    assert report["status"] == "ready"
    assert report["checks"]["database"]["ok"] is True
    assert report["checks"]["channel_layer"]["ok"] is True


@pytest.mark.services
def test_readyz_is_ready_over_redis_and_reuses_one_probe_channel(tmp_path, redis_server):
    with daphne_server(tmp_path, REDIS_URL=redis_server.url) as server:
        for _ in range(5):
            status, _, body = http_get(f"{server.http_url}/readyz")
            assert status == 200, body
            assert json.loads(body)["checks"]["channel_layer"]["ok"] is True
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            probe_channels = [name for name in client.pubsub_channels() if b"readyz" in name]
        finally:
            client.close()
    # Five checks, one subscription: a channel per check would pile up on the pub/sub layer.
    assert len(probe_channels) == 1


def test_readyz_is_503_naming_the_channel_layer_when_redis_is_unreachable(tmp_path):
    with daphne_server(tmp_path, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0") as server:
        status, _, body = http_get(f"{server.http_url}/readyz")
        health, _, _ = http_get(f"{server.http_url}/healthz")
        logs = server.logs()
    report = json.loads(body)
    assert status == 503
    assert report["status"] == "unavailable"
    assert report["checks"]["channel_layer"] == {"ok": False, "error": "ConnectionError"}
    assert report["checks"]["database"]["ok"] is True
    assert health == 200
    assert 'msg="readiness check failed" check=channel_layer error=ConnectionError' in logs


def test_readyz_is_503_naming_the_database_when_it_is_unreachable(tmp_path):
    unreachable = f"postgres://signaling@127.0.0.1:{free_port()}/signaling"
    with daphne_server(tmp_path, migrate_db=False, DATABASE_URL=unreachable) as server:
        status, _, body = http_get(f"{server.http_url}/readyz")
        health, _, health_body = http_get(f"{server.http_url}/healthz")
    report = json.loads(body)
    assert status == 503
    assert report["checks"]["database"] == {"ok": False, "error": "OperationalError"}
    assert report["checks"]["channel_layer"]["ok"] is True
    # /healthz never touches the database.
    assert (health, json.loads(health_body)) == (200, {"status": "ok"})


# --- /metrics access ---------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_need_the_bearer_token_when_one_is_set(client, settings):
    settings.SIGNALING_METRICS_TOKEN = token = secrets.token_urlsafe(16)
    settings.DEBUG = True

    missing = client.get("/metrics")
    wrong = client.get("/metrics", headers={"Authorization": f"Bearer {token}x"})
    right = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})

    assert missing.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert right["Content-Type"].startswith("text/plain")
    assert b"signaling_connections " in right.content


@pytest.mark.django_db
def test_metrics_are_not_found_without_a_token_unless_debug(client, settings):
    settings.SIGNALING_METRICS_TOKEN = ""
    settings.DEBUG = False
    assert client.get("/metrics").status_code == 404
    settings.DEBUG = True
    assert client.get("/metrics").status_code == 200


# --- The metrics module --------------------------------------------------------------


def sample_or_none(name: str, **labels: str) -> float | None:
    """Read one sample, collecting only the metric that has it (the calls gauge queries the database)."""
    for family in metrics.REGISTRY.restricted_registry([name]).collect():
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def sample(name: str, **labels: str) -> float:
    return sample_or_none(name, **labels) or 0.0


def test_connection_and_session_gauges_go_up_and_down():
    connections, sessions = sample("signaling_connections"), sample("signaling_registered_sessions")
    opened = sample("signaling_connections_opened_total")
    metrics.connection_opened()
    metrics.session_registered()
    assert sample("signaling_connections") == connections + 1
    assert sample("signaling_registered_sessions") == sessions + 1
    metrics.session_closed()
    metrics.connection_closed()
    assert sample("signaling_connections") == connections
    assert sample("signaling_registered_sessions") == sessions
    assert sample("signaling_connections_opened_total") == opened + 1


def test_message_types_from_clients_are_folded_into_a_bounded_set():
    offers, other = (
        sample("signaling_messages_received_total", type="offer"),
        sample("signaling_messages_received_total", type="other"),
    )
    metrics.message_received("offer")
    metrics.message_received("x" * 500)
    metrics.message_received("call.signal")
    assert sample("signaling_messages_received_total", type="offer") == offers + 1
    assert sample("signaling_messages_received_total", type="other") == other + 2
    assert sample_or_none("signaling_messages_received_total", type="x" * 500) is None


def test_message_type_names_every_parsed_inbound_message():
    frames = {
        '{"type":"register","username":"a","user_id":"1"}': "register",
        '{"type":"call_request","target_username":"b"}': "call_request",
        '{"type":"call_rejected","caller_username":"b"}': "call_rejected",
        '{"type":"call_ended","target_username":"b"}': "call_ended",
        '{"type":"answer","target_username":"b","data":{}}': "answer",
        '{"type":"get_call_history"}': "get_call_history",
        '{"type":"ping"}': "ping",
    }
    for frame, kind in frames.items():
        assert metrics.message_type(protocol.parse_message(frame)) == kind


def test_errors_and_transitions_count_by_label():
    errors = sample("signaling_errors_sent_total", code="rate_limited")
    hangups = sample("signaling_call_transitions_total", status="completed", reason="hangup")
    ringing = sample("signaling_call_transitions_total", status="ringing", reason="")
    metrics.error_sent("rate_limited")
    metrics.call_transition("completed", "hangup")
    metrics.call_transition("ringing", None)
    metrics.call_transition("no-such-status", "no-such-reason")
    assert sample("signaling_errors_sent_total", code="rate_limited") == errors + 1
    assert sample("signaling_call_transitions_total", status="completed", reason="hangup") == hangups + 1
    assert sample("signaling_call_transitions_total", status="ringing", reason="") == ringing + 1
    assert sample("signaling_call_transitions_total", status="other", reason="other") >= 1


def test_relay_latency_lands_in_the_histogram():
    count, total = sample("signaling_relay_seconds_count"), sample("signaling_relay_seconds_sum")
    under_5ms = sample("signaling_relay_seconds_bucket", le="0.005")
    metrics.observe_relay(0.003)
    assert sample("signaling_relay_seconds_count") == count + 1
    assert sample("signaling_relay_seconds_sum") == pytest.approx(total + 0.003)
    assert sample("signaling_relay_seconds_bucket", le="0.005") == under_5ms + 1


@pytest.mark.django_db
def test_calls_by_status_are_counted_from_the_database_at_scrape_time():
    call_store.touch_users({"alice": "u-a", "bob": "u-b", "carol": "u-c"})
    first = call_store.start_call(call_store.Actor("chan-a", "alice"), "bob", 45)
    call_store.start_call(call_store.Actor("chan-c", "carol"), "bob", 45)  # bob is being called already: busy
    call_store.end_call(first.call_id, call_store.EndReason.HANGUP, call_store.Actor("chan-a", "alice"), party=True)

    assert sample("signaling_calls", status="cancelled") == 1
    assert sample("signaling_calls", status="busy") == 1
    assert sample("signaling_calls", status="ringing") == 0
    assert sample("signaling_calls_scrape_error") == 0


# --- /metrics after real traffic --------------------------------------------------------


def test_metrics_show_calls_by_status_after_a_real_call(server):
    before = samples(http_get(f"{server.http_url}/metrics")[2].decode())
    asyncio.run(a_call_with_a_candidate_and_a_bad_frame(server.url))

    status, headers, body = http_get(f"{server.http_url}/metrics")
    after = samples(body.decode())
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    completed = value(after, "signaling_calls", status="completed")
    assert completed == (value(before, "signaling_calls", status="completed") or 0) + 1
    rows = sqlite3.connect(Path(server.env["DATABASE_URL"].removeprefix("sqlite:///"))).execute(
        "SELECT COUNT(*) FROM calls_call WHERE status = 'completed'"
    )
    assert rows.fetchone()[0] == completed
    assert value(after, "process_resident_memory_bytes") > 0


def test_counters_move_after_real_traffic(server):
    before = samples(http_get(f"{server.http_url}/metrics")[2].decode())
    asyncio.run(a_call_with_a_candidate_and_a_bad_frame(server.url))

    def moved(name: str, **labels: str) -> float:
        return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

    # The server handles the two disconnects after the client has closed: wait for them.
    deadline = time.monotonic() + TIMEOUT
    while True:
        after = samples(http_get(f"{server.http_url}/metrics")[2].decode())
        if moved("signaling_connections") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    assert moved("signaling_connections_opened_total") == 2
    assert moved("signaling_registrations_total") == 2
    assert moved("signaling_messages_received_total", type="ice_candidate") == 1
    assert moved("signaling_messages_received_total", type="invalid") == 1
    assert moved("signaling_errors_sent_total", code="invalid_json") == 1
    assert moved("signaling_call_transitions_total", status="ringing", reason="") == 1
    assert moved("signaling_call_transitions_total", status="answered", reason="") == 1
    assert moved("signaling_call_transitions_total", status="completed", reason="hangup") == 1
    assert moved("signaling_relay_seconds_count") == 1
    # Both sockets closed: the gauges are back where they were.
    assert moved("signaling_connections") == 0
    assert moved("signaling_registered_sessions") == 0


# --- render.yaml -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blueprint() -> dict[str, Any]:
    return yaml.safe_load(BLUEPRINT.read_text())


def web_service(blueprint: dict[str, Any]) -> dict[str, Any]:
    (web,) = [service for service in blueprint["services"] if service["type"] == "web"]
    return web


def env_vars(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["key"]: entry for entry in service["envVars"]}


def test_the_blueprint_starts_bin_serve_and_checks_healthz(blueprint):
    web = web_service(blueprint)
    assert web["runtime"] == "python"
    assert web["startCommand"] == "sh bin/serve"
    assert web["healthCheckPath"] == "/healthz"
    assert web["preDeployCommand"] == "python manage.py migrate --noinput"
    assert "collectstatic --noinput" in web["buildCommand"]
    assert "pip install --require-hashes -r requirements.lock" in web["buildCommand"]


def test_the_blueprint_wires_its_database_and_key_value_instance(blueprint):
    env = env_vars(web_service(blueprint))
    (keyvalue,) = [service for service in blueprint["services"] if service["type"] == "keyvalue"]
    (database,) = blueprint["databases"]

    assert env["DATABASE_URL"]["fromDatabase"] == {"name": database["name"], "property": "connectionString"}
    assert env["REDIS_URL"]["fromService"] == {
        "type": "keyvalue",
        "name": keyvalue["name"],
        "property": "connectionString",
    }
    assert keyvalue["ipAllowList"] == []
    assert env["DEBUG"]["value"] == "false"
    assert env["SECRET_KEY"]["generateValue"] is True
    assert env["SIGNALING_JWT_SECRET"]["generateValue"] is True
    assert env["PYTHON_VERSION"]["value"].startswith("3.11.")


def test_production_settings_load_with_the_blueprints_environment(blueprint):
    """What Render passes at build and start time is enough for settings.py in production mode."""
    stand_ins = {
        "DATABASE_URL": "postgres://signaling:secret@signaling-db:5432/signaling",
        "REDIS_URL": "redis://signaling-keyvalue:6379",
        "ALLOWED_HOSTS": "calls.example.com",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALING_") and k != "DJANGO_SETTINGS_MODULE"}
    for key, entry in env_vars(web_service(blueprint)).items():
        if "value" in entry:
            env[key] = str(entry["value"])
        elif entry.get("generateValue"):
            env[key] = secrets.token_urlsafe(32)
        else:
            env[key] = stand_ins[key]
    env["RENDER_EXTERNAL_HOSTNAME"] = "signaling-server.onrender.com"
    env["DJANGO_SETTINGS_MODULE"] = "signaling_project.settings"  # as manage.py and asgi.py set it
    script = (
        "import json, django; from django.conf import settings; django.setup();"
        "print(json.dumps([settings.DEBUG, settings.ALLOWED_HOSTS, settings.DATABASES['default']['ENGINE']]))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    debug, hosts, engine = json.loads(result.stdout)
    assert debug is False
    assert hosts == ["calls.example.com", "signaling-server.onrender.com"]
    assert engine == "django.db.backends.postgresql"
