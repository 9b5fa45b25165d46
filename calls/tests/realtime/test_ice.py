"""Covers calls.realtime.ice: a real coturn accepts the TURN credentials it issues, and only those.

coturn runs with the TURN REST API mechanism (`use-auth-secret`), on a free
loopback port, with no configuration file and nothing outside a temp folder.
The proof is real TURN traffic: an aiortc peer connection pair restricted to
relay candidates connects through it and passes a data channel message, and
TURN Allocate requests (aioice's client, long-term credentials) succeed with
issued credentials and get 401 with expired or altered ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from calls.realtime.ice import ice_servers_for, turn_credentials
from calls.testing.servers import free_port
from calls.testing.services import in_ci

SECRET = "coturn-static-auth-secret-for-tests"
REALM = "signaling.test"


@dataclass
class Coturn:
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, deadline_s: float = 5.0) -> None:
        deadline = time.monotonic() + deadline_s
        while text not in self.logs():
            if time.monotonic() > deadline:
                raise AssertionError(f"coturn never logged {text!r}")
            time.sleep(0.05)


def free_udp_port() -> int:
    """Return a port free for both UDP and TCP on 127.0.0.1 (coturn listens on both)."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            with contextlib.suppress(OSError):
                sock.bind(("127.0.0.1", port))
                return port


def wait_for_stun(port: int, proc: subprocess.Popen, deadline_s: float = 15.0) -> None:
    """Block until the server answers a STUN Binding request on 127.0.0.1:port."""
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    deadline = time.monotonic() + deadline_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"turnserver exited with code {proc.returncode}")
            sock.sendto(bytes(request), ("127.0.0.1", port))
            try:
                response = stun.parse_message(sock.recv(2048))
            except (TimeoutError, ConnectionRefusedError):
                continue
            if response.transaction_id == request.transaction_id:
                return
    raise TimeoutError(f"turnserver did not answer STUN on 127.0.0.1:{port} within {deadline_s} s")


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    binary = shutil.which("turnserver")
    if binary is None:
        message = "turnserver is missing (make system-packages installs the Debian coturn package)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("coturn")
    server = Coturn(free_udp_port(), folder / "turn.log")
    command = [
        binary,
        "-n",  # no configuration file: /etc/turnserver.conf is never read
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        f"--listening-port={server.port}",
        "--use-auth-secret",
        f"--static-auth-secret={SECRET}",
        f"--realm={REALM}",
        # The test's peers are on loopback, which coturn refuses by default.
        "--allow-loopback-peers",
        "--no-multicast-peers",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--no-software-attribute",
        f"--log-file={server.log_path}",
        "--simple-log",
        "--verbose",
        "--no-stdout-log",
        f"--pidfile={folder / 'turn.pid'}",
        f"--userdb={folder / 'turndb'}",
    ]
    proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_stun(server.port, proc)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def relay_only(servers: list[dict]) -> RTCConfiguration:
    """An aiortc configuration with only these servers and relay candidates only."""
    ice_servers = [
        RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential")) for s in servers
    ]
    return RTCConfiguration(iceServers=ice_servers, iceTransportPolicy=RTCIceTransportPolicy.RELAY)


def turn_entry(coturn: Coturn, username: str, credential: str) -> list[dict]:
    return [{"urls": [coturn.url], "username": username, "credential": credential}]


async def connect_pair(config: RTCConfiguration, timeout: float) -> tuple[RTCPeerConnection, RTCPeerConnection, str]:
    """Connect two peer connections; return them and the message the answerer received."""
    caller, callee = RTCPeerConnection(config), RTCPeerConnection(config)
    received: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    channel = caller.createDataChannel("chat")
    channel.on("open", lambda: channel.send("hello over TURN"))

    @callee.on("datachannel")
    def on_datachannel(remote_channel) -> None:
        remote_channel.on("message", lambda message: received.done() or received.set_result(message))

    await caller.setLocalDescription(await caller.createOffer())
    await callee.setRemoteDescription(caller.localDescription)
    await callee.setLocalDescription(await callee.createAnswer())
    await caller.setRemoteDescription(callee.localDescription)
    async with asyncio.timeout(timeout):
        message = await received
    return caller, callee, message


