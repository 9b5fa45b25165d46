"""Covers calls.http.accounts, api, throttle and admin_login: sign-up, tokens, the admin login, and their limits.

Failed logins count per (account, client address) and per address, never per
account alone; sign-ups count per address; password checks run in a few slots
on pool threads, never on asgiref's thread for database work.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from asgiref.sync import SyncToAsync, ThreadSensitiveContext
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import MD5PasswordHasher
from django.contrib.auth.signals import user_login_failed
from django.core.cache import cache
from django.test import AsyncClient, Client
from django.test.client import MULTIPART_CONTENT

from calls.http import accounts
from calls.http.throttle import password_checks

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"
PASSWORD = "the-right-pass-phrase-1"
ATTACKER = "203.0.113.9"
OWNER = "198.51.100.7"


@pytest.fixture(autouse=True)
def accounts_on(settings) -> Iterator[None]:
    settings.SIGNALING_JWT_SECRET = SECRET
    settings.SIGNALING_ALLOW_SIGNUP = True
    settings.SIGNALING_LOGIN_CONCURRENCY = 2
    # A cheap hasher: these tests are about who may check a password, not its cost.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    cache.clear()  # the failure counts live in the (process-wide) cache
    yield
    cache.clear()


@pytest.fixture
def password_checks_seen() -> Iterator[list[str]]:
    """The usernames of failed password checks, as Django reports them (user_login_failed)."""
    seen: list[str] = []

    def receiver(sender: Any, credentials: dict[str, Any], **kwargs: Any) -> None:
        seen.append(credentials["username"])

    user_login_failed.connect(receiver)
    yield seen
    user_login_failed.disconnect(receiver)


def post_json(client: Client, path: str, body: Any, address: str = OWNER, **extra: Any) -> Any:
    return client.post(path, body, "application/json", REMOTE_ADDR=address, **extra)


def login(client: Client, username: str, password: str, address: str = OWNER, **extra: Any) -> Any:
    return post_json(client, "/api/token", {"username": username, "password": password}, address, **extra)


def admin_login(client: Client, username: str, password: str, address: str = OWNER) -> Any:
    body = {"username": username, "password": password, "next": "/admin/"}
    return client.post("/admin/login/", body, REMOTE_ADDR=address)


def claims_of(response: Any) -> dict[str, Any]:
    return jwt.decode(response.json()["token"], SECRET, algorithms=["HS256"])


def assert_refused(response: Any, status: int, code: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert body["error"] == code and body["message"]
    assert "token" not in body


# --- sign-up and tokens ------------------------------------------------------


def test_signup_then_token_carries_the_accounts_name_and_id(client):
    created = post_json(client, "/api/users", {"username": "dana", "password": "a-long-pass-phrase-9"})
    assert (created.status_code, created.json()) == (201, {"username": "dana"})
    user = get_user_model().objects.get(username="dana")
    assert user.password.startswith("md5$") and "a-long-pass" not in user.password
    issued = login(client, "dana", "a-long-pass-phrase-9")
    assert issued.status_code == 200 and issued["Cache-Control"] == "no-store"
    claims = claims_of(issued)
    assert claims["sub"] == "dana" and claims["user_id"] == str(user.pk) and claims["exp"] > time.time()
    assert issued.json()["expires_at"]


def test_signup_is_off_by_default(client, settings):
    settings.SIGNALING_ALLOW_SIGNUP = False
    response = post_json(client, "/api/users", {"username": "dana", "password": "a-long-pass-phrase-9"})
    assert_refused(response, 403, "signup_disabled")
    assert not get_user_model().objects.filter(username="dana").exists()


def test_weak_passwords_are_refused(client):
    response = post_json(client, "/api/users", {"username": "dana", "password": "123"})
    assert_refused(response, 400, "invalid_account")
    assert not get_user_model().objects.exists()


def test_signup_stores_the_nfkc_form_of_the_username(client):
    response = post_json(client, "/api/users", {"username": "ｄａｎａ", "password": "a-long-pass-phrase-9"})
    assert (response.status_code, response.json()) == (201, {"username": "dana"})
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["dana"]


@pytest.mark.parametrize(
    "username, why",
    [
        ("ali\u200bce", "format"),  # zero-width space
        ("\u202eecila", "format"),  # right-to-left override
        (" alice", "spaces"),
        ("a" * 65, "64"),
    ],
    ids=["zero-width", "bidi-override", "leading-space", "too-long"],
)
def test_signup_refuses_usernames_the_username_rule_refuses_naming_why(client, username, why):
    response = post_json(client, "/api/users", {"username": username, "password": "a-long-pass-phrase-9"})
    assert_refused(response, 400, "invalid_username")
    assert why in response.json()["message"]
    assert not get_user_model().objects.exists()


@pytest.mark.parametrize("variant", ["alice", "Alice", "ALICE", "ａｌｉｃｅ", "Ａｌｉｃｅ"])
def test_a_username_taken_in_any_case_or_width_is_refused(client, variant):
    owner = get_user_model().objects.create_user("alice", password=PASSWORD)
    response = post_json(client, "/api/users", {"username": variant, "password": "another-pass-phrase-7"})
    assert_refused(response, 409, "username_exists")
    assert list(get_user_model().objects.values_list("pk", "username")) == [(owner.pk, "alice")]


@pytest.mark.parametrize("typed", ["ALICE", "Alice", "ａｌｉｃｅ"])
def test_login_finds_the_account_whatever_the_case_or_width(client, typed):
    owner = get_user_model().objects.create_user("alice", password=PASSWORD)
    response = login(client, typed, PASSWORD)
    assert response.status_code == 200
    claims = claims_of(response)
    assert (claims["sub"], claims["user_id"]) == ("alice", str(owner.pk))


def test_a_wrong_password_or_unknown_name_is_one_answer(client, password_checks_seen):
    get_user_model().objects.create_user("alice", password=PASSWORD)
    assert_refused(login(client, "alice", "wrong"), 401, "invalid_credentials")
    assert_refused(login(client, "nobody", "wrong"), 401, "invalid_credentials")
    assert password_checks_seen == ["alice", "nobody"]


def test_an_inactive_account_gets_no_token(client):
    get_user_model().objects.create_user("alice", password=PASSWORD, is_active=False)
    assert_refused(login(client, "alice", PASSWORD), 401, "invalid_credentials")


def test_bad_api_bodies_get_clear_errors(client, password_checks_seen):
    assert_refused(post_json(client, "/api/token", "nope"), 400, "invalid_json")
    assert_refused(post_json(client, "/api/token", {"username": 5}), 400, "invalid_request")
    assert_refused(post_json(client, "/api/token", {"username": "a", "password": "x" * 5000}), 413, "invalid_request")
    assert_refused(post_json(client, "/api/token", '{"username": "a", "password": "\\ud800"}'), 400, "invalid_request")
    assert_refused(post_json(client, "/api/users", '{"username": "\\udfff", "password": "p"}'), 400, "invalid_request")
    assert client.get("/api/token").status_code == 405
    assert client.get("/api/users").status_code == 405
    assert password_checks_seen == []


def test_without_a_jwt_secret_the_api_is_not_there(client, settings):
    settings.SIGNALING_JWT_SECRET = ""
    get_user_model().objects.create_user("alice", password=PASSWORD)
    assert_refused(login(client, "alice", PASSWORD), 404, "not_configured")
    response = post_json(client, "/api/users", {"username": "dana", "password": "a-long-pass-phrase-9"})
    assert_refused(response, 404, "not_configured")
    assert get_user_model().objects.count() == 1


# --- login throttling ----------------------------------------------------------


def test_failed_logins_lock_that_address_out_of_that_account(client, password_checks_seen):
    get_user_model().objects.create_user("frank", password=PASSWORD)
    statuses = [login(client, "frank", "wrong", ATTACKER).status_code for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    right = login(client, "FRANK", PASSWORD, ATTACKER)
    assert_refused(right, 429, "throttled")
    assert right["Retry-After"] == str(15 * 60)
    # Refused before the password check: a throttled guess costs no hash.
    assert password_checks_seen == ["frank"] * 5


def test_the_owner_still_logs_in_from_another_address(client):
    owner = get_user_model().objects.create_user("frank", password=PASSWORD)
    for _ in range(10):
        login(client, "frank", "wrong", ATTACKER)
    assert_refused(login(client, "frank", PASSWORD, ATTACKER), 429, "throttled")
    response = login(client, "frank", PASSWORD, OWNER)
    assert response.status_code == 200
    assert claims_of(response)["user_id"] == str(owner.pk)


def test_failures_count_per_address_across_usernames(client, password_checks_seen):
    get_user_model().objects.create_user("frank", password=PASSWORD)
    statuses = [login(client, f"guess-{n}", "wrong", ATTACKER).status_code for n in range(20)]
    assert statuses == [401] * 20
    assert_refused(login(client, "frank", PASSWORD, ATTACKER), 429, "throttled")
    assert_refused(login(client, "someone-else", "wrong", ATTACKER), 429, "throttled")
    assert len(password_checks_seen) == 20
    assert login(client, "frank", PASSWORD, OWNER).status_code == 200


def test_a_success_clears_the_accounts_count_for_that_address(client):
    get_user_model().objects.create_user("frank", password=PASSWORD)
    assert [login(client, "frank", "wrong").status_code for _ in range(4)] == [401] * 4
    assert login(client, "frank", PASSWORD).status_code == 200
    assert [login(client, "frank", "wrong").status_code for _ in range(6)] == [401] * 5 + [429]


def test_a_forged_x_forwarded_for_does_not_reset_the_count(client):
    get_user_model().objects.create_user("frank", password=PASSWORD)
    statuses = [
        login(client, "frank", "wrong", ATTACKER, HTTP_X_FORWARDED_FOR=f"192.0.2.{n}").status_code for n in range(6)
    ]
    assert statuses == [401] * 5 + [429]


def test_behind_a_trusted_proxy_the_forwarded_address_is_counted(client, settings):
    settings.SIGNALING_TRUSTED_PROXIES = 1
    get_user_model().objects.create_user("frank", password=PASSWORD)
    proxy = "10.0.0.1"
    # The client may write entries of its own to the left; the proxy's is the last.
    forged = {"HTTP_X_FORWARDED_FOR": f"{OWNER}, {ATTACKER}"}
    statuses = [login(client, "frank", "wrong", proxy, **forged).status_code for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    owner = login(client, "frank", PASSWORD, proxy, HTTP_X_FORWARDED_FOR=OWNER)
    assert owner.status_code == 200


def test_signups_are_throttled_per_address(client):
    for n in range(10):
        response = post_json(client, "/api/users", {"username": f"user{n}", "password": "a-long-pass-phrase-9"})
        assert response.status_code == 201
    refused = post_json(client, "/api/users", {"username": "user10", "password": "a-long-pass-phrase-9"})
    assert_refused(refused, 429, "throttled")
    assert refused["Retry-After"] == str(3600)
    assert not get_user_model().objects.filter(username="user10").exists()
    elsewhere = post_json(client, "/api/users", {"username": "user10", "password": "a-long-pass-phrase-9"}, ATTACKER)
    assert elsewhere.status_code == 201
    assert get_user_model().objects.count() == 11


# --- the admin login -------------------------------------------------------------


@pytest.fixture
def staff():
    return get_user_model().objects.create_user("admin", password=PASSWORD, is_staff=True, is_superuser=True)


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def test_the_admin_login_page_is_served(client):
    response = client.get("/admin/login/")
    assert response.status_code == 200
    assert b'name="password"' in response.content


def test_admin_login_failures_are_throttled_and_the_owner_gets_in_elsewhere(client, staff, password_checks_seen):
    statuses = [admin_login(client, "admin", "wrong", ATTACKER).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]  # Django shows the form again with an error
    refused = admin_login(client, "admin", PASSWORD, ATTACKER)
    assert refused.status_code == 429 and refused["Retry-After"] == str(15 * 60)
    assert not logged_in(client)
    assert password_checks_seen == ["admin"] * 5
    staff.refresh_from_db()
    assert staff.last_login is None

    owner = admin_login(Client(), "admin", PASSWORD, OWNER)
    assert owner.status_code == 302 and owner["Location"] == "/admin/"
    staff.refresh_from_db()
    assert staff.last_login is not None


def test_admin_and_api_failures_share_one_count(client, staff):
    assert [admin_login(client, "admin", "wrong").status_code for _ in range(3)] == [200] * 3
    assert [login(client, "Admin", "wrong").status_code for _ in range(2)] == [401] * 2
    assert_refused(login(client, "admin", PASSWORD), 429, "throttled")
    assert admin_login(client, "admin", PASSWORD).status_code == 429
    assert not logged_in(client)


def test_a_successful_admin_login_clears_the_count(client, staff):
    assert [admin_login(client, "admin", "wrong").status_code for _ in range(4)] == [200] * 4
    assert admin_login(client, "admin", PASSWORD).status_code == 302
    assert logged_in(client)
    statuses = [admin_login(Client(), "admin", "wrong").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]


def test_the_admin_is_for_staff_only(client):
    get_user_model().objects.create_user("plain", password="a-long-pass-phrase-9")
    client.login(username="plain", password="a-long-pass-phrase-9")
    response = client.get("/admin/calls/call/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


# --- the cap on password checks at once ---------------------------------------


class BlockedHashes:
    """Make the password hasher wait for `release` once `armed`; count hashes as they start."""

    def __init__(self) -> None:
        self.armed = False
        self.started = threading.Semaphore(0)
        self.release = threading.Event()
        self.threads: list[int] = []

    def wrap(self, encode: Any) -> Any:
        def blocking_encode(hasher: Any, password: str, salt: str) -> str:
            self.threads.append(threading.get_ident())
            if self.armed:
                self.started.release()
                assert self.release.wait(30), "the test never released the hashes"
            return encode(hasher, password, salt)

        return blocking_encode

    async def wait_started(self, count: int) -> None:
        for _ in range(count):
            assert await asyncio.to_thread(self.started.acquire, timeout=30)


@pytest.fixture
def blocked_hashes(monkeypatch) -> Iterator[BlockedHashes]:
    blocked = BlockedHashes()
    monkeypatch.setattr(MD5PasswordHasher, "encode", blocked.wrap(MD5PasswordHasher.encode))
    yield blocked
    blocked.release.set()


async def post_async(client: AsyncClient, path: str, body: dict[str, str], **kwargs: Any) -> Any:
    """POST as daphne would: in a context of its own, as Django's ASGIHandler runs each request.

    Without it, AsyncClient runs the sync middleware (WhiteNoise) of every request
    on asgiref's one thread, one request at a time.
    """
    kwargs.setdefault("content_type", "application/json")
    async with ThreadSensitiveContext():
        return await client.post(path, body, **kwargs)


async def test_password_checks_beyond_the_cap_are_refused_at_once(staff, blocked_hashes):
    await database_sync_to_async(get_user_model().objects.create_user)("frank", password=PASSWORD)
    blocked_hashes.armed = True
    client = AsyncClient()
    held = [asyncio.create_task(post_async(client, "/api/token", {"username": "frank", "password": PASSWORD}))]
    held.append(asyncio.create_task(post_async(client, "/api/users", {"username": "gina", "password": PASSWORD})))
    await blocked_hashes.wait_started(2)
    assert password_checks.running == 2

    busy = await asyncio.wait_for(
        post_async(client, "/api/token", {"username": "frank", "password": PASSWORD}), timeout=10
    )
    assert_refused(busy, 503, "busy")
    assert busy["Retry-After"] == "1"
    signup = await asyncio.wait_for(
        post_async(client, "/api/users", {"username": "hugo", "password": PASSWORD}), timeout=10
    )
    assert_refused(signup, 503, "busy")
    admin = await asyncio.wait_for(
        post_async(
            client, "/admin/login/", {"username": "admin", "password": PASSWORD}, content_type=MULTIPART_CONTENT
        ),
        timeout=10,
    )
    assert admin.status_code == 503 and admin["Retry-After"] == "1"
    assert "_auth_user_id" not in (await client.asession())

    blocked_hashes.release.set()
    token, created = await asyncio.gather(*held)
    assert token.status_code == 200 and created.status_code == 201
    assert password_checks.running == 0
    later = await post_async(client, "/api/token", {"username": "gina", "password": PASSWORD})
    assert later.status_code == 200
    names = await database_sync_to_async(lambda: sorted(get_user_model().objects.values_list("username", flat=True)))()
    assert names == ["admin", "frank", "gina"]


async def test_a_client_that_hangs_up_keeps_its_slot_until_its_hash_ends(settings, blocked_hashes):
    settings.SIGNALING_LOGIN_CONCURRENCY = 1
    await database_sync_to_async(get_user_model().objects.create_user)("frank", password=PASSWORD)
    blocked_hashes.armed = True
    client = AsyncClient()
    request = asyncio.create_task(post_async(client, "/api/token", {"username": "frank", "password": PASSWORD}))
    await blocked_hashes.wait_started(1)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    # The hash still runs on its thread: its slot is still taken.
    assert password_checks.running == 1
    assert_refused(await post_async(client, "/api/token", {"username": "frank", "password": PASSWORD}), 503, "busy")

    blocked_hashes.release.set()
    await password_checks.wait_idle()
    assert password_checks.running == 0
    assert (await post_async(client, "/api/token", {"username": "frank", "password": PASSWORD})).status_code == 200


async def test_password_work_runs_off_the_database_thread(blocked_hashes):
    # Plain AsyncClient: no context per request, so thread-sensitive work, the
    # consumers' database work included, runs on asgiref's one thread.
    client = AsyncClient()
    created = await client.post("/api/users", {"username": "frank", "password": PASSWORD}, "application/json")
    issued = await client.post("/api/token", {"username": "frank", "password": PASSWORD}, "application/json")
    assert (created.status_code, issued.status_code) == (201, 200)

    database_thread = await asyncio.wrap_future(SyncToAsync.single_thread_executor.submit(threading.get_ident))
    # The thread the comparison is about: where the consumers' database work runs.
    assert await database_sync_to_async(threading.get_ident)() == database_thread
    assert len(blocked_hashes.threads) == 2  # one hash to store the password, one to check it
    assert database_thread not in blocked_hashes.threads
    assert threading.get_ident() not in blocked_hashes.threads
    assert await database_sync_to_async(get_user_model().objects.filter(username="frank").exists)()


def test_the_sync_slot_refuses_when_full_and_frees_on_exit(settings):
    settings.SIGNALING_LOGIN_CONCURRENCY = 1
    with accounts.password_check_slot():
        with pytest.raises(accounts.AccountError) as refused, accounts.password_check_slot():
            pass
        assert (refused.value.code, refused.value.status, refused.value.retry_after) == ("busy", 503, 1)
    assert password_checks.running == 0
    with accounts.password_check_slot():
        assert password_checks.running == 1
