"""Channel-layer events: the messages processes and sessions send each other, never a client.

Channels dispatches a layer event to the consumer method named after its
`type` (`call.signal` -> `call_signal`), so every type is one of the constants
below, set by the server: a client's `type` never becomes one. Each builder
returns a plain dict (the layer serialises it with msgpack between processes).
"""

from __future__ import annotations

import time
from typing import Any

# Calls: from one party's session (or the server) to the other's.
CALL_INCOMING = "call.incoming"
CALL_ACCEPTED = "call.accepted"
CALL_ANSWERED_ELSEWHERE = "call.answered_elsewhere"
CALL_REJECTED = "call.rejected"
CALL_ENDED = "call.ended"
CALL_PEER_RECONNECTING = "call.peer_reconnecting"
CALL_PEER_MOVED = "call.peer_moved"
CALL_SIGNAL = "call.signal"

# Sessions: resume, liveness and shutdown.
SESSION_RESUME = "session.resume"
SESSION_REFUSED = "session.refused"
SESSION_HANDOVER = "session.handover"
SESSION_EXPIRE = "session.expire"
SESSION_PROBE = "session.probe"
SESSION_PROBE_REPLY = "session.probe_reply"
SESSION_PROBE_RESULT = "session.probe_result"
SERVER_DRAIN = "server.drain"

# Processes: to each process's own channel.
PRESENCE_CHANGED = "presence.changed"
RUNTIME_PROBE = "runtime.probe"


def call_incoming(call_id: str, caller_username: str, caller_id: str, caller_channel: str) -> dict[str, Any]:
    return {
        "type": CALL_INCOMING,
        "call_id": call_id,
        "caller_username": caller_username,
        "caller_id": caller_id,
        "caller_channel": caller_channel,
    }


def call_accepted(call_id: str, accepter_username: str, accepter_channel: str) -> dict[str, Any]:
    return {
        "type": CALL_ACCEPTED,
        "call_id": call_id,
        "accepter_username": accepter_username,
        "accepter_channel": accepter_channel,
    }


def call_answered_elsewhere(call_id: str, answered_channel: str) -> dict[str, Any]:
    return {"type": CALL_ANSWERED_ELSEWHERE, "call_id": call_id, "answered_channel": answered_channel}


def call_rejected(call_id: str, rejecter_username: str, reason: str) -> dict[str, Any]:
    return {"type": CALL_REJECTED, "call_id": call_id, "rejecter_username": rejecter_username, "reason": reason}


def call_ended(call_id: str, reason: str) -> dict[str, Any]:
    return {"type": CALL_ENDED, "call_id": call_id, "reason": reason}


def call_peer_reconnecting(call_id: str, username: str) -> dict[str, Any]:
    return {"type": CALL_PEER_RECONNECTING, "call_id": call_id, "username": username}


def call_peer_moved(call_id: str, username: str, channel: str) -> dict[str, Any]:
    return {"type": CALL_PEER_MOVED, "call_id": call_id, "username": username, "channel": channel}


def call_signal(call_id: str, text: str) -> dict[str, Any]:
    """A signal for the peer, already encoded as the frame it receives; `sent_at` for the relay metric."""
    return {"type": CALL_SIGNAL, "call_id": call_id, "text": text, "sent_at": time.time()}


def session_resume(nonce: str, reply_to: str) -> dict[str, Any]:
    return {"type": SESSION_RESUME, "nonce": nonce, "reply_to": reply_to}


def session_refused() -> dict[str, Any]:
    return {"type": SESSION_REFUSED}


def session_handover(
    old_channel: str,
    username: str,
    user_id: str,
    device_id: str,
    calls: list[dict[str, Any]],
    queued: list[dict[str, Any]],
    dropped: int,
    presence: str,
    watch: list[str],
) -> dict[str, Any]:
    """A session given to a new socket: its calls, and what was queued for it while it had none."""
    return {
        "type": SESSION_HANDOVER,
        "old_channel": old_channel,
        "username": username,
        "user_id": user_id,
        "device_id": device_id,
        "calls": calls,
        "queued": queued,
        "dropped": dropped,
        "presence": presence,
        "watch": watch,
    }


def session_expire(code: int) -> dict[str, Any]:
    return {"type": SESSION_EXPIRE, "code": code}


def session_probe(token: str, reply_to: str) -> dict[str, Any]:
    return {"type": SESSION_PROBE, "token": token, "reply_to": reply_to}


def session_probe_reply(token: str, alive: bool) -> dict[str, Any]:
    return {"type": SESSION_PROBE_REPLY, "token": token, "alive": alive}


def session_probe_result(probe: dict[str, Any], alive: bool) -> dict[str, Any]:
    """What a session's own ping found, posted to itself with the probe it answers."""
    return {**probe, "type": SESSION_PROBE_RESULT, "alive": alive}


def server_drain(carry: bool) -> dict[str, Any]:
    return {"type": SERVER_DRAIN, "carry": carry}


def presence_changed(origin: str) -> dict[str, Any]:
    return {"type": PRESENCE_CHANGED, "origin": origin}


def runtime_probe(token: str) -> dict[str, Any]:
    return {"type": RUNTIME_PROBE, "token": token}
