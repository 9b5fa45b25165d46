"""Events: what the server sent (and what the client itself noticed), as typed objects.

`parse_event` turns one decoded server message into an event. It never raises for a
message it does not know: unknown types become `UnknownEvent`, so a newer server's
additions reach the application instead of breaking the client. Missing optional
fields (a v1 server sends no `call_id`) become None or an empty value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event; `raw` is the message as the server sent it ({} for local events)."""

    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class User:
    username: str
    user_id: str


@dataclass(frozen=True, slots=True)
class ResumedCall:
    """A call that survived a resume: its id, the other party and its status."""

    call_id: str
    peer_username: str
    status: str


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    call_id: str
    caller_username: str
    callee_username: str
    status: str
    end_reason: str | None
    started_at: str | None
    answered_at: str | None
    ended_at: str | None
    duration_s: float | None


# --- Server -> client -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registered(Event):
    """The server accepted the registration; on a resume `resumed` is true and `calls` lists the live calls."""

    username: str
    user_id: str
    ice_servers: tuple[Mapping[str, Any], ...] = ()
    resume_token: str | None = None
    resumed: bool = False
    calls: tuple[ResumedCall, ...] = ()
    device_id: str | None = None
    # The server's Web Push application key (base64url), when it sends Web Push.
    vapid_public_key: str | None = None


@dataclass(frozen=True, slots=True)
class OnlineUsers(Event):
    users: tuple[User, ...]
    timestamp: str | None = None


@dataclass(frozen=True, slots=True)
class Presence(Event):
    """Who came online and who went offline in one broadcast window ("delta" presence and watch lists).

    `snapshot`: the whole picture of the users it covers (after `registered`:
    everyone followed; in answer to `watch`: the users just added). The client
    also delivers one `UserOnline`/`UserOffline` per user of each frame.
    """

    online: tuple[User, ...]
    offline: tuple[User, ...]
    snapshot: bool = False


@dataclass(frozen=True, slots=True)
class UserOnline(Event):
    username: str
    user_id: str


@dataclass(frozen=True, slots=True)
class UserOffline(Event):
    username: str
    user_id: str


@dataclass(frozen=True, slots=True)
class IncomingCall(Event):
    caller_username: str
    caller_id: str
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class CallRinging(Event):
    """The call this client requested rings at the other party; `push` when it rings a device woken by a push."""

    call_id: str
    target_username: str
    push: bool = False


@dataclass(frozen=True, slots=True)
class CallAccepted(Event):
    accepter_username: str
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class CallRejected(Event):
    """The other party refused the call; `reason` is "rejected" or "busy"."""

    rejecter_username: str
    call_id: str | None = None
    reason: str = "rejected"


@dataclass(frozen=True, slots=True)
class CallEnded(Event):
    """A call ended: hangup, cancelled, timeout, disconnected, rejected or answered_elsewhere.

    The client also raises this itself (with an empty `raw`) for calls lost when a
    session could not be resumed.
    """

    from_username: str
    call_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Signal(Event):
    """Base of the relayed WebRTC messages; `data` is what the other party sent."""

    from_username: str
    data: Mapping[str, Any]
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class Offer(Signal):
    pass


@dataclass(frozen=True, slots=True)
class Answer(Signal):
    pass


@dataclass(frozen=True, slots=True)
class IceCandidate(Signal):
    pass


@dataclass(frozen=True, slots=True)
class CallHistory(Event):
    calls: tuple[HistoryEntry, ...]


@dataclass(frozen=True, slots=True)
class PushSubscribed(Event):
    """The server stored a push subscription for this user (the reply to `subscribe_push`)."""

    subscription_id: str


@dataclass(frozen=True, slots=True)
class PushUnsubscribed(Event):
    """The server removed a push subscription (the reply to `unsubscribe_push`)."""

    subscription_id: str


@dataclass(frozen=True, slots=True)
class Pong(Event):
    server_time: str | None = None


@dataclass(frozen=True, slots=True)
class Error(Event):
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class PeerReconnecting(Event):
    """The other party of a call lost its connection; the server holds the call while it comes back."""

    username: str
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class PeerReconnected(Event):
    username: str
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class UnknownEvent(Event):
    """A message type this client version does not know; read it from `raw`."""

    type: str


