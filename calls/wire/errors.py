"""The one error type: a request the server refuses, with the code and message the client receives."""

from __future__ import annotations


class SignalingError(Exception):
    """A refusal; `code` (one of the codes in calls/wire/protocol.py) and `message` go back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
