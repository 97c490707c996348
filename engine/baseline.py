"""The paper's baseline: temperature sampling from the root prompt alone.

A baseline store is a normal run store whose config has depth 0 (the root is
the only node, and a leaf) and ``samples`` = ``max_samples`` = N. Its root's
target of N samples is written here, with the store's baseline mark, in one
transaction. The TreeSynth driver then synthesises the planned root like any
leaf, so the baseline differs from the tree run in one thing only, the
absence of the tree's attributes: the same prompt template (with no
properties listed), sample schema, temperature, samples per request, dedup
(the same embedder, threshold and checks, run-wide) and request limit, and
the same exact count N. ``export``, ``status`` and ``diversity`` read it as
they read a tree run, and a rerun of the same command continues it exactly."""

from __future__ import annotations

import datetime
from typing import Any

from treesynth.engine.config import TaskConfig, build_config
from treesynth.engine.leaves import call_sizes, request_limit
from treesynth.store import Node, Store, StoreError
from treesynth.store.keys import root_key

# Keys of a tree run's config that a baseline copies with --like: everything
# that decides what one leaf call asks for and how it is sampled.
LIKE_KEYS = (
    "description", "sample_schema", "leaf_samples", "samples_per_request", "near_duplicate", "requests_per_sample",
    "seed", "temperature", "top_p", "max_tokens", "call_retries", "prompts", "shuffle_choices",
)


def baseline_config(task: dict[str, Any], overrides: dict[str, Any], samples: int, source: str = "baseline") -> TaskConfig:
    return build_config(task, {**overrides, "depth": 0, "max_samples": samples, "samples": samples}, source=source)


def like_task(run_config: dict[str, Any]) -> dict[str, Any]:
    """The task of a tree run's stored config, as a baseline of it uses it."""
    return {key: run_config[key] for key in LIKE_KEYS if key in run_config}


def baseline_plan(samples: int, leaf_samples: int) -> list[int]:
    return call_sizes(samples, leaf_samples)


def baseline_mark(store: Store) -> int | None:
    """N when the store is a baseline, else None (also for stores older than the mark)."""
    return store.baseline_mark()


def prepare(store: Store, config: TaskConfig) -> bool:
    """Write the root leaf, its plan and the baseline mark (one transaction)
    unless the store already has them; True when written now."""
    samples = config.max_samples
    if store.has_root():
        mark = baseline_mark(store)
        if mark is None:
            raise StoreError(f"{store.path} holds a tree run, not a baseline; use a new --store")
        if mark != samples:  # the config check refuses this first; kept for stores edited by hand
            raise StoreError(f"{store.path} is a baseline of {mark} samples, not {samples}")
        return False
    plan = baseline_plan(samples, config.leaf_samples)
    root = Node(
        key=root_key(),
        parent=None,
        depth=0,
        position="",
        path=[],
        state="planned",
        plan=plan,
        target=samples,
        request_limit=request_limit(samples, config.samples_per_request, config.requests_per_sample),
        calls_done=0,
        kept=0,
    )
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    store.create_baseline(root, samples, created)
    return True
