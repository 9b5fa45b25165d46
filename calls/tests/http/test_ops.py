"""Covers calls.http.ops: /healthz, /readyz and /metrics, on real daphne processes and through Django's test client."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from calls.testing.servers import DaphneServer, daphne_server, free_port
from calls.tests.netclient import TIMEOUT, answered_call, connect_registered, http_request, server_rows
from calls.wire import protocol


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse Prometheus text into {(sample name, labels): value}."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(server: DaphneServer) -> tuple[int, dict[str, str], bytes]:
    """GET the server's /metrics with its token, once the call history it decided is written."""
    server.history_written()
    return http_request(f"{server.http_url}/metrics", Authorization=f"Bearer {server.env['SIGNALING_METRICS_TOKEN']}")


def value(parsed: dict, name: str, **labels: str) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    """One daphne process (SQLite, in-memory layer, DEBUG on) shared by this module's tests."""
    with daphne_server(tmp_path_factory.mktemp("ops")) as server:
        yield server


async def a_call_with_a_candidate_and_a_bad_frame(url: str) -> None:
    """alice calls bob, bob answers, bob sends a candidate and a broken frame, alice hangs up."""
    alice, _ = await connect_registered(url, "alice")
    bob, _ = await connect_registered(url, "bob")
    try:
        call_id = await answered_call(alice, bob)
        candidate = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMLineIndex": 0}
        await bob.send({"type": "ice_candidate", "target_username": "alice", "data": candidate})
        await alice.expect("ice_candidate")
        await bob.send("{broken")
        await bob.expect_error(protocol.INVALID_JSON)
        await alice.send({"type": "call_ended", "call_id": call_id})
        await bob.expect("call_ended")
    finally:
        await alice.ws.close()
        await bob.ws.close()


# --- /healthz and /readyz ----------------------------------------------------------


def test_healthz_and_readyz_answer_ok_on_a_working_server(server):
    status, _, body = http_request(f"{server.http_url}/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})

    status, _, body = http_request(f"{server.http_url}/readyz")
    report = json.loads(body)
    assert status == 200
    assert report["status"] == "ready"
    assert report["checks"]["database"]["ok"] is True
    assert report["checks"]["channel_layer"]["ok"] is True


@pytest.mark.services
def test_readyz_is_ready_over_redis_and_reuses_one_probe_channel(tmp_path, redis_server):
    with daphne_server(tmp_path, REDIS_URL=redis_server.url) as server:
        for _ in range(5):
            status, _, body = http_request(f"{server.http_url}/readyz")
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
        status, _, body = http_request(f"{server.http_url}/readyz")
        health, _, _ = http_request(f"{server.http_url}/healthz")
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
        status, _, body = http_request(f"{server.http_url}/readyz")
        health, _, health_body = http_request(f"{server.http_url}/healthz")
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


# --- /metrics after real traffic --------------------------------------------------------


def test_metrics_show_calls_by_status_after_a_real_call(server):
    before = samples(scrape(server)[2].decode())
    asyncio.run(a_call_with_a_candidate_and_a_bad_frame(server.url))

    status, headers, body = scrape(server)
    after = samples(body.decode())
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    completed = value(after, "signaling_calls", status="completed")
    assert completed == (value(before, "signaling_calls", status="completed") or 0) + 1
    assert server_rows(server, "SELECT COUNT(*) FROM calls_call WHERE status = 'completed'") == [(completed,)]
    assert value(after, "process_resident_memory_bytes") > 0


def test_counters_move_after_real_traffic(server):
    before = samples(scrape(server)[2].decode())
    asyncio.run(a_call_with_a_candidate_and_a_bad_frame(server.url))

    def moved(name: str, **labels: str) -> float:
        return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

    # The server handles the two disconnects after the client has closed: wait for them.
    deadline = time.monotonic() + TIMEOUT
    while True:
        after = samples(scrape(server)[2].decode())
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
