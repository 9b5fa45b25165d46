"""The exceptions the client raises."""

from __future__ import annotations


class SignalingError(Exception):
    """The server answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RegistrationError(SignalingError):
    """The server refused the registration (unauthorized, username_taken, ...)."""


class CallFailed(SignalingError):
    """A call request failed: code "busy", "user_offline", "already_in_call", ..."""


class NotConnectedError(RuntimeError):
    """The client has no registered connection right now."""


class ClientClosedError(RuntimeError):
    """The client was closed."""
