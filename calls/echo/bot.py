"""The echo bot's media side: answer every call and send the caller's own tracks back.

Each call gets its own RTCPeerConnection, configured with the ICE servers the
signaling server handed out at registration (never aiortc's default public STUN),
and its own worker task, so one call's offer is handled in order with its
candidates while other calls go on. Received tracks are sent back through a
MediaRelay. No SDP or candidate is logged at INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.sdp import candidate_from_sdp
from signaling_client import SignalingClient
from signaling_client import events as ev
from websockets.exceptions import InvalidHandshake

logger = logging.getLogger(__name__)


def rtc_ice_servers(ice_servers: Iterable[Mapping[str, Any]]) -> list[RTCIceServer]:
    """Convert the `ice_servers` of a `registered` message to aiortc's RTCIceServer list."""
    servers = []
    for server in ice_servers:
        urls = server.get("urls")
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not urls:
            logger.warning("ignored an ICE server without urls")
            continue
        servers.append(
            RTCIceServer(
                urls=[str(url) for url in urls], username=server.get("username"), credential=server.get("credential")
            )
        )
    return servers


def rtc_configuration(ice_servers: Iterable[Mapping[str, Any]]) -> RTCConfiguration:
    """An RTCConfiguration with exactly these ICE servers (an empty list, never aiortc's default)."""
    return RTCConfiguration(iceServers=rtc_ice_servers(ice_servers))


def candidate_from_wire(data: Mapping[str, Any]) -> RTCIceCandidate | None:
    """Parse a browser-style {candidate, sdpMid, sdpMLineIndex}; None for the end-of-candidates marker."""
    text = data.get("candidate")
    if not isinstance(text, str) or not text.strip():
        return None
    candidate = candidate_from_sdp(text.strip().removeprefix("a=").removeprefix("candidate:"))
    candidate.sdpMid = data.get("sdpMid")
    candidate.sdpMLineIndex = data.get("sdpMLineIndex")
    return candidate


def use_host_addresses(addresses: list[str]) -> None:
    """Gather ICE host candidates only on these local addresses (e.g. 127.0.0.1 on a test machine).

    aioice has no option for this; it normally offers every non-loopback address.
    """
    chosen = list(addresses)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(chosen)


@dataclass(eq=False)
class EchoCall:
    """One answered call: its peer connection and the signaling waiting for it, in order."""

    call_id: str
    caller: str
    pc: RTCPeerConnection
    relay: MediaRelay = field(default_factory=MediaRelay)
    inbox: asyncio.Queue[ev.Signal] = field(default_factory=asyncio.Queue)
    worker: asyncio.Task[None] | None = None
    candidates_early: list[RTCIceCandidate] = field(default_factory=list)


class EchoBot:
    """Answer every call on `client` and echo the caller's audio and video back."""

    def __init__(self, client: SignalingClient) -> None:
        self.client = client
        self.calls: dict[str, EchoCall] = {}

    async def run(self) -> None:
        """Handle the client's events until it closes, then end every call."""
        try:
            async for event in self.client.events():
                await self.handle(event)
        finally:
            await self.end_all()

    async def handle(self, event: ev.Event) -> None:
        match event:
            case ev.IncomingCall(call_id=str() as call_id):
                await self.answer_call(call_id, event.caller_username)
            case ev.Offer(call_id=str() as call_id) | ev.IceCandidate(call_id=str() as call_id) if (
                call_id in self.calls
            ):
                self.calls[call_id].inbox.put_nowait(event)
            case ev.CallEnded(call_id=str() as call_id) | ev.CallRejected(call_id=str() as call_id):
                await self.close_call(call_id, event.reason or "ended")

    async def answer_call(self, call_id: str, caller: str) -> None:
        pc = RTCPeerConnection(rtc_configuration(self.client.ice_servers))
        call = EchoCall(call_id, caller, pc)
        self.calls[call_id] = call

        @pc.on("track")
        def echo_track(track: MediaStreamTrack) -> None:
            pc.addTrack(call.relay.subscribe(track, buffered=track.kind != "video"))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            logger.debug("media connection state", extra={"call": call_id, "state": pc.connectionState})
            if pc.connectionState == "failed" and call_id in self.calls:
                logger.info("media connection failed; hanging up", extra={"call": call_id, "caller": caller})
                await self.client.hang_up(call_id)
                await self.close_call(call_id, "media failed")

        call.worker = asyncio.create_task(self._work(call), name=f"echo call {call_id}")
        await self.client.accept(call_id)
        logger.info("echo call started", extra={"call": call_id, "caller": caller})

    async def _work(self, call: EchoCall) -> None:
        while True:
            signal = await call.inbox.get()
            try:
                if isinstance(signal, ev.Offer):
                    await self._answer_offer(call, signal.data)
                else:
                    await self._add_candidate(call, signal.data)
            except Exception:
                logger.exception("signal not handled", extra={"call": call.call_id, "signal": type(signal).__name__})

    async def _answer_offer(self, call: EchoCall, data: Mapping[str, Any]) -> None:
        await call.pc.setRemoteDescription(RTCSessionDescription(sdp=data["sdp"], type=data["type"]))
        for candidate in call.candidates_early:
            await call.pc.addIceCandidate(candidate)
        call.candidates_early.clear()
        await call.pc.setLocalDescription(await call.pc.createAnswer())
        local = call.pc.localDescription
        await self.client.send_answer(call.call_id, {"type": local.type, "sdp": local.sdp})
        logger.debug("offer answered", extra={"call": call.call_id})

    async def _add_candidate(self, call: EchoCall, data: Mapping[str, Any]) -> None:
        candidate = candidate_from_wire(data)
        if candidate is None:
            return
        if call.pc.remoteDescription is None:
            call.candidates_early.append(candidate)
        else:
            await call.pc.addIceCandidate(candidate)

    async def close_call(self, call_id: str, reason: str) -> None:
        """Stop echoing one call and free its peer connection."""
        call = self.calls.pop(call_id, None)
        if call is None:
            return
        if call.worker is not None:
            call.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call.worker
        await call.pc.close()
        logger.info("echo call ended", extra={"call": call_id, "caller": call.caller, "reason": reason})

    async def end_all(self) -> None:
        """Hang up every call (when the signaling connection is still up) and close them."""
        for call_id in list(self.calls):
            if self.client.connected:
                with contextlib.suppress(Exception):
                    await self.client.hang_up(call_id)
            await self.close_call(call_id, "bot stopped")


async def run_echo_bot(
    url: str, username: str, user_id: str, token: str | None = None, stop: asyncio.Event | None = None
) -> None:
    """Register as `username` and echo every call until `stop` is set (or forever).

    A server that cannot be reached yet is retried with backoff; a refused
    registration raises RegistrationError.
    """
    stop = stop or asyncio.Event()
    client = SignalingClient(url, username, user_id, token=token)
    delay = 1.0
    while True:
        try:
            await client.connect()
            break
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            logger.warning(
                "echo bot cannot reach the server; retrying",
                extra={"url": url, "error": type(exc).__name__, "detail": str(exc), "retry_in_s": delay},
            )
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return
        except TimeoutError:
            delay = min(delay * 2, 30.0)
    logger.info("echo bot registered", extra={"user": username, "url": url})
    bot = EchoBot(client)
    runner = asyncio.create_task(bot.run())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([runner, stopper], return_when=asyncio.FIRST_COMPLETED)
        await bot.end_all()
    finally:
        stopper.cancel()
        await client.close()
        await runner
