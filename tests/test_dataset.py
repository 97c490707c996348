"""`export --to DIR`: a dataset folder that `datasets.load_dataset(DIR)` loads
without arguments (Parquet per split, a card), seeded splits stable under
reruns; the store's SQL views; README's schema section generated from the
store so it cannot drift."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from treesynth.engine.cli import app
from treesynth.engine.dataset import DatasetError, MARK, parse_splits, split_of
from treesynth.store import Store
from treesynth.store import schema as store_schema

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
# --pivots 3 --max-values 3: the fake model's criteria split the root and its children.
ARGS = ["run", "Short notes about houseplants", "--depth", "2", "--pivots", "3", "--max-values", "3",
        "--samples", "24", "--seed", "11", "--model", "fake:", "--no-progress"]


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory) -> Path:
    # A real process, so that its session records the command line the card quotes.
    store = tmp_path_factory.mktemp("run") / "run.db"
    result = subprocess.run([sys.executable, "-m", "treesynth", *ARGS, "--store", str(store)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return store


def export(*args: str):
    return runner.invoke(app, ["export", *map(str, args)])


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def load(folder: Path):
    import datasets  # the test extra installs it

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    return datasets.load_dataset(str(folder), cache_dir=str(folder.parent / "hf-cache"))


def store_records(path: Path) -> list[dict]:
    store = Store.open_existing(path)
    try:
        return [
            {"leaf": leaf, "data": json.loads(data), "attributes": json.loads(attributes), "hash": h}
            for leaf, data, attributes, h in store.iter_sample_rows()
        ]
    finally:
        store.close()


def test_the_folder_loads_with_load_dataset_and_holds_every_record_with_its_path(finished_store, tmp_path):
    folder = tmp_path / "ds"
    result = export(finished_store, "--to", folder, "--split", "train=0.75,test=0.25", "--jsonl")
    assert result.exit_code == 0, result.output
    records = store_records(finished_store)
    assert len(records) == 24
    ds = load(folder)
    assert set(ds) == {"train", "test"}
    assert ds["train"].num_rows + ds["test"].num_rows == 24
    assert ds["test"].num_rows > 0 and ds["train"].num_rows > ds["test"].num_rows
    loaded = [row for name in ("train", "test") for row in ds[name]]
    by_text = {r["data"]["text"]: r for r in records}
    assert {row["text"] for row in loaded} == set(by_text)
    dimensions = list(ds["train"].features["attributes"])
    assert len(dimensions) >= 2  # the tree split at depth 0 and 1
    for row in loaded:
        record = by_text[row["text"]]
        assert row["leaf"] == record["leaf"]
        assert {d: v for d, v in row["attributes"].items() if v is not None} == record["attributes"]
    # JSONL on request holds the same records as the Parquet of its split.
    for name in ("train", "test"):
        lines = (folder / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["text"] for line in lines] == ds[name]["text"]


def test_the_card_has_hub_front_matter_and_says_how_the_data_was_made(finished_store, tmp_path):
    folder = tmp_path / "ds"
    assert export(finished_store, "--to", folder, "--split", "train=0.9,test=0.1").exit_code == 0
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["configs"][0]["config_name"] == "default"
    assert [f["split"] for f in front["configs"][0]["data_files"]] == ["train", "test"]
    assert front["size_categories"] == ["n<1K"]
    assert "license" in front
    body = card.split("---\n", 2)[2]
    run = Store.open_existing(finished_store).run()
    for needed in ("Short notes about houseplants", run.method_hash, "seed: 11", "## Reproduce", "## Diversity",
                   "mean pairwise cosine", "treesynth run 'Short notes about houseplants'", MARK):
        assert needed in body, needed


def test_a_second_export_gives_the_same_bytes_and_splits_do_not_depend_on_other_records(finished_store, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert export(finished_store, "--to", first, "--split", "train=0.5,test=0.5").exit_code == 0
    assert export(finished_store, "--to", second, "--split", "train=0.5,test=0.5").exit_code == 0
    a, b = digests(first), digests(second)
    b["README.md"] = a["README.md"]  # the card names its own folder in the reproduce command
    assert a == b
    # Replacing an earlier export in place works and gives the same data.
    assert export(finished_store, "--to", first, "--split", "train=0.5,test=0.5").exit_code == 0
    assert digests(first) == a
    # A record's split is a function of the seed and its own hash: the same
    # whatever other records exist, and a different seed moves some records.
    hashes = [r["hash"] for r in store_records(finished_store)]
    splits = [("train", 0.5), ("test", 0.5)]
    alone = [split_of(11, h, splits) for h in hashes]
    assert alone == [split_of(11, h, splits) for h in reversed(hashes)][::-1]
    assert alone != [split_of(12, h, splits) for h in hashes]


@pytest.mark.parametrize(
    "text, message",
    [
        ("train=0.9,test=0.2", "add up to 1.1"),
        ("train=0.9", "add up to 0.9"),
        ("train", "NAME=FRACTION"),
        ("Train=1", "NAME=FRACTION"),
        ("train=x", "'x' is not a number"),
        ("train=0.5,train=0.5", "named twice"),
        ("train=1.5,test=-0.5", "above 0"),
    ],
)
def test_bad_splits_are_refused_in_one_line(text, message):
    with pytest.raises(DatasetError, match=message):
        parse_splits(text)


def test_bad_export_arguments_are_one_line_and_leave_a_foreign_folder_untouched(finished_store, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cases = [
        (["--to", foreign], "not empty and not an earlier treesynth export"),
        (["--to", tmp_path / "x", "--split", "train=0.5"], "add up to 0.5"),
        (["--to", tmp_path / "x", "-o", tmp_path / "x.jsonl"], "not both"),
        (["--split", "train=1"], "go with --to"),
        (["--to", tmp_path / "missing" / "x"], "does not exist"),
    ]
    for args, message in cases:
        result = export(finished_store, *args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "x").exists()


def test_the_views_agree_with_the_tables(finished_store):
    store = Store.open_existing(finished_store)
    q = lambda sql: store.db.execute(sql).fetchall()  # noqa: E731
    samples = q("SELECT count(*) FROM samples")[0][0]
    assert samples == 24
    assert q("SELECT count(*) FROM samples_flat")[0][0] == samples
    attribute_rows = sum(len(json.loads(a)) for (a,) in q("SELECT attributes FROM samples"))
    assert attribute_rows > samples  # depth-2 paths: two attributes per sample
    assert q("SELECT count(*) FROM sample_attributes")[0][0] == attribute_rows
    text, attributes = q("SELECT attributes_text, attributes FROM samples_flat LIMIT 1")[0]
    assert text == "; ".join(f"{d}: {v}" for d, v in json.loads(attributes).items())
    leaves = q("SELECT sum(kept), sum(dropped), count(*) FROM leaves")[0]
    assert leaves[0] == samples and leaves[1] == q("SELECT count(*) FROM dropped")[0][0]
    assert leaves[2] == q("SELECT count(*) FROM nodes WHERE state IN ('leaf', 'planned', 'done')")[0][0]
    assert q("SELECT count(*) FROM failures")[0][0] == (
        q("SELECT count(*) FROM nodes WHERE reason IS NOT NULL")[0][0] + q("SELECT count(*) FROM dropped")[0][0]
    )
    per_step = q("SELECT sum(calls), sum(completion_tokens) FROM calls_per_step")[0]
    assert per_step == q("SELECT count(*), sum(completion_tokens) FROM calls")[0]
    assert {r for (r,) in q("SELECT DISTINCT role FROM calls_per_step")} >= {"pivots", "criterion", "coverage", "leaf"}
    store.close()


def test_the_readme_schema_section_is_generated_from_the_store():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = store_schema.section(readme)
    assert documented is not None, "README.md lost its schema markers"
    assert documented == store_schema.markdown(), "README's store schema is stale: run python -m treesynth.store.schema README.md"
    names = {name for name, _, _ in store_schema.fresh_schema()}
    assert {"samples", "nodes", "calls", "samples_flat", "leaves", "failures"} <= names
