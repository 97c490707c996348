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


@migration
def m004_views(db: sqlite_utils.Database) -> None:
    # Read-only views for the common questions, for sqlite-utils and Datasette
    # (store/schema.py describes them; README "The store" is generated from it).
    for sql in VIEWS_V1:
        db.execute(sql)


VIEWS_V1 = (
    # One row per kept sample: the leaf's path as "dimension: value; ..." text
    # beside the sample's fields (data) and attributes as JSON.
    """CREATE VIEW samples_flat AS
    SELECT s.rowid AS id, s.leaf, s.position, s.call, s.idx,
           (SELECT group_concat(a.key || ': ' || a.value, '; ')
              FROM json_each(s.attributes) AS a) AS attributes_text,
           s.data, s.attributes, s.hash
      FROM samples AS s""",
    # One row per (sample, dimension): facet samples by any dimension.
    """CREATE VIEW sample_attributes AS
    SELECT s.rowid AS sample, s.leaf, a.key AS dimension,
           CASE WHEN a.type IN ('array', 'object') THEN a.value ELSE CAST(a.value AS TEXT) END AS value
      FROM samples AS s, json_each(s.attributes) AS a""",
    # One row per leaf: its path, target, requests made, samples kept and dropped.
    """CREATE VIEW leaves AS
    SELECT n.key, n.depth, n.position, n.path, n.state, n.target, n.calls_done AS requests,
           n.request_limit, (SELECT count(*) FROM samples AS s WHERE s.leaf = n.key) AS kept,
           (SELECT count(*) FROM dropped AS d WHERE d.leaf = n.key) AS dropped, n.reason
      FROM nodes AS n
     WHERE n.state IN ('leaf', 'planned', 'done')""",
    # What failed and why: nodes that became leaves before max depth, and
    # every sample not kept.
    """CREATE VIEW failures AS
    SELECT 'node' AS kind, n.key AS node, n.depth, n.path AS detail, n.reason
      FROM nodes AS n WHERE n.reason IS NOT NULL
    UNION ALL
    SELECT 'dropped sample', d.leaf, n.depth, d.data, d.reason
      FROM dropped AS d LEFT JOIN nodes AS n ON n.key = d.leaf""",
    # Model calls per session and role, with tokens and seconds.
    """CREATE VIEW calls_per_step AS
    SELECT session, role, count(*) AS calls, sum(prompt_tokens) AS prompt_tokens,
           sum(completion_tokens) AS completion_tokens, round(sum(seconds), 3) AS seconds
      FROM calls GROUP BY session, role""",
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
