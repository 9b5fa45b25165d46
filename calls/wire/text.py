"""What text the server accepts: the username rule, and values that can be sent on.

Pure code. Python's json accepts `"\\ud800"` (a lone surrogate, which no UTF-8
encoder takes), `NaN`, `Infinity` and `1e400`; relayed to a peer, the first
breaks its socket's encoder and the others are not JSON. Every inbound frame is
checked here before anything acts on it.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from calls.wire.errors import INVALID_MESSAGE, SignalingError

USERNAME_MAX = 64
# How deep a frame may nest (the message object is level 1, `data` level 2): an
# SDP or a candidate is flat; anything deeper is a client bug or an attack, and
# re-encoding it for the peer must never hit a recursion limit.
MAX_DEPTH = 16
# Values (objects, arrays, strings, numbers) one frame may hold, whatever its size.
MAX_NODES = 10_000


# Characters no username may hold: control (Cc), format (Cf: bidi overrides, zero-width
# joiners and spaces), surrogate (Cs), private use (Co), unassigned (Cn), and line or
# paragraph separators (Zl, Zp). Each lets two names look alike or a name hide text.
_BANNED_IN_USERNAMES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class InvalidUsername(ValueError):
    """A username the rule below refuses; the message says why."""


def normalize_username(value: str) -> str:
    """Return a username in its one written form (NFKC), or raise InvalidUsername.

    Look-alikes are refused or folded: compatibility forms (full-width letters,
    ligatures) become their plain letters, and characters that are invisible or
    reorder text are refused. Ownership also ignores case: see `username_key`.
    """
    name = unicodedata.normalize("NFKC", value)
    if not 1 <= len(name) <= USERNAME_MAX:
        raise InvalidUsername(f"must be 1 to {USERNAME_MAX} characters")
    if name != name.strip():
        raise InvalidUsername("must not start or end with spaces")
    if any(unicodedata.category(ch) in _BANNED_IN_USERNAMES for ch in name):
        raise InvalidUsername("must not contain control, format, surrogate or unassigned characters")
    return name


def username_key(username: str) -> str:
    """Return what two usernames are compared by: one owner per key (case and width ignored)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", username).casefold())


def check_values(obj: dict[str, Any]) -> None:
    """Refuse what could not be sent on: lone surrogates, non-finite numbers, deep nesting.

    Python's json accepts `"\\ud800"` (a lone surrogate, which no UTF-8 encoder
    takes), `NaN`, `Infinity` and `1e400`; relayed to a peer, the first breaks
    its socket's encoder and the others are not JSON. The error names the field.
    """
    nodes = 0
    # Each value with its depth and its trail: (the parent's trail, its key or index), the
    # path spelled out only for an error (formatting one per value cost more than the checks).
    stack: list[tuple[Any, int, tuple | None]] = [(obj, 1, None)]
    while stack:
        value, depth, trail = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise SignalingError(INVALID_MESSAGE, f"Message must hold at most {MAX_NODES} values")
        if isinstance(value, str):
            if not value.isascii():
                _check_text(value, trail)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise SignalingError(INVALID_MESSAGE, f"'{_path(trail)}' must be a finite number")
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise SignalingError(INVALID_MESSAGE, f"'{_path(trail)}' nests deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    if not key.isascii():
                        _check_text(key, (trail, key))
                    stack.append((item, depth + 1, (trail, key)))
            else:
                stack.extend((item, depth + 1, (trail, index)) for index, item in enumerate(value))


def _path(trail: tuple | None) -> str:
    """Spell out a trail: `data.a[0].b`."""
    parts: list[str] = []
    while trail is not None:
        trail, step = trail
        parts.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    return "".join(reversed(parts)).removeprefix(".")


def _check_text(value: str, trail: tuple | None) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = _path(trail).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:80]
        raise SignalingError(INVALID_MESSAGE, f"'{shown}' must be valid Unicode text (no lone surrogates)") from None


def field(obj: dict[str, Any], name: str, kind: type, required: bool = True) -> Any:
    """Return `obj[name]` if it is a `kind` (None when absent and not required); refuse it naming the field."""
    value = obj.get(name)
    if value is None:
        if required:
            raise SignalingError(INVALID_MESSAGE, f"'{name}' is required")
        return None
    # bool is an int subclass: never accept true/false where a number is meant.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SignalingError(INVALID_MESSAGE, f"'{name}' must be {KIND_NAMES[kind]}")
    return value


KIND_NAMES = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object"}


def text_field(obj: dict[str, Any], name: str, maximum: int, required: bool = True) -> str | None:
    """Return a string field of 1 to `maximum` characters without control characters."""
    value = field(obj, name, str, required)
    if value is None:
        return None
    if not 1 <= len(value) <= maximum:
        raise SignalingError(INVALID_MESSAGE, f"'{name}' must be 1 to {maximum} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise SignalingError(INVALID_MESSAGE, f"'{name}' must not contain control characters")
    return value
