"""Covers calls.echo.bot (`manage.py echo_bot`): aiortc callers through a real daphne process get their media back.

Each caller sends video frames that carry a frame counter drawn as big black and
white blocks (they survive VP8) plus a 500 Hz tone, and checks that what comes
back decodes to counters it sent and to sound rather than silence. Every peer
connection uses 127.0.0.1 only and no STUN/TURN server.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import math
import sys
import time
from array import array

import aioice.ice
import av
import pytest
import signaling_client as sc
from aioice import stun
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError

from calls.echo.bot import candidate_from_wire, rtc_configuration, rtc_ice_servers
from calls.testing.servers import ROOT, daphne_server
from calls.tests.netclient import Recorder, call_row, until_online

WIDTH, HEIGHT = 320, 240
GRID = 4  # 4 x 4 cells: 12 counter bits and a 4-bit checksum
SAMPLE_RATE = 48000
AUDIO_SAMPLES = 960  # 20 ms
TONE = array("h", (int(9000 * math.sin(2 * math.pi * 500 * n / SAMPLE_RATE)) for n in range(AUDIO_SAMPLES)))
FRAMES_WANTED = 30
TIMEOUT = 30


# --- Media with recognisable content ---------------------------------------------


def counter_bits(counter: int) -> list[int]:
    value = counter % 4096
    checksum = ((value & 0xF) + (value >> 4 & 0xF) + (value >> 8)) % 16
    word = value << 4 | checksum
    return [word >> (15 - i) & 1 for i in range(16)]


def counter_frame(counter: int) -> av.VideoFrame:
    """A yuv420p frame whose luma shows `counter` as a 4 x 4 grid of black/white cells."""
    frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
    luma = frame.planes[0]
    bits = counter_bits(counter)
    cell_w, cell_h = WIDTH // GRID, HEIGHT // GRID
    rows = []
    for y in range(HEIGHT):
        row = bytearray()
        for col in range(GRID):
            row += bytes([235 if bits[(y // cell_h) * GRID + col] else 16]) * cell_w
        row += bytes(luma.line_size - WIDTH)
        rows.append(bytes(row))
    luma.update(b"".join(rows))
    for chroma in frame.planes[1:]:
        chroma.update(bytes([128]) * chroma.buffer_size)
    return frame


def decode_counter(frame: av.VideoFrame) -> int | None:
    """The counter a received frame shows, or None when its checksum does not hold."""
    gray = frame.reformat(width=WIDTH, height=HEIGHT, format="gray")
    plane = gray.planes[0]
    pixels = bytes(plane)
    cell_w, cell_h = WIDTH // GRID, HEIGHT // GRID
    word = 0
    for cell in range(GRID * GRID):
        cx = (cell % GRID) * cell_w + cell_w // 2
        cy = (cell // GRID) * cell_h + cell_h // 2
        samples = [pixels[y * plane.line_size + x] for y in range(cy - 8, cy + 8, 4) for x in range(cx - 8, cx + 8, 4)]
        word = word << 1 | (sum(samples) / len(samples) > 128)
    value, checksum = word >> 4, word & 0xF
    return value if ((value & 0xF) + (value >> 4 & 0xF) + (value >> 8)) % 16 == checksum else None


class CounterTrack(VideoStreamTrack):
    """Video whose n-th frame shows first + n."""

    def __init__(self, first: int = 0) -> None:
        super().__init__()
        self.first = first
        self.sent = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = counter_frame(self.first + self.sent)
        self.sent += 1
        frame.pts, frame.time_base = pts, time_base
        return frame


class ToneTrack(MediaStreamTrack):
    """A 500 Hz tone in 20 ms frames, paced in real time as a microphone would be."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.start: float | None = None
        self.timestamp = 0

    async def recv(self) -> av.AudioFrame:
        if self.start is None:
            self.start = time.monotonic()
        else:
            self.timestamp += AUDIO_SAMPLES
            await asyncio.sleep(max(0.0, self.start + self.timestamp / SAMPLE_RATE - time.monotonic()))
        frame = av.AudioFrame(format="s16", layout="mono", samples=AUDIO_SAMPLES)
        frame.planes[0].update(TONE.tobytes())
        frame.sample_rate = SAMPLE_RATE
        frame.pts, frame.time_base = self.timestamp, fractions.Fraction(1, SAMPLE_RATE)
        return frame


def loudness(frame: av.AudioFrame) -> float:
    samples = array("h", bytes(frame.planes[0])[: frame.samples * 2 * len(frame.layout.channels)])
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))


