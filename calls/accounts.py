"""Accounts for teams without their own backend: sign-up, and tokens for a password.

Failed logins are counted per username and per client address in the cache;
past the limit, logins are refused until the window passes.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import IntegrityError

from calls.protocol import USERNAME_MAX
from calls.security import mint_token

logger = logging.getLogger(__name__)

FAILURE_WINDOW_S = 15 * 60
FAILURES_PER_USERNAME = 5
FAILURES_PER_ADDRESS = 20


class AccountError(Exception):
    """A refused account request: `code` and `status` go back in the HTTP response."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: datetime


def _failure_keys(username: str, address: str) -> list[tuple[str, int]]:
    digest = hashlib.sha256(username.lower().encode()).hexdigest()[:32]
    return [
        (f"login-failures:user:{digest}", FAILURES_PER_USERNAME),
        (f"login-failures:addr:{address}", FAILURES_PER_ADDRESS),
    ]


def _check_token_auth_configured() -> None:
    if not settings.SIGNALING_JWT_SECRET:
        raise AccountError("not_configured", "Token authentication is not configured on this server", 404)


def issue_token(username: str, password: str, address: str) -> IssuedToken:
    """Return a registration token for a Django user's correct password."""
    _check_token_auth_configured()
    keys = _failure_keys(username, address)
    if any(cache.get(key, 0) >= limit for key, limit in keys):
        raise AccountError("throttled", "Too many failed logins; try again later", 429)
    user = authenticate(username=username, password=password)
    if user is None or not user.is_active:
        for key, _ in keys:
            cache.add(key, 0, FAILURE_WINDOW_S)
            cache.incr(key)
        logger.info("login failed", extra={"address": address})
        raise AccountError("invalid_credentials", "Wrong username or password", 401)
    cache.delete(keys[0][0])
    token, expires_at = mint_token(user.get_username())
    return IssuedToken(token, expires_at)


def create_account(username: str, password: str) -> str:
    """Create a Django user that can log in for tokens; return its username."""
    _check_token_auth_configured()
    if not settings.SIGNALING_ALLOW_SIGNUP:
        raise AccountError("signup_disabled", "Sign-up is disabled on this server", 403)
    if not 1 <= len(username) <= USERNAME_MAX or any(unicodedata.category(ch) == "Cc" for ch in username):
        raise AccountError(
            "invalid_username", f"Usernames are 1 to {USERNAME_MAX} characters, no control characters", 400
        )
    user_model = get_user_model()
    candidate = user_model(username=username)
    try:
        user_model.username.field.run_validators(username)
        validate_password(password, candidate)
    except ValidationError as exc:
        raise AccountError("invalid_account", " ".join(exc.messages), 400) from None
    candidate.set_password(password)
    try:
        candidate.save()
    except IntegrityError:
        raise AccountError("username_exists", "That username is taken", 409) from None
    logger.info("account created", extra={"user": username})
    return username
