"""Covers the layout of calls/ itself: layers whose dependencies point one way, modules that import alone.

The layers are those of docs/architecture.md. Every import counts,
`TYPE_CHECKING` and function-level ones included: a lower layer that needs a
higher one gets it handed in (an interface, a callback), never imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "calls"

# Lowest first: a module may import from its own layer and the ones before it.
LAYERS: list[tuple[str, ...]] = [
    ("calls.wire",),
    ("calls.observability",),
    ("calls.callflow", "calls.models", "calls.migrations"),
    ("calls.push",),
    ("calls.presence",),
    ("calls.realtime",),
    ("calls.process",),
    ("calls.server", "calls.http", "calls.echo", "calls.admin", "calls.apps", "calls.management", "calls.testing"),
]
# A module past this many lines is asking to be split along a line a reader would recognise.
MAX_MODULE_LINES = 420


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and to docs/architecture.md")


def app_modules() -> dict[str, Path]:
    """Every module of the app but its tests, by dotted name."""
    modules = {}
    for path in sorted(APP.rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        if relative.parts[1] == "tests":
            continue
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """Every `calls.*` module this one imports, anywhere in the file, with its line."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
            found.append((base, node.lineno))
    return [(name, line) for name, line in found if name == "calls" or name.startswith("calls.")]


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The app module an imported name belongs to (`calls.wire.protocol.encode` -> `calls.wire.protocol`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_every_import_points_to_the_same_layer_or_a_lower_one():
    modules = app_modules()
    upward = []
    for module, path in modules.items():
        if module == "calls":
            continue
        for name, line in imports_of(module, path):
            target = resolve(name, modules)
            if target in (None, "calls"):
                continue
            if layer_of(target) > layer_of(module):
                upward.append(f"{path.relative_to(ROOT)}:{line} {module} -> {target}")
    assert upward == [], "imports from a higher layer:\n" + "\n".join(upward)


def test_the_app_never_imports_its_tests():
    modules = app_modules()
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for module, path in modules.items()
        for name, line in imports_of(module, path)
        if name == "calls.tests" or name.startswith("calls.tests.")
    ]
    assert offenders == []


def test_no_module_is_past_the_size_that_asks_for_a_split():
    long = {
        str(path.relative_to(ROOT)): lines
        for path in app_modules().values()
        if "migrations" not in path.parts and (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """No module depends on another having been imported first (a cycle hidden by import order)."""
    modules = [m for m in app_modules() if ".migrations" not in m]

    def import_alone(module: str) -> tuple[str, int, str]:
        code = (
            "import os, django; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'signaling_project.settings'); "
            f"django.setup(); import {module}"
        )
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return module, result.returncode, result.stderr[-600:]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [(m, err) for m, code, err in pool.map(import_alone, modules) if code != 0]
    assert failures == []


# --- The tests mirror the packages ------------------------------------------------------------

TESTS = APP / "tests"
# Suites that exercise the whole server across modules, and so mirror no one package.
WHOLE_SERVER = "system"


def suite_files() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def test_every_test_folder_is_a_package_of_the_app_or_the_whole_server():
    folders = {path.name for path in TESTS.iterdir() if path.is_dir() and path.name != "__pycache__"}
    packages = {path.name for path in APP.iterdir() if (path / "__init__.py").exists() and path.name != "tests"}
    assert folders - packages == {WHOLE_SERVER}
    assert all((TESTS / folder / "__init__.py").exists() for folder in folders)


def test_every_test_file_names_what_it_covers_in_its_first_line():
    unnamed = [
        str(path.relative_to(ROOT))
        for path in suite_files()
        if not (ast.get_docstring(ast.parse(path.read_text())) or "").startswith("Covers ")
    ]
    assert unnamed == []


def test_no_test_module_imports_another():
    """Shared helpers live in calls/tests/wsclient.py, calls/tests/netclient.py and the one conftest."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line} {name}"
        for path in [*suite_files(), *TESTS.glob("*.py")]
        for name, line in imports_of("calls.tests." + path.stem, path)
        if any(part.startswith(("test_", "conftest")) for part in name.split(".")[2:])
    ]
    assert offenders == []