# --- Raised by the client itself ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Reconnecting(Event):
    """The socket dropped; the next attempt starts after `delay` seconds."""

    attempt: int
    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class Reconnected(Event):
    """Registered again after a drop; `resumed` tells whether the old session (and its calls) survived."""

    resumed: bool


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The client stopped for good: `close()` was called or the server refused it for good."""

    reason: str


# --- Parsing ----------------------------------------------------------------


def _str(message: Mapping[str, Any], name: str) -> str:
    value = message.get(name)
    return value if isinstance(value, str) else ""


def _opt_str(message: Mapping[str, Any], name: str) -> str | None:
    value = message.get(name)
    return value if isinstance(value, str) else None


def _dicts(message: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    value = message.get(name)
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _registered(m: Mapping[str, Any]) -> Registered:
    return Registered(
        username=_str(m, "username"),
        user_id=_str(m, "user_id"),
        ice_servers=tuple(_dicts(m, "ice_servers")),
        resume_token=_opt_str(m, "resume_token"),
        resumed=m.get("resumed") is True,
        calls=tuple(
            ResumedCall(_str(c, "call_id"), _str(c, "peer_username"), _str(c, "status")) for c in _dicts(m, "calls")
        ),
        device_id=_opt_str(m, "device_id"),
        vapid_public_key=_opt_str(m, "vapid_public_key"),
        raw=m,
    )


def _signal(kind: type[Signal]) -> Callable[[Mapping[str, Any]], Signal]:
    def parse(m: Mapping[str, Any]) -> Signal:
        data = m.get("data")
        return kind(
            from_username=_str(m, "from_username"),
            data=data if isinstance(data, dict) else {},
            call_id=_opt_str(m, "call_id"),
            raw=m,
        )

    return parse


def _history_entry(c: Mapping[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        call_id=_str(c, "call_id"),
        caller_username=_str(c, "caller_username"),
        callee_username=_str(c, "callee_username"),
        status=_str(c, "status"),
        end_reason=_opt_str(c, "end_reason"),
        started_at=_opt_str(c, "started_at"),
        answered_at=_opt_str(c, "answered_at"),
        ended_at=_opt_str(c, "ended_at"),
        duration_s=_number(c.get("duration_s")),
    )


_PARSERS: dict[str, Callable[[Mapping[str, Any]], Event]] = {
    "registered": _registered,
    "online_users": lambda m: OnlineUsers(
        users=tuple(User(_str(u, "username"), _str(u, "user_id")) for u in _dicts(m, "users")),
        timestamp=_opt_str(m, "timestamp"),
        raw=m,
    ),
    "presence": lambda m: Presence(
        online=tuple(User(_str(u, "username"), _str(u, "user_id")) for u in _dicts(m, "online")),
        offline=tuple(User(_str(u, "username"), _str(u, "user_id")) for u in _dicts(m, "offline")),
        snapshot=m.get("snapshot") is True,
        raw=m,
    ),
    "incoming_call": lambda m: IncomingCall(
        _str(m, "caller_username"), _str(m, "caller_id"), _opt_str(m, "call_id"), raw=m
    ),
    "call_ringing": lambda m: CallRinging(_str(m, "call_id"), _str(m, "target_username"), m.get("push") is True, raw=m),
    "call_accepted": lambda m: CallAccepted(_str(m, "accepter_username"), _opt_str(m, "call_id"), raw=m),
    "call_rejected": lambda m: CallRejected(
        _str(m, "rejecter_username"), _opt_str(m, "call_id"), _opt_str(m, "reason") or "rejected", raw=m
    ),
    "call_ended": lambda m: CallEnded(_str(m, "from_username"), _opt_str(m, "call_id"), _opt_str(m, "reason"), raw=m),
    "offer": _signal(Offer),
    "answer": _signal(Answer),
    "ice_candidate": _signal(IceCandidate),
    "call_history": lambda m: CallHistory(tuple(_history_entry(c) for c in _dicts(m, "calls")), raw=m),
    "push_subscribed": lambda m: PushSubscribed(_str(m, "subscription_id"), raw=m),
    "push_unsubscribed": lambda m: PushUnsubscribed(_str(m, "subscription_id"), raw=m),
    "pong": lambda m: Pong(_opt_str(m, "server_time"), raw=m),
    "error": lambda m: Error(_str(m, "code"), _str(m, "message"), raw=m),
    "peer_reconnecting": lambda m: PeerReconnecting(_str(m, "username"), _opt_str(m, "call_id"), raw=m),
    "peer_reconnected": lambda m: PeerReconnected(_str(m, "username"), _opt_str(m, "call_id"), raw=m),
}


def parse_event(message: Mapping[str, Any]) -> Event:
    """Turn one decoded server message into an event; unknown types become UnknownEvent."""
    kind = message.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        return UnknownEvent(type=kind if isinstance(kind, str) else "", raw=message)
    return parser(message)
