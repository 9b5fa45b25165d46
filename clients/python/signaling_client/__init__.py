"""asyncio client for the WebRTC call signaling server.

async with SignalingClient("ws://127.0.0.1:8765/", "alice", "alice-id") as client:
    call_id = await client.call("bob")
    async for event in client.events():
        ...
"""

from __future__ import annotations

from signaling_client.book import CallInfo
from signaling_client.client import SignalingClient
from signaling_client.errors import (
    CallFailed,
    ClientClosedError,
    NotConnectedError,
    RegistrationError,
    SignalingError,
)
from signaling_client.events import (
    Answer,
    CallAccepted,
    CallEnded,
    CallHistory,
    CallRejected,
    CallRinging,
    Closed,
    Error,
    Event,
    HistoryEntry,
    IceCandidate,
    IncomingCall,
    Offer,
    OnlineUsers,
    PeerReconnected,
    PeerReconnecting,
    Pong,
    Presence,
    PushSubscribed,
    PushUnsubscribed,
    Reconnected,
    Reconnecting,
    Registered,
    ResumedCall,
    Signal,
    UnknownEvent,
    User,
    UserOffline,
    UserOnline,
    parse_event,
)

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "CallAccepted",
    "CallEnded",
    "CallFailed",
    "CallHistory",
    "CallInfo",
    "CallRejected",
    "CallRinging",
    "ClientClosedError",
    "Closed",
    "Error",
    "Event",
    "HistoryEntry",
    "IceCandidate",
    "IncomingCall",
    "NotConnectedError",
    "Offer",
    "OnlineUsers",
    "PeerReconnected",
    "PeerReconnecting",
    "Pong",
    "PushSubscribed",
    "PushUnsubscribed",
    "Reconnected",
    "Reconnecting",
    "Registered",
    "RegistrationError",
    "ResumedCall",
    "Signal",
    "SignalingClient",
    "SignalingError",
    "UnknownEvent",
    "User",
    "UserOffline",
    "Presence",
    "UserOnline",
    "parse_event",
]
