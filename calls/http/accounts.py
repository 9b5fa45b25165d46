"""Accounts for teams without their own backend: sign-up, and tokens for a password.

Failed logins (here and at the admin) are counted per username and client address,
and per client address, in the cache; never per username alone, so nobody
elsewhere can lock an account's owner out. Sign-ups are counted per address.
Password checks run in one of a few slots (calls/throttle.py), off the thread
that does the WebSocket side's database work.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Q

from calls.http.throttle import Busy, Window, password_checks
from calls.realtime.security import mint_token
from calls.wire.errors import SignalingError
from calls.wire.text import InvalidUsername, normalize_username, username_key

logger = logging.getLogger(__name__)

# Five guesses per account from one address; twenty from one address in all
# (mobile carriers put many users behind one address, so not fewer).
FAILURE_WINDOW_S = 15 * 60
LOGIN_FAILURES_PER_USER_AND_ADDRESS = Window("login-failures:user-address", 5, FAILURE_WINDOW_S)
LOGIN_FAILURES_PER_ADDRESS = Window("login-failures:address", 20, FAILURE_WINDOW_S)
SIGNUPS_PER_ADDRESS = Window("signups:address", 10, 60 * 60)
BUSY_RETRY_AFTER_S = 1


class AccountError(SignalingError):
    """A refused account request: `code`, `status` and `retry_after` go back in the HTTP response."""

    def __init__(self, code: str, message: str, status: int, retry_after: int | None = None) -> None:
        super().__init__(code, message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: datetime


def _busy() -> AccountError:
    return AccountError("busy", "Too many logins at once; try again in a second", 503, BUSY_RETRY_AFTER_S)


@contextmanager
def password_check_slot() -> Iterator[None]:
    """Hold a password-check slot for a sync block; raise AccountError (503 busy) when none is free."""
    try:
        with password_checks.slot():
            yield
    except Busy:
        raise _busy() from None


def check_login_allowed(username: str, address: str) -> None:
    """Raise AccountError (429) if this address failed too often, for this account or in all."""
    if LOGIN_FAILURES_PER_USER_AND_ADDRESS.reached(username_key(username), address) or (
        LOGIN_FAILURES_PER_ADDRESS.reached(address)
    ):
        raise AccountError("throttled", "Too many failed logins; try again later", 429, FAILURE_WINDOW_S)


def record_login(username: str, address: str, succeeded: bool) -> None:
    """Count a failed login, or forget this address's failures for this account after a success."""
    key = username_key(username)
    if succeeded:
        # The address-wide count stays: logging in to an account of one's own
        # must not buy more guesses at others.
        LOGIN_FAILURES_PER_USER_AND_ADDRESS.clear(key, address)
        return
    LOGIN_FAILURES_PER_USER_AND_ADDRESS.count(key, address)
    LOGIN_FAILURES_PER_ADDRESS.count(address)
    logger.info("login failed", extra={"address": address})


def _check_token_auth_configured() -> None:
    if not settings.SIGNALING_JWT_SECRET:
        raise AccountError("not_configured", "Token authentication is not configured on this server", 404)


def _accounts_named(name: str) -> list[AbstractBaseUser]:
    """Return the accounts whose username has the same key as `name` (case and width ignored)."""
    user_model = get_user_model()
    field = user_model.USERNAME_FIELD
    key = username_key(name)
    # iexact narrows the search in the database (Unicode upper-casing on
    # PostgreSQL, ASCII only on SQLite); the key decides.
    candidates = user_model.objects.filter(Q(**{f"{field}__iexact": name}) | Q(**{field: name}))
    return [user for user in candidates if username_key(user.get_username()) == key]


def _authenticate(name: str, password: str) -> AbstractBaseUser | None:
    accounts = _accounts_named(name)
    exact = [user for user in accounts if user.get_username() == name]
    # Two old accounts that differ only in case: only the exact name logs in.
    account = exact[0] if exact else accounts[0] if len(accounts) == 1 else None
    # An unknown name still goes through authenticate(), which hashes the password
    # anyway: a refusal takes as long whether the account exists or not.
    user = authenticate(username=account.get_username() if account else name, password=password)
    return user if user is not None and user.is_active else None


def issue_token(username: str, password: str, address: str) -> IssuedToken:
    """Return a registration token for an account's correct password ("ALICE" logs in as "alice")."""
    _check_token_auth_configured()
    name = unicodedata.normalize("NFKC", username)
    check_login_allowed(name, address)
    user = _authenticate(name, password)
    record_login(name, address, succeeded=user is not None)
    if user is None:
        raise AccountError("invalid_credentials", "Wrong username or password", 401)
    token, expires_at = mint_token(user.get_username(), user_id=str(user.pk))
    return IssuedToken(token, expires_at)


def _lock_username_key(key: str) -> None:
    # Two sign-ups of "Alice" and "alice" at once must not both find the key free.
    # SQLite needs nothing: its transactions take the write lock when they open
    # (transaction_mode IMMEDIATE in settings.py).
    if connection.vendor == "postgresql":
        lock_id = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id])


def create_account(username: str, password: str, address: str) -> str:
    """Create a Django user that can log in for tokens; return its username."""
    _check_token_auth_configured()
    if not settings.SIGNALING_ALLOW_SIGNUP:
        raise AccountError("signup_disabled", "Sign-up is disabled on this server", 403)
    if SIGNUPS_PER_ADDRESS.count(address) > SIGNUPS_PER_ADDRESS.limit:
        raise AccountError("throttled", "Too many sign-ups; try again later", 429, SIGNUPS_PER_ADDRESS.seconds)
    try:
        name = normalize_username(username)
    except InvalidUsername as exc:
        raise AccountError("invalid_username", f"The username {exc}", 400) from None
    user_model = get_user_model()
    candidate = user_model(**{user_model.USERNAME_FIELD: name})
    try:
        user_model._meta.get_field(user_model.USERNAME_FIELD).run_validators(name)
        validate_password(password, candidate)
    except ValidationError as exc:
        raise AccountError("invalid_account", " ".join(exc.messages), 400) from None
    candidate.set_password(password)
    try:
        with transaction.atomic():
            _lock_username_key(username_key(name))
            if _accounts_named(name):
                raise AccountError("username_exists", "That username is taken", 409)
            candidate.save()
    except IntegrityError:
        raise AccountError("username_exists", "That username is taken", 409) from None
    logger.info("account created", extra={"user": name})
    return name


async def aissue_token(username: str, password: str, address: str) -> IssuedToken:
    """Run issue_token in a password-check slot, off the database thread; busy (503) when none is free."""
    try:
        return await password_checks.run(issue_token, username, password, address)
    except Busy:
        raise _busy() from None


async def acreate_account(username: str, password: str, address: str) -> str:
    """Run create_account in a password-check slot, off the database thread; busy (503) when none is free."""
    try:
        return await password_checks.run(create_account, username, password, address)
    except Busy:
        raise _busy() from None
