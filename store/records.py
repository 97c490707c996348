"""The store's typed records: a run and a node as the engine, export, balance
and the CLI see them, with JSON columns decoded. Rows come in through
``from_row`` and go out through ``row``; only store/ reads or writes SQL.

A store made before a column existed (read-only, so not migrated) reads that
column as its default."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from treesynth.store.keys import canonical_json


def _known(cls, row: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in row.items() if k in names}


@dataclass(frozen=True)
class Run:
    """The one row of ``runs``: what the run makes and under which contract."""

    config: dict[str, Any]  # the TaskConfig as JSON, in field order (export writes fields in the schema's order)
    config_hash: str
    model: dict[str, Any]  # the model fingerprint
    seed: int
    treesynth_version: str | None = None
    created: str | None = None
    method: dict[str, Any] | None = None  # the content contract (engine/contract.py); None in the oldest stores
    method_hash: str | None = None
    topup_rounds: int = 0  # top-up rounds done (engine/leaves.py)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Run:
        data = _known(cls, row)
        data["config"] = json.loads(data["config"])
        data["model"] = json.loads(data["model"])
        data["method"] = json.loads(data["method"]) if data.get("method") else None
        data["topup_rounds"] = data.get("topup_rounds") or 0
        return cls(**data)

    def row(self) -> dict[str, Any]:
        return {
            # Key order kept (not canonical JSON): export writes fields in the schema's order.
            "config": json.dumps(self.config, ensure_ascii=False, separators=(",", ":")),
            "config_hash": self.config_hash,
            "model": canonical_json(self.model),
            "seed": self.seed,
            "treesynth_version": self.treesynth_version,
            "method": canonical_json(self.method) if self.method is not None else None,
            "method_hash": self.method_hash,
            "created": self.created,
        }


# Columns of ``nodes`` that hold JSON.
NODE_JSON_COLUMNS = ("path", "pivots", "labels", "value_list", "plan")


@dataclass(frozen=True)
class Node:
    """One row of ``nodes``: a node of the tree and where it stands.

    ``state`` goes open -> pivoted -> criterion -> split for an inner node,
    and leaf -> planned -> done for a leaf."""

    key: str
    parent: str | None
    depth: int
    position: str  # dotted child indices, zero-padded: sorts in tree order
    path: list  # [[dimension, value or [values]], ...] from the root
    state: str
    pivots: list | None = None  # the pivot samples
    dimension: str | None = None  # the criterion chosen at this node
    labels: list | None = None  # the criterion's label of each pivot sample
    value_list: list | None = None  # the dimension's values after coverage
    infinite: int | None = None
    reason: str | None = None  # why a node above the maximum depth became a leaf
    plan: list | None = None  # a leaf's samples asked for by each leaf call
    calls_done: int | None = None  # leaf calls finished, in order
    target: int | None = None  # samples the leaf keeps
    kept: int | None = None  # samples it kept so far
    request_limit: int | None = None  # leaf calls it may make

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Node:
        data = _known(cls, row)
        for column in NODE_JSON_COLUMNS:
            if data.get(column) is not None:
                data[column] = json.loads(data[column])
        return cls(**data)

    def row(self) -> dict[str, Any]:
        """The columns a new node is inserted with: those set, JSON encoded."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name != "parent":
                continue
            out[f.name] = canonical_json(value) if f.name in NODE_JSON_COLUMNS else value
        return out


@dataclass(frozen=True)
class Sample:
    """One kept sample, a row of ``samples``: the ``idx``-th sample of a leaf's
    request ``call``, placed by the leaf's ``position`` for export."""

    leaf: str
    call: int
    idx: int
    position: str
    data: dict[str, Any]  # the sample's fields
    attributes: dict[str, str]  # {dimension: value} the request was made under
    hash: str  # the sample's content key
    vector: bytes | None = None  # its embedding (float32), where the run's filter made one

    def row(self) -> dict[str, Any]:
        out = {
            "leaf": self.leaf,
            "call": self.call,
            "idx": self.idx,
            "position": self.position,
            "data": canonical_json(self.data),
            "attributes": canonical_json(self.attributes),
            "hash": self.hash,
        }
        if self.vector is not None:
            out["vector"] = self.vector
        return out


@dataclass(frozen=True)
class Dropped:
    """A sample not kept, a row of ``dropped``: what the model wrote (the
    whole answer where it could not be read as samples) and why."""

    leaf: str
    call: int
    idx: int
    data: str
    reason: str

    def row(self) -> dict[str, Any]:
        return {"leaf": self.leaf, "call": self.call, "idx": self.idx, "data": self.data, "reason": self.reason}
