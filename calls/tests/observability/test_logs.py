"""Covers calls.observability.logs: one line per record, logfmt or JSON, secrets redacted at INFO.

Checked in-process, through the settings in a fresh process, and on a real server.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import websockets

from calls.observability.logs import LineFormatter, RedactFilter
from calls.testing.servers import ROOT, daphne_server, server_env
from calls.tests.netclient import Peer, answered_call, connect_registered

# key=value, the value bare or a quoted JSON string literal; pairs separated by one space.
_PAIR = re.compile(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|[^\s"=\\]+)')


def parse_logfmt(line: str) -> dict[str, str]:
    """Parse one logfmt line, strictly: raise ValueError unless the whole line is key=value pairs."""
    fields: dict[str, str] = {}
    pos = 0
    while True:
        match = _PAIR.match(line, pos)
        if match is None:
            raise ValueError(f"not logfmt at {pos}: {line!r}")
        key, raw = match.groups()
        if key in fields:
            raise ValueError(f"{key} twice: {line!r}")
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
        pos = match.end()
        if pos == len(line):
            return fields
        if line[pos] != " ":
            raise ValueError(f"no space after {key}: {line!r}")
        pos += 1


def emit(
    level: int, msg: str, *args: Any, extra: dict[str, Any] | None = None, output: str = "logfmt", **kwargs: Any
) -> str:
    """Log one record through the formatter and filter settings.LOGGING uses; return what was written."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(output))
    handler.addFilter(RedactFilter())
    logger = logging.getLogger("calls.tests.logs")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.log(level, msg, *args, extra=extra, **kwargs)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text[:-1]


# --- The formatter ------------------------------------------------------------------


def test_values_with_newlines_quotes_and_equals_stay_on_one_line():
    text = emit(
        logging.INFO,
        'offer\nfrom "alice" a=b',
        extra={"session": "specific..inmemory!abc", "user": 'bob "the" = builder\r\nsecond line'},
    )
    fields = parse_logfmt(one_line(text))
    assert fields["msg"] == 'offer\nfrom "alice" a=b'
    assert fields["user"] == 'bob "the" = builder\r\nsecond line'
    assert "session=specific..inmemory!abc " in text  # safe values stay bare


def test_an_exception_and_its_traceback_are_one_escaped_exc_field():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        text = emit(logging.ERROR, "handling failed", extra={"call": "c1"}, exc_info=True)
    fields = parse_logfmt(one_line(text))
    assert list(fields) == ["ts", "level", "logger", "msg", "call", "exc"]
    assert fields["exc"].startswith("Traceback (most recent call last):\n")
    assert fields["exc"].endswith("ValueError: bad\nvalue")


def test_a_stack_is_one_exc_field_too():
    fields = parse_logfmt(one_line(emit(logging.WARNING, "where", stack_info=True)))
    assert fields["exc"].startswith("Stack (most recent call last):\n")


def test_logfmt_parses_back_to_the_same_fields_in_order():
    extra = {
        "session": "specific..inmemory!abc",
        "user": "Jürgen",
        "call": "3f2a0c1e-0000-4000-8000-000000000000",
        "reason": None,
        "resumed": True,
        "bytes": 1048576,
        "empty": "",
        "odd": "back\\slash\ttab\u2028sep\x00nul\x7fdel",
    }
    fields = parse_logfmt(one_line(emit(logging.INFO, "session %s registered", "s1", extra=extra)))
    assert list(fields) == ["ts", "level", "logger", "msg", *extra]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["ts"])
    assert (fields["level"], fields["logger"], fields["msg"]) == ("info", "calls.tests.logs", "session s1 registered")
    assert fields["reason"] == "null" and fields["resumed"] == "true" and fields["bytes"] == "1048576"
    assert {key: fields[key] for key in ("session", "user", "call", "empty", "odd")} == {
        key: extra[key] for key in ("session", "user", "call", "empty", "odd")
    }


def test_json_output_is_one_object_with_the_fields():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        text = emit(
            logging.ERROR,
            "line\nbreak",
            extra={"session": "s1", "call": "c1", "reason": None, "odd": "\u2028"},
            output="json",
            exc_info=True,
        )
    record = json.loads(one_line(text))
    assert list(record) == ["ts", "level", "logger", "msg", "session", "call", "reason", "odd", "exc"]
    assert record["msg"] == "line\nbreak" and record["level"] == "error"
    assert (record["session"], record["call"], record["reason"], record["odd"]) == ("s1", "c1", None, "\u2028")
    assert record["exc"].endswith("RuntimeError: boom")


def test_an_extra_named_like_a_header_field_does_not_replace_it():
    record = json.loads(emit(logging.INFO, "hello", extra={"level": "fake", "ts": "x"}, output="json"))
    assert (record["level"], record["level_"], record["ts_"]) == ("info", "fake", "x")


# --- The redaction filter -----------------------------------------------------------


def test_token_and_sdp_fields_are_redacted_at_info():
    extra = {"resume_token": "rt-secret", "sdp": "v=0 secret", "data": {"sdp": "v=0"}, "session": "s1"}
    text = emit(logging.INFO, "signal relayed", extra=extra)
    fields = parse_logfmt(one_line(text))
    assert (fields["resume_token"], fields["sdp"], fields["data"]) == ("[redacted]",) * 3
    assert fields["session"] == "s1"
    assert "secret" not in text and "v=0" not in text


