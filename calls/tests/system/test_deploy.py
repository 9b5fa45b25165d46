"""Covers the deploy of the whole server: the Render Blueprint (render.yaml) deploys a server that is safe to expose.

Settings are loaded in a subprocess with exactly the environment a Render deploy
gets from render.yaml (stand-ins for what Render generates or links), never
with this process's SIGNALING_*, DATABASE_URL or REDIS_URL. Nothing connects to
the database or Redis.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
from typing import Any

import pytest
import yaml

from calls.testing.servers import ROOT

RENDER_HOSTNAME = "example.onrender.com"


@pytest.fixture(scope="module")
def blueprint() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "render.yaml").read_text())


def web_service(blueprint: dict[str, Any]) -> dict[str, Any]:
    (web,) = [service for service in blueprint["services"] if service["type"] == "web"]
    return web


@pytest.fixture(scope="module")
def web_env_vars(blueprint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["key"]: entry for entry in web_service(blueprint)["envVars"]}


def render_generated_value() -> str:
    """A value as Render's generateValue makes one: 256 random bits, base64-encoded (44 characters)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def render_environment(env_vars: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The environment Render gives the web service, from its envVars."""
    env = {}
    for key, entry in env_vars.items():
        if "value" in entry:
            env[key] = str(entry["value"])
        elif entry.get("generateValue"):
            env[key] = render_generated_value()
        elif "fromDatabase" in entry:
            assert entry["fromDatabase"]["property"] == "connectionString", key
            env[key] = f"postgres://signaling:{secrets.token_urlsafe(24)}@dpg-test0000000000000000-a/signaling"
        elif "fromService" in entry:
            source = entry["fromService"]
            assert (source["type"], source["property"]) == ("keyvalue", "connectionString"), key
            env[key] = "redis://red-test0000000000000000:6379"
        elif entry.get("sync") is False:
            env[key] = "calls.example.com"
        else:
            raise AssertionError(f"{key}: an envVars entry this test does not know how to fill in")
    env["RENDER_EXTERNAL_HOSTNAME"] = RENDER_HOSTNAME
    return env


def run_in_deploy(env_vars: dict[str, dict[str, Any]], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=render_environment(env_vars),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blueprint_starts_bin_serve_and_checks_healthz(blueprint):
    web = web_service(blueprint)
    assert web["runtime"] == "python"
    assert web["startCommand"] == "sh bin/serve"
    assert web["healthCheckPath"] == "/healthz"
    assert web["preDeployCommand"] == "python manage.py migrate --noinput"
    assert "collectstatic --noinput" in web["buildCommand"]
    assert "pip install --require-hashes -r requirements.lock" in web["buildCommand"]


def test_the_blueprint_wires_its_database_and_key_value_instance(blueprint):
    env = {entry["key"]: entry for entry in web_service(blueprint)["envVars"]}
    (keyvalue,) = [service for service in blueprint["services"] if service["type"] == "keyvalue"]
    (database,) = blueprint["databases"]

    assert env["DATABASE_URL"]["fromDatabase"] == {"name": database["name"], "property": "connectionString"}
    assert env["REDIS_URL"]["fromService"] == {
        "type": "keyvalue",
        "name": keyvalue["name"],
        "property": "connectionString",
    }
    assert keyvalue["ipAllowList"] == []
    assert env["DEBUG"]["value"] == "false"
    assert env["SECRET_KEY"]["generateValue"] is True
    assert env["SIGNALING_JWT_SECRET"]["generateValue"] is True
    assert env["PYTHON_VERSION"]["value"].startswith("3.11.")


def test_production_settings_load_with_the_blueprints_environment(web_env_vars):
    """What Render passes at build and start time is enough for settings.py in production mode."""
    script = (
        "import json, os, django; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'signaling_project.settings');"
        "from django.conf import settings; django.setup();"
        "print(json.dumps([settings.DEBUG, settings.ALLOWED_HOSTS, settings.DATABASES['default']['ENGINE']]))"
    )
    result = run_in_deploy(web_env_vars, "-c", script)
    assert result.returncode == 0, result.stderr
    debug, hosts, engine = json.loads(result.stdout)
    assert debug is False
    assert hosts == ["calls.example.com", RENDER_HOSTNAME]
    assert engine == "django.db.backends.postgresql"


def test_the_blueprint_states_the_auth_mode_and_its_proxy(web_env_vars):
    assert web_env_vars["SIGNALING_AUTH"] == {"key": "SIGNALING_AUTH", "value": "token"}
    assert web_env_vars["SIGNALING_TRUSTED_PROXIES"] == {"key": "SIGNALING_TRUSTED_PROXIES", "value": "1"}
    assert web_env_vars["DEBUG"]["value"] == "false"


def test_djangos_deploy_checks_pass_with_the_blueprints_environment(web_env_vars):
    result = run_in_deploy(web_env_vars, "manage.py", "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


# Requests through Django's test client inside a deploy's settings; as manage.py does,
# the script names the settings module itself.
PROBE = """
import json, os, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signaling_project.settings")
django.setup()
from django.conf import settings
from django.test import Client
client = Client(HTTP_HOST="example.onrender.com")
plain, health = client.get("/api/ice-servers"), client.get("/healthz")
secure = client.get("/api/ice-servers", HTTP_X_FORWARDED_PROTO="https")
print(json.dumps({
    "auth": settings.SIGNALING_AUTH,
    "proxies": settings.SIGNALING_TRUSTED_PROXIES,
    "cookies_secure": [settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE],
    "plain": [plain.status_code, plain.get("Location")],
    "health": health.status_code,
    "secure": [secure.status_code, secure.get("Strict-Transport-Security")],
}))
"""


def test_a_deploy_sends_plain_http_to_https_except_the_health_checks(web_env_vars):
    result = run_in_deploy(web_env_vars, "-c", PROBE)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert (seen["auth"], seen["proxies"]) == ("token", 1)
    assert seen["cookies_secure"] == [True, True]
    assert seen["plain"] == [301, f"https://{RENDER_HOSTNAME}/api/ice-servers"]
    assert seen["health"] == 200
    assert seen["secure"] == [401, "max-age=31536000; includeSubDomains; preload"]


def test_a_short_secret_key_is_refused_in_production(web_env_vars):
    env_vars = {**web_env_vars, "SECRET_KEY": {"key": "SECRET_KEY", "value": "too-short-to-be-a-key"}}
    result = run_in_deploy(env_vars, "manage.py", "check")
    assert result.returncode != 0
    assert "SECRET_KEY must be a random value of 32+ characters" in result.stderr
