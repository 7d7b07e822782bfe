"""The committed JSON Schemas (docs/schemas/) are the models' own, and describe the wire exactly.

A client in another language trusts docs/schemas/*.json; these tests keep that trust earned:
the files are what ``python -m hakuriver.schemas`` generates from the models today, messages
the project sends validate against them, and messages the models refuse are refused by them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from hakuriver import schemas
from hakuriver.messages import (Heartbeat, Kill, Mount, NodeInfo, NumaNode, OutputChunk, RpcReply, RpcRequest,
                                StateEvent, Task)
from hakuriver.states import TaskState

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "schemas"


def committed(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((COMMITTED / f"{name}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_committed_schemas_match_the_models():
    problems = schemas.differences(COMMITTED)
    assert problems == [], "\n".join(problems) + "\nrun: python -m hakuriver.schemas --write docs/schemas/"


def test_check_names_a_stale_or_missing_file(tmp_path):
    schemas.write(tmp_path)
    (tmp_path / "kill.json").write_text("{}\n")
    (tmp_path / "heartbeat.json").unlink()
    result = subprocess.run([sys.executable, "-m", "hakuriver.schemas", "--check", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert "kill.json: differs from the model Kill" in result.stderr
    assert "heartbeat.json: missing" in result.stderr
    assert "task.json" not in result.stderr


def _task(**fields) -> Task:
    values = dict(task_id=(1 << 62) + 5, batch_id=(1 << 62) + 4, command="python", args=["-c", "print(1)"],
                  env={"MODEL_TYPE": "large", "_X1": ""}, cores=1.5, memory=8 << 30, target="node1", numa=0,
                  container="my-env", mounts=[Mount(host_path="/data", container_path="/in", read_only=True)],
                  user="alice", submit_host="laptop")
    values.update(fields)
    return Task(**values)


def _sent() -> dict[str, object]:
    """One message of each kind, as this project puts it on the wire."""
    numa = {0: NumaNode(cpus=[0, 1], memory=1 << 30), 1: NumaNode(cpus=[2, 3], memory=1 << 30)}
    return {
        "task": _task(),
        "state-event": StateEvent(task_id=5, node="node1", state=TaskState.QUEUED, seq=1, task=_task()),
        "kill": Kill(task_id=5, user="alice"),
        "heartbeat": Heartbeat(node="node1", cores_total=4, cores_free=2.5, memory_total=2 << 30,
                               memory_free=1 << 30, numa=numa, numa_cores_free={0: 1.0, 1: 1.5},
                               running=[5], queued=[6], executors=["process"], unenforced=["memory"]),
        "node-info": NodeInfo(node="node1", numa=[0, 1], cores=4, memory=2 << 30),
        "rpc-request": RpcRequest(method="status", params={"task_ids": [5]}),
        "rpc-reply": RpcReply(ok=True, result={"tasks": []}),
    }


@pytest.mark.parametrize("name", list(_sent()))
def test_what_the_project_sends_validates(name):
    body = json.loads(_sent()[name].to_bytes())
    committed(name).validate(body)


def test_output_chunk_headers_validate():
    headers = OutputChunk(task_id=(1 << 62) + 5, stream="stderr", offset=65536).headers()
    committed("output-chunk-headers").validate(headers)


REFUSED = [
    ("task", {"env": {"1BAD": "x"}}),
    ("task", {"cores": -1}),
    ("task", {"command": ""}),
    ("task", {"v": 2}),
    ("task", {"priority": 5}),                          # unknown field
    ("task", {"mounts": [{"host_path": "/a"}]}),        # container_path missing
    ("state-event", {"state": "done"}),
    ("kill", {"task_id": "5x"}),
    ("heartbeat", {"numa": {"zero": {"cpus": [0], "memory": 1}}}),
    ("rpc-request", {"method": "drop_tables"}),
]


@pytest.mark.parametrize("name,change", REFUSED, ids=[f"{n}:{next(iter(c))}" for n, c in REFUSED])
def test_what_the_models_refuse_the_schemas_refuse(name, change):
    body = {**json.loads(_sent()[name].to_bytes()), **change}
    model = schemas.MODELS[name]
    with pytest.raises(ValueError):
        model.model_validate_json(json.dumps(body))
    assert not committed(name).is_valid(body)


def test_chunk_headers_refused_like_the_model():
    good = OutputChunk(task_id=5, stream="stdout", offset=0).headers()
    for change in ({"stream": "stdin"}, {"offset": -1}, {"task_id": "x5"}, {"extra": 1}):
        headers = {**good, **change}
        with pytest.raises(ValueError):
            OutputChunk.model_validate(headers)
        assert not committed("output-chunk-headers").is_valid(headers), change