class Returned:
    """What comes back from the bot: decoded counters, loud audio frames, and whether the tracks ended."""

    def __init__(self) -> None:
        self.counters: list[int] = []
        self.garbled = 0
        self.loud_audio_frames = 0
        self.ended: set[str] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()

    def consume(self, track: MediaStreamTrack) -> None:
        self.tasks.append(asyncio.ensure_future(self._read(track)))

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    counter = await asyncio.to_thread(decode_counter, frame)
                    if counter is None:
                        self.garbled += 1
                    else:
                        self.counters.append(counter)
                elif loudness(frame) > 1000:
                    self.loud_audio_frames += 1
                self.changed.set()
        except MediaStreamError:
            self.ended.add(track.kind)
            self.changed.set()

    async def until(self, condition, timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


class StunResponder(asyncio.DatagramProtocol):
    """A STUN server on 127.0.0.1 that answers Binding requests and counts them."""

    def __init__(self) -> None:
        self.requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = stun.parse_message(data)
        self.requests += 1
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=request.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = addr
        self.transport.sendto(bytes(response), addr)


# --- Fixtures -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _loopback_ice(monkeypatch):
    """This test's own aiortc peers offer 127.0.0.1 only (the bot is told with --ice-address)."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


class BotProcess:
    """`manage.py echo_bot` as a child process; its log lines are read as they come."""

    def __init__(self, server, username: str = "echo") -> None:
        self.server = server
        self.username = username
        self.lines: list[str] = []
        self.changed = asyncio.Event()

    async def __aenter__(self) -> BotProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "manage.py",
            "echo_bot",
            *("--url", self.server.url, "--username", self.username, "--ice-address", "127.0.0.1"),
            cwd=ROOT,
            env=self.server.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace").rstrip())
            self.changed.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def wait_for_line(self, text: str, timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                self.changed.clear()
                await self.changed.wait()

    async def __aexit__(self, *exc_info: object) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(15):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self.reader


def split_candidates(sdp: str) -> tuple[str, list[dict[str, object]]]:
    """Take the candidates out of an SDP, as browser-style trickle messages."""
    lines, candidates, index, mid = [], [], -1, None
    for line in sdp.splitlines():
        if line.startswith("m="):
            index, mid = index + 1, None
        elif line.startswith("a=mid:"):
            mid = line.removeprefix("a=mid:")
        if line.startswith("a=candidate:"):
            candidates.append({"candidate": line.removeprefix("a="), "sdpMid": mid, "sdpMLineIndex": index})
        elif line != "a=end-of-candidates":
            lines.append(line)
    return "\r\n".join(lines) + "\r\n", candidates


async def echo_call(
    url: str,
    username: str,
    first_counter: int = 0,
    together: asyncio.Barrier | None = None,
    trickle: bool = False,
) -> tuple[str, Returned, CounterTrack]:
    """Call the echo bot as `username`, wait for the echo, hang up; return the call id and what came back.

    With `together`, every caller waits there with its echo flowing before anyone hangs up.
    With `trickle`, the offer goes without candidates and they follow one by one, as from a browser.
    """
    client = sc.SignalingClient(url, username, f"id-{username}")
    events = Recorder(client)
    await client.connect()
    await until_online(events, "echo")
    call_id = await client.call("echo")
    await events.expect(sc.CallAccepted, call_id=call_id, accepter_username="echo")

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    video = CounterTrack(first_counter)
    pc.addTrack(video)
    pc.addTrack(ToneTrack())
    returned = Returned()
    pc.on("track", returned.consume)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        sdp, candidates = pc.localDescription.sdp, []
        if trickle:
            sdp, candidates = split_candidates(sdp)
            assert candidates and "a=candidate" not in sdp
            candidates.append({"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0})  # end of candidates
        await client.send_offer(call_id, {"type": "offer", "sdp": sdp})
        for candidate in candidates:
            await client.send_ice_candidate(call_id, candidate)
        answer = await events.expect(sc.Answer, call_id=call_id, timeout=TIMEOUT)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.data["sdp"], type=answer.data["type"]))
        await returned.until(lambda: len(returned.counters) >= FRAMES_WANTED and returned.loud_audio_frames >= 10)

        if together is not None:
            await asyncio.wait_for(together.wait(), TIMEOUT)
        await client.hang_up(call_id)
        # Our own peer connection is still open: the tracks end because the bot closed its side.
        await returned.until(lambda: returned.ended == {"audio", "video"})
    finally:
        await pc.close()
        await client.close()
    return call_id, returned, video


def assert_echoed(returned: Returned, video: CounterTrack) -> None:
    assert len(returned.counters) >= FRAMES_WANTED
    sent = range(video.first, video.first + video.sent)
    assert all(counter in sent for counter in returned.counters), (sent, returned.counters)
    assert returned.counters == sorted(returned.counters), "frames come back in the order sent"
    assert len(set(returned.counters)) >= FRAMES_WANTED // 2
    assert returned.garbled <= len(returned.counters) // 10, f"{returned.garbled} garbled frames"


# --- Tests ------------------------------------------------------------------------


def test_counter_frames_decode_to_their_counter():
    for counter in (0, 1, 7, 100, 2047, 4095):
        assert decode_counter(counter_frame(counter)) == counter


def test_ice_servers_from_registered_become_the_bots_rtc_configuration():
    servers = [
        {"urls": "stun:127.0.0.1:3478"},
        {
            "urls": ["turn:127.0.0.1:3478?transport=udp", "turns:127.0.0.1:5349"],
            "username": "1:echo",
            "credential": "c",
        },
        {"username": "no-urls"},
    ]
    config = rtc_configuration(servers)
    assert [(s.urls, s.username, s.credential) for s in config.iceServers] == [
        (["stun:127.0.0.1:3478"], None, None),
        (["turn:127.0.0.1:3478?transport=udp", "turns:127.0.0.1:5349"], "1:echo", "c"),
    ]
    assert rtc_configuration([]).iceServers == [], "no ICE servers must mean none, not aiortc's public default"
    assert rtc_ice_servers(()) == []


def test_browser_candidates_parse_for_aiortc():
    candidate = candidate_from_wire(
        {
            "candidate": "candidate:842163049 1 udp 1677729535 127.0.0.1 50123 typ host",
            "sdpMid": "0",
            "sdpMLineIndex": 0,
        }
    )
    assert (candidate.ip, candidate.port, candidate.type, candidate.sdpMid) == ("127.0.0.1", 50123, "host", "0")
    assert candidate_from_wire({"candidate": "", "sdpMid": "0"}) is None


async def test_the_echo_bot_sends_a_callers_video_and_audio_back(tmp_path):
    # The server hands out a (local) STUN server: the bot must use it, and nothing else.
    transport, stun_server = await asyncio.get_running_loop().create_datagram_endpoint(
        StunResponder, local_addr=("127.0.0.1", 0)
    )
    ice_servers = json.dumps([{"urls": f"stun:127.0.0.1:{transport.get_extra_info('sockname')[1]}"}])
    try:
        with daphne_server(tmp_path, SIGNALING_PRESENCE_WINDOW_MS="20", SIGNALING_ICE_SERVERS=ice_servers) as server:
            async with BotProcess(server) as bot:
                call_id, returned, video = await echo_call(server.url, "caller", trickle=True)
                await bot.wait_for_line(f'msg="echo call ended" call={call_id} caller=caller reason=hangup')
            assert bot.proc.returncode == 0, bot.log
    finally:
        transport.close()
    assert stun_server.requests >= 1, "the bot's peer connection must use the ICE servers from registered"
    assert_echoed(returned, video)
    assert call_row(server, call_id) == ("completed", "hangup")
    assert f'msg="echo call started" call={call_id} caller=caller' in bot.log
    assert "v=0" not in bot.log and "candidate:" not in bot.log, "no SDP or candidates in the bot's log"
    assert 'msg="signal not handled"' not in bot.log and "level=error" not in bot.log, bot.log


async def test_two_simultaneous_callers_each_get_their_own_echo(tmp_path):
    together = asyncio.Barrier(2)
    # The echo user takes several calls at once; everyone else stays one call at a time.
    with daphne_server(tmp_path, SIGNALING_PRESENCE_WINDOW_MS="20", SIGNALING_MULTI_CALL_USERS="echo") as server:
        async with BotProcess(server) as bot:
            (first_id, first, first_video), (second_id, second, second_video) = await asyncio.gather(
                echo_call(server.url, "caller-a", 0, together), echo_call(server.url, "caller-b", 2000, together)
            )
            await bot.wait_for_line(f'msg="echo call ended" call={first_id} caller=caller-a reason=hangup')
            await bot.wait_for_line(f'msg="echo call ended" call={second_id} caller=caller-b reason=hangup')
    assert first_id != second_id
    assert_echoed(first, first_video)
    assert_echoed(second, second_video)
    assert call_row(server, first_id) == ("completed", "hangup")
    assert call_row(server, second_id) == ("completed", "hangup")
    # Each caller got its own frames back, not the other's (their counters are 2000 apart).
    assert max(first.counters) < 2000 <= min(second.counters)
    events = [line for line in bot.lines if 'msg="echo call started"' in line or 'msg="echo call ended"' in line]
    assert [('msg="echo call started"' in line) for line in events] == [True, True, False, False], events
