"""Leaf synthesis planning: how many calls each leaf makes, and how many
samples each call asks for.

A leaf makes ``infinite_samples ** k`` calls (k: infinite dimensions on its
path) of ``leaf_samples`` samples each. A ``max_samples`` budget smaller than
that total scales every leaf down in proportion, by largest remainder with
ties broken in tree order, so the plan is exact and deterministic."""

from __future__ import annotations

import random
from typing import Any, Sequence


def leaf_call_count(infinite_dimensions: int, infinite_samples: int) -> int:
    return infinite_samples**infinite_dimensions


def plan_leaves(
    infinite_counts: Sequence[int], leaf_samples: int, infinite_samples: int, max_samples: int | None
) -> list[list[int]]:
    """For each leaf (in tree order), the sample count of each of its calls."""
    wanted = [leaf_call_count(k, infinite_samples) * leaf_samples for k in infinite_counts]
    total = sum(wanted)
    if max_samples is not None and total > max_samples:
        targets = _largest_remainder(wanted, max_samples)
    else:
        targets = wanted
    plans = []
    for target in targets:
        full, rest = divmod(target, leaf_samples)
        plans.append([leaf_samples] * full + ([rest] if rest else []))
    return plans


def _largest_remainder(weights: Sequence[int], budget: int) -> list[int]:
    total = sum(weights)
    exact = [w * budget / total for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: budget - sum(shares)]:
        shares[i] += 1
    return shares


def draw_attributes(path: Sequence[Sequence[Any]], seed: int) -> list[tuple[str, str]]:
    """The path's (dimension, value) pairs, an infinite dimension's value drawn
    from its list with a RNG seeded by the caller (run seed, node, step, attempt)."""
    rng = random.Random(seed)
    attributes = []
    for dimension, value in path:
        if isinstance(value, list):
            value = value[rng.randrange(len(value))]
        attributes.append((dimension, value))
    return attributes


def infinite_dimensions(path: Sequence[Sequence[Any]]) -> int:
    return sum(1 for _, value in path if isinstance(value, list))
