"""Render the protocol spec, protocol/asyncapi.yaml, into docs/protocol.md.

    python -m protocol.render           # write docs/protocol.md
    python -m protocol.render --check   # exit 1 when docs/protocol.md is not what the spec renders to

Pure: the same spec always renders to the same text (calls/tests/wire/test_spec.py
checks that the checked-in docs/protocol.md is fresh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "protocol" / "asyncapi.yaml"
DOC = ROOT / "docs" / "protocol.md"

CLIENT, SERVER = "client", "server"
DIRECTIONS = {
    CLIENT: ("receiveClientMessages", "Client to server"),
    SERVER: ("sendServerMessages", "Server to client"),
}
# Enumerations rendered as sections of their own, by schema name, with the heading they get.
ENUMERATIONS = {
    "ErrorCode": "Error codes",
    "CallEndedReason": "`call_ended` reasons",
    "CallRejectedReason": "`call_rejected` reasons",
    "CallStatus": "History statuses",
    "EndReason": "History end reasons",
    "Platform": "Push platforms",
}
# A line of an example longer than this is pretty-printed instead.
EXAMPLE_WIDTH = 110


def load(path: Path = SPEC) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _cell(text: Any) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _anchor(name: str) -> str:
    return name.lower().replace(".", "-").replace("_", "-")


class Renderer:
    """Turn the spec into Markdown, section by section."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.schemas: dict[str, dict[str, Any]] = spec["components"]["schemas"]
        self.messages = {sender: self._messages(sender) for sender in DIRECTIONS}
        self.payloads = {
            message["payload"]["$ref"].rpartition("/")[2] for found in self.messages.values() for _, message in found
        }

    # --- Reading the spec ------------------------------------------------------------

    def resolve(self, ref: str) -> dict[str, Any]:
        node: Any = self.spec
        for part in ref.removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        if isinstance(node, dict) and set(node) == {"$ref"}:
            return self.resolve(node["$ref"])
        return node

    def _messages(self, sender: str) -> list[tuple[str, dict[str, Any]]]:
        operation = self.spec["operations"][DIRECTIONS[sender][0]]
        return [(ref["$ref"].rpartition("/")[2], self.resolve(ref["$ref"])) for ref in operation["messages"]]

    def payload(self, message: dict[str, Any]) -> dict[str, Any]:
        return self.resolve(message["payload"]["$ref"])

    @staticmethod
    def _named(schema: dict[str, Any]) -> str | None:
        """The component a schema is (`$ref`) or wraps (`allOf` of one `$ref`), if any."""
        if "$ref" in schema:
            return schema["$ref"].rpartition("/")[2]
        parts = schema.get("allOf", [])
        if len(parts) == 1 and "$ref" in parts[0]:
            return parts[0]["$ref"].rpartition("/")[2]
        return None

    def _link(self, name: str) -> str:
        title = self.schemas[name].get("title", name)
        if name in ENUMERATIONS:
            return f"string: [{_cell(title).lower()}](#{_anchor('enum-' + name)})"
        return f"[{title}](#{_anchor('schema-' + name)})"

    # --- Types and fields ------------------------------------------------------------

    def type_of(self, schema: dict[str, Any]) -> str:
        """A short human name for what a schema allows."""
        named = self._named(schema)
        if named is not None:
            return self._link(named)
        if "const" in schema:
            return f"`{json.dumps(schema['const'])}`"
        if "enum" in schema:
            return " \\| ".join(f"`{value}`" for value in schema["enum"])
        if "oneOf" in schema:
            options = schema["oneOf"]
            if all("const" in option for option in options):
                return " \\| ".join(f"`{option['const']}`" for option in options)
            return " or ".join(self.type_of(option) for option in options)
        kind = schema.get("type")
        if isinstance(kind, list):
            return " or ".join(self.type_of({**schema, "type": one}) for one in kind)
        if kind == "array":
            items = schema.get("items", {})
            if self._named(items) is None and items.get("type") == "object":
                return "array of objects"
            return f"array of {self.type_of(items)}" + ("s" if items.get("type") in ("string", "object") else "")
        if kind == "string":
            text = f"string ({schema['format']})" if "format" in schema else "string"
            low, high = schema.get("minLength"), schema.get("maxLength")
            if high is not None:
                text += f", {low or 0}-{high} characters"
            return text
        if kind in ("integer", "number"):
            low, high = schema.get("minimum"), schema.get("maximum")
            if low is not None and high is not None:
                return f"{kind}, {low}-{high}"
            if low is not None:
                return f"{kind} >= {low}"
            return kind
        if kind == "null":
            return "null"
        return kind or "any"

    @staticmethod
    def _inner_object(schema: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
        """An anonymous object a field holds (or holds a list of), to list its fields too."""
        if "$ref" in schema or "allOf" in schema:
            return None
        if schema.get("type") == "object" and "properties" in schema:
            return schema, "."
        items = schema.get("items", {})
        if schema.get("type") == "array" and items.get("type") == "object" and "properties" in items:
            return items, "[]."
        return None

    def describe(self, schema: dict[str, Any]) -> str:
        text = schema.get("description", "")
        if "default" in schema:
            text = f"{text} Default `{json.dumps(schema['default'])}`.".strip()
        return _cell(text)

    def field_rows(self, schema: dict[str, Any], prefix: str = "", since: str = "") -> list[str]:
        rows = []
        required = set(schema.get("required", []))
        for name, field in schema.get("properties", {}).items():
            if name in required:
                needed = "yes"
            else:
                needed = _cell(field.get("x-required-when", "no"))
            field_since = field.get("x-since", since if name == "type" and not prefix else "")
            rows.append(
                f"| `{prefix}{name}` | {self.type_of(field)} | {needed} | {field_since} | {self.describe(field)} |"
            )
            inner = self._inner_object(field)
            if inner is not None:
                rows += self.field_rows(inner[0], f"{prefix}{name}{inner[1]}")
        return rows

    def field_table(self, schema: dict[str, Any], since: str = "", others: str = "") -> list[str]:
        lines = [
            "| Field | Type | Required | Since | Description |",
            "| --- | --- | --- | --- | --- |",
            *self.field_rows(schema, since=since),
        ]
        if others:
            lines += ["", others]
        return lines

    # --- Sections --------------------------------------------------------------------

    def render(self) -> str:
        info = self.spec["info"]
        channel = self.spec["channels"]["signaling"]
        lines = [
            "# The wire protocol",
            "",
            "<!-- Generated from protocol/asyncapi.yaml by `python -m protocol.render` (`make protocol-docs`).",
            "     Do not edit: change the spec and render it again. -->",
            "",
            f"Version {info['version']}. The machine-readable source is [protocol/asyncapi.yaml]"
            "(../protocol/asyncapi.yaml) (AsyncAPI 3.0.0), also served by the server at "
            "`GET /api/protocol/asyncapi.yaml`. Every frame the test suite's clients receive is "
            "validated against it (calls/tests/conformance.py).",
            "",
            "- [The connection](#the-connection)",
            "- [Call flows](#call-flows)",
            "- [Client to server](#client-to-server)",
            "- [Server to client](#server-to-client)",
            "- [Close codes](#close-codes)",
            *[f"- [{title.replace('`', '')}](#{_anchor('enum-' + name)})" for name, title in ENUMERATIONS.items()],
            "- [Values](#values)",
            "- [Push payloads](#push-payloads)",
            "",
            info["description"].strip(),
            "",
            "## The connection",
            "",
            channel["description"].strip(),
            "",
            "| Server | URL | |",
            "| --- | --- | --- |",
        ]
        for name, server in self.spec["servers"].items():
            url = f"{server['protocol']}://{server['host']}{server.get('pathname', '')}"
            lines.append(f"| {name} | `{url}` | {_cell(server.get('description', ''))} |")
        lines += ["", *self.render_sequences()]
        for sender in DIRECTIONS:
            lines += self.render_messages(sender)
        lines += self.render_close_codes(channel["x-close-codes"])
        for name, title in ENUMERATIONS.items():
            lines += self.render_enumeration(name, title)
        lines += self.render_values()
        lines += self.render_push_payloads()
        return "\n".join(lines).rstrip() + "\n"

    def render_sequences(self) -> list[str]:
        lines = [
            "## Call flows",
            "",
            "Who sends what, in which order. Each message links to its fields below.",
        ]
        for sequence in self.spec["x-sequences"]:
            ids = {name: f"P{index}" for index, name in enumerate(sequence["participants"])}
            lines += ["", f"### {sequence['title']}", "", "```mermaid", "sequenceDiagram"]
            lines += [f"    participant {ids[name]} as {name}" for name in sequence["participants"]]
            lines += [f"    {ids[step['from']]}->>{ids[step['to']]}: {step['message']}" for step in sequence["steps"]]
            lines += ["```", "", "| # | From | To | Message | Notes |", "| --- | --- | --- | --- | --- |"]
            for number, step in enumerate(sequence["steps"], 1):
                sender = SERVER if step["from"] == "Server" else CLIENT
                link = f"[`{step['message']}`](#{_anchor(sender + '-' + step['message'])})"
                lines.append(f"| {number} | {step['from']} | {step['to']} | {link} | {_cell(step.get('note', ''))} |")
        return lines + [""]

    def render_messages(self, sender: str) -> list[str]:
        lines = [f"## {DIRECTIONS[sender][1]}", ""]
        if sender == CLIENT:
            lines.append("The server ignores fields it does not know in every message; they are allowed.")
            others = "Other fields: ignored."
        else:
            lines.append("Exactly these fields: a field not listed here is not sent (the schemas forbid it).")
            others = "No other fields."
        lines.append("")
        lines.append("| Message | Since | Summary |")
        lines.append("| --- | --- | --- |")
        for key, message in self.messages[sender]:
            link = f"[`{message['name']}`](#{_anchor(key)})"
            lines.append(f"| {link} | {message.get('x-since', '')} | {_cell(message.get('summary', ''))} |")
        for key, message in self.messages[sender]:
            lines += ["", f'<a id="{_anchor(key)}"></a>', "", f"### `{message['name']}`: {message['title']}", ""]
            lines.append(f"*{message['x-since']}*. {message.get('summary', '')}".strip())
            if message.get("description"):
                lines += ["", message["description"].strip()]
            lines += ["", *self.field_table(self.payload(message), message.get("x-since", ""), others)]
            for example in message.get("examples", []):
                title = f"Example ({example['name']})" + (f": {example['summary']}" if example.get("summary") else ":")
                lines += ["", title, "", "```json", self.example(example["payload"]), "```"]
        return lines + [""]

    @staticmethod
    def example(payload: dict[str, Any]) -> str:
        text = json.dumps(payload, ensure_ascii=False)
        return text if len(text) <= EXAMPLE_WIDTH else json.dumps(payload, ensure_ascii=False, indent=2)

    def render_close_codes(self, codes: list[dict[str, Any]]) -> list[str]:
        lines = [
            "## Close codes",
            "",
            "How the WebSocket closes, and what each code means to a client.",
            "",
            "| Code | Name | Sent by | Meaning |",
            "| --- | --- | --- | --- |",
        ]
        for code in codes:
            lines.append(f"| {code['code']} | {code['name']} | {code['sent_by']} | {_cell(code['meaning'])} |")
        return lines + [""]

    def render_enumeration(self, name: str, title: str) -> list[str]:
        schema = self.schemas[name]
        lines = [f'<a id="{_anchor("enum-" + name)}"></a>', "", f"## {title}", ""]
        if schema.get("description"):
            lines += [schema["description"].strip(), ""]
        lines += ["| Value | Meaning |", "| --- | --- |"]
        lines += [f"| `{option['const']}` | {_cell(option.get('description', ''))} |" for option in schema["oneOf"]]
        return lines + [""]

    def render_values(self) -> list[str]:
        lines = ["## Values", "", "The values and objects the messages' fields refer to."]
        for name, schema in self.schemas.items():
            if name in self.payloads or name in ENUMERATIONS or schema.get("x-push-payload"):
                continue
            lines += ["", f'<a id="{_anchor("schema-" + name)}"></a>', "", f"### {schema.get('title', name)}", ""]
            lines.append(f"{self.type_of({k: v for k, v in schema.items() if k != 'title'})}.")
            if "pattern" in schema:
                lines.append(f"Pattern: `{schema['pattern']}`.")
            if schema.get("description"):
                lines += ["", schema["description"].strip()]
            if "properties" in schema:
                others = "No other fields." if schema.get("additionalProperties") is False else ""
                lines += ["", *self.field_table(schema, others=others)]
        return lines + [""]

    def render_push_payloads(self) -> list[str]:
        lines = [
            "## Push payloads",
            "",
            "Not sent on the socket: what a push (Web Push, FCM data message, APNs) carries to a device "
            "with no open socket. See [push.md](push.md).",
        ]
        for name, schema in self.schemas.items():
            if not schema.get("x-push-payload"):
                continue
            lines += ["", f'<a id="{_anchor("schema-" + name)}"></a>', "", f"### {schema['title']}", ""]
            lines += [schema.get("description", "").strip(), ""]
            lines += self.field_table(schema, others="No other fields.")
        return lines


def render(spec: dict[str, Any]) -> str:
    """Return docs/protocol.md's text for this spec."""
    return Renderer(spec).render()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when docs/protocol.md is not fresh")
    args = parser.parse_args(argv)
    text = render(load())
    if args.check:
        if not DOC.exists() or DOC.read_text(encoding="utf-8") != text:
            sys.stderr.write("docs/protocol.md is stale: run `python -m protocol.render` (make protocol-docs)\n")
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
