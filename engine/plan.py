"""What a run will cost before it starts: nodes, model calls by role, samples,
tokens and time, as a worst case and as an expected case. Pure arithmetic
over a TaskConfig; no model, no store, no I/O (``treesynth plan`` measures
and prints, engine/cli/plan.py).

Worst case (an upper bound, each count bounded on its own):

- the tree: every node below max depth splits into ``max_values`` values
  (more would make the dimension infinite: one child), so there are
  ``sum(max_values ** d for d < depth)`` internal nodes and
  ``max_values ** depth`` leaves;
- each internal node: every pivot request retried ``call_retries`` times,
  ``criterion_retries`` criterion attempts, ``coverage_rounds`` coverage rounds;
- leaves: each leaf makes its full request limit (``request_limit``: every
  sample dropped until the limit), and with ``--samples N`` every one of the
  ``TOPUP_ROUNDS`` top-up rounds asks again for all N; without ``--samples``
  a leaf's target is ``leaf_samples * infinite_samples ** k``, so where
  ``infinite_samples`` > ``max_values`` the trees with infinite dimensions
  are counted too (the largest of the trees with j infinite levels and
  depth - j finite ones is taken). Under ``--max-samples`` a tree that mixes
  both kinds of split can round its leaf targets unevenly and so make up to
  one more request per leaf than this;
- every answer runs to ``max_tokens``.

Expected case (a simple deterministic rule, not a prediction of what a model
does; small models usually split less):

- every step succeeds at its first try: ``ceil(pivots / samples_per_request)``
  pivot requests, ``min(criterion_candidates, criterion_retries)`` criterion
  attempts (the engine stops at ``criterion_candidates`` usable answers);
- every split has ``b = min(max_values, pivots + 10 * coverage_rounds)``
  values, all finite: the criterion labels the pivots with ``min(pivots, b)``
  distinct values and each coverage round adds ``COVERAGE_MAX_NEW`` (10) more,
  so coverage takes ``max(1, ceil((b - min(pivots, b)) / 10))`` rounds;
- no sample is dropped: a leaf with target t makes
  ``ceil(t / samples_per_request)`` requests and no top-up round runs;
- tokens: pivot and leaf calls take the measured tokens a sample
  (``Rates``); criterion and coverage answers are assumed to take
  ``ANSWER_FRAME_TOKENS`` + ``PHRASE_TOKENS`` a phrase (pivots + 1 phrases;
  10), not measured; time = model load + calls x the measured seconds a call
  beyond decoding + tokens x the measured seconds a token. Model time only:
  the sentence embedder and the engine's own work are not counted.

``remaining_calls`` applies the same expected rule to a run in progress (for
the ETA of ``treesynth status``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from treesynth.engine.config import TaskConfig
from treesynth.engine.leaves import TOPUP_ROUNDS, request_limit
from treesynth.engine.schemas import COVERAGE_MAX_NEW

ROLES = ("pivots", "criterion", "coverage", "leaf")

# Answer sizes of the two steps whose answers are a few short phrases: about
# 8 tokens of JSON around 3 tokens a phrase (SmolLM2's tokenizer on typical
# answers: 10 labels took 37 tokens). Assumed, not measured by the probe.
PHRASE_TOKENS = 3
ANSWER_FRAME_TOKENS = 8


@dataclass(frozen=True)
class Counts:
    """One case of a plan: the tree's size, model calls by role, samples kept."""

    internal: int  # nodes that are split
    leaves: int
    pivots: int
    criterion: int
    coverage: int
    leaf: int
    samples: int  # samples in the dataset

    @property
    def nodes(self) -> int:
        return self.internal + self.leaves

    @property
    def calls(self) -> int:
        return self.pivots + self.criterion + self.coverage + self.leaf

    def by_role(self) -> dict[str, int]:
        return {role: getattr(self, role) for role in ROLES}


@dataclass(frozen=True)
class Plan:
    expected: Counts
    worst: Counts
    branching: int  # values per split in the expected case
    worst_tokens: int  # every answer at max_tokens


@dataclass(frozen=True)
class Rates:
    """Measured speed of one model on this machine (by a probe, or bench.json)."""

    tokens_per_sample: float  # completion tokens one pivot or leaf sample takes
    seconds_per_token: float  # decoding, constrained
    seconds_per_call: float  # per call beyond decoding: prompt evaluation, set-up
    load_seconds: float  # loading the model, once a run
    source: str  # what measured it, in words


@dataclass(frozen=True)
class TimeEstimate:
    expected_tokens: int
    expected_seconds: float
    worst_seconds: float


# -- the two cases ---------------------------------------------------------


def pivot_requests(config: TaskConfig) -> int:
    return math.ceil(config.pivots / config.samples_per_request)


def expected_branching(config: TaskConfig) -> int:
    return min(config.max_values, config.pivots + COVERAGE_MAX_NEW * config.coverage_rounds)


