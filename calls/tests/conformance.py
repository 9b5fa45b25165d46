"""Frames checked against the protocol's one source, protocol/asyncapi.yaml.

The test clients call `check(message, SERVER)` on every frame the server sends them
(calls/tests/wsclient.py `Client.receive`, calls/tests/netclient.py `Peer.receive`, and
the library clients of the `open_client` fixture through `checked_connection`), so a
frame the spec does not describe fails the test that saw it. `check(message, CLIENT)`
checks what a client sends. The spec is read once; each message is validated against
the schema of its `type` in its direction (JSON Schema draft-07, as AsyncAPI 3.0 uses),
with the formats the spec names (`uuid`, `date-time`) checked.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from jsonschema import Draft7Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

SPEC = Path(__file__).resolve().parents[2] / "protocol" / "asyncapi.yaml"
# The base URI the spec's own `#/components/...` references resolve against.
SPEC_URI = "urn:signaling-protocol:asyncapi"

# Who sends a message, and the spec's operation that lists what it sends.
CLIENT, SERVER = "client", "server"
OPERATIONS = {CLIENT: "receiveClientMessages", SERVER: "sendServerMessages"}

# RFC 3339, as `datetime.isoformat()` writes it for an aware datetime.
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})")

FORMATS = FormatChecker(formats=())


@FORMATS.checks("uuid", raises=ValueError)
def _is_uuid(value: object) -> bool:
    """The canonical form only: lowercase, with hyphens, as the server writes it."""
    return not isinstance(value, str) or str(UUID(value)) == value


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return _DATE_TIME.fullmatch(value) is not None and datetime.fromisoformat(value).tzinfo is not None


class NonConforming(AssertionError):
    """A message that protocol/asyncapi.yaml does not describe."""


@functools.cache
def spec() -> dict[str, Any]:
    """The spec as loaded from protocol/asyncapi.yaml (read once)."""
    return yaml.safe_load(SPEC.read_text(encoding="utf-8"))


def resolve(ref: str) -> dict[str, Any]:
    """Follow a local `$ref` (`#/a/b`), and the references it leads to, to the object itself."""
    node: Any = spec()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    if isinstance(node, dict) and set(node) == {"$ref"}:
        return resolve(node["$ref"])
    return node


def messages(sender: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each message `sender` may send, as (its key in components/messages, the message object)."""
    for reference in spec()["operations"][OPERATIONS[sender]]["messages"]:
        key = reference["$ref"].rpartition("/")[2]
        yield key, resolve(reference["$ref"])


def message_type(message: dict[str, Any]) -> str:
    """The `type` a spec message's payload carries."""
    return resolve(message["payload"]["$ref"])["properties"]["type"]["const"]


@functools.cache
def validator(ref: str) -> Draft7Validator:
    """A validator for the spec's schema at `ref` (`#/components/schemas/...`), its references resolved in the spec."""
    registry = Registry().with_resource(SPEC_URI, Resource.from_contents(spec(), default_specification=DRAFT7))
    return Draft7Validator({"$ref": SPEC_URI + ref}, registry=registry, format_checker=FORMATS)


@functools.cache
def _validators() -> dict[tuple[str, str], Draft7Validator]:
    return {
        (sender, message_type(message)): validator(message["payload"]["$ref"])
        for sender in OPERATIONS
        for _, message in messages(sender)
    }


def problems(message: dict[str, Any] | str, sender: str) -> list[str]:
    """What is wrong with `message` (a dict, or a frame's text) as sent by `sender`; empty when it conforms."""
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except ValueError:
            return ["the frame is not JSON"]
    if not isinstance(message, dict):
        return ["the frame is not a JSON object"]
    kind = message.get("type")
    validator = _validators().get((sender, kind)) if isinstance(kind, str) else None
    if validator is None:
        return [f"the spec has no {sender}-to-{'server' if sender == CLIENT else 'client'} message of type {kind!r}"]
    errors = sorted(validator.iter_errors(message), key=lambda error: [str(part) for part in error.absolute_path])
    return [
        f"{'.'.join(str(part) for part in error.absolute_path) or '(message)'}: {error.message}" for error in errors
    ]


def check(message: dict[str, Any] | str, sender: str) -> None:
    """Raise NonConforming unless `message`, sent by `sender`, is as protocol/asyncapi.yaml describes."""
    found = problems(message, sender)
    if found:
        raise NonConforming(
            f"a {sender} message does not conform to protocol/asyncapi.yaml: {'; '.join(found)}\n  message: {message!r}"
        )
