"""A session's calls: what its client asks of them, and what it hears of them.

`CallTable` is the collaborator a consumer keeps for the calls its session is
party to (`calls`, by call id), kept current by channel-layer events, so that
relaying offers, answers and candidates is a memory lookup and never touches
the database. Changes of a call's state go through the call service
(calls/callflow/service.py), which tells both parties.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from django.conf import settings

from calls.callflow.board import Actor, CallRecord
from calls.callflow.live import LiveCall
from calls.callflow.states import EndReason
from calls.observability import metrics
from calls.presence.base import SessionInfo
from calls.realtime.sessions import Services
from calls.wire import events, protocol
from calls.wire.errors import SignalingError
from calls.wire.text import username_key

logger = logging.getLogger(__name__)


class CallParty(Protocol):
    """What `CallTable` needs of the consumer it serves."""

    channel_name: str
    services: Services
    session: SessionInfo | None
    registered_at: Any

    def actor(self) -> Actor: ...
    async def send_json(self, content: dict[str, Any]) -> None: ...
    async def send_text(self, text: str) -> None: ...


class CallTable:
    """The calls of one session, by id."""

    def __init__(self, party: CallParty) -> None:
        self.party = party
        self.calls: dict[str, LiveCall] = {}

    def find(self, call_id: str | None, peer: str | None, *, ringing_for_me: bool = False) -> LiveCall | None:
        """Find one of this session's calls by id, or by the other party's username."""
        if call_id is not None:
            call = self.calls.get(call_id)
            if call is not None and peer is not None and call.peer_username != peer:
                return None
        else:
            call = next((c for c in reversed(self.calls.values()) if c.peer_username == peer), None)
        if call is not None and ringing_for_me and (call.is_caller or call.answered):
            return None
        return call

    async def send_to_peer(self, call: LiveCall, event: dict[str, Any]) -> None:
        """Send a layer event to the other party of a call: its session, or all its sessions."""
        sessions = self.party.services.sessions
        if call.peer_channel:
            await sessions.send(call.peer_channel, event)
        else:
            await sessions.send_to_user(call.peer_username, event)

    async def send_to_peers(self, event_for: Callable[[LiveCall], dict[str, Any]]) -> None:
        """Send each call's peer the event built for that call."""
        for call in list(self.calls.values()):
            await self.send_to_peer(call, event_for(call))

    # --- What the client asks ---------------------------------------------

    async def request(self, message: protocol.CallRequest) -> None:
        party = self.party
        services, me, target = party.services, party.session.username, message.target_username
        if username_key(target) == username_key(me):
            raise SignalingError(protocol.INVALID_MESSAGE, "You cannot call yourself")
        refusal = services.calls.limits.check(me, target)
        if refusal is not None:
            raise SignalingError(protocol.CALL_RATE_LIMITED, refusal)
        sessions = await services.store.sessions_of(target)
        if sessions:
            target = sessions[0].username  # as its owner writes it
        # No socket to ring (none, or only sessions held for a resume): wake a device by push.
        push = all(session.held for session in sessions) and await services.push.has_subscriptions(target)
        if not sessions and not push:
            raise SignalingError(protocol.USER_OFFLINE_CODE, f"{target} is not online")
        record = await services.calls.start(party.actor(), party.session.user_id, target, push=push)
        if record.end_reason == EndReason.BUSY:
            await party.send_json(protocol.call_rejected(target, record.call_id, EndReason.BUSY))
            return
        self.calls[record.call_id] = LiveCall(
            record.call_id, target, is_caller=True, caller_id=party.session.user_id, pushed=record.pushed
        )
        await party.send_json(protocol.call_ringing(record.call_id, target, pushed=record.pushed))

    async def accept(self, message: protocol.CallAnswer) -> None:
        call = self.find(message.call_id, message.caller_username, ringing_for_me=True)
        if call is None:
            raise SignalingError(protocol.NOT_RINGING, "That call is not ringing for you")
        record = await self.party.services.calls.accept(call.call_id, self.party.actor())
        call.answered = True
        call.peer_channel = record.caller_channel

    async def reject(self, message: protocol.CallAnswer) -> None:
        call = self.find(message.call_id, message.caller_username, ringing_for_me=True)
        if call is None:
            raise SignalingError(protocol.NOT_RINGING, "That call is not ringing for you")
        await self.party.services.calls.end(call.call_id, EndReason.REJECTED, self.party.actor())
        self.calls.pop(call.call_id, None)

    async def hang_up(self, message: protocol.CallEnd) -> None:
        call = self.find(message.call_id, message.target_username)
        if call is None:
            raise SignalingError(protocol.NOT_IN_CALL, "You are not in a call with that user")
        self.calls.pop(call.call_id, None)
        if await self.party.services.calls.end(call.call_id, EndReason.HANGUP, self.party.actor()) is None:
            # Not on the board (Redis lost its data, and the call is not written back yet):
            # the peer still learns of the hang-up from this session's view of the call.
            reason = (
                EndReason.HANGUP if call.answered else EndReason.CANCELLED if call.is_caller else EndReason.REJECTED
            )
            await self.send_to_peer(call, events.call_ended(call.call_id, reason))

    async def relay(self, message: protocol.Signal) -> None:
        call = self.find(message.call_id, message.target_username)
        if call is None:
            raise SignalingError(protocol.NOT_IN_CALL, f"You are not in a call with {message.target_username}")
        me = self.party.session.username
        event = events.call_signal(
            call.call_id, protocol.encode(protocol.signal(message.type, me, message.data, call.call_id))
        )
        # The hot path: a peer on this process gets the signal straight into its inbox,
        # without the layer, like every event sent to one session, so they keep their
        # order; a peer elsewhere gets it through the layer's next batch, not waited
        # for. Before the answer, signals go to every session of the callee as a
        # group send, through the layer.
        if call.peer_channel:
            await self.party.services.sessions.relay(call.peer_channel, event)
        else:
            await self.send_to_peer(call, event)

    async def send_history(self, message: protocol.HistoryRequest) -> None:
        party = self.party
        if settings.SIGNALING_AUTH == "token":
            session, since = None, None
        else:  # nothing proves this is who used the name before: only this session's calls
            session, since = party.channel_name, party.registered_at
        calls = await party.services.calls.history_of(party.session.username, message.limit, session, since)
        await party.send_json(protocol.call_history(calls))

    async def ring_waiting(self, ringing: list[CallRecord]) -> None:
        """A session just registered: ring it for the calls already ringing for its user (a device woken by push)."""
        for record in ringing:
            if record.call_id not in self.calls:
                await self.call_incoming(
                    events.call_incoming(
                        record.call_id, record.caller_username, record.caller_id, record.caller_channel
                    )
                )

    # --- What the session hears (channel-layer events) ------------------

    async def call_incoming(self, event: dict[str, Any]) -> None:
        if self.party.session is None:
            return
        call_id = event["call_id"]
        self.calls[call_id] = LiveCall(
            call_id,
            event["caller_username"],
            is_caller=False,
            peer_channel=event["caller_channel"],
            caller_id=event["caller_id"],
        )
        await self.party.send_json(protocol.incoming_call(event["caller_username"], event["caller_id"], call_id))

    async def call_accepted(self, event: dict[str, Any]) -> None:
        call = self.calls.get(event["call_id"])
        if call is None:
            return
        services = self.party.services
        services.calls.cancel_ring_timeout(call.call_id)
        services.calls.limits.answered(self.party.session.username, call.peer_username)
        call.answered = True
        call.peer_channel = event["accepter_channel"]
        await self.party.send_json(protocol.call_accepted(event["accepter_username"], call.call_id))

    async def call_answered_elsewhere(self, event: dict[str, Any]) -> None:
        if event["answered_channel"] == self.party.channel_name:
            return
        call = self.calls.pop(event["call_id"], None)
        if call is not None:
            await self.party.send_json(protocol.call_ended(call.peer_username, call.call_id, "answered_elsewhere"))

    async def call_rejected(self, event: dict[str, Any]) -> None:
        call = self.calls.pop(event["call_id"], None)
        if call is not None:
            await self.party.send_json(
                protocol.call_rejected(event["rejecter_username"], call.call_id, event["reason"])
            )

    async def call_ended(self, event: dict[str, Any]) -> None:
        call = self.calls.pop(event["call_id"], None)
        if call is not None:
            await self.party.send_json(protocol.call_ended(call.peer_username, call.call_id, event["reason"]))

    async def call_peer_reconnecting(self, event: dict[str, Any]) -> None:
        if event["call_id"] in self.calls:
            await self.party.send_json(protocol.peer_reconnecting(event["username"], event["call_id"]))

    async def call_peer_moved(self, event: dict[str, Any]) -> None:
        call = self.calls.get(event["call_id"])
        if call is None:
            return
        if call.peer_channel:
            call.peer_channel = event["channel"]
        await self.party.send_json(protocol.peer_reconnected(event["username"], call.call_id))

    async def call_signal(self, event: dict[str, Any]) -> None:
        if event["call_id"] in self.calls:
            metrics.observe_relay(time.time() - event["sent_at"])
            await self.party.send_text(event["text"])