def expected_coverage_rounds(config: TaskConfig) -> int:
    b = expected_branching(config)
    return min(config.coverage_rounds, max(1, math.ceil((b - min(config.pivots, b)) / COVERAGE_MAX_NEW)))


def _internal_nodes(branching: int, depth: int) -> int:
    return sum(branching**d for d in range(depth))


def _equal_split(total: int, parts: int) -> list[tuple[int, int]]:
    """(target, how many leaves have it): ``total`` spread over ``parts`` as
    equal_targets does (they differ by at most one)."""
    if parts <= 0:
        return []
    q, r = divmod(total, parts)
    return [(t, n) for t, n in ((q + 1, r), (q, parts - r)) if n]


def _leaf_targets(config: TaskConfig, leaves: int, infinite_levels: int = 0) -> list[tuple[int, int]]:
    """The leaves' targets as (target, count) on a tree of ``leaves`` leaves,
    each with ``infinite_levels`` infinite dimensions on its path."""
    if config.samples is not None:
        return _equal_split(config.samples, leaves)
    per_leaf = config.leaf_samples * config.infinite_samples**infinite_levels
    if config.max_samples is not None and per_leaf * leaves > config.max_samples:
        return _equal_split(config.max_samples, leaves)
    return [(per_leaf, leaves)]


def expected_counts(config: TaskConfig) -> Counts:
    depth = config.depth
    b = expected_branching(config)
    internal = _internal_nodes(b, depth)
    leaves = b**depth
    targets = _leaf_targets(config, leaves)
    return Counts(
        internal=internal,
        leaves=leaves,
        pivots=internal * pivot_requests(config),
        criterion=internal * min(config.criterion_candidates, config.criterion_retries),
        coverage=internal * expected_coverage_rounds(config),
        leaf=sum(n * math.ceil(t / config.samples_per_request) for t, n in targets),
        samples=sum(t * n for t, n in targets),
    )


def worst_counts(config: TaskConfig) -> Counts:
    depth, v = config.depth, config.max_values
    internal = _internal_nodes(v, depth)
    leaf_requests = samples = 0
    # j infinite levels above each leaf, depth - j finite ones (only j = 0
    # can matter unless infinite_samples > max_values).
    for j in range(depth + 1) if config.infinite_samples > v else (0,):
        targets = _leaf_targets(config, v ** (depth - j), j)
        requests = sum(n * request_limit(t, config.samples_per_request, config.requests_per_sample) for t, n in targets)
        if config.samples is not None:
            requests *= 1 + TOPUP_ROUNDS  # each round may ask for all N again
        leaf_requests = max(leaf_requests, requests)
        samples = max(samples, sum(t * n for t, n in targets))
    return Counts(
        internal=internal,
        leaves=v**depth,
        pivots=internal * pivot_requests(config) * config.call_retries,
        criterion=internal * config.criterion_retries,
        coverage=internal * config.coverage_rounds,
        leaf=leaf_requests,
        samples=samples,
    )


def plan(config: TaskConfig) -> Plan:
    worst = worst_counts(config)
    return Plan(expected_counts(config), worst, expected_branching(config), worst.calls * config.max_tokens)


# -- tokens and time -----------------------------------------------------------


def tokens_per_call(config: TaskConfig, rates: Rates) -> dict[str, float]:
    """Expected completion tokens of one call of each role."""
    return {
        "pivots": rates.tokens_per_sample * min(config.samples_per_request, config.pivots),
        "criterion": ANSWER_FRAME_TOKENS + PHRASE_TOKENS * (config.pivots + 1),
        "coverage": ANSWER_FRAME_TOKENS + PHRASE_TOKENS * COVERAGE_MAX_NEW,
        "leaf": rates.tokens_per_sample * config.samples_per_request,
    }


def estimate_time(the_plan: Plan, config: TaskConfig, rates: Rates) -> TimeEstimate:
    per_call = tokens_per_call(config, rates)
    expected = the_plan.expected
    tokens = {role: calls * per_call[role] for role, calls in expected.by_role().items()}
    # A leaf request asks for no more samples than its leaf still needs.
    tokens["leaf"] = min(tokens["leaf"], expected.samples * rates.tokens_per_sample)
    expected_tokens = sum(tokens.values())
    expected_seconds = rates.load_seconds + expected.calls * rates.seconds_per_call + expected_tokens * rates.seconds_per_token
    worst = the_plan.worst
    worst_seconds = rates.load_seconds + worst.calls * rates.seconds_per_call + the_plan.worst_tokens * rates.seconds_per_token
    return TimeEstimate(round(expected_tokens), expected_seconds, worst_seconds)


# -- a run in progress -----------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Where a stored run stands, as ``remaining_calls`` needs it."""

    unsplit: dict[tuple[int, str], int]  # (depth, state) -> nodes not yet split: open, pivoted, criterion
    leaves: int  # nodes that are leaves, planned or not
    unplanned_leaves: int  # leaves whose targets are not yet set (state 'leaf')
    shortfalls: list[int]  # target - kept of each planned leaf


