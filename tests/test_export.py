"""Export writes a sample's fields in the schema's order; spec warnings reach the user."""

from __future__ import annotations

import json

from helpers_proc import treesynth_in_process


def cli(*args, cwd):
    return treesynth_in_process(*args, cwd=cwd)


def test_export_fields_follow_the_schema_order_then_leaf_and_attributes(tmp_path):
    run = cli("run", "--preset", "gsm8k", "--store", "g.db", "--model", "fake:", "--depth", "1", "--pivots", "2",
              "--max-values", "2", "--leaf-samples", "1", "--infinite-samples", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = cli("export", "g.db", cwd=tmp_path).stdout.splitlines()
    assert lines
    for line in lines:
        assert list(json.loads(line)) == ["question", "solution", "answer", "leaf", "attributes"]


def test_bounds_added_to_a_custom_schema_are_reported_as_warnings(tmp_path):
    (tmp_path / "task.toml").write_text(
        'description = "short notes"\n'
        'sample_schema = \'{"type": "object", "properties": {"note": {"type": "string"}}}\'\n'
    )
    run = cli("run", "--spec", "task.toml", "--store", "t.db", "--model", "fake:", "--depth", "0", "--leaf-samples", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
    assert any("sample_schema" in w and "maxLength" in w for w in warnings), run.stderr
    lines = cli("export", "t.db", cwd=tmp_path).stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert len(json.loads(line)["note"]) <= 500
