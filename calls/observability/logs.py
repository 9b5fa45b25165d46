"""Log records as single lines: logfmt by default, JSON lines with SIGNALING_LOG_FORMAT=json.

A line is `ts=... level=... logger=... msg="..."`, then every field passed with
`extra=` in the order given, then `exc=` when there is a traceback or stack:

    ts=2026-11-26T01:02:03.456Z level=info logger=calls.callflow.service msg="call started" call=3f2a... session=...

A logfmt value is written bare when it has no space, quote, backslash, `=` or
control character; otherwise it is quoted and escaped as a JSON string literal,
so a newline in a value (or a whole traceback) never starts a new line. None is
`null`, booleans are `true`/`false`. In JSON mode each line is one object with the
same keys; non-JSON values become strings.

Safety net, `RedactFilter` (on the handler in settings.LOGGING): on records at INFO
and above, `extra=` fields named like a secret (a name with a `token`, `password`,
`sdp`, `data`, `authorization`, `secret`, `credential` or `candidate` part, split on
`_`, `-` and `.`) are replaced with "[redacted]", and any other field longer than
200 characters is cut to 200 and marked with "...". DEBUG records keep them whole.
The message itself and `exc` are left alone: call sites keep SDP and tokens out of
their messages, and a traceback is worth keeping whole.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=`.
STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
HEADER = ("ts", "level", "logger", "msg")

REDACTED = "[redacted]"
SECRET_PARTS = frozenset({"token", "password", "sdp", "data", "authorization", "secret", "credential", "candidate"})
MAX_VALUE_CHARS = 200

# Whitespace (Unicode line separators included), quotes, `=`, backslashes, control characters.
_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f]')
_TO_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
_NAME_PARTS = re.compile(r"[_.\-]")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\u{ord(char):04x}"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the line
        return f"<unprintable {type(value).__name__}>"


def logfmt_value(value: Any) -> str:
    """Return `value` as a logfmt value: bare if safe, else a quoted JSON string literal."""
    text = _text(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + _TO_ESCAPE.sub(_escape_char, text) + '"'


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Return the record's `extra=` fields, in the order they were given."""
    return {key: value for key, value in record.__dict__.items() if key not in STANDARD_ATTRS}


class LineFormatter(logging.Formatter):
    """Format a record as one logfmt line, or one JSON object when `output` is "json"."""

    def __init__(self, output: str = "logfmt") -> None:
        super().__init__()
        if output not in ("logfmt", "json"):
            raise ValueError(f"output must be logfmt or json, not {output!r}")
        self.json = output == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            key = _BAD_KEY_CHARS.sub("_", key) or "_"
            # An extra named like a header field must not overwrite it.
            fields[f"{key}_" if key in fields else key] = value
        exc = self._exception_text(record)
        if exc:
            fields["exc_" if "exc" in fields else "exc"] = exc
        if self.json:
            try:
                return json.dumps(fields, default=_text)
            except (TypeError, ValueError):  # e.g. a dict with tuple keys, or a cycle
                return json.dumps({key: _text(value) for key, value in fields.items()})
        return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items())

    def _exception_text(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        parts = [record.exc_text, record.stack_info and self.formatStack(record.stack_info)]
        return "\n".join(part for part in parts if part)


@functools.lru_cache(maxsize=512)
def is_secret_name(name: str) -> bool:
    """Whether a field name has a part (split on _ - .) that names a secret, e.g. resume_token."""
    return any(part in SECRET_PARTS for part in _NAME_PARTS.split(name.lower()))


class RedactFilter(logging.Filter):
    """At INFO and above, redact secret-named `extra=` fields and cut long ones; never drop a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True
        for key, value in extra_fields(record).items():
            if is_secret_name(key):
                setattr(record, key, REDACTED)
                continue
            if value is None or isinstance(value, bool | int | float):
                continue
            text = _text(value)
            if len(text) > MAX_VALUE_CHARS:
                setattr(record, key, text[:MAX_VALUE_CHARS] + "...")
        return True