def remaining_calls(config: TaskConfig, progress: Progress) -> int:
    """Model calls a run still needs under the expected rule: each unsplit
    node finishes its steps and grows a full expected subtree, and the
    leaves make ceil(missing samples / samples_per_request) requests."""
    b = expected_branching(config)
    piv = pivot_requests(config)
    crit = min(config.criterion_candidates, config.criterion_retries)
    cov = expected_coverage_rounds(config)
    own = {"open": piv + crit + cov, "pivoted": crit + cov, "criterion": cov}
    calls = 0
    future_leaves = 0
    for (depth, state), count in progress.unsplit.items():
        below = max(config.depth - depth, 1)
        descendants = _internal_nodes(b, below) - 1  # internal nodes under it
        calls += count * (own.get(state, 0) + descendants * (piv + crit + cov))
        future_leaves += count * b**below
    if progress.unsplit or progress.unplanned_leaves:
        targets = _leaf_targets(config, progress.leaves + future_leaves)
        calls += sum(n * math.ceil(t / config.samples_per_request) for t, n in targets)
    else:
        calls += sum(math.ceil(max(s, 0) / config.samples_per_request) for s in progress.shortfalls)
    return calls


# -- words -------------------------------------------------------------------------


def summary_line(the_plan: Plan) -> str:
    e, w = the_plan.expected, the_plan.worst
    nodes = f"{w.nodes:,}" if e.nodes == w.nodes else f"{e.nodes:,} to {w.nodes:,}"
    return (
        f"plan: {e.calls:,} model calls and {e.samples:,} samples expected, at most {w.calls:,} calls "
        f"and {w.samples:,} samples ({nodes} nodes); `treesynth plan` with the same flags explains"
    )


def about(seconds: float) -> str:
    """An estimated duration: '~3.2 min', or 'under 1 s'."""
    return duration(seconds) if seconds < 1 else "~" + duration(seconds)


def approx(n: float) -> str:
    """An estimated count to two significant figures: 5335 -> '~5,300'."""
    n = round(n)
    if n >= 100:
        n = round(n, 2 - len(str(n)))
    return f"~{n:,}"


def duration(seconds: float) -> str:
    """A duration to two significant figures at most: '45 s', '3.2 min', '1.5 h', '12 days'."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size * (2 if unit == "days" else 1):
            return f"{_two_figures(seconds / size)} {unit}"
    return "under 1 s" if seconds < 1 else f"{_two_figures(seconds)} s"


def _two_figures(x: float) -> str:
    if x >= 10:
        return f"{round(x):,}"
    return f"{x:.1f}".removesuffix(".0")


LARGE_CALLS = 1000  # a worst case past this many calls gets a hint


def bounds_line(config: TaskConfig) -> str:
    def flag(name: str, value) -> str:
        return f"--{name} {'none' if value is None else value}"

    return "bounds: " + ", ".join(
        (
            flag("samples", config.samples),
            flag("max-samples", config.max_samples),
            flag("max-values", config.max_values),
            flag("infinite-samples", config.infinite_samples),
            flag("depth", config.depth),
        )
    )


def hint(the_plan: Plan, config: TaskConfig) -> str | None:
    """Which flag to lower, when the worst case is large; None when it is not."""
    worst = the_plan.worst
    if worst.calls <= LARGE_CALLS:
        return None
    v, d = config.max_values, config.depth
    growth = f"the tree grows as max_values^depth ({v}^{d} = {v**d:,} leaves at worst)"
    tree_calls = worst.calls - worst.leaf
    budget = config.samples if config.samples is not None else config.max_samples
    if tree_calls >= worst.leaf or (budget is not None and v**d >= budget):
        return f"hint: {growth}: lower --max-values or --depth first"
    if budget is None:
        lever = "--infinite-samples, " if config.infinite_samples > v else ""
        return f"hint: the leaf calls are unbounded by a budget and {growth}: give --samples N or --max-samples N, or lower {lever}--max-values or --depth"
    flag = "--samples" if config.samples is not None else "--max-samples"
    return f"hint: the leaf calls grow with {flag} ({budget:,}): lower {flag} first; {growth}"


def eta_text(stored_config: dict, progress: dict, calls: int, model_seconds: float, finished: bool) -> str:
    """`treesynth status`'s ETA: the mean model seconds per call so far times
    the calls the expected rule says remain (``remaining_calls``)."""
    if finished:
        return "none: the run is finished"
    if calls == 0:
        return "unknown (no model call made yet to time)"
    from pydantic import ValidationError

    try:
        config = TaskConfig.model_validate(stored_config)
    except (ValidationError, ValueError):
        return "unknown (the stored config is not one this version reads)"
    remaining = remaining_calls(config, Progress(**progress))
    per_call = model_seconds / calls
    return (
        f"{about(per_call * remaining)} of model time ({per_call:.2f} s a call over the {calls:,} calls so far, "
        f"x ~{remaining:,} calls left if every step succeeds at its first try and every split has "
        f"{expected_branching(config)} values)"
    )
