"""Leaf synthesis planning: how many calls each leaf makes, and how many
samples each call asks for.

A leaf makes ``infinite_samples ** k`` calls (k: infinite dimensions on its
path) of ``leaf_samples`` samples each. A ``max_samples`` budget smaller than
that total scales every leaf down in proportion, by largest remainder with
ties broken in tree order, so the plan is exact and deterministic. The sum of
a leaf's plan is its target; with ``--samples N`` every leaf's target is N
split equally instead (``equal_targets``).

A leaf reaches its target with leaf requests of ``samples_per_request``
samples each, every request drawing its infinite values afresh; dropped
samples (duplicates, debris) are made up by further requests, at most
``request_limit`` in all. With ``--samples N``, a run still short of N when
every leaf is done asks the leaves with the fewest samples for the
shortfall (``topup_extras``), each with ``request_limit`` of the extra
samples in new requests, for up to ``TOPUP_ROUNDS`` rounds."""

from __future__ import annotations

import math
import random
from typing import Any, Sequence


TOPUP_ROUNDS = 3


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
    return [call_sizes(target, leaf_samples) for target in targets]


def call_sizes(samples: int, per_call: int) -> list[int]:
    """Samples asked for by each call: full calls, then the remainder."""
    full, rest = divmod(samples, per_call)
    return [per_call] * full + ([rest] if rest else [])


def _largest_remainder(weights: Sequence[int], budget: int) -> list[int]:
    total = sum(weights)
    exact = [w * budget / total for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: budget - sum(shares)]:
        shares[i] += 1
    return shares


def equal_targets(leaves: int, samples: int) -> list[int]:
    """``--samples N``: N spread equally over the leaves in tree order, the
    remainder one each to the first leaves."""
    if leaves == 0:
        return []
    return _largest_remainder([1] * leaves, samples)


def request_limit(target: int, samples_per_request: int, requests_per_sample: float) -> int:
    """The most leaf requests a leaf makes for ``target`` samples: enough for
    ``requests_per_sample`` times the samples, and always one spare."""
    if target <= 0:
        return 0
    return math.ceil(requests_per_sample * target / samples_per_request) + 1


def topup_extras(kept: Sequence[int], shortfall: int) -> list[int]:
    """How many more samples each leaf is asked for, ``shortfall`` in all:
    one at a time to the leaves in order of fewest kept samples (then tree
    order), so the dataset stays as even as the leaves allow."""
    extras = [0] * len(kept)
    order = sorted(range(len(kept)), key=lambda i: (kept[i], i))
    if not order:
        return extras
    for step in range(shortfall):
        extras[order[step % len(order)]] += 1
    return extras


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
