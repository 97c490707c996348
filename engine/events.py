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
class BatchStarted:
    calls: int  # calls of the batch
    sent: int  # of them, going to the model (the rest are answered from the store)
    in_flight: int  # sequences the model decodes at once


@dataclass(frozen=True)
class AnswerRejected:
    node: str
    step: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class CriterionChosen:
    node: str
    dimension: str
    score: float  # engine/selection.py: label balance + relevance to the task
    candidates: int  # usable answers it was chosen from


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
    planned_samples: int  # the leaves' targets, summed
    kept_samples: int  # already in the store


@dataclass(frozen=True)
class LeafCallDone:
    node: str
    call: int
    samples: int  # kept
    dropped: int = 0  # duplicates, debris, an unusable answer


@dataclass(frozen=True)
class TopUp:
    round: int
    shortfall: int  # samples still missing from --samples
    leaves: int  # leaves asked for more


@dataclass(frozen=True)
class RunFinished:
    samples: int
    wanted: int  # the leaves' targets, summed
    dropped: int
    calls_sent: int
    calls_replayed: int
    model_seconds: float
    wall_seconds: float
    root_reason: str | None = None  # why the root could not be split, when it could not


Event = (
    RunStarted | CallFinished | BatchStarted | AnswerRejected | CriterionChosen | NodeSplit | NodeBecameLeaf | TreeBuilt
    | LeafCallDone | TopUp | RunFinished
)
