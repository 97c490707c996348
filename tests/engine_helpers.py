"""Helpers shared by tests: build a store, run the engine in-process, read the export."""

from __future__ import annotations

import json
from pathlib import Path

from treesynth.engine.config import TaskConfig
from treesynth.engine.tree import TreeSynth
from treesynth.store import Store
from treesynth.store.keys import canonical_json


def make_store(path: Path, config: TaskConfig, model) -> Store:
    store = Store.create(
        path,
        {
            "config": json.dumps(config.model_dump(mode="json"), separators=(",", ":")),
            "config_hash": config.content_hash(),
            "model": canonical_json(model.fingerprint),
            "seed": config.seed,
            "treesynth_version": "test",
            "created": "test",
        },
    )
    return store


def run_engine(config: TaskConfig, model, path: Path) -> tuple[Store, list]:
    store = make_store(path, config, model) if not path.exists() else Store(path)
    events = list(TreeSynth(config, model, store).run())
    return store, events


def export_lines(store: Store) -> list[dict]:
    from treesynth.engine.export import iter_records

    fields = list(store.run()["config"]["sample_schema"]["properties"])
    return [json.loads(line) for line in iter_records(store, fields)]
