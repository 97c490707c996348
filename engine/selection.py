"""What the independent sentence embedder decides, deterministically.

- **Which criterion.** Every usable criterion answer of a node is a
  candidate; the one with the highest score wins, ties to the earlier
  attempt. score = balance + relevance, where balance is the entropy of the
  pivots' labels divided by log(number of pivots) (1: every pivot in its own
  group; 0: one group) and relevance is the mean cosine similarity between
  "dimension: value" and the task description over the distinct values (a
  split on ``json`` or ``1.5`` scores near 0 for kitchen-appliance reviews).
- **Which samples to keep.** A sample is dropped, with its reason recorded in
  the store, when its text (its string fields joined by newlines) fails
  ``checks.sample_problem``, when its normalised text (lower case, words
  only) equals a kept sample's, or when its embedding has cosine similarity
  >= ``near`` with any sample kept so far in the run, in this leaf or any
  other. Each text is embedded alone, so its vector never depends on what was
  embedded before it; the decision and the vector of every kept sample are
  committed with the leaf request that made it, so a resumed run reads them
  back instead of deciding again."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import xxhash

from treesynth.engine.checks import normalise, sample_problem, words_of

VECTOR_DTYPE = np.float32


def sample_text(sample: dict[str, Any]) -> str:
    """The text a sample is judged by: its string fields, joined by newlines."""
    return "\n".join(v for v in sample.values() if isinstance(v, str))


def text_key(text: str) -> int:
    return xxhash.xxh3_64_intdigest(normalise(text).encode("utf-8"))


def task_words(description: str) -> frozenset[str]:
    return frozenset(words_of(description))


# -- criterion --------------------------------------------------------------------


def label_balance(labels: Sequence[str]) -> float:
    counts = Counter(normalise(label) for label in labels)
    n = len(labels)
    if n < 2:
        return 0.0
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    return entropy / math.log(n)


def criterion_score(dimension: str, labels: Sequence[str], description: str, embedder) -> float:
    values = list(dict.fromkeys(labels))
    vectors = embedder.embed([description] + [f"{dimension}: {v}" for v in values])
    relevance = float(np.mean(vectors[1:] @ vectors[0]))
    return round(label_balance(labels) + relevance, 6)


# -- samples ----------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    keep: bool
    reason: str | None  # why dropped
    vector: np.ndarray | None  # the kept sample's embedding


class SampleFilter:
    """The run's memory of kept samples: normalised-text keys and embeddings."""

    def __init__(self, embedder, near: float, words: frozenset[str]):
        self.embedder = embedder
        self.near = near
        self.words = words
        self.keys: set[int] = set()
        self._vectors = np.zeros((0, 0), dtype=VECTOR_DTYPE)
        self.count = 0

    def load(self, kept: Iterable[tuple[str, bytes | None]]) -> None:
        """Remember the samples a store already holds: (text, stored vector)."""
        rows = []
        for text, blob in kept:
            self.keys.add(text_key(text))
            rows.append(np.frombuffer(blob, dtype=VECTOR_DTYPE) if blob else self._embed(text))
        for row in rows:
            self._append(row)

    def judge(self, samples: Sequence[dict[str, Any]], dimensions: Sequence[str] = ()) -> list[Verdict]:
        """A verdict per sample, in order; kept ones are remembered at once,
        so a later sample of the same answer is judged against them."""
        verdicts = []
        for sample in samples:
            text = sample_text(sample)
            problem = sample_problem(text, self.words, dimensions)
            if problem:
                verdicts.append(Verdict(False, problem, None))
                continue
            key = text_key(text)
            if key in self.keys:
                verdicts.append(Verdict(False, "exact duplicate", None))
                continue
            vector = self._embed(text)
            if self.count:
                similarity = float(np.max(self._vectors[: self.count] @ vector))
                if similarity >= self.near:
                    verdicts.append(Verdict(False, f"near duplicate (cosine {similarity:.3f})", None))
                    continue
            self.keys.add(key)
            self._append(vector)
            verdicts.append(Verdict(True, None, vector))
        return verdicts

    def _embed(self, text: str) -> np.ndarray:
        return np.asarray(self.embedder.embed([text])[0], dtype=VECTOR_DTYPE)

    def _append(self, vector: np.ndarray) -> None:
        if self.count == self._vectors.shape[0]:
            grown = np.zeros((max(64, 2 * self.count), vector.shape[0]), dtype=VECTOR_DTYPE)
            if self.count:
                grown[: self.count] = self._vectors[: self.count]
            self._vectors = grown
        self._vectors[self.count] = vector
        self.count += 1
