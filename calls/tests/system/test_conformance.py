"""Covers the wire protocol as the Python client library (./clients/python) speaks it with daphne: every frame conforms.

One daphne process in token mode with Web Push (its push service a loopback stand-in,
calls/tests/push/push_service.py). Three library clients make every request the library
has: register, ping, push_subscribe and push_unsubscribe, call, accept, offer, answer,
ICE candidates, hang up, reject, history. Their sockets record every frame both ways;
each must conform to protocol/asyncapi.yaml, and between them they cover every message
a client can send and all but the resume notices the server sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import signaling_client as sc
from websockets.asyncio.client import ClientConnection

from calls.push.webpush import new_key_pair
from calls.testing.servers import DaphneServer, daphne_server
from calls.tests import conformance
from calls.tests.conformance import CLIENT, SERVER
from calls.tests.push.push_service import PushService

VAPID_PRIVATE, _ = new_key_pair()
ENV = {
    "SIGNALING_AUTH": "token",
    "SIGNALING_JWT_SECRET": "conformance-secret-" + "x" * 32,
    "SIGNALING_VAPID_PRIVATE_KEY": VAPID_PRIVATE,
    "SIGNALING_VAPID_SUBJECT": "mailto:ops@example.com",
    # The stand-in push service listens on plain http on loopback.
    "SIGNALING_PUSH_ALLOW_PRIVATE_ENDPOINTS": "true",
    "SIGNALING_PRESENCE_WINDOW_MS": "20",
}
CANDIDATE = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}


@pytest.fixture
def server(tmp_path) -> Iterator[DaphneServer]:
    with daphne_server(tmp_path, **ENV) as server:
        yield server


@pytest.fixture
def service() -> Iterator[PushService]:
    service = PushService()
    yield service
    service.close()


def recording(frames: list[tuple[str, str]]) -> type[ClientConnection]:
    """A socket class for the library (its `create_connection`) that records every text frame: (sender, text)."""

    class Recording(ClientConnection):
        async def send(self, message: Any, *, text: bool | None = None) -> None:
            if isinstance(message, str):
                frames.append((CLIENT, message))
            await super().send(message, text=text)

        async def recv(self, decode: bool | None = None) -> Any:
            frame = await super().recv(decode)
            if isinstance(frame, str):
                frames.append((SERVER, frame))
            return frame

    return Recording


async def test_every_frame_the_client_library_and_the_server_exchange_conforms(server, service, open_client):
    frames: list[tuple[str, str]] = []
    socket = recording(frames)
    carol, carol_events = await open_client(server, "carol", presence="delta", create_connection=socket)
    await carol_events.expect(sc.Presence, snapshot=True)  # the snapshot; changes come as presence frames from now on
    alice, alice_events = await open_client(server, "alice", device_id="alice-phone", create_connection=socket)
    bob, bob_events = await open_client(server, "bob", create_connection=socket)
    await carol_events.expect(sc.UserOnline, username="bob")
    await carol.watch(add=["alice", "bob"])  # carol follows these two from now on

    await alice.ping()
    subscription_id = await bob.subscribe_push("webpush", subscription=service.subscription("bob").to_json())
    await bob.unsubscribe_push(subscription_id)
    with pytest.raises(sc.SignalingError):
        await bob.unsubscribe_push(subscription_id)

    call_id = await alice.call("bob")
    await bob_events.expect(sc.IncomingCall, call_id=call_id)
    await bob.accept(call_id)
    await alice_events.expect(sc.CallAccepted, call_id=call_id)
    await alice.send_offer(call_id, {"type": "offer", "sdp": "v=0\r\n"})
    await bob_events.expect(sc.Offer, call_id=call_id)
    await bob.send_answer(call_id, {"type": "answer", "sdp": "v=0\r\n"})
    await alice_events.expect(sc.Answer, call_id=call_id)
    await bob.send_ice_candidate(call_id, CANDIDATE)
    await alice_events.expect(sc.IceCandidate, call_id=call_id)
    await alice.send_ice_candidate(call_id, CANDIDATE)
    await bob_events.expect(sc.IceCandidate, call_id=call_id)
    await alice.hang_up(call_id)
    await bob_events.expect(sc.CallEnded, call_id=call_id, reason="hangup")

    refused = await alice.call("bob")
    await bob_events.expect(sc.IncomingCall, call_id=refused)
    await bob.reject(refused)
    await alice_events.expect(sc.CallRejected, call_id=refused)
    assert [entry.call_id for entry in await alice.get_call_history()] == [refused, call_id]
    await bob.close()
    await carol_events.expect(sc.UserOffline, username="bob")

    assert [(sender, frame, found) for sender, frame in frames if (found := conformance.problems(frame, sender))] == []
    sent = {json.loads(frame)["type"] for sender, frame in frames if sender == CLIENT}
    received = {json.loads(frame)["type"] for sender, frame in frames if sender == SERVER}
    assert sent == {conformance.message_type(message) for _, message in conformance.messages(CLIENT)}
    assert received == {conformance.message_type(message) for _, message in conformance.messages(SERVER)} - {
        "peer_reconnecting",
        "peer_reconnected",
    }
