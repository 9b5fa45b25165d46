"""Where the server's time goes: py-spy samples under load, and per-message micro-costs.

`py-spy record --format raw` writes one line per distinct stack, root first,
frames separated by ";" and the sample count last. Shares are of the samples
py-spy took while the server was on CPU (idle waits are not sampled).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import timeit
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    """Return the py-spy executable (requirements-dev.lock pins it)."""
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: `make install-dev`")
    return found


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen:
    """Start sampling a process for `seconds` without pausing it."""
    args = [py_spy(), "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", str(rate)]
    args += ["--nonblocking", "--format", "raw", "-o", str(out)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _label(frame: str) -> tuple[str, str]:
    """Return (function with its file, area) for one frame."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "other"
    func, file = match["func"], match["file"]
    top = file.split("/", 1)[0] if "/" in file else file.removesuffix(".py")
    return f"{func} ({file})", top


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Top frames by own time and by inclusive time, and own time by package."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        labels = [_label(frame) for frame in stack.split(";")]
        total += count
        leaf, area = labels[-1]
        own[leaf] += count
        areas[area] += count
        for name in {name for name, _ in labels}:
            inclusive[name] += count

    def shares(counter: Counter[str], limit: int) -> list[dict[str, Any]]:
        return [{"frame": name, "share": round(n / total, 3)} for name, n in counter.most_common(limit)]

    return {
        "samples": total,
        "own": shares(own, top),
        "inclusive": shares(inclusive, 3 * top),
        "by_package": shares(areas, 12),
    }


def micro_costs() -> dict[str, float]:
    """Microseconds per call of the steps the relay path repeats for every message (no server)."""
    import copy
    import json

    from bench.loadgen import CANDIDATE
    from calls.wire import protocol

    inbound = json.dumps(
        {
            "type": "ice_candidate",
            "target_username": "bob",
            "call_id": "0b7f9f52-3f5e-4a49-9a8e-2b1c3d4e5f60",
            "data": CANDIDATE,
        }
    )
    message = protocol.parse_message(inbound)
    event = {"type": "call.signal", "call_id": message.call_id, "text": inbound}
    text = protocol.encode(protocol.signal(message.type, "alice", message.data, message.call_id))
    encoded = text.encode()
    deflate = zlib.compressobj(wbits=-15)  # permessage-deflate's raw deflate, context kept between frames

    def deflate_frame() -> bytes:
        return deflate.compress(encoded) + deflate.flush(zlib.Z_SYNC_FLUSH)

    steps = {
        "parse_message": lambda: protocol.parse_message(inbound),
        "encode_outbound": lambda: protocol.encode(protocol.signal(message.type, "alice", message.data, "x")),
        "json_loads_only": lambda: json.loads(inbound),
        "utf8_length_check": lambda: len(inbound.encode()),
        "deepcopy_layer_event": lambda: copy.deepcopy(event),
        "utf8_encode_outbound": lambda: text.encode("utf8"),
        "deflate_outbound_frame": deflate_frame,
    }
    costs = {}
    for name, step in steps.items():
        runs, seconds = timeit.Timer(step).autorange()
        costs[name] = round(seconds / runs * 1e6, 2)
    return costs
