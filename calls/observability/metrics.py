"""Prometheus metrics: the metric objects and the one-line functions the server calls.

The consumer and the call service call the functions below (never the metric
objects), so a label value can only be one of a known, bounded set: anything a
client controls is folded into "other". Calls by status are not counted here:
`CallStatusCollector` (calls/http/ops.py) reads them from the database when
/metrics is scraped.

Metrics are per process; with several daphne processes, scrape each one.
"""

from __future__ import annotations

import logging
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from calls.wire import protocol

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

OTHER = "other"
INVALID = "invalid"
INBOUND_TYPES = frozenset(
    {
        protocol.REGISTER,
        protocol.CALL_REQUEST,
        protocol.CALL_ACCEPTED,
        protocol.CALL_REJECTED,
        protocol.CALL_ENDED,
        protocol.OFFER,
        protocol.ANSWER,
        protocol.ICE_CANDIDATE,
        protocol.GET_CALL_HISTORY,
        protocol.PING,
    }
)
_MESSAGE_TYPE_BY_CLASS: dict[type, str] = {
    protocol.Register: protocol.REGISTER,
    protocol.CallRequest: protocol.CALL_REQUEST,
    protocol.CallEnd: protocol.CALL_ENDED,
    protocol.HistoryRequest: protocol.GET_CALL_HISTORY,
    protocol.Ping: protocol.PING,
}
_ERROR_CODE = re.compile(r"[a-z_]{1,40}")
PUSH_PLATFORMS = frozenset({"webpush", "fcm", "apns"})
# Call statuses and end reasons are the server's own words (calls/callflow/states.py).
_STATE_LABEL = re.compile(r"[a-z_]{1,20}")

CONNECTIONS = Gauge("signaling_connections", "Open WebSocket connections.", registry=REGISTRY)
CONNECTIONS_OPENED = Counter(
    "signaling_connections_opened", "WebSocket connections accepted since start.", registry=REGISTRY
)
REGISTERED_SESSIONS = Gauge(
    "signaling_registered_sessions", "Connections that registered a user and are still open.", registry=REGISTRY
)
REGISTRATIONS = Counter("signaling_registrations", "Successful registrations since start.", registry=REGISTRY)
ONLINE_USERS = Gauge(
    "signaling_online_users", "Users online on any process, as of the last presence broadcast.", registry=REGISTRY
)
MESSAGES_RECEIVED = Counter(
    "signaling_messages_received", "Frames received from clients, by message type.", ["type"], registry=REGISTRY
)
ERRORS_SENT = Counter("signaling_errors_sent", "Error messages sent to clients, by code.", ["code"], registry=REGISTRY)
PUSHES = Counter(
    "signaling_pushes",
    "Pushes to callees' devices, by platform and outcome (sent, gone, retry, failed).",
    ["platform", "outcome"],
    registry=REGISTRY,
)
CALL_TRANSITIONS = Counter(
    "signaling_call_transitions",
    "Calls entering a status, with the end reason (empty while the call is live).",
    ["status", "reason"],
    registry=REGISTRY,
)
HISTORY_BACKLOG = Gauge(
    "signaling_history_backlog",
    "Call transitions decided and not yet written to the database (calls/callflow/history.py).",
    registry=REGISTRY,
)
RELAY_SECONDS = Histogram(
    "signaling_relay_seconds",
    "Time from receiving an offer, answer or candidate to sending it to the other party.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)


def history_queued(count: int) -> None:
    HISTORY_BACKLOG.inc(count)


def history_written(count: int) -> None:
    HISTORY_BACKLOG.dec(count)


def connection_opened() -> None:
    CONNECTIONS.inc()
    CONNECTIONS_OPENED.inc()


def connection_closed() -> None:
    CONNECTIONS.dec()


def session_registered() -> None:
    REGISTERED_SESSIONS.inc()
    REGISTRATIONS.inc()


def session_closed() -> None:
    """A registered connection closed (call only for sessions counted by session_registered)."""
    REGISTERED_SESSIONS.dec()


def online_users(count: int) -> None:
    ONLINE_USERS.set(count)


def message_type(message: protocol.Message) -> str:
    """Return the wire type of a parsed inbound message."""
    kind = getattr(message, "type", None)
    return kind if isinstance(kind, str) else _MESSAGE_TYPE_BY_CLASS.get(type(message), OTHER)


def message_received(kind: str) -> None:
    """Count one inbound frame: its wire type, or "invalid" for a frame that did not parse."""
    MESSAGES_RECEIVED.labels(kind if kind in INBOUND_TYPES or kind == INVALID else OTHER).inc()


def push_sent(platform: str, outcome: str) -> None:
    PUSHES.labels(
        platform if platform in PUSH_PLATFORMS else OTHER, outcome if _STATE_LABEL.fullmatch(outcome) else OTHER
    ).inc()


def error_sent(code: str) -> None:
    ERRORS_SENT.labels(code if _ERROR_CODE.fullmatch(code) else OTHER).inc()


def call_transition(status: str, reason: str | None) -> None:
    """Count a call entering `status` (a new call too: ringing, or busy), with its end reason."""
    status_label = status if _STATE_LABEL.fullmatch(status) else OTHER
    reason_label = "" if reason is None else reason if _STATE_LABEL.fullmatch(reason) else OTHER
    CALL_TRANSITIONS.labels(status_label, reason_label).inc()


def observe_relay(seconds: float) -> None:
    RELAY_SECONDS.observe(max(0.0, seconds))
