"""Custom sample specs (checked and bounded at start), prompt overrides
(placeholders checked before any model call) and the seeded balance of the
correct choice's position. Fake model only: no llama.cpp here."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from engine_helpers import export_lines, run_engine
from treesynth.engine import prompts
from treesynth.engine.cli import app
from treesynth.engine.config import DEFAULT_SAMPLE_SCHEMA, ConfigError, TaskConfig, build_config
from treesynth.engine.presets import load_preset
from treesynth.engine.spec import check_sample_schema, choice_position, finish_sample, shuffle_choices
from treesynth.models.fake import FakeModel

runner = CliRunner()


def obj(**properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def short(**kw) -> dict:
    return {"type": "string", "maxLength": 80, **kw}


# -- checking and bounding -------------------------------------------------------


def test_bounded_schema_passes_unchanged_without_warnings():
    schema = obj(
        q=short(minLength=5, description="a question"),
        n={"type": "integer", "minimum": 1, "maximum": 5},
        x={"type": "number"},
        ok={"type": "boolean"},
        kind={"enum": ["a", "b"]},
        tags={"type": "array", "items": short(), "minItems": 1, "maxItems": 3},
        code=short(pattern="^[A-Z]{3}$"),
    )
    assert check_sample_schema(schema) == (schema, [])
    assert check_sample_schema(DEFAULT_SAMPLE_SCHEMA) == (DEFAULT_SAMPLE_SCHEMA, [])


def test_unbounded_strings_and_arrays_get_bounds_and_one_warning_each():
    schema = {
        "type": "object",
        "properties": {
            "story": {"type": "string", "minLength": 600},
            "steps": {"type": "array", "items": {"type": "string"}},
        },
    }
    bounded, warnings = check_sample_schema(schema)
    assert bounded["properties"]["story"]["maxLength"] == 600  # never below minLength
    assert bounded["properties"]["steps"]["maxItems"] == 10
    assert bounded["properties"]["steps"]["items"]["maxLength"] == 500
    assert bounded["required"] == ["story", "steps"] and bounded["additionalProperties"] is False
    assert warnings == [
        'no "required" list; every field made required',
        "properties.story: no maxLength; bounded to 600 characters",
        "properties.steps: no maxItems; bounded to 10 items",
        "properties.steps.items: no maxLength; bounded to 500 characters",
    ]
    assert "maxLength" not in schema["properties"]["story"], "the caller's schema is not modified"
    assert check_sample_schema(bounded) == (bounded, []), "bounding is idempotent"


def test_config_carries_the_warnings_and_stores_the_bounded_schema():
    config = build_config({"description": "d", "sample_schema": {"type": "object", "properties": {"a": {"type": "string"}}}}, {})
    assert config.sample_schema["properties"]["a"]["maxLength"] == 500
    assert config.warnings == [
        'sample_schema: no "required" list; every field made required',
        "sample_schema: properties.a: no maxLength; bounded to 500 characters",
    ]
    assert build_config({"description": "d"}, {}).warnings == []


def test_nested_objects_and_lists_of_objects_are_supported_two_levels_deep():
    turn = obj(role={"enum": ["user", "assistant"]}, content=short())
    schema = obj(title=short(), turns={"type": "array", "items": turn, "maxItems": 4}, meta=obj(source=short(), extra=obj(note=short())))
    assert check_sample_schema(schema) == (schema, [])
    deeper = obj(a=obj(b=obj(c=obj(d=short()))))
    with pytest.raises(ConfigError, match=r"properties\.a\.properties\.b\.properties\.c: objects nest at most 2 levels"):
        check_sample_schema(deeper)


def test_fake_model_run_with_a_custom_nested_spec_exports_valid_records(tmp_path):
    user_schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "turns": {"type": "array", "items": obj(role={"enum": ["user", "assistant"]}, content={"type": "string"}), "minItems": 1},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["title", "turns", "rating"],
    }
    config = build_config({"description": "support chats", "sample_schema": user_schema, "depth": 1, "pivots": 3, "max_values": 3}, {})
    store, _ = run_engine(config, FakeModel(), tmp_path / "run.db")
    records = export_lines(store)
    assert len(records) >= 10
    for record in records:
        assert set(list(record)[:3]) == {"title", "turns", "rating"} and list(record)[3:] == ["leaf", "attributes"]
        sample = {k: v for k, v in record.items() if k not in ("leaf", "attributes")}
        jsonschema.validate(sample, user_schema)
        jsonschema.validate(sample, config.sample_schema)


UNSUPPORTED = [
    ({"type": "array", "items": short()}, 'the sample must be of "type": "object"'),
    ({"type": "object", "properties": {}}, 'an object needs "properties" with at least one field'),
    (obj(a={"anyOf": [short(), {"type": "integer"}]}), "properties.a: no \"type\""),
    (obj(a={"type": "string", "maxLength": 9, "anyOf": [short()]}), "properties.a: 'anyOf' is not supported in a string field"),
    (obj(a={"$ref": "#/$defs/x"}), 'properties.a: no "type"'),
    ({**obj(a=short()), "$defs": {"x": short()}}, "'$defs' is not supported in an object field"),
    (obj(a={"type": ["string", "null"]}), "properties.a: a list of types is not supported"),
    (obj(a={"type": "null"}), 'properties.a: type "null" is not supported'),
    (obj(a={"type": "date"}), "properties.a: type 'date' is not supported"),
    (obj(a={"type": "array", "items": short(), "maxItems": 3, "uniqueItems": True}), "properties.a: 'uniqueItems' is not supported in an array field"),
    (obj(a={"type": "array", "items": [short(), short()], "maxItems": 2}), 'properties.a: an array needs "items"'),
    (obj(a={"type": "string", "maxlength": 9}), "properties.a: 'maxlength' is not supported in a string field"),
    ({**obj(a=short()), "additionalProperties": True}, '"additionalProperties" must be false'),
    ({**obj(a=short()), "required": ["a", "b"]}, "\"required\" names 'b', not among its properties"),
    ({**obj(a=short()), "patternProperties": {"^x": short()}}, "'patternProperties' is not supported"),
    (obj(a=short(minLength=50, maxLength=10)), "properties.a: minLength 50 is above maxLength 10"),
    (obj(a={"type": "array", "items": short(), "minItems": 5, "maxItems": 2}), "properties.a: minItems 5 is above maxItems 2"),
    (obj(a=short(maxLength=0)), "properties.a: maxLength must be at least 1"),
    (obj(a={"type": "integer", "minimum": 9, "maximum": 1}), "properties.a: minimum 9 is above maximum 1"),
    (obj(a={"enum": []}), 'properties.a: "enum" must be a non-empty list'),
    (obj(a={"enum": ["x", None]}), "properties.a: enum value null is not a string, number or boolean"),
    (obj(a={"type": "integer", "enum": [1, "two"]}), 'properties.a: enum value "two" is not of type integer'),
    (obj(a={"enum": ["x", "x"]}), 'properties.a: "enum" repeats a value'),
    (obj(leaf=short()), "property 'leaf' is reserved for export"),
    (obj(a=short(pattern="(unclosed")), "the constraint engine refuses it"),
    (obj(a=short(format="postcode")), "the constraint engine refuses it: Unknown format: postcode"),
]


@pytest.mark.parametrize("schema, message", UNSUPPORTED, ids=[m[:40] for _, m in UNSUPPORTED])
def test_unsupported_construct_is_a_config_error_naming_it(schema, message):
    with pytest.raises(ConfigError) as error:
        build_config({"description": "d", "sample_schema": schema}, {})
    assert message in str(error.value)
    assert str(error.value).startswith("task: sample_schema: ")


def write_task(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "task.toml"
    path.write_text('description = "short support chats"\n' + body, encoding="utf-8")
    return path


CLI_ERRORS = [
    ('sample_schema = \'{"type": "object", "properties": {"a": {"oneOf": []}}}\'\n', 'sample_schema: properties.a: no "type"'),
    ('sample_schema = \'{"type": "object", "properties": {"a": {"type": "string", "maxLength": 5, "not": {}}}}\'\n',
     "sample_schema: properties.a: 'not' is not supported in a string field"),
    ('sample_schema = \'{"type": "object", "properties": {"a": {"type": ["string", "integer"]}}}\'\n', "a list of types is not supported"),
    ('sample_schema = \'{"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}, "required": ["z"]}\'\n',
     "\"required\" names 'z'"),
    ('sample_schema = \'{"type": "object", "properties": {"a": {"type": "string", "minLength": 9, "maxLength": 5}}}\'\n',
     "minLength 9 is above maxLength 5"),
    ("sample_schema = '{not json'\n", "sample_schema: not valid JSON"),
    ('[prompts]\nleaf = "Write {n} samples of {description} in {subspace} about {topic}."\n',
     "prompts.leaf: unknown placeholder {topic}; known: description, subspace, n, examples, fields"),
    ('[prompts]\npivots = "Write {n} samples of {description}."\n', "prompts.pivots: the template must contain {subspace}"),
    ('[prompts]\ncoverage = "{dimension} {values} {{ok}} }"\n', "prompts.coverage: not a valid template (Single '}' encountered"),
    ('[prompts]\ncriterion = "{numbered_pivots} {n:%Y}"\n', "prompts.criterion: cannot be rendered"),
    ('[prompts]\ncriterion = "{numbered_pivots} {description.upper}"\n', "prompts.criterion: unknown placeholder {description.upper}"),
    ('[prompts]\ncriterion = "{numbered_pivots} {0}"\n', "prompts.criterion: unknown placeholder {0}"),
    ('[prompts]\nsystem = "be nice"\n', "prompts.system: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("body, message", CLI_ERRORS, ids=[m[:40] for _, m in CLI_ERRORS])
def test_cli_refuses_a_bad_spec_in_one_line_with_exit_2_before_any_model_call(tmp_path, body, message):
    task = write_task(tmp_path, body)
    store = tmp_path / "run.db"
    log = tmp_path / "calls.log"
    result = runner.invoke(app, ["run", "--spec", str(task), "--store", str(store), "--model", f"fake:log={log}"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {task}: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not store.exists() and not log.exists()


def test_cli_refuses_every_unsupported_construct_with_exit_2(tmp_path):
    store = tmp_path / "run.db"
    for schema, message in UNSUPPORTED:
        task = write_task(tmp_path, f"sample_schema = '{json.dumps(schema)}'\n")
        result = runner.invoke(app, ["run", "--spec", str(task), "--store", str(store), "--model", "fake:"])
        assert result.exit_code == 2, (message, result.output)
        assert result.stderr.startswith(f"error: {task}: sample_schema: ") and message in result.stderr, result.stderr
        assert not store.exists()


def test_preset_with_shuffle_choices_on_a_field_that_is_not_an_array_is_refused(tmp_path):
    task = load_preset("simpletom")
    task["shuffle_choices"] = {"choices": "question", "label": "label"}
    with pytest.raises(ConfigError, match="'question' must be an array field with minItems = maxItems >= 2"):
        build_config(task, {})
    task["shuffle_choices"] = {"choices": "choices", "label": "story"}
    with pytest.raises(ConfigError, match="'story' must be an enum field with exactly 2 values"):
        build_config(task, {})
    task["shuffle_choices"] = {"choices": "choices", "label": "answer"}
    with pytest.raises(ConfigError, match="'answer' is not a field of the sample schema"):
        build_config(task, {})


# -- prompt overrides ---------------------------------------------------------------


def test_builtin_templates_pass_their_own_check_and_every_placeholder_is_documented():
    for step, template in prompts.TEMPLATES.items():
        prompts.check_template(step, template)
        assert set(prompts._placeholders(template)) <= set(prompts.PLACEHOLDERS[step])
    help_text = prompts.placeholder_help()
    for step, names in prompts.PLACEHOLDERS.items():
        assert f"[prompts] {step}" in help_text
        assert all(f"{{{name}}}" in help_text for name in names)


def test_every_documented_placeholder_is_supplied_by_its_render_function():
    every = {step: " ".join("{" + name + "}" for name in names) for step, names in prompts.PLACEHOLDERS.items()}
    attrs = [("setting", "farm")]
    schema = DEFAULT_SAMPLE_SCHEMA
    rendered = {
        "pivots": prompts.pivots_messages("d", attrs, schema, 4, every["pivots"]),
        "criterion": prompts.criterion_messages("d", attrs, [{"text": "p1"}, {"text": "p2"}], ["size"], every["criterion"]),
        "coverage": prompts.coverage_messages("d", attrs, "colour", ["red", "blue"], every["coverage"]),
        "leaf": prompts.leaf_messages("d", attrs, schema, 4, every["leaf"]),
    }
    for step, messages in rendered.items():
        user = messages[-1][1]
        assert "{" not in user.replace('{"text"', ""), (step, user)
        assert "farm" in user


def test_overridden_templates_reach_their_step_and_only_theirs(tmp_path):
    overrides = {
        "pivots": "PIVOT-MARK {subspace} {n}",
        "criterion": "CRITERION-MARK {numbered_pivots}",
        "coverage": "COVERAGE-MARK {dimension}: {values}",
        "leaf": "LEAF-MARK {description} {subspace} {fields}",
    }
    config = TaskConfig(description="toy problems", depth=1, pivots=3, leaf_samples=2, max_values=3, prompts=overrides)
    model = FakeModel()
    run_engine(config, model, tmp_path / "run.db")
    seen = Counter()
    for request in model.history:
        user = request.messages[-1][1]
        marks = [m for m in ("PIVOT", "CRITERION", "COVERAGE", "LEAF") if user.startswith(m + "-MARK")]
        assert len(marks) == 1, user
        seen[marks[0]] += 1
    assert set(seen) == {"PIVOT", "CRITERION", "COVERAGE", "LEAF"}
    leaf_prompt = next(r.messages[-1][1] for r in model.history if r.messages[-1][1].startswith("LEAF-MARK"))
    dimension = json.loads(next(iter(model_nodes(tmp_path / "run.db"))))[0][0]
    assert leaf_prompt.startswith(f"LEAF-MARK toy problems {dimension[:1].upper()}{dimension[1:]}: ")


def model_nodes(path):
    from treesynth.store import Store

    return [node["path"] for node in Store(path).db.query("SELECT path FROM nodes WHERE depth = 1")]


# -- the correct choice's position ------------------------------------------------------


def test_choice_positions_are_a_permutation_in_every_group_and_depend_only_on_place():
    for k in (2, 3, 4):
        positions = [choice_position(7, "xxh3:leaf", 0, i, k) for i in range(12 * k)]
        for start in range(0, len(positions), k):
            assert sorted(positions[start : start + k]) == list(range(k))
        assert positions == [choice_position(7, "xxh3:leaf", 0, i, k) for i in range(12 * k)]
    two = [choice_position(7, "xxh3:leaf", call, i, 2) for call in range(20) for i in range(2)]
    assert len(set(two[::2])) == 2, "the first position of a pair is drawn, not fixed"
    assert two != [choice_position(8, "xxh3:leaf", call, i, 2) for call in range(20) for i in range(2)]


def test_shuffle_moves_the_correct_text_and_relabels():
    sample = {"story": "s", "choices": ["right", "wrong"], "label": "A"}
    assert shuffle_choices(sample, "choices", "label", ["A", "B"], 1) == {"story": "s", "choices": ["wrong", "right"], "label": "B"}
    assert shuffle_choices(sample, "choices", "label", ["A", "B"], 0) == sample
    three = {"choices": ["x", "y", "z"], "label": "C"}
    assert shuffle_choices(three, "choices", "label", ["A", "B", "C"], 0) == {"choices": ["z", "x", "y"], "label": "A"}
    config = TaskConfig(description="d")
    assert finish_sample(config, sample, "xxh3:leaf", 0, 1) is sample


def simpletom_config(seed: int, **kw) -> TaskConfig:
    flags = {"depth": 1, "pivots": 4, "leaf_samples": 4, "max_values": 50, "infinite_samples": 1, "seed": seed, **kw}
    return build_config(load_preset("simpletom"), flags)


def test_simpletom_answer_positions_are_exactly_balanced_for_a_seed(tmp_path):
    config = simpletom_config(seed=5)
    model = FakeModel()
    store, _ = run_engine(config, model, tmp_path / "a.db")
    records = export_lines(store)
    assert len(records) >= 12
    assert Counter(r["label"] for r in records) == {"A": len(records) // 2, "B": len(records) // 2}

    # The shuffle never changes which text is correct: compare with the model's own answers.
    raw = {}
    for row in store.db.query("SELECT node, step, response FROM calls WHERE role = 'leaf'"):
        call = int(row["step"].split(":")[1])
        answer = json.loads(row["response"])  # one sample per request by default, an array otherwise
        for index, sample in enumerate(answer if isinstance(answer, list) else [answer]):
            raw[(row["node"], call, index)] = sample
    stored = store.db.query("SELECT leaf, call, idx, data FROM samples")
    moved = 0
    for row in stored:
        before, after = raw[(row["leaf"], row["call"], row["idx"])], json.loads(row["data"])
        correct_before = before["choices"]["AB".index(before["label"])]
        assert after["choices"]["AB".index(after["label"])] == correct_before
        assert sorted(after["choices"]) == sorted(before["choices"])
        moved += after["label"] != before["label"]
    assert moved > 0

    again, _ = run_engine(simpletom_config(seed=5), FakeModel(), tmp_path / "b.db")
    assert export_lines(again) == records, "same seed, same positions"
    other = [r["label"] for r in export_lines(run_engine(simpletom_config(seed=8), FakeModel(), tmp_path / "c.db")[0])]
    assert other.count("A") == other.count("B") == len(other) // 2
    assert len(other) >= 12


def test_odd_leaf_samples_warn_that_balance_is_within_one_per_call():
    assert simpletom_config(seed=0).warnings == []
    assert simpletom_config(seed=0, leaf_samples=3).warnings == [
        "shuffle_choices: leaf_samples 3 is not a multiple of 2 choices; "
        "the correct choice's position is balanced to within one per leaf"
    ]
