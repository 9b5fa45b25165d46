"""Covers calls.server.daphne: the patches of daphne, autobahn and Twisted, seen from a client of a real daphne.

Each patch shows where a client stands: the close codes it gets on the wire, the
frames refused before the application runs. The version check runs alone.
"""

from __future__ import annotations

import json

import pytest
import websockets
from django.core.exceptions import ImproperlyConfigured

from calls.server.daphne import TESTED_VERSIONS, check_versions
from calls.testing.servers import daphne_server
from calls.tests.netclient import close_code, expect_error, send, still_answers


def test_the_versions_the_patches_were_written_for_pass_the_check():
    check_versions(dict(TESTED_VERSIONS))


@pytest.mark.parametrize(("package", "found"), [("daphne", "4.3.0"), ("autobahn", None), ("twisted", "24.3.0")])
def test_another_version_or_a_missing_package_stops_start_up_naming_both(package, found):
    with pytest.raises(ImproperlyConfigured) as refused:
        check_versions({**TESTED_VERSIONS, package: found})
    expected = f"patches {package} {TESTED_VERSIONS[package]}, but found {package} {found or 'missing'}"
    assert expected in str(refused.value)


async def test_a_socket_that_never_registers_is_closed_with_1008_on_the_wire(tmp_path):
    # autobahn refuses application close codes other than 1000 and 3000-4999, and daphne
    # then drops the connection without a close frame; the server sends 1008 itself.
    with daphne_server(tmp_path, SIGNALING_REGISTER_TIMEOUT="0.3") as server:
        async with websockets.connect(server.url) as ws:
            assert await close_code(ws) == 1008


async def test_a_one_mebibyte_frame_never_reaches_the_app(tmp_path):
    with daphne_server(tmp_path) as server:
        ws = await websockets.connect(server.url, max_size=None)
        try:
            await send(ws, {"type": "ping", "padding": "x" * (100 * 1024)})
            await expect_error(ws, "message_too_large")
            # daphne cuts the connection (1009, or a plain drop) before the app runs:
            # the app would have answered message_too_large and kept the socket open.
            with pytest.raises((websockets.ConnectionClosed, ConnectionResetError)) as closed:
                await ws.send(json.dumps({"type": "ping", "padding": "x" * (1024 * 1024)}))
                await ws.recv()
            rcvd = getattr(closed.value, "rcvd", None)
            assert rcvd is None or rcvd.code == 1009
        finally:
            ws.transport.abort()
        async with websockets.connect(server.url) as ws:
            await still_answers(ws)
