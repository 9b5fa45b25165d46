"""Covers calls.process.drain and the SIGTERM hook in calls.server.daphne: graceful shutdown of real daphne processes.

SIGTERM closes every socket with 1012 and ends no call another process can carry
(with Redis and PostgreSQL for the carry).
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from calls.testing.servers import daphne_server
from calls.tests.netclient import answered_call, ring, server_rows, start_cluster

SERVICE_RESTART = 1012


def exited(server, timeout: float = 20.0) -> int:
    return server.proc.wait(timeout)


async def test_one_process_closes_every_socket_with_1012_and_ends_its_calls(tmp_path, peers):
    with daphne_server(tmp_path, SIGNALING_PRESENCE_WINDOW_MS="20") as server:
        alice = await peers(server, "alice", resume=True)
        bob = await peers(server, "bob")
        idle = await peers(server)  # connected, never registered
        call_id = await answered_call(alice, bob)

        server.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(alice.close_code(), bob.close_code(), idle.close_code())
        assert codes == [SERVICE_RESTART] * 3
        assert await asyncio.to_thread(exited, server) == 0
        # No other process can carry the call: it ended, and the row says why.
        assert server_rows(server, "SELECT id, status, end_reason FROM calls_call") == [
            (call_id.replace("-", ""), "completed", "disconnected")
        ]
        logs = server.logs()
        assert 'msg="SIGTERM: stopped listening; draining"' in logs and 'msg="runtime drained"' in logs
        assert "took too long to shut down" not in logs and "Exception inside application" not in logs


@pytest.mark.services
async def test_a_resumable_call_moves_to_another_process_and_a_v1_call_ends(tmp_path, postgres, peers):
    cluster = start_cluster(tmp_path, postgres, SIGNALING_RESUME_GRACE="20")
    try:
        alice = await peers(cluster.a)
        alice.name = "alice"
        token = (await alice.register("alice", "id-alice", resume=True))["resume_token"]
        bob = await peers(cluster.b, "bob")
        carol = await peers(cluster.a, "carol")  # a v1 client: cannot resume
        dave = await peers(cluster.b, "dave")
        carried = await answered_call(alice, bob)
        dropped = await answered_call(carol, dave)
        # frank's call is still ringing when his process goes; gina answers meanwhile.
        frank = await peers(cluster.a)
        frank.name = "frank"
        frank_token = (await frank.register("frank", "id-frank", resume=True))["resume_token"]
        gina = await peers(cluster.b, "gina")
        ringing = await ring(frank, [gina], "gina")

        cluster.a.proc.send_signal(signal.SIGTERM)
        assert await alice.close_code() == SERVICE_RESTART
        assert await carol.close_code() == SERVICE_RESTART
        assert await frank.close_code() == SERVICE_RESTART
        reconnecting = await bob.expect("peer_reconnecting")
        assert (reconnecting["username"], reconnecting["call_id"]) == ("alice", carried)
        ended = await dave.expect("call_ended")
        assert (ended["call_id"], ended["reason"]) == (dropped, "disconnected")
        assert await asyncio.to_thread(exited, cluster.a) == 0
        assert "Exception inside application" not in cluster.a.logs()
        assert cluster.call_row(carried) == ("answered", None)
        assert cluster.call_row(dropped) == ("completed", "disconnected")

        # alice comes back on the other process with her token: the call is hers again.
        again = await peers(cluster.b)
        again.name = "alice"
        resumed = await again.register("alice", "id-alice", resume_token=token)
        assert resumed["resumed"] is True
        assert resumed["calls"] == [{"call_id": carried, "peer_username": "bob", "status": "answered"}]
        assert (await bob.expect("peer_reconnected"))["call_id"] == carried
        candidate = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMLineIndex": 0}
        await again.send({"type": "ice_candidate", "target_username": "bob", "data": candidate})
        relayed = await bob.expect("ice_candidate")
        assert (relayed["from_username"], relayed["data"], relayed["call_id"]) == ("alice", candidate, carried)
        await bob.send({"type": "ice_candidate", "target_username": "alice", "data": candidate})
        assert (await again.expect("ice_candidate"))["from_username"] == "bob"

        # The answer to frank's call went to his old socket's channel, gone with its
        # process: the resumed session learns it from the database.
        assert (await gina.expect("peer_reconnecting"))["call_id"] == ringing
        await gina.send({"type": "call_accepted", "call_id": ringing})
        frank_again = await peers(cluster.b)
        frank_again.name = "frank"
        resumed = await frank_again.register("frank", "id-frank", resume_token=frank_token)
        assert resumed["calls"] == [{"call_id": ringing, "peer_username": "gina", "status": "answered"}]
        accepted = await frank_again.expect("call_accepted")
        assert (accepted["call_id"], accepted["accepter_username"]) == (ringing, "gina")
        assert (await gina.expect("peer_reconnected"))["call_id"] == ringing
        await frank_again.send({"type": "offer", "target_username": "gina", "data": {"type": "offer", "sdp": "v=0"}})
        assert (await gina.expect("offer"))["call_id"] == ringing
        await gina.send({"type": "answer", "target_username": "frank", "data": {"type": "answer", "sdp": "v=0"}})
        assert (await frank_again.expect("answer"))["from_username"] == "gina"
        assert cluster.call_row(ringing) == ("answered", None)

        # The parked state was taken once: the same token cannot take it again.
        thief = await peers(cluster.b)
        await thief.send({"type": "register", "username": "alice", "user_id": "id-alice", "resume_token": token})
        await thief.expect_error("resume_failed")

        await again.send({"type": "call_ended", "target_username": "bob"})
        ended = await bob.expect("call_ended")
        assert (ended["call_id"], ended["reason"]) == (carried, "hangup")
        assert cluster.call_row(carried) == ("completed", "hangup")
    finally:
        cluster.stop()


@pytest.mark.services
async def test_a_parked_session_nobody_resumes_ends_its_call_after_the_grace(tmp_path, postgres, peers):
    cluster = start_cluster(tmp_path, postgres, SIGNALING_RESUME_GRACE="2", SIGNALING_PRESENCE_TTL="3")
    try:
        alice = await peers(cluster.a, "alice", resume=True)
        bob = await peers(cluster.b, "bob")
        call_id = await answered_call(alice, bob)
        cluster.a.proc.send_signal(signal.SIGTERM)
        assert await alice.close_code() == SERVICE_RESTART
        await bob.expect("peer_reconnecting")
        # Parked for the grace: alice stays listed meanwhile, then her lease runs out.
        ended = await bob.expect("call_ended", timeout=15)
        assert (ended["call_id"], ended["reason"]) == (call_id, "disconnected")
        await bob.expect_online({"bob"})
        assert cluster.call_row(call_id) == ("completed", "disconnected")
    finally:
        cluster.stop()


@pytest.mark.services
async def test_a_call_between_two_parked_sessions_goes_on_when_both_resume(tmp_path, postgres, peers):
    cluster = start_cluster(tmp_path, postgres, SIGNALING_RESUME_GRACE="20")
    try:
        tokens = {}
        old = {}
        for name in ("hana", "ivan"):
            old[name] = await peers(cluster.a)
            old[name].name = name
            tokens[name] = (await old[name].register(name, f"id-{name}", resume=True))["resume_token"]
        call_id = await answered_call(old["hana"], old["ivan"])
        cluster.a.proc.send_signal(signal.SIGTERM)
        assert await old["hana"].close_code() == SERVICE_RESTART
        assert await old["ivan"].close_code() == SERVICE_RESTART
        assert await asyncio.to_thread(exited, cluster.a) == 0

        new = {}
        for name in ("hana", "ivan"):  # one after the other: the second finds the first moved
            new[name] = await peers(cluster.b)
            new[name].name = name
            resumed = await new[name].register(name, f"id-{name}", resume_token=tokens[name])
            assert resumed["calls"][0]["call_id"] == call_id
        assert (await new["hana"].expect("peer_reconnected"))["username"] == "ivan"
        for sender, receiver in (("hana", "ivan"), ("ivan", "hana")):
            data = {"candidate": f"candidate:{sender}", "sdpMLineIndex": 0}
            await new[sender].send({"type": "ice_candidate", "target_username": receiver, "data": data})
            got = await new[receiver].expect("ice_candidate")
            assert (got["from_username"], got["data"]) == (sender, data)
        assert cluster.call_row(call_id) == ("answered", None)
    finally:
        cluster.stop()
