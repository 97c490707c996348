"""Read-only queries behind ``treesynth report``: plain rows, in a fixed order.

Every function takes a Store and returns dataclasses or tuples; nothing here
renders. Stores made before a column or table existed (``nodes.target``,
``samples.vector``, ``dropped``) are read as far as they go: a missing
column reads as None, a missing table as no rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from treesynth.store import Store


@dataclass(frozen=True)
class NodeRow:
    key: str
    parent: str | None
    depth: int
    position: str
    path: list  # [[dimension, value or [values]], ...] from the root
    state: str
    dimension: str | None  # the criterion chosen at this node
    values: list | None  # the dimension's values after coverage
    infinite: bool
    reason: str | None  # why a node above the maximum depth became a leaf
    target: int | None  # samples the leaf wants (None: not planned yet, or an old store)
    kept: int  # kept samples in the store
    dropped: int  # dropped samples in the store


@dataclass(frozen=True)
class Usage:
    """Model calls of one role or one session."""

    name: str
    calls: int
    completion_tokens: int
    prompt_tokens: int
    seconds: float


@dataclass(frozen=True)
class SessionRow:
    id: int | None  # None: calls committed without a session (made outside the CLI)
    started: str | None
    resumed: bool
    command: str  # "run", "baseline", "balance", ...
    usage: Usage  # the calls SENT in this session; replayed calls are not sent again


def _columns(store: Store, table: str) -> set[str]:
    return {row[1] for row in store.db.execute(f"PRAGMA table_info({table})").fetchall()}


def _has_table(store: Store, table: str) -> bool:
    return table in store.db.table_names()


def nodes(store: Store) -> list[NodeRow]:
    """Every node in tree order (positions sort depth-first), with its sample counts."""
    cols = _columns(store, "nodes")
    target = "n.target" if "target" in cols else "NULL"
    dropped = "(SELECT count(*) FROM dropped d WHERE d.leaf = n.key)" if _has_table(store, "dropped") else "0"
    sql = (
        "SELECT n.key, n.parent, n.depth, n.position, n.path, n.state, n.dimension, n.value_list, n.infinite, "
        f"n.reason, {target}, (SELECT count(*) FROM samples s WHERE s.leaf = n.key), {dropped} "
        "FROM nodes n ORDER BY n.position, n.key"
    )
    return [
        NodeRow(
            key=key,
            parent=parent,
            depth=depth,
            position=position,
            path=json.loads(path),
            state=state,
            dimension=dimension,
            values=json.loads(values) if values is not None else None,
            infinite=bool(infinite),
            reason=reason,
            target=target_value,
            kept=kept,
            dropped=dropped_count,
        )
        for key, parent, depth, position, path, state, dimension, values, infinite, reason, target_value, kept, dropped_count in store.db.execute(sql).fetchall()
    ]


def first_samples(store: Store, per_leaf: int) -> dict[str, list[str]]:
    """Per leaf key: the data JSON of its first ``per_leaf`` kept samples, in export order."""
    rows = store.db.execute(
        "SELECT leaf, data FROM (SELECT leaf, data, call, idx, "
        "row_number() OVER (PARTITION BY leaf ORDER BY call, idx) AS n FROM samples) "
        "WHERE n <= ? ORDER BY leaf, call, idx",
        [per_leaf],
    ).fetchall()
    out: dict[str, list[str]] = {}
    for leaf, data in rows:
        out.setdefault(leaf, []).append(data)
    return out


_USAGE = "count(*), coalesce(sum(completion_tokens), 0), coalesce(sum(prompt_tokens), 0), coalesce(sum(seconds), 0.0)"


def usage_by_role(store: Store) -> list[Usage]:
    """Calls, tokens and model seconds per role, in the method's order, then any other role by name."""
    rows = store.db.execute(
        f"SELECT role, {_USAGE} FROM calls GROUP BY role ORDER BY "
        "CASE role WHEN 'pivots' THEN 0 WHEN 'criterion' THEN 1 WHEN 'coverage' THEN 2 WHEN 'leaf' THEN 3 ELSE 4 END, role"
    ).fetchall()
    return [Usage(role, calls, tokens, prompt, float(seconds)) for role, calls, tokens, prompt, seconds in rows]


def sessions(store: Store) -> list[SessionRow]:
    """Every session in order with the calls sent in it; a last row (id None)
    for calls that name no session, when there are any."""
    usage = {
        session: Usage("", calls, tokens, prompt, float(seconds))
        for session, calls, tokens, prompt, seconds in store.db.execute(
            f"SELECT session, {_USAGE} FROM calls GROUP BY session"
        ).fetchall()
    }
    out = []
    for sid, started, settings, resumed in store.db.execute(
        "SELECT id, started, settings, resumed FROM sessions ORDER BY id"
    ).fetchall():
        command = _command(settings)
        out.append(SessionRow(sid, started, bool(resumed), command, usage.pop(sid, Usage("", 0, 0, 0, 0.0))))
    leftover = list(usage.values())  # calls of no session, or of a session row that is gone
    if leftover:
        total = Usage(
            "",
            sum(u.calls for u in leftover),
            sum(u.completion_tokens for u in leftover),
            sum(u.prompt_tokens for u in leftover),
            sum(u.seconds for u in leftover),
        )
        out.append(SessionRow(None, None, False, "", total))
    return out


def _command(settings: str | None) -> str:
    try:
        data: Any = json.loads(settings or "{}")
    except ValueError:
        return "run"
    command = data.get("command") if isinstance(data, dict) else None
    return command if isinstance(command, str) else "run"


def vector_counts(store: Store) -> tuple[int, int]:
    """(kept samples, of them with a stored embedding)."""
    if "vector" not in _columns(store, "samples"):
        return store.sample_count(), 0
    return store.db.execute("SELECT count(*), count(vector) FROM samples").fetchone()


def sample_vectors(store: Store) -> Iterator[bytes]:
    """The stored embeddings of the kept samples that have one, in export order; streams."""
    if "vector" not in _columns(store, "samples"):
        return
    cursor = store.db.execute("SELECT vector FROM samples WHERE vector IS NOT NULL ORDER BY position, call, idx")
    while batch := cursor.fetchmany(2048):
        for (vector,) in batch:
            yield vector
