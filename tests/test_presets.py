"""The shipped presets: each loads, renders its prompts, prints as a task file
that runs unchanged with --spec, and runs end to end on the embedded model,
every exported record valid against the preset's sample schema."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
from typer.testing import CliRunner

from treesynth.engine import prompts
from treesynth.engine.cli import app
from treesynth.engine.config import build_config, load_task_file
from treesynth.engine.presets import load_preset, preset_names, preset_text
from treesynth.store import Store

runner = CliRunner()

PRESETS = ["code", "gsm8k", "math", "simpletom"]
FIELDS = {
    "gsm8k": ["question", "solution", "answer"],
    "math": ["problem", "subject", "level", "solution", "answer"],
    "code": ["instruction", "input", "output"],
    "simpletom": ["story", "question", "choices", "label"],
}
# Words each preset's pivot and leaf prompts must carry beyond the generic ones.
DOMAIN_WORDS = {"gsm8k": "word problems", "math": "competition math", "code": "programming instructions", "simpletom": "theory-of-mind"}
TINY = ["--pivots", "2", "--max-values", "2", "--infinite-samples", "1", "--n-ctx", "2048"]
# Every preset makes its records at the root alone (depth 0): the records come
# from the leaf prompt and the sample schema, which is what differs between
# presets. A depth-1 tree doubled their time (code 20 s -> 41 s, MATH 37 s ->
# 74 s, SimpleToM 16 s -> 51 s, GSM8K 6 s -> 23-29 s). A preset's tree steps
# are covered elsewhere: its pivots and criterion prompts render with the
# preset's wording (above), a GSM8K preset tree is built on the fake model
# (test_flags_override_the_preset), and the built-in criterion and coverage
# run on the real model in the real-model kill series.
# At most two leaves: one sample each, except SimpleToM, whose leaf calls of two
# samples each hold the correct choice once in each position. MATH asks for
# exactly 2 samples (top-ups included): most of the 135M model's competition
# problems are digit runs or repeat themselves, and are dropped. Its answers
# are capped at 640 tokens: uncapped, the model's digit runs went on for 900 to
# 1400 tokens a call, and this one test took 340 s instead of 85 (at depth 1).
# The seed is 3, but 1 for MATH and code: with seed 3, three of MATH's five
# answers were dropped (two digit runs cut off at 640 tokens, one about the
# format: 5 calls, 32 s); with seed 1 its first two answers are valid problems
# (2 calls, 10 s). Code's first answer at seed 3 repeats itself and is dropped
# (2 calls, 22 s); at seed 1 it is kept (1 call, 6 s). SimpleToM at seed 7:
# 2 calls, 107 tokens, 7 s; seed 3 took 2 calls of 510 and 82 tokens, 20-25 s,
# and seeds 1, 2 and 4-11 from 211 to 1,188 tokens (2 or 3 calls, 11-44 s).
# Drops and top-ups are the engine's, the same for every preset, and tested
# on the fake model.
SEED = {"math": "1", "code": "1", "simpletom": "7"}
LEAF_FLAGS = {"simpletom": ["--leaf-samples", "2"], "math": ["--leaf-samples", "1", "--samples", "2", "--max-tokens", "640"]}


def test_the_four_domains_ship_and_are_listed_one_line_each():
    assert preset_names() == PRESETS
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == PRESETS
    assert "GSM8K-style" in lines[1] and "MATH-style" in lines[2] and "Code Alpaca" in lines[0] and "SimpleToM" in lines[3]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_with_every_field_required_and_bounded(name):
    config = build_config(load_preset(name), {})
    assert config.warnings == [], "a shipped preset needs no bounds added"
    schema = config.sample_schema
    assert list(schema["properties"]) == FIELDS[name]
    assert schema["required"] == FIELDS[name]
    # Pivot and leaf wording is the preset's; criterion and coverage keep the built-in few-shot turns.
    assert config.prompts.pivots and config.prompts.leaf
    assert config.prompts.criterion is None and config.prompts.coverage is None


@pytest.mark.parametrize("name", PRESETS)
def test_preset_prompts_render_with_domain_wording_and_never_the_format(name):
    config = build_config(load_preset(name), {})
    attrs = [("setting", "a farm")]
    pivot = prompts.pivots_messages(config.description, attrs, config.sample_schema, 1, config.prompts.pivots)[-1][1]
    leaf = prompts.leaf_messages(config.description, attrs, config.sample_schema, 1, config.prompts.leaf)[-1][1]
    criterion = prompts.criterion_messages(config.description, attrs, [{"a": "x"}, {"a": "y"}], ["tone"], config.prompts.criterion)[-1][1]
    coverage = prompts.coverage_messages(config.description, attrs, "tone", ["calm"], config.prompts.coverage)[-1][1]
    for text in (pivot, leaf, criterion, coverage):
        assert "Setting: a farm" in text
        assert not re.search(r"\bjson\b|\barrays?\b|\bschema\b", text.lower()), text
    for text in (pivot, leaf):
        assert config.description in text and DOMAIN_WORDS[name] in text and "one example" in text
    for field in FIELDS[name]:
        assert f"its {field} (" in pivot and f"its {field} (" in leaf
    assert "Do not sort them by tone." in criterion and "- x\n- y" in criterion
    assert "by tone. The tone groups so far: calm." in coverage


@pytest.mark.parametrize("name", PRESETS)
def test_preset_show_prints_a_task_file_that_runs_unchanged_with_spec(name, tmp_path):
    result = runner.invoke(app, ["preset", "show", name])
    assert result.exit_code == 0
    assert result.stdout == preset_text(name)
    assert result.stdout.startswith(f"# {name}: ")
    path = tmp_path / "my-task.toml"
    path.write_text(result.stdout, encoding="utf-8")
    assert build_config(load_task_file(path), {}) == build_config(load_preset(name), {})


@pytest.mark.parametrize("name", PRESETS)
def test_placeholders_listed_in_the_preset_file_are_the_checked_ones(name):
    listed = {}
    for line in preset_text(name).splitlines():
        match = re.match(r"#   (\w+): +(.*?) +\(must contain (.*)\)$", line)
        if match:
            listed[match[1]] = (re.findall(r"{(\w+)}", match[2]), re.findall(r"{(\w+)}", match[3]))
    assert listed == {step: (list(names), list(prompts.REQUIRED[step])) for step, names in prompts.PLACEHOLDERS.items()}


def test_unknown_preset_is_one_line_and_exit_2(tmp_path):
    shown = runner.invoke(app, ["preset", "show", "gsm9k"])
    assert shown.exit_code == 2
    assert shown.stderr == "error: unknown preset 'gsm9k'; the presets are: code, gsm8k, math, simpletom\n"
    ran = runner.invoke(app, ["run", "--preset", "../gsm8k", "--store", str(tmp_path / "x.db"), "--model", "fake:"])
    assert ran.exit_code == 2 and "unknown preset '../gsm8k'" in ran.stderr
    assert not (tmp_path / "x.db").exists()


def test_flags_override_the_preset(tmp_path):
    store = tmp_path / "run.db"
    result = runner.invoke(app, ["run", "--preset", "gsm8k", "--store", str(store), "--model", "fake:", "--depth", "1",
                                 "--pivots", "3", "--leaf-samples", "2", "--seed", "9", "--no-progress"])
    assert result.exit_code == 0, result.output
    exported = runner.invoke(app, ["export", str(store)])
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    schema = build_config(load_preset("gsm8k"), {}).sample_schema
    assert records and all(r["leaf"].startswith("xxh3:") and isinstance(r["attributes"], dict) for r in records)
    for record in records:
        jsonschema.validate({k: record[k] for k in FIELDS["gsm8k"]}, schema)
    config = Store.open_existing(store, readonly=True).run().config
    assert (config["depth"], config["pivots"], config["leaf_samples"], config["seed"]) == (1, 3, 2, 9)
    assert config["description"] == load_preset("gsm8k")["description"] and config["prompts"]["leaf"]


# -- the embedded model ------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_on_the_embedded_model_and_exports_valid_records(name, tmp_path):
    store = tmp_path / f"{name}.db"
    started = time.perf_counter()
    result = runner.invoke(app, ["run", "--preset", name, "--store", str(store), "--depth", "0", *TINY,
                                 "--seed", SEED.get(name, "3"),
                                 *LEAF_FLAGS.get(name, ["--leaf-samples", "1", "--max-samples", "2"]), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = tmp_path / f"{name}.jsonl"
    exported = runner.invoke(app, ["export", str(store), "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records, f"{name}: no samples"
    schema = load_preset(name)["sample_schema"]
    for record in records:
        assert sorted(record) == sorted(FIELDS[name] + ["leaf", "attributes"])
        jsonschema.validate({k: v for k, v in record.items() if k not in ("leaf", "attributes")}, schema)
        assert record["leaf"].startswith("xxh3:") and isinstance(record["attributes"], dict)
    if name == "simpletom":
        labels = [r["label"] for r in records]
        assert labels.count("A") == labels.count("B"), labels
    tokens = Store.open_existing(store, readonly=True).counts()["tokens"]
    print(f"\n{name}: {len(records)} records, {tokens} tokens, {time.perf_counter() - started:.1f} s; first:\n"
          + json.dumps(records[0], ensure_ascii=False))
