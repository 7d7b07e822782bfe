"""JSON Schemas of every wire message, generated from the pydantic models of :mod:`hakuriver.messages`.

Why it exists: a client written in another language needs the message contract as data, and
that data must never drift from the models every process of this project validates with. So
the schemas are not written by hand: this module derives them, ``docs/schemas/*.json`` holds
the committed copies that ``docs/protocol.md`` links to, and ``tests/test_schemas.py`` fails
when a model changes and the copies were not rewritten.

    python -m hakuriver.schemas --write docs/schemas/   # (re)write the committed copies
    python -m hakuriver.schemas --check docs/schemas/   # exit 1 and name what differs

Each schema is the *validation* schema: it describes what a receiver accepts. A field with a
default may be left out when sending; senders of this project always write every field.
Nothing imports this module at start-up; it is a tool for maintainers and the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from hakuriver.messages import Heartbeat, Kill, NodeInfo, OutputChunk, RpcReply, RpcRequest, StateEvent, Task

DIALECT = "https://json-schema.org/draft/2020-12/schema"

# File name (without .json) → the model of that message. OutputChunk is the metadata of an
# output chunk, which travels as AMQP headers, not as a JSON body (see docs/protocol.md).
MODELS: dict[str, type[BaseModel]] = {
    "task": Task,
    "state-event": StateEvent,
    "output-chunk-headers": OutputChunk,
    "kill": Kill,
    "heartbeat": Heartbeat,
    "node-info": NodeInfo,
    "rpc-request": RpcRequest,
    "rpc-reply": RpcReply,
}


# The output chunk's headers() writes the task id as a decimal string (the receiving model
# accepts the string or an integer); the schema says so, since it describes those headers.
_CHUNK_TASK_ID = {"anyOf": [{"type": "string", "pattern": "^[0-9]+$"}, {"type": "integer"}], "title": "Task Id"}


class _Exact(GenerateJsonSchema):
    """pydantic's generator, made as strict as the models: a dict whose keys must match a
    pattern (``Task.env``) rejects the other keys too, and a dict with integer keys
    (``Heartbeat.numa``) has keys written as decimal numbers, as validation requires."""

    def dict_schema(self, schema):
        result = super().dict_schema(schema)
        if "patternProperties" in result:
            result.setdefault("additionalProperties", False)
        if schema.get("keys_schema", {}).get("type") == "int":
            result["propertyNames"] = {"pattern": "^-?[0-9]+$"}
        return result


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every message's JSON Schema, by file name."""
    schemas = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema(mode="validation", schema_generator=_Exact)
        if model is OutputChunk:
            schema["properties"]["task_id"] = _CHUNK_TASK_ID
        schemas[name] = {"$schema": DIALECT, "$id": f"{name}.json", **schema}
    return schemas


def render(schema: dict[str, Any]) -> str:
    """The text committed for ``schema``: stable key order, so a diff shows only real changes."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(directory: Path) -> list[Path]:
    """Write every schema into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / f"{name}.json"
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


def differences(directory: Path) -> list[str]:
    """What in ``directory`` does not match the models, one line each (empty: all match)."""
    expected = {f"{name}.json": render(schema) for name, schema in json_schemas().items()}
    found = {path.name for path in directory.glob("*.json")} if directory.is_dir() else set()
    problems = []
    for file_name, text in expected.items():
        path = directory / file_name
        if file_name not in found:
            problems.append(f"{path}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path}: differs from the model {MODELS[file_name[:-5]].__name__}")
    problems += [f"{directory / name}: no such message model" for name in sorted(found - expected.keys())]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hakuriver.schemas",
                                     description="Write or check the JSON Schemas of HakuRiver's messages.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="DIR", type=Path, help="write DIR/<message>.json for every message")
    action.add_argument("--check", metavar="DIR", type=Path, help="exit 1 if DIR does not match the models")
    args = parser.parse_args(argv)
    if args.write is not None:
        for path in write(args.write):
            print(path)
        return 0
    problems = differences(args.check)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"rewrite them with: python -m hakuriver.schemas --write {args.check}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
