"""The error codes a client can receive, and the one error type that carries them."""

from __future__ import annotations

# Error codes.
INVALID_JSON = "invalid_json"
INVALID_MESSAGE = "invalid_message"
UNKNOWN_TYPE = "unknown_type"
NOT_REGISTERED = "not_registered"
ALREADY_REGISTERED = "already_registered"
USER_OFFLINE_CODE = "user_offline"
NOT_IN_CALL = "not_in_call"
NOT_RINGING = "not_ringing"
ALREADY_IN_CALL = "already_in_call"
USERNAME_TAKEN = "username_taken"
UNAUTHORIZED = "unauthorized"
MESSAGE_TOO_LARGE = "message_too_large"
RATE_LIMITED = "rate_limited"
TOO_MANY_SESSIONS = "too_many_sessions"
TOO_MANY_CONNECTIONS = "too_many_connections"
CALL_RATE_LIMITED = "call_rate_limited"
RESUME_FAILED = "resume_failed"
RESUME_OVERFLOW = "resume_overflow"
INTERNAL_ERROR = "internal_error"
PUSH_UNAVAILABLE = "push_unavailable"
TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
UNKNOWN_SUBSCRIPTION = "unknown_subscription"
WATCH_LIMIT = "watch_limit"


class SignalingError(Exception):
    """A refusal; `code` (one of the codes above) and `message` go back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
