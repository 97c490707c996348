"""Numbered migrations, each applied in its own transaction and recorded by
name in ``_treesynth_migrations``. Never edit an applied migration: add one."""

from __future__ import annotations

from typing import Callable

import sqlite_utils

MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = []


def migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["runs"].create(
        {
            "id": int,
            "config": str,  # JSON of the TaskConfig in field order; config_hash is over its canonical JSON
            "config_hash": str,
            "model": str,  # canonical JSON of the model fingerprint
            "seed": int,
            "treesynth_version": str,
            "created": str,
        },
        pk="id",
    )
    db["sessions"].create(
        {"id": int, "started": str, "pid": int, "settings": str, "resumed": int},
        pk="id",
    )
    db["nodes"].create(
        {
            "key": str,
            "parent": str,
            "depth": int,
            "position": str,  # dotted child indices, zero-padded: sorts in tree order
            "path": str,  # JSON [[dimension, value or [values]], ...] from the root
            "state": str,  # open, pivoted, criterion, split, leaf, planned, done
            "pivots": str,
            "dimension": str,  # the criterion chosen at this node
            "labels": str,
            "value_list": str,  # the dimension's values after coverage
            "infinite": int,
            "reason": str,  # why a node at depth < max became a leaf
            "plan": str,  # JSON list: samples asked for by each leaf call
            "calls_done": int,  # leaf calls finished, in order
        },
        pk="key",
        not_null={"depth", "position", "path", "state"},
    )
    db["nodes"].create_index(["depth", "position"])
    db["calls"].create(
        {
            "key": str,
            "node": str,
            "role": str,  # pivots, criterion, coverage, leaf
            "step": str,  # e.g. "coverage:2", "leaf:7"
            "attempt": int,
            "request": str,
            "response": str,
            "completion_tokens": int,
            "prompt_tokens": int,
            "seconds": float,
            "finish_reason": str,
            "session": int,
        },
        pk="key",
    )
    db["calls"].create_index(["node", "step", "attempt"])
    db["samples"].create(
        {
            "leaf": str,
            "call": int,
            "idx": int,
            "position": str,  # the leaf's position, so export streams in tree order from one index
            "data": str,  # canonical JSON of the sample's fields
            "attributes": str,  # JSON {dimension: value}
            "hash": str,
        },
        pk=("leaf", "call", "idx"),
    )
    db["samples"].create_index(["position", "call", "idx"])


@migration
def m002_baseline(db: sqlite_utils.Database) -> None:
    # Marks a store made by `treesynth baseline` (temperature sampling from the
    # root prompt alone): one row, written with the root's plan.
    db["baseline"].create({"id": int, "samples": int, "created": str}, pk="id")


@migration
def m003_kept_and_dropped(db: sqlite_utils.Database) -> None:
    # The method's content contract (engine/contract.py), compared on resume.
    db["runs"].add_column("method", str)
    db["runs"].add_column("method_hash", str)
    # Rounds of --samples top-up done: part of the run's progress, so a
    # resumed run tops up exactly as often as an uninterrupted one.
    db["runs"].add_column("topup_rounds", int)
    # A leaf wants `target` samples; `calls_done` counts its requests, `kept`
    # the samples it kept.
    db["nodes"].add_column("target", int)
    db["nodes"].add_column("kept", int)
    db["nodes"].add_column("request_limit", int)  # calls_done may not pass it
    # The embedding a kept sample was judged by (float32), read back on resume.
    db["samples"].add_column("vector", bytes)
    db["dropped"].create(
        {
            "leaf": str,
            "call": int,  # the leaf request that made it
            "idx": int,
            "data": str,  # canonical JSON of the sample, or the raw answer when unusable
            "reason": str,  # e.g. "exact duplicate", "near duplicate (cosine 0.953)", "template placeholder"
        },
        pk=("leaf", "call", "idx"),
    )


def apply(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations; returns the names applied."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS _treesynth_migrations (name TEXT PRIMARY KEY, applied TEXT NOT NULL)"
    )
    done = {row[0] for row in db.execute("SELECT name FROM _treesynth_migrations").fetchall()}
    applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            fn(db)
            db.execute(
                "INSERT INTO _treesynth_migrations (name, applied) VALUES (?, datetime('now'))", [name]
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
