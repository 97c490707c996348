"""What the ETA of `treesynth status` reads from a store beyond
``Store.counts``: the nodes not yet split and the leaves' shortfalls."""

from __future__ import annotations

from typing import Any

UNSPLIT_STATES = ("open", "pivoted", "criterion")
LEAF_STATES = ("leaf", "planned", "done")


def progress(store) -> dict[str, Any]:
    """Nodes not yet split by (depth, state), leaves, leaves not yet planned,
    and each planned leaf's missing samples (target - kept)."""
    marks = ", ".join("?" * len(UNSPLIT_STATES))
    unsplit = {
        (depth, state): count
        for depth, state, count in store.db.execute(
            f"SELECT depth, state, count(*) FROM nodes WHERE state IN ({marks}) GROUP BY depth, state", UNSPLIT_STATES
        ).fetchall()
    }
    states = dict(store.db.execute("SELECT state, count(*) FROM nodes GROUP BY state").fetchall())
    shortfalls = [
        row[0]
        for row in store.db.execute(
            "SELECT coalesce(target, 0) - coalesce(kept, 0) FROM nodes WHERE state = 'planned'"
        ).fetchall()
    ]
    return {
        "unsplit": unsplit,
        "leaves": sum(states.get(s, 0) for s in LEAF_STATES),
        "unplanned_leaves": states.get("leaf", 0),
        "shortfalls": shortfalls,
    }
