"""The content contract: a store is continued only under the method that
wrote it. A changed template, schema or rule refuses with one line and exit
code 2, and leaves the store untouched; settings that do not change content
(threads, progress) never refuse."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from treesynth.engine import checks, contract, prompts, schemas
from treesynth.engine.cli import app
from treesynth.store import Store

runner = CliRunner()
ARGS = ["run", "Short notes about houseplants", "--depth", "1", "--pivots", "2", "--max-values", "2",
        "--samples", "4", "--seed", "5", "--model", "fake:", "--no-progress"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def finished_store(tmp_path: Path) -> Path:
    store = tmp_path / "run.db"
    result = runner.invoke(app, [*ARGS, "--store", str(store)])
    assert result.exit_code == 0, result.output
    return store


@pytest.mark.parametrize(
    "change, part",
    [
        (lambda mp: mp.setitem(prompts.TEMPLATES, "leaf", prompts.LEAF + "\nBe brief."), "prompts.leaf"),
        (lambda mp: mp.setattr(schemas, "VALUE_PATTERN", r"^[a-z]+$"), "schemas.value_pattern"),
        (lambda mp: mp.setattr(checks, "CATCH_ALL", checks.CATCH_ALL | {"stuff"}), "checks.catch_all"),
        (lambda mp: mp.setattr(contract, "_RULES", contract._RULES + (checks.clean,)), "rules.checks.clean"),
    ],
    ids=["template", "schema", "check word list", "rule code"],
)
def test_a_changed_method_refuses_to_continue_and_leaves_the_store_untouched(finished_store, monkeypatch, change, part):
    before = digest(finished_store)
    change(monkeypatch)
    result = runner.invoke(app, [*ARGS, "--store", str(finished_store)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "different method" in lines[0] and part in lines[0]
    assert "Traceback" not in result.output
    assert digest(finished_store) == before


def test_settings_that_do_not_change_content_still_continue(finished_store):
    result = runner.invoke(app, [*ARGS, "--store", str(finished_store), "--threads", "1", "--progress"])
    assert result.exit_code == 0, result.output
    assert "0 model calls sent" in result.stdout


def test_a_store_from_before_the_method_was_recorded_is_refused(finished_store):
    store = Store(finished_store)
    store.db.execute("UPDATE runs SET method = NULL, method_hash = NULL")
    store.close()
    result = runner.invoke(app, [*ARGS, "--store", str(finished_store)])
    assert result.exit_code == 2
    assert "written before the method was recorded" in result.stderr


def test_the_method_names_every_rule_it_hashes():
    method = contract.method({"model": "x"})
    assert method["prompts"]["leaf"] == prompts.LEAF
    assert "checks.sample_problem" in method["rules"] and "selection.SampleFilter.judge" in method["rules"]
    assert contract.method_hash(method) != contract.method_hash(contract.method({"model": "y"}))
