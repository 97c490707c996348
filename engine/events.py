"""Typed events the engine yields; the CLI only renders them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunStarted:
    resumed: bool
    nodes: int
    samples: int


@dataclass(frozen=True)
class CallFinished:
    role: str
    node: str
    completion_tokens: int
    seconds: float
    replayed: bool  # answered from the store's call log, not sent to the model


@dataclass(frozen=True)
class AnswerRejected:
    node: str
    step: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class NodeSplit:
    node: str
    depth: int
    dimension: str
    values: tuple[str, ...]
    infinite: bool


@dataclass(frozen=True)
class NodeBecameLeaf:
    node: str
    depth: int
    reason: str | None  # None: the node is at max depth


@dataclass(frozen=True)
class TreeBuilt:
    leaves: int
    leaf_calls: int
    planned_samples: int
    calls_done: int


@dataclass(frozen=True)
class LeafCallDone:
    node: str
    call: int
    samples: int


@dataclass(frozen=True)
class RunFinished:
    samples: int
    calls_sent: int
    calls_replayed: int
    model_seconds: float
    wall_seconds: float


Event = (
    RunStarted | CallFinished | AnswerRejected | NodeSplit | NodeBecameLeaf | TreeBuilt | LeafCallDone | RunFinished
)
