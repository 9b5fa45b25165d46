"""Refusing to run with dependency versions that code reaching into them was not tested with.

calls/realtime/redis_layer.py relies on channels-redis and redis-py internals,
calls/server/daphne.py patches daphne, autobahn and Twisted: each names the
versions it was written for, and start-up stops, naming them, on any other
(a release that renamed an attribute would otherwise break it silently).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from django.core.exceptions import ImproperlyConfigured


def installed_versions(names: list[str]) -> dict[str, str | None]:
    """The installed version of each package (None: not installed)."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def require_tested(tested: dict[str, str], installed: dict[str, str | None] | None, what: str, action: str) -> None:
    """Raise ImproperlyConfigured unless every package of `tested` is installed at its version.

    `what` says what relies on them ("calls/server/daphne.py patches"), `action`
    what to do before updating the pins ("check each patch against the new version").
    """
    if installed is None:
        installed = installed_versions(list(tested))
    wrong = sorted(name for name, found in installed.items() if found != tested[name])
    if wrong:
        found = ", ".join(f"{name} {installed[name] or 'missing'}" for name in wrong)
        expected = ", ".join(f"{name} {tested[name]}" for name in wrong)
        raise ImproperlyConfigured(
            f"{what} {expected}, but found {found}: install requirements.lock (make install), "
            f"or {action} and update TESTED_VERSIONS"
        )
