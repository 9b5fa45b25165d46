"""Covers the JavaScript client (clients/js) by running its own tests, `node --test`, from pytest.

The node tests start their own daphne processes with bin/serve, on this Python
(`TEST_SERVER_PYTHON`), and drive them with the client on the `ws` package, which
`npm ci` installs from clients/js/package-lock.json when it is missing. Without node
or npm the test is skipped, except in CI, where that fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from calls.testing.services import in_ci

ROOT = Path(__file__).resolve().parents[3]
JS_CLIENT = ROOT / "clients" / "js"
NODE_MAJOR_MIN = 20
# The node suite takes about 15 s on 2 shared cores; the rest is headroom for a loaded machine.
NODE_TIMEOUT_S = 240


def require(name: str) -> str:
    """Return the path of a tool; skip without it, except in CI, where that fails."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: the JavaScript client's tests need node >= {NODE_MAJOR_MIN} and npm"
        if in_ci():
            pytest.fail(f"{message} (CI=true: tests are never skipped for a missing component)")
        pytest.skip(message)
    return path


def test_the_javascript_client_passes_its_node_tests() -> None:
    node = require("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    major = re.match(r"v(\d+)\.", version)
    assert major and int(major.group(1)) >= NODE_MAJOR_MIN, f"node {version} is too old: need >= {NODE_MAJOR_MIN}"
    if not (JS_CLIENT / "node_modules" / "ws").is_dir():
        npm = require("npm")
        installed = subprocess.run(
            [npm, "ci", "--prefix", str(JS_CLIENT), "--ignore-scripts", "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT_S,
        )
        assert installed.returncode == 0, f"npm ci failed:\n{installed.stdout}\n{installed.stderr}"

    tests = sorted(str(path.relative_to(ROOT)) for path in (JS_CLIENT / "test").glob("*.test.js"))
    assert tests, "no clients/js/test/*.test.js"
    result = subprocess.run(
        [node, "--test", "--test-reporter=spec", *tests],
        cwd=ROOT,
        env={**os.environ, "TEST_SERVER_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
    )
    assert result.returncode == 0, f"node --test failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