def candidate_types(sdp: str) -> set[str]:
    return {line.split(" typ ")[1].split()[0] for line in sdp.splitlines() if line.startswith("a=candidate:")}


async def test_a_relay_only_peer_connection_pair_talks_through_coturn_with_issued_credentials(coturn, settings):
    settings.SIGNALING_ICE_SERVERS = []
    settings.SIGNALING_TURN_URLS = [coturn.url]
    settings.SIGNALING_TURN_SECRET = SECRET
    caller, callee = None, None
    try:
        caller, callee, message = await connect_pair(relay_only(ice_servers_for("relay-pair")), timeout=20)
        assert message == "hello over TURN"
        for pc in (caller, callee):
            assert candidate_types(pc.localDescription.sdp) == {"relay"}
            assert pc.connectionState == "connected"
    finally:
        for pc in (caller, callee):
            if pc is not None:
                await pc.close()
    # coturn bound a channel for this user: the data went through the relay.
    await asyncio.to_thread(coturn.wait_for_log, ":relay-pair>: incoming packet CHANNEL_BIND processed, success")


async def test_a_relay_only_pair_cannot_connect_with_an_altered_credential(coturn):
    turn_username, credential = turn_credentials("alice", SECRET, ttl=600)
    config = relay_only(turn_entry(coturn, turn_username, credential[:-4] + "AAA="))
    caller = RTCPeerConnection(config)
    try:
        caller.createDataChannel("chat")
        await caller.setLocalDescription(await caller.createOffer())
        # Without a TURN allocation there is no relay candidate, so nothing to connect over.
        assert candidate_types(caller.localDescription.sdp) == set()
    finally:
        await caller.close()


async def allocate(coturn: Coturn, username: str, credential: str) -> tuple[str, int]:
    """Make one TURN allocation (RFC 8656 long-term credentials); return the relayed address."""
    transport, _ = await create_turn_endpoint(
        asyncio.DatagramProtocol, ("127.0.0.1", coturn.port), username=username, password=credential
    )
    try:
        return transport.get_extra_info("sockname")
    finally:
        transport.close()


async def allocation_error(coturn: Coturn, username: str, credential: str) -> int:
    with pytest.raises(stun.TransactionFailed) as failed:
        await allocate(coturn, username, credential)
    return failed.value.response.attributes["ERROR-CODE"][0]


async def test_coturn_allocates_a_relay_for_issued_credentials(coturn):
    turn_username, credential = turn_credentials("alice", SECRET, ttl=600)
    host, port = await allocate(coturn, turn_username, credential)
    assert host == "127.0.0.1" and port > 0


async def test_coturn_refuses_expired_credentials(coturn):
    turn_username, credential = turn_credentials("alice", SECRET, ttl=600, now=time.time() - 3600)
    assert await allocation_error(coturn, turn_username, credential) == 401


@pytest.mark.parametrize("alteration", ["other_secret", "later_expiry", "other_user", "flipped_credential"])
async def test_coturn_refuses_altered_credentials(coturn, alteration):
    turn_username, credential = turn_credentials("alice", SECRET, ttl=600)
    expiry, _, user = turn_username.partition(":")
    match alteration:
        case "other_secret":
            turn_username, credential = turn_credentials("alice", "not-the-secret", ttl=600)
        case "later_expiry":
            turn_username = f"{int(expiry) + 86400}:{user}"
        case "other_user":
            turn_username = f"{expiry}:mallory"
        case "flipped_credential":
            credential = ("B" if credential[0] == "A" else "A") + credential[1:]
    assert await allocation_error(coturn, turn_username, credential) == 401
