"""Settings for bench/layer_choice.py: the project's, with the layer's Redis socket timeout
set from BENCH_REDIS_SOCKET_TIMEOUT (to compare the core layer with and without it)."""

from __future__ import annotations

import os

from signaling_project.settings import *  # noqa: F403
from signaling_project.settings import CHANNEL_LAYERS, REDIS_URL

_socket_timeout = os.environ.get("BENCH_REDIS_SOCKET_TIMEOUT")
if REDIS_URL and _socket_timeout:
    CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [{"address": REDIS_URL, "socket_timeout": float(_socket_timeout)}]
