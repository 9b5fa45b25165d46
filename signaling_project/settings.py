"""Django settings for the signaling server, read from the environment.

A fresh clone runs with no variables set: DEBUG on, SQLite, in-memory channel
layer. Production sets DEBUG=false, SECRET_KEY, ALLOWED_HOSTS, and for more than
one process REDIS_URL and DATABASE_URL.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from signaling_project.env import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_json_list,
    env_list,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", True)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off: generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(50))'`"
        )
    SECRET_KEY = "insecure-development-key-only-for-debug-mode"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
_render_host = os.environ.get("RENDER_EXTERNAL_HOSTNAME")
if _render_host:
    ALLOWED_HOSTS.append(_render_host)
if not ALLOWED_HOSTS and not DEBUG:
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set when DEBUG is off, e.g. example.com")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "calls",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "signaling_project.urls"
ASGI_APPLICATION = "signaling_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------

_database_url = env_str("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
try:
    _database = dj_database_url.parse(_database_url, conn_max_age=60, conn_health_checks=True)
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
if _database["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE makes every atomic block take the write lock up front, so two
    # transitions of one call serialise instead of failing with "locked".
    _database["CONN_MAX_AGE"] = 600
    _database["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
elif _database["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured("DATABASE_URL must be a sqlite:// or postgres:// URL")
DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer --------------------------------------------------------

REDIS_URL = env_str("REDIS_URL")
SIGNALING_CHANNEL_LAYER = env_choice("SIGNALING_CHANNEL_LAYER", "pubsub", ("pubsub", "core"))
if REDIS_URL:
    if not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured("REDIS_URL must start with redis://, rediss:// or unix://")
    _layer_backend = {
        "pubsub": "calls.realtime.redis_layer.SignalingPubSubLayer",
        "core": "channels_redis.core.RedisChannelLayer",
    }[SIGNALING_CHANNEL_LAYER]
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": _layer_backend,
            # core's blocking reads last 5 s, as long as redis-py's default socket
            # timeout: a longer timeout keeps idle core consumers from being cut off.
            "CONFIG": {
                "hosts": [
                    REDIS_URL if SIGNALING_CHANNEL_LAYER == "pubsub" else {"address": REDIS_URL, "socket_timeout": 15}
                ],
                # core drops group members after group_expiry (a day by default): a
                # session connected longer would stop receiving its calls.
                **({} if SIGNALING_CHANNEL_LAYER == "pubsub" else {"group_expiry": 365 * 86400}),
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "calls.realtime.layers.SignalingInMemoryLayer",
            "CONFIG": {"capacity": 1000, "expiry": 60},
        }
    }

# Failed logins (POST /api/token, the admin login) and sign-ups are counted in the
# cache, shared between processes when Redis is configured.
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Auth, static files, i18n --------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static", ("signaling-client", BASE_DIR / "clients" / "js" / "src")]
# WhiteNoise serves the test page's files from daphne itself, straight from the
# app folders, so no collectstatic step is needed to run.
WHITENOISE_USE_FINDERS = True
# Without collectstatic (development, tests) STATIC_ROOT does not exist; finders serve the files.
warnings.filterwarnings("ignore", message="No directory at", module="whitenoise.base")

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- HTTPS in production --------------------------------------------------

if not DEBUG:
    # Cookies (admin session, CSRF) only over HTTPS, plain HTTP redirected, and
    # browsers told to come back over HTTPS only. Each is a variable of the same
    # name, e.g. SECURE_SSL_REDIRECT=false behind a proxy that redirects by itself.
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    # Render's health checks come over plain HTTP from inside its network (no
    # X-Forwarded-Proto): redirected, /healthz would never answer 200.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
    # Django's key check (security.W009) wants 50 characters, but Render's
    # generateValue is a base64-encoded 256-bit value of 44: more entropy than
    # Django's own 50-character keys. This rule takes its place, and refuses to start.
    SILENCED_SYSTEM_CHECKS = ["security.W009"]
    if len(SECRET_KEY) < 32 or len(set(SECRET_KEY)) < 5 or SECRET_KEY.startswith("django-insecure-"):
        raise ImproperlyConfigured(
            "SECRET_KEY must be a random value of 32+ characters when DEBUG is off: generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(50))'`"
        )

# --- Signaling ------------------------------------------------------------

# Seconds an unanswered call rings before it ends with reason "timeout".
SIGNALING_RING_TIMEOUT = env_float("SIGNALING_RING_TIMEOUT", 45.0, minimum=0.1)
# Seconds between sweeps that close calls whose deadline passed or whose party vanished.
SIGNALING_REAPER_INTERVAL = env_float("SIGNALING_REAPER_INTERVAL", 5.0, minimum=0.05)
# Seconds a session's presence lease lasts without renewal (crashed processes).
SIGNALING_PRESENCE_TTL = env_float("SIGNALING_PRESENCE_TTL", 30.0, minimum=0.5)
# Milliseconds over which presence changes are coalesced into one broadcast.
SIGNALING_PRESENCE_WINDOW_MS = env_int("SIGNALING_PRESENCE_WINDOW_MS", 200, minimum=0)
# "global" (v1): every session may follow everyone online. "watch": sessions follow only
# the users on their watch lists, and v1 clients get an empty online_users list.
SIGNALING_PRESENCE_SCOPE = env_choice("SIGNALING_PRESENCE_SCOPE", "global", ("global", "watch"))
# Users one session may watch.
SIGNALING_WATCH_LIMIT = env_int("SIGNALING_WATCH_LIMIT", 1000, minimum=1)
# "open" (v1: username held by its user_id) or "token" (JWT on register).
SIGNALING_AUTH = env_choice("SIGNALING_AUTH", "open", ("open", "token"))
SIGNALING_JWT_SECRET = env_str("SIGNALING_JWT_SECRET")
if SIGNALING_AUTH == "token" and len(SIGNALING_JWT_SECRET) < 32:
    raise ImproperlyConfigured("SIGNALING_AUTH=token needs SIGNALING_JWT_SECRET of 32+ characters")
SIGNALING_TOKEN_TTL = env_int("SIGNALING_TOKEN_TTL", 3600, minimum=60)
SIGNALING_ALLOW_SIGNUP = env_bool("SIGNALING_ALLOW_SIGNUP", False)
# Origins allowed to open a socket from a browser; default: the ALLOWED_HOSTS.
SIGNALING_ALLOWED_ORIGINS = env_list("SIGNALING_ALLOWED_ORIGINS", [])
SIGNALING_MAX_MESSAGE_BYTES = env_int("SIGNALING_MAX_MESSAGE_BYTES", 65536, minimum=1024)
# Token bucket per connection: "RATE/BURST" messages per second.
SIGNALING_RATE = env_str("SIGNALING_RATE", "50/200")
if not re.fullmatch(r"\d+(\.\d+)?/\d+", SIGNALING_RATE):
    raise ImproperlyConfigured(f"SIGNALING_RATE must look like 50/200 (per second/burst), not {SIGNALING_RATE!r}")
# Users who may be in several calls at once and are never busy (e.g. the echo bot).
SIGNALING_MULTI_CALL_USERS = env_list("SIGNALING_MULTI_CALL_USERS", [])
# Proxies in front of the server that append to X-Forwarded-For (Render: 1). Client
# addresses (connection limits, login throttling) come from that header only this far.
SIGNALING_TRUSTED_PROXIES = env_int("SIGNALING_TRUSTED_PROXIES", 0, minimum=0, maximum=10)
SIGNALING_MAX_SESSIONS_PER_USER = env_int("SIGNALING_MAX_SESSIONS_PER_USER", 5, minimum=1)
SIGNALING_REGISTER_TIMEOUT = env_float("SIGNALING_REGISTER_TIMEOUT", 10.0, minimum=0.1)
# Bytes daphne may hold for a client that stops reading before it is disconnected.
SIGNALING_SEND_BUFFER_BYTES = env_int("SIGNALING_SEND_BUFFER_BYTES", 1048576, minimum=65536)
# Read by bin/serve for daphne's keepalive pings; here so they are known and checked.
SIGNALING_PING_INTERVAL = env_int("SIGNALING_PING_INTERVAL", 20, minimum=1)
SIGNALING_PING_TIMEOUT = env_int("SIGNALING_PING_TIMEOUT", 20, minimum=1)
SIGNALING_RESUME_GRACE = env_float("SIGNALING_RESUME_GRACE", 30.0, minimum=0.1)
SIGNALING_RESUME_QUEUE_LIMIT = env_int("SIGNALING_RESUME_QUEUE_LIMIT", 200, minimum=1)
# ... and in bytes: what a held session may pile up (and, on a shutdown, copy into Redis).
SIGNALING_RESUME_QUEUE_BYTES = env_int("SIGNALING_RESUME_QUEUE_BYTES", 1048576, minimum=1024)
# Abuse limits (0 disables each). New sockets a client address may open per second,
# and sockets it may hold that have not registered yet; registered sockets are not
# capped per address, since mobile carriers put thousands of users behind one.
SIGNALING_CONNECT_RATE_PER_ADDRESS = env_float("SIGNALING_CONNECT_RATE_PER_ADDRESS", 20.0, minimum=0)
SIGNALING_MAX_PENDING_PER_ADDRESS = env_int("SIGNALING_MAX_PENDING_PER_ADDRESS", 50, minimum=0)
# Sockets one process holds at most, registered or not.
SIGNALING_MAX_CONNECTIONS = env_int("SIGNALING_MAX_CONNECTIONS", 10000, minimum=0)
# Calls a user may start per minute, and unanswered calls in a row from one caller
# to one callee (an answer resets it) within an hour: ring-spam keeps nobody busy.
SIGNALING_CALLS_PER_MINUTE = env_int("SIGNALING_CALLS_PER_MINUTE", 20, minimum=0)
SIGNALING_UNANSWERED_CALLS_PER_CALLEE = env_int("SIGNALING_UNANSWERED_CALLS_PER_CALLEE", 5, minimum=0)
# Call history is written behind the calls, in batches: a transition waits at most this
# long for its batch to start (calls/callflow/history.py).
SIGNALING_HISTORY_DELAY_MS = env_int("SIGNALING_HISTORY_DELAY_MS", 200, minimum=0, maximum=1000)
# Call history older than this many days is deleted by a periodic job (0 keeps it).
SIGNALING_HISTORY_DAYS = env_int("SIGNALING_HISTORY_DAYS", 90, minimum=0)
# Password checks (POST /api/token, /api/users, admin login) running at once; more
# are refused with 503 at once instead of queueing behind each other.
SIGNALING_LOGIN_CONCURRENCY = env_int("SIGNALING_LOGIN_CONCURRENCY", 2, minimum=1)

# Push notifications for callees without a socket (calls/push/). Each platform is off
# until configured. Web Push: a VAPID key pair (`python manage.py vapid_keys`).
SIGNALING_VAPID_PRIVATE_KEY = env_str("SIGNALING_VAPID_PRIVATE_KEY").replace("\\n", "\n")
SIGNALING_VAPID_SUBJECT = env_str("SIGNALING_VAPID_SUBJECT")
if SIGNALING_VAPID_PRIVATE_KEY and not SIGNALING_VAPID_SUBJECT.startswith(("mailto:", "https://")):
    raise ImproperlyConfigured("SIGNALING_VAPID_SUBJECT must be a mailto: or https: URL when Web Push is configured")
# FCM: a service account's JSON key (the JSON itself, or a path to the file).
SIGNALING_FCM_CREDENTIALS = env_str("SIGNALING_FCM_CREDENTIALS")
SIGNALING_FCM_BASE_URL = env_str("SIGNALING_FCM_BASE_URL", "https://fcm.googleapis.com")
# APNs: a token-based key (.p8), its key id, the team id and the app's bundle id.
SIGNALING_APNS_KEY_FILE = env_str("SIGNALING_APNS_KEY_FILE")
SIGNALING_APNS_KEY_ID = env_str("SIGNALING_APNS_KEY_ID")
SIGNALING_APNS_TEAM_ID = env_str("SIGNALING_APNS_TEAM_ID")
SIGNALING_APNS_TOPIC = env_str("SIGNALING_APNS_TOPIC")
SIGNALING_APNS_USE_SANDBOX = env_bool("SIGNALING_APNS_USE_SANDBOX", False)
# Overrides the production or sandbox host (tests: a stand-in on loopback), and a CA
# bundle to trust for it (tests: a test CA).
SIGNALING_APNS_BASE_URL = env_str("SIGNALING_APNS_BASE_URL")
SIGNALING_APNS_CA_FILE = env_str("SIGNALING_APNS_CA_FILE")
if SIGNALING_APNS_KEY_FILE and not (SIGNALING_APNS_KEY_ID and SIGNALING_APNS_TEAM_ID and SIGNALING_APNS_TOPIC):
    raise ImproperlyConfigured("SIGNALING_APNS_KEY_FILE needs SIGNALING_APNS_KEY_ID, _TEAM_ID and _TOPIC")
SIGNALING_PUSH_MAX_SUBSCRIPTIONS = env_int("SIGNALING_PUSH_MAX_SUBSCRIPTIONS", 10, minimum=1)
# Web Push endpoints must be https on a public address (no pushes into the server's own
# network); true allows http and private addresses: tests and private deployments.
SIGNALING_PUSH_ALLOW_PRIVATE_ENDPOINTS = env_bool("SIGNALING_PUSH_ALLOW_PRIVATE_ENDPOINTS", False)
SIGNALING_ICE_SERVERS = env_json_list("SIGNALING_ICE_SERVERS")
SIGNALING_TURN_URLS = env_list("SIGNALING_TURN_URLS", [])
SIGNALING_TURN_SECRET = env_str("SIGNALING_TURN_SECRET")
SIGNALING_TURN_TTL = env_int("SIGNALING_TURN_TTL", 86400, minimum=60)
if SIGNALING_TURN_URLS and not SIGNALING_TURN_SECRET:
    raise ImproperlyConfigured("SIGNALING_TURN_URLS needs SIGNALING_TURN_SECRET")
# Bearer token for /metrics; empty means /metrics is only served when DEBUG is on.
SIGNALING_METRICS_TOKEN = env_str("SIGNALING_METRICS_TOKEN")
# One line per log record: "logfmt" or "json" (calls/logs.py).
SIGNALING_LOG_FORMAT = env_choice("SIGNALING_LOG_FORMAT", "logfmt", ("logfmt", "json"))

_KNOWN_SIGNALING_VARS = {name for name in globals() if name.startswith("SIGNALING_")}
_unknown = sorted(name for name in os.environ if name.startswith("SIGNALING_") and name not in _KNOWN_SIGNALING_VARS)
if _unknown:
    raise ImproperlyConfigured(f"Unknown setting(s): {', '.join(_unknown)}; see the README")

# --- Logging --------------------------------------------------------------

LOG_LEVEL = env_choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"()": "calls.observability.logs.LineFormatter", "output": SIGNALING_LOG_FORMAT}},
    # At INFO and above, secret-named fields are redacted and long ones cut (calls/logs.py).
    "filters": {"redact": {"()": "calls.observability.logs.RedactFilter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "line", "filters": ["redact"]}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "calls": {"level": LOG_LEVEL},
        "django": {"level": "WARNING" if LOG_LEVEL != "DEBUG" else "INFO"},
    },
}