def test_token_and_sdp_fields_are_kept_at_debug():
    text = emit(logging.DEBUG, "signal relayed", extra={"resume_token": "rt-secret", "sdp": "v=0 secret"})
    fields = parse_logfmt(one_line(text))
    assert (fields["resume_token"], fields["sdp"]) == ("rt-secret", "v=0 secret")


def test_long_values_are_cut_at_info():
    fields = parse_logfmt(one_line(emit(logging.WARNING, "failed", extra={"detail": "x" * 5000, "n": 10**300})))
    assert fields["detail"] == "x" * 200 + "..."
    assert fields["n"] == str(10**300)  # numbers are left whole


# --- Settings --------------------------------------------------------------------------


def log_through_settings(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Set Django up in a fresh process with `env` and log one INFO line on calls.check."""
    script = (
        "import django, logging; django.setup();"
        "logging.getLogger('calls.check').info('hello', extra={'session': 's1', 'sdp': 'v=0'})"
    )
    env = server_env(tmp_path, DJANGO_SETTINGS_MODULE="signaling_project.settings", **env)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)


def test_signaling_log_format_json_makes_the_console_write_json_lines(tmp_path):
    result = log_through_settings(tmp_path, SIGNALING_LOG_FORMAT="json")
    assert result.returncode == 0, result.stderr
    record = json.loads(one_line(result.stderr))
    assert {k: record[k] for k in ("level", "logger", "msg", "session", "sdp")} == {
        "level": "info",
        "logger": "calls.check",
        "msg": "hello",
        "session": "s1",
        "sdp": "[redacted]",
    }


def test_log_level_warning_leaves_info_lines_out(tmp_path):
    result = log_through_settings(tmp_path, LOG_LEVEL="warning")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_an_unknown_log_format_stops_start_up(tmp_path):
    result = log_through_settings(tmp_path, SIGNALING_LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "SIGNALING_LOG_FORMAT must be one of logfmt, json, not 'xml'" in result.stderr


# --- A real server ---------------------------------------------------------------------


async def test_a_real_server_logs_one_well_formed_line_per_event_and_no_sdp_or_token(tmp_path):
    marker = f"sdp-marker-{secrets.token_hex(8)}"
    stolen = f"resume-marker-{secrets.token_hex(8)}"
    with daphne_server(tmp_path) as server:
        alice, registered = await connect_registered(server.url, "alice", resume=True)
        token = registered["resume_token"]
        bob, _ = await connect_registered(server.url, "bob")
        call_id = await answered_call(alice, bob)
        offer = {"type": "offer", "sdp": f"v=0\r\no=- {marker} 2 IN IP4 127.0.0.1\r\ns=-\r\n"}
        await alice.send({"type": "offer", "target_username": "bob", "call_id": call_id, "data": offer})
        assert (await bob.expect("offer"))["data"] == offer
        answer = {"type": "answer", "sdp": f"v=0\r\no=- {marker} 3 IN IP4 127.0.0.1\r\n"}
        await bob.send({"type": "answer", "target_username": "alice", "call_id": call_id, "data": answer})
        await alice.expect("answer")

        thief = Peer(await websockets.connect(server.url), "mallory")
        await thief.send({"type": "register", "username": "mallory", "user_id": "m", "resume_token": stolen})
        await thief.expect_error("resume_failed")
        alice.ws.transport.abort()
        await bob.expect("peer_reconnecting")
        back, resumed = await connect_registered(server.url, "alice", resume_token=token)
        assert resumed["resumed"] is True
        assert (await bob.expect("peer_reconnected"))["call_id"] == call_id
        await back.send({"type": "call_ended", "call_id": call_id})
        await bob.expect("call_ended")
        for peer in (thief, back, bob):
            await peer.ws.close()
    logs = server.logs()

    assert marker not in logs
    assert token not in logs and stolen not in logs
    assert "--- Logging error ---" not in logs
    ours = [line for line in logs.splitlines() if "logger=calls." in line]
    parsed = [parse_logfmt(line) for line in ours]  # raises on a line that is not one whole logfmt record
    assert all(list(fields)[:4] == ["ts", "level", "logger", "msg"] for fields in parsed)
    sessions = {
        (f["msg"], f.get("user")) for f in parsed if f["logger"] in ("calls.realtime.consumer", "calls.realtime.resume")
    }
    assert {("session registered", "alice"), ("session registered", "bob"), ("session resumed", "alice")} <= sessions
    assert all(f["session"] for f in parsed if f["msg"].startswith("session "))
    lifecycle = [fields for fields in parsed if fields["logger"] == "calls.callflow.service"]
    assert [fields["msg"] for fields in lifecycle] == ["call started", "call transition", "call transition"]
    assert all(fields["call"] == call_id and fields["session"] for fields in lifecycle)
    assert [(f["old_status"], f["new_status"]) for f in lifecycle[1:]] == [
        ("ringing", "answered"),
        ("answered", "completed"),
    ]
