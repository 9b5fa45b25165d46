"""The wire protocol: parse inbound frames and build outbound messages.

Pure code: no ORM, no I/O. Every inbound frame becomes one of the message
dataclasses below or raises `SignalingError` with the code the client receives.
Field names are the v1 protocol's; everything added since is optional.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from calls.wire import presence as presence_wire
from calls.wire import push
from calls.wire.errors import (  # noqa: F401 - the error codes are part of the protocol's names
    ALREADY_IN_CALL,
    ALREADY_REGISTERED,
    CALL_RATE_LIMITED,
    INTERNAL_ERROR,
    INVALID_JSON,
    INVALID_MESSAGE,
    MESSAGE_TOO_LARGE,
    NOT_IN_CALL,
    NOT_REGISTERED,
    NOT_RINGING,
    PUSH_UNAVAILABLE,
    RATE_LIMITED,
    RESUME_FAILED,
    RESUME_OVERFLOW,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_SESSIONS,
    TOO_MANY_SUBSCRIPTIONS,
    UNAUTHORIZED,
    UNKNOWN_SUBSCRIPTION,
    UNKNOWN_TYPE,
    USER_OFFLINE_CODE,
    USERNAME_TAKEN,
    WATCH_LIMIT,
    SignalingError,
)
from calls.wire.text import InvalidUsername, check_values, field, normalize_username, text_field

# Client -> server message types.
REGISTER = "register"
CALL_REQUEST = "call_request"
CALL_ACCEPTED = "call_accepted"
CALL_REJECTED = "call_rejected"
CALL_ENDED = "call_ended"
OFFER = "offer"
ANSWER = "answer"
ICE_CANDIDATE = "ice_candidate"
GET_CALL_HISTORY = "get_call_history"
PING = "ping"

SIGNAL_TYPES = frozenset({OFFER, ANSWER, ICE_CANDIDATE})

# Server -> client message types (besides the echoed call_* and signal types).
REGISTERED = "registered"
ONLINE_USERS = "online_users"
INCOMING_CALL = "incoming_call"
CALL_RINGING = "call_ringing"
CALL_HISTORY = "call_history"
PEER_RECONNECTING = "peer_reconnecting"
PEER_RECONNECTED = "peer_reconnected"
PONG = "pong"
ERROR = "error"

# WebSocket close code that tells a client to reconnect: on a shutdown (to another
# process), or when its session cannot be listed again after the presence store
# lost it (its username went to someone else meanwhile).
CLOSE_SERVICE_RESTART = 1012

USER_ID_MAX = 128
DEVICE_ID_MAX = 128
TOKEN_MAX = 4096
HISTORY_DEFAULT_LIMIT = 20
HISTORY_MAX_LIMIT = 100
PRESENCE_MODES = ("full", "delta")


@dataclass(frozen=True, slots=True)
class Register:
    username: str
    user_id: str
    token: str | None = None
    device_id: str | None = None
    presence: str = "full"
    # Usernames to follow instead of everyone (None: no watch list).
    watch: tuple[str, ...] | None = None
    resume: bool = False
    resume_token: str | None = None


@dataclass(frozen=True, slots=True)
class CallRequest:
    target_username: str


@dataclass(frozen=True, slots=True)
class CallAnswer:
    """`call_accepted` or `call_rejected` from the callee."""

    type: str
    caller_username: str | None
    call_id: str | None


@dataclass(frozen=True, slots=True)
class CallEnd:
    target_username: str | None
    call_id: str | None


@dataclass(frozen=True, slots=True)
class Signal:
    """`offer`, `answer` or `ice_candidate` for the other party of a call."""

    type: str
    target_username: str
    data: dict[str, Any]
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    limit: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


Message = (
    Register
    | CallRequest
    | CallAnswer
    | CallEnd
    | Signal
    | HistoryRequest
    | Ping
    | push.PushSubscribe
    | push.PushUnsubscribe
    | presence_wire.Watch
)


def _username(obj: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = field(obj, name, str, required)
    if value is None:
        return None
    try:
        return normalize_username(value)
    except InvalidUsername as exc:
        raise SignalingError(INVALID_MESSAGE, f"'{name}' {exc}") from None


def _call_id(obj: dict[str, Any]) -> str | None:
    value = field(obj, "call_id", str, required=False)
    if value is None:
        return None
    try:
        return str(UUID(value))
    except ValueError:
        raise SignalingError(INVALID_MESSAGE, "'call_id' must be a UUID") from None


def parse_message(text: str) -> Message:
    """Parse one inbound text frame into a message, or raise SignalingError."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise SignalingError(INVALID_JSON, "Message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise SignalingError(INVALID_MESSAGE, "Message must be a JSON object")
    check_values(obj)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise SignalingError(INVALID_MESSAGE, "'type' is required and must be a string")
    parser = _PARSERS.get(kind)
    if parser is None:
        shown = kind if len(kind) <= 40 else kind[:40] + "..."
        raise SignalingError(UNKNOWN_TYPE, f"Unknown message type {shown!r}")
    return parser(obj)


