"""Helpers shared by tests: build a store, run the engine in-process, read the export."""

from __future__ import annotations

import json
from pathlib import Path

from treesynth.engine.config import TaskConfig
from treesynth.engine.tree import TreeSynth
from treesynth.store import Run, Store


def embedder():
    """The real sentence embedder (loaded once per process): the engine's third seam."""
    from treesynth.models.minilm import load_minilm

    return load_minilm()


def make_store(path: Path, config: TaskConfig, model) -> Store:
    from treesynth.engine.contract import method, method_hash

    the_method = method(embedder().fingerprint)
    store = Store.create(
        path,
        Run(
            config=config.model_dump(mode="json"),
            config_hash=config.content_hash(),
            model=model.fingerprint,
            seed=config.seed,
            treesynth_version="test",
            created="test",
            method=the_method,
            method_hash=method_hash(the_method),
        ),
    )
    return store


def run_engine(config: TaskConfig, model, path: Path) -> tuple[Store, list]:
    store = make_store(path, config, model) if not path.exists() else Store(path)
    events = list(TreeSynth(config, model, store, embedder()).run())
    return store, events


def export_lines(store: Store) -> list[dict]:
    from treesynth.engine.export import iter_records

    fields = list(store.run().config["sample_schema"]["properties"])
    return [json.loads(line) for line in iter_records(store, fields)]


_PEOPLE = ["farmer", "pilot", "teacher", "baker", "nurse", "sailor", "painter", "miner", "chef", "judge", "poet", "tailor", "dentist"]
_VERBS = ["sells", "paints", "counts", "repairs", "hides", "borrows", "throws", "washes", "measures", "builds", "orders"]
_THINGS = ["apples", "violins", "tractors", "umbrellas", "candles", "bicycles", "kites", "lanterns", "carpets", "telescopes", "saddles", "helmets"]
_PLACES = ["at the harbour", "in the desert", "on the roof", "near the castle", "under the bridge", "inside the museum",
           "beside the lake", "in the library", "at the airport", "on the mountain"]  # fmt: skip


def distinct_text(n: int) -> str:
    """The n-th of a family of unrelated sentences: the first 80 are pairwise
    below cosine 0.72 for the sentence embedder, so none is a near duplicate."""
    return f"The {_PEOPLE[n % 13]} {_VERBS[(n * 3) % 11]} {n % 9 + 2} {_THINGS[(n * 5) % 12]} {_PLACES[(n * 7) % 10]}."