def _parse_register(obj: dict[str, Any]) -> Register:
    presence = field(obj, "presence", str, required=False) or "full"
    if presence not in PRESENCE_MODES:
        raise SignalingError(INVALID_MESSAGE, "'presence' must be 'full' or 'delta'")
    return Register(
        username=_username(obj, "username"),
        user_id=text_field(obj, "user_id", USER_ID_MAX),
        token=text_field(obj, "token", TOKEN_MAX, required=False),
        device_id=text_field(obj, "device_id", DEVICE_ID_MAX, required=False),
        presence=presence,
        watch=presence_wire.usernames(obj, "watch", presence_wire.WATCH_FRAME_MAX),
        resume=bool(field(obj, "resume", bool, required=False)),
        resume_token=text_field(obj, "resume_token", TOKEN_MAX, required=False),
    )


def _parse_call_request(obj: dict[str, Any]) -> CallRequest:
    return CallRequest(target_username=_username(obj, "target_username"))


def _parse_call_answer(obj: dict[str, Any]) -> CallAnswer:
    call_id = _call_id(obj)
    caller = _username(obj, "caller_username", required=call_id is None)
    return CallAnswer(type=obj["type"], caller_username=caller, call_id=call_id)


def _parse_call_end(obj: dict[str, Any]) -> CallEnd:
    call_id = _call_id(obj)
    target = _username(obj, "target_username", required=call_id is None)
    return CallEnd(target_username=target, call_id=call_id)


def _parse_signal(obj: dict[str, Any]) -> Signal:
    return Signal(
        type=obj["type"],
        target_username=_username(obj, "target_username"),
        data=field(obj, "data", dict),
        call_id=_call_id(obj),
    )


def _parse_history(obj: dict[str, Any]) -> HistoryRequest:
    limit = field(obj, "limit", int, required=False)
    if limit is None:
        limit = HISTORY_DEFAULT_LIMIT
    if not 1 <= limit <= HISTORY_MAX_LIMIT:
        raise SignalingError(INVALID_MESSAGE, f"'limit' must be 1 to {HISTORY_MAX_LIMIT}")
    return HistoryRequest(limit=limit)


_PARSERS = {
    REGISTER: _parse_register,
    CALL_REQUEST: _parse_call_request,
    CALL_ACCEPTED: _parse_call_answer,
    CALL_REJECTED: _parse_call_answer,
    CALL_ENDED: _parse_call_end,
    OFFER: _parse_signal,
    ANSWER: _parse_signal,
    ICE_CANDIDATE: _parse_signal,
    GET_CALL_HISTORY: _parse_history,
    PING: lambda obj: Ping(),
    push.PUSH_SUBSCRIBE: push.parse_subscribe,
    push.PUSH_UNSUBSCRIBE: push.parse_unsubscribe,
    presence_wire.WATCH: presence_wire.parse_watch,
}


# --- Outbound -------------------------------------------------------------


def encode(message: dict[str, Any]) -> str:
    """Encode an outbound message compactly."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def utc_timestamp(moment: datetime | None = None) -> str:
    """Return an ISO 8601 UTC timestamp, e.g. 2026-11-25T14:30:00.123456+00:00."""
    return (moment or datetime.now(UTC)).isoformat()


def error(code: str, message: str) -> dict[str, Any]:
    return {"type": ERROR, "code": code, "message": message}


def online_users(users: list[dict[str, str]]) -> dict[str, Any]:
    return {"type": ONLINE_USERS, "users": users, "timestamp": utc_timestamp()}


def signal(kind: str, from_username: str, data: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"type": kind, "from_username": from_username, "data": data, "call_id": call_id}


def call_ended(from_username: str, call_id: str, reason: str) -> dict[str, Any]:
    return {"type": CALL_ENDED, "from_username": from_username, "call_id": call_id, "reason": reason}


def call_rejected(rejecter_username: str, call_id: str, reason: str) -> dict[str, Any]:
    return {"type": CALL_REJECTED, "rejecter_username": rejecter_username, "call_id": call_id, "reason": reason}


def call_accepted(accepter_username: str, call_id: str) -> dict[str, Any]:
    return {"type": CALL_ACCEPTED, "accepter_username": accepter_username, "call_id": call_id}


def incoming_call(caller_username: str, caller_id: str, call_id: str) -> dict[str, Any]:
    return {"type": INCOMING_CALL, "caller_username": caller_username, "caller_id": caller_id, "call_id": call_id}


def call_ringing(call_id: str, target_username: str, pushed: bool = False) -> dict[str, Any]:
    """The caller's notice that the call rings; `push` when the callee is being woken by a push."""
    message = {"type": CALL_RINGING, "call_id": call_id, "target_username": target_username}
    if pushed:
        message["push"] = True
    return message


def peer_reconnecting(username: str, call_id: str) -> dict[str, Any]:
    return {"type": PEER_RECONNECTING, "username": username, "call_id": call_id}


def peer_reconnected(username: str, call_id: str) -> dict[str, Any]:
    return {"type": PEER_RECONNECTED, "username": username, "call_id": call_id}


def call_history(calls: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": CALL_HISTORY, "calls": calls}


def pong() -> dict[str, Any]:
    return {"type": PONG, "server_time": utc_timestamp()}
